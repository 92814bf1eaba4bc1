"""The host's Ed25519 signing key: created on first use, kept 0600 in a 0700 directory; and the
log's identity (its origin line and key name).

The private key is never printed, logged or put in a repr; only its verifier key (public) leaves
this module. Other parts (attestation) sign with the same key through `host_signer`.

The origin must name one log among all the logs a witness sees. A hostname alone does not (cloned
VMs, `localhost`), so the default is `<hostname>-<host id>.skyguard/log`, where the host id is 8
random bytes (hex) created once and kept in the state dir (`host-id`). An operator may set it
with SKYGUARD_LOG_ORIGIN, or by writing the name to `<state-dir>/log-origin` before the log is
created. A log keeps the name it was created with (store.py), so existing logs are unchanged.
Not here: what is signed.
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, load_pem_private_key

from skyguard import fsutil
from skyguard.errors import LogError
from skyguard.tlog.checkpoint import Signer, valid_key_name
from skyguard.tlog.files import os_reason

HOST_KEY_FILE = "host-ed25519.pem"
HOST_ID_FILE = "host-id"
ORIGIN_FILE = "log-origin"
ORIGIN_ENV = "SKYGUARD_LOG_ORIGIN"


def host_id(state_dir: Path, create: bool = True) -> str | None:
    """This host's random id (16 hex digits), made once per state dir."""
    path = Path(state_dir) / HOST_ID_FILE
    if path.exists():
        value = _read(path, "the host id").decode(errors="replace").strip()
        if len(value) == 16 and all(c in "0123456789abcdef" for c in value):
            return value
        raise LogError(f"{path} does not hold a host id (16 hex digits); remove it to make a new "
                       f"one (logs created since keep their origin)")
    if not create:
        return None
    _ensure_private_dir(path.parent)
    value = secrets.token_hex(8)
    try:
        fsutil.create_private(path, (value + "\n").encode())
    except FileExistsError:   # another process made it first: use theirs
        return host_id(state_dir, create=False)
    return value


def default_key_name(state_dir: Path | None = None, create: bool = True) -> str:
    """The signed-note key name and default log origin: unique per host, URL-like.

    SKYGUARD_LOG_ORIGIN, else <state-dir>/log-origin, else <hostname>-<host id>.skyguard/log
    (the host id made on first use). Without a state dir: <hostname>.skyguard/log (the name
    logs had before host ids; used only to read such logs)."""
    configured = os.environ.get(ORIGIN_ENV, "").strip()
    if not configured and state_dir is not None and (Path(state_dir) / ORIGIN_FILE).exists():
        configured = _read(Path(state_dir) / ORIGIN_FILE, "the log origin").decode(errors="replace").strip()
    if configured:
        if not valid_key_name(configured) or not configured.isprintable():
            raise LogError(f"log origin {configured!r} (from {ORIGIN_ENV} or {ORIGIN_FILE}) must be "
                           f"printable, with no spaces and no '+'")
        return configured
    hostname = socket.gethostname() or "localhost"
    if state_dir is None:
        return f"{hostname}.skyguard/log"
    ident = host_id(state_dir, create=create)
    return f"{hostname}-{ident}.skyguard/log" if ident else f"{hostname}.skyguard/log"


def _read(path: Path, what: str) -> bytes:
    """A file of the state dir, which must be a regular file: a FIFO put there is refused (LogError
    naming it), never waited on (the daemon would hang at start)."""
    try:
        return fsutil.read_regular_file(path)
    except OSError as e:
        raise LogError(f"cannot read {what} {path}: {os_reason(e)}; move it away (a new one is made)") from None


def key_path(state_dir: Path) -> Path:
    return Path(state_dir) / HOST_KEY_FILE


def _ensure_private_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077:
        os.chmod(directory, 0o700)


def load_or_create_key_file(path: Path, what: str = "host key", create: bool = True,
                            missing_hint: str = "") -> Ed25519PrivateKey:
    """An Ed25519 private key in a PEM file (0600), created on first use."""
    path = Path(path)
    if not path.exists():
        if not create:
            raise LogError(f"no {what} at {path}{missing_hint}")
        _ensure_private_dir(path.parent)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        fsutil.write_private(path, pem)  # never a half-written key under the real name
        return key
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        # Fail closed: a key others could read may already be someone else's key.
        raise LogError(f"{what} {path} is readable by others (mode {mode:04o}); "
                       f"run `chmod 600 {path}` and consider the key compromised")
    pem = _read(path, what)
    try:
        loaded = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise LogError(f"{what} {path} is not a PEM Ed25519 private key; move it away to "
                       f"create a new one (old checkpoints then need the old public key)") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise LogError(f"{what} {path} is not an Ed25519 key")
    return loaded


def load_or_create_host_key(state_dir: Path, create: bool = True) -> Ed25519PrivateKey:
    return load_or_create_key_file(
        key_path(state_dir), "host key", create,
        "; it is created when the daemon first starts (or pass --key with the log's verifier key)")


def host_signer(state_dir: Path, name: str | None = None, create: bool = True) -> Signer:
    key = load_or_create_host_key(state_dir, create=create)
    return Signer(name or default_key_name(state_dir, create=create), key)
