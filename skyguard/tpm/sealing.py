"""The sealed store's key, sealed by the TPM to a PCR policy (the key provider of the secret store).

`skyguard tpm seal-store` moves the store's 32-byte key from the file `secrets/sealing.key` into a
TPM sealed object kept in `secrets/sealing.key.tpm`: the object's private part is encrypted by the
storage primary key of this TPM (made again from the standard template on every use, so nothing
else need be persisted), and it opens only under a policy session whose PolicyPCR matches the PCR
values it was sealed to. So:

- a copy of the state dir on another host (another TPM) cannot even load the object;
- this host booted into another measured state (platform PCRs 0-7 by default: firmware, boot
  loader, Secure Boot state) cannot unseal it.

Why the platform PCRs and not skyguard's own PCR: skyguard's PCR moves on every policy load and
attach, so a key sealed to one of its values would not open at the next restart. A key sealed to
skyguard's launch would need a PCR of its own or a signed policy (PolicyAuthorize): not done.

Fail closed: once the key is sealed, a store whose TPM is missing or refuses stays shut (the
file key is gone, and no new one is made). Without a TPM the file key stays as it is.
Migration keeps the file key until the sealed copy has been unsealed and compared.

Not here: the store itself (skyguard/custody/store.py), the AEAD.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import stat
from pathlib import Path

from skyguard import config, fsutil
from skyguard.errors import BadInput, CredentialError
from skyguard.tpm.device import BANK, PLATFORM_PCRS, Tpm, TpmError, TpmUnavailable, find_tcti

SEALED_FILE = "sealing.key.tpm"
FILE_KEY = "sealing.key"  # skyguard.custody.store.SEALING_KEY_FILE
KEY_BYTES = 32
FORMAT = 1


class SealedKeyError(CredentialError):
    """The sealed key cannot be opened: no TPM, another TPM, or another measured state."""


def _selection(pcrs) -> str:
    return f"{BANK}:" + ",".join(str(p) for p in sorted(pcrs))


def storage_primary(tpm: Tpm) -> str:
    """The storage primary key (ECC P-256, owner hierarchy, default template): the same key every
    time on one TPM, another on any other TPM."""
    ctx = tpm.file("primary.ctx")
    tpm.run("tpm2_createprimary", "-C", "o", "-g", "sha256", "-G", "ecc", "-c", str(ctx))
    return str(ctx)


def seal(tpm: Tpm, key: bytes, pcrs=PLATFORM_PCRS) -> dict:
    """A sealed object holding `key`, openable only when `pcrs` hold their values of now."""
    pcrs = sorted(set(pcrs))
    if not pcrs or any(p not in range(24) for p in pcrs):
        raise BadInput("seal to PCRs among 0-23, e.g. 0,1,2,3,4,5,6,7")
    with tpm.locked():
        primary = storage_primary(tpm)
        trial, policy = tpm.file("trial.session"), tpm.file("pcr.policy")
        tpm.run("tpm2_startauthsession", "-S", str(trial))
        try:
            tpm.run("tpm2_policypcr", "-S", str(trial), "-l", _selection(pcrs), "-L", str(policy))
        finally:
            tpm.run("tpm2_flushcontext", str(trial), flush=False)
        pub, priv = tpm.file("sealed.pub"), tpm.file("sealed.priv")
        # The key goes in on stdin, never into a file; userwithauth clear: only the policy opens it.
        tpm.run("tpm2_create", "-C", primary, "-L", str(policy), "-i", "-", "-u", str(pub), "-r", str(priv),
                "-a", "fixedtpm|fixedparent|noda", input=key)
        blob = {"version": FORMAT, "bank": BANK, "pcrs": pcrs, "policy": policy.read_bytes().hex(),
                "public": base64.b64encode(pub.read_bytes()).decode(),
                "private": base64.b64encode(priv.read_bytes()).decode()}
        for f in (pub, priv, policy):
            f.unlink()
    return blob


def unseal(tpm: Tpm, blob: dict) -> bytes:
    try:
        pcrs = [int(p) for p in blob["pcrs"]]
        pub_bytes, priv_bytes = base64.b64decode(blob["public"]), base64.b64decode(blob["private"])
    except (KeyError, TypeError, ValueError):
        raise SealedKeyError("the sealed key file is damaged (restore it from backup)") from None
    with tpm.locked():
        try:
            primary = storage_primary(tpm)
            pub, priv, obj = tpm.file("sealed.pub"), tpm.file("sealed.priv"), tpm.file("sealed.ctx")
            pub.write_bytes(pub_bytes)
            priv.write_bytes(priv_bytes)
            tpm.run("tpm2_load", "-C", primary, "-u", str(pub), "-r", str(priv), "-c", str(obj))
        except TpmUnavailable:
            raise
        except TpmError as e:
            raise SealedKeyError(f"this TPM cannot load the sealed store key: it was sealed by another TPM "
                                 f"(a state dir copied from another host?) ({e})") from None
        session = tpm.file("unseal.session")
        tpm.run("tpm2_startauthsession", "--policy-session", "-S", str(session))
        try:
            tpm.run("tpm2_policypcr", "-S", str(session), "-l", _selection(pcrs))
            key = tpm.run_bytes("tpm2_unseal", "-c", str(obj), "-p", f"session:{session}")
        except TpmError as e:
            raise SealedKeyError(f"the TPM refuses to unseal the store key: {BANK} PCRs "
                                 f"{','.join(map(str, pcrs))} differ from when it was sealed (this host booted "
                                 f"into another measured state) ({e})") from None
        finally:
            tpm.run("tpm2_flushcontext", str(session), flush=False)
    if len(key) != KEY_BYTES:
        raise SealedKeyError(f"the unsealed store key is {len(key)} bytes, expected {KEY_BYTES}")
    return key


class SealedKey:
    """The key provider the secret store asks for its key when `sealing.key.tpm` exists."""

    def __init__(self, store_dir: Path, tcti: str | None = None):
        self.store_dir = Path(store_dir)
        self.path = self.store_dir / SEALED_FILE
        self.tcti = tcti

    def __repr__(self) -> str:
        return f"SealedKey({str(self.path)!r})"

    def exists(self) -> bool:
        return self.path.exists()

    def _tpm(self) -> Tpm:
        state_dir = self.store_dir.parent
        tcti = find_tcti(state_dir, self.tcti)
        if tcti is None:
            raise SealedKeyError(f"the store key is sealed by a TPM ({self.path}) and no TPM is reachable here: "
                                 f"the secrets stay closed (configure it with `skyguard tpm init --tcti T`)")
        return Tpm(tcti, state_dir / "tpm" / "lock")

    def load(self) -> bytes:
        """The 32-byte store key. Raises SealedKeyError (never returns another key)."""
        try:
            blob = json.loads(fsutil.read_regular_file(self.path))  # a FIFO is refused, never waited on
        except OSError as e:
            raise SealedKeyError(f"cannot read the sealed store key {self.path}: {e.strerror or e}") from None
        except ValueError as e:
            raise SealedKeyError(f"cannot read the sealed store key {self.path}: {e}") from None
        try:
            return unseal(self._tpm(), blob)
        except TpmUnavailable as e:
            raise SealedKeyError(f"the store key is sealed by a TPM and the TPM is unavailable: {e}; "
                                 f"the secrets stay closed") from None

    def save(self, blob: dict) -> None:
        fsutil.write_private(self.path, json.dumps(blob, sort_keys=True).encode() + b"\n")


def key_in_use(store_dir: Path) -> str:
    """"tpm" (sealed), "file" (sealing.key), or "none" (no secret stored yet)."""
    store_dir = Path(store_dir)
    if (store_dir / SEALED_FILE).exists():
        return "tpm"
    return "file" if (store_dir / FILE_KEY).exists() else "none"


def migrate(store_dir: Path, tpm: Tpm, pcrs=PLATFORM_PCRS) -> dict:
    """Move the store's file key into the TPM (see the module text). Idempotent."""
    store_dir = Path(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        with fsutil.exclusive_lock(store_dir / ".lock", config.LOCK_WAIT_S):  # the store's own lock
            return _migrate_locked(store_dir, tpm, pcrs)
    except fsutil.LockTimeout as e:
        raise CredentialError(f"the secret store's lock {e}: nothing was sealed; try again once it is done") from None


def _migrate_locked(store_dir: Path, tpm: Tpm, pcrs) -> dict:
    key_file, sealed = store_dir / FILE_KEY, SealedKey(store_dir)
    if sealed.exists() and not key_file.exists():
        return {"key": "tpm", "changed": False, "sealed_file": str(sealed.path)}
    if sealed.exists():
        raise CredentialError(f"both {key_file} and {sealed.path} exist: an interrupted migration? Check that "
                              f"the sealed key opens (`skyguard tpm status`), then remove {key_file}")
    if not key_file.exists():
        key = os.urandom(KEY_BYTES)  # no secret yet: the store's first key is born sealed
    else:
        if stat.S_IMODE(key_file.stat().st_mode) & 0o077:
            raise CredentialError(f"{key_file} is readable by others; fix its mode (chmod 600) and rotate "
                                  f"the secrets before sealing it")
        key = fsutil.read_regular_file(key_file)  # a FIFO is refused, never waited on
        if len(key) != KEY_BYTES:
            raise CredentialError(f"{key_file} is {len(key)} bytes, expected {KEY_BYTES}: damaged")
    blob = seal(tpm, key, pcrs)
    if not hmac.compare_digest(unseal(tpm, blob), key):
        raise CredentialError("the TPM unsealed another key than it sealed; the file key is kept")
    sealed.save(blob)
    if key_file.exists():
        key_file.unlink()
        fsutil.fsync_directory(store_dir)
    return {"key": "tpm", "changed": True, "sealed_file": str(sealed.path), "pcrs": blob["pcrs"],
            "bank": BANK}
