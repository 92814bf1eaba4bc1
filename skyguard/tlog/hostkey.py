"""The host's Ed25519 signing key: created on first use, kept 0600 in a 0700 directory.

The private key is never printed, logged or put in a repr; only its verifier key (public) leaves
this module. Other parts (attestation) sign with the same key through `host_signer`.
Not here: what is signed.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (Encoding, NoEncryption, PrivateFormat,
                                                          load_pem_private_key)

from skyguard import fsutil
from skyguard.errors import LogError
from skyguard.tlog.checkpoint import Signer

HOST_KEY_FILE = "host-ed25519.pem"


def default_key_name() -> str:
    """The signed-note key name (and default log origin): stable per host, URL-like."""
    return f"{socket.gethostname()}.skyguard/log"


def key_path(state_dir: Path) -> Path:
    return Path(state_dir) / HOST_KEY_FILE


def _ensure_private_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077:
        os.chmod(directory, 0o700)


def load_or_create_host_key(state_dir: Path, create: bool = True) -> Ed25519PrivateKey:
    path = key_path(state_dir)
    if not path.exists():
        if not create:
            raise LogError(f"no host key at {path}; it is created when the daemon first starts "
                           f"(or pass --key with the log's verifier key)")
        _ensure_private_dir(path.parent)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        fsutil.write_private(path, pem)  # never a half-written key under the real name
        return key
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        # Fail closed: a key others could read may already be someone else's key.
        raise LogError(f"host key {path} is readable by others (mode {mode:04o}); "
                       f"run `chmod 600 {path}` and consider the key compromised")
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise LogError(f"host key {path} is not a PEM Ed25519 private key; move it away to "
                       f"create a new one (old checkpoints then need the old public key)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise LogError(f"host key {path} is not an Ed25519 key")
    return key


def host_signer(state_dir: Path, name: str | None = None, create: bool = True) -> Signer:
    return Signer(name or default_key_name(), load_or_create_host_key(state_dir, create=create))
