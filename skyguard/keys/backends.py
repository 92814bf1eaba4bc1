"""Open the key backend a policy's `keys:` section names: the one place that turns configuration
(and the PIN, read from the sealed store) into a backend object.

Every backend has the same methods: create, list, info, public_pem, remove, export_private (which
always fails for a private key), sign, decrypt, key_type, close. Not here: policy parsing
(skyguard/policy/keys.py), HTTP.
"""

from __future__ import annotations

from pathlib import Path

from skyguard.keys.types import KeyCustodyError


def secret_store(state_dir: Path):
    from skyguard.custody.store import SecretStore

    return SecretStore(Path(state_dir) / "secrets")


def open_backend(config, state_dir: Path):
    """config: a skyguard.policy.keys.KeysConfig. Raises KeyCustodyError with what to fix."""
    store = secret_store(state_dir)
    if config.backend == "file":
        from skyguard.keys.filebackend import FileBackend

        return FileBackend(store)
    if config.backend == "pkcs11":
        from skyguard.errors import CredentialError
        from skyguard.keys.pkcs11 import Pkcs11Backend

        try:
            pin = store.get(config.pin_secret)
        except CredentialError as e:
            raise KeyCustodyError(f"the token PIN (keys.pin_secret {config.pin_secret!r}) is not available: {e}") from None
        return Pkcs11Backend(config.module, config.token, pin.reveal())
    if config.backend == "tpm":
        from skyguard.keys.tpmbackend import TpmBackend

        return TpmBackend(state_dir)  # the TPM skyguard/tpm/device.py finds (--tcti of `tpm init`, env, device)
    raise KeyCustodyError(f"key backend {config.backend!r} is not available; use pkcs11, tpm or file")


def with_key_names(policy, stored: set[str], named: set[str]) -> set[str]:
    """`named` (the store names a policy uses, for `skyguard status`) with those of its keys:
    section: the token PIN; `cert.<key>` of each key named for TLS (credentials[].client_certificate,
    and tls_termination[].certificate where that name is a key: it has a stored certificate, as
    credproxy/termination.py decides, and is then no secret of its own); with the file backend each
    key the policy names (`key.<name>`), and every stored key counted as used: a key is removed
    with `skyguard key rm`, never offered to `secret rm`."""
    from skyguard.keys.filebackend import PREFIX as KEY_PREFIX
    from skyguard.keys.tlskey import CERT_PREFIX

    keys = policy.keys
    if keys is None:
        return named
    keyed_terminations = {t.certificate for t in policy.tls_termination if CERT_PREFIX + t.certificate in stored}
    tls = {c.client_certificate for c in policy.credentials if c.client_certificate} | keyed_terminations
    out = (named - keyed_terminations) | {CERT_PREFIX + name for name in tls}
    if keys.backend == "pkcs11" and keys.pin_secret:
        out.add(keys.pin_secret)
    if keys.backend == "file":
        out |= {KEY_PREFIX + name for name in tls | {g.name for g in keys.grants}}
        out |= {name for name in stored if name.startswith(KEY_PREFIX)}
    return out
