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
    raise KeyCustodyError(f"key backend {config.backend!r} is not available; use pkcs11 or file")
