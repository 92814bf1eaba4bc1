"""The sealed secret store: named secrets encrypted at rest under a host sealing key.

One file per secret (`<name>.sealed`, JSON) holds public metadata (name, size, times, caller
metadata) in clear and the value as AES-256-GCM ciphertext. The metadata is the GCM associated
data, so renaming a file onto another name, or editing its times or size, fails authentication
just like editing the ciphertext. The 32-byte sealing key lives in `sealing.key` in the same
directory (mode 0600, directory 0700), created on first use; or, once `skyguard tpm seal-store`
ran, sealed by the TPM in `sealing.key.tpm` (it opens only on this TPM in its measured state).
Writes are atomic (temporary file, fsync, rename, fsync of the directory) and serialised between
processes with a lock file, waited for at most config.LOCK_WAIT_S (then CredentialError naming it
and its holder: a stuck holder must not hang a part taking a policy).

Values leave this module only as `Secret`, a bytes subclass whose repr and str never show the
value; no error message, log line or repr here ever contains one. This module is not the
credential-swap proxy and not the CLI (skyguard/cli/secret.py); it does no policy checks.

Thread-safety: each call opens, reads and writes files itself; a SecretStore can be shared by
threads and by processes on the same directory.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets as _random
import stat
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from skyguard import config, fsutil
from skyguard.errors import BadInput, CredentialError

SEALING_KEY_FILE = "sealing.key"
SEALED_SUFFIX = ".sealed"
FORMAT_VERSION = 1
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the GCM standard nonce; random per write, never reused in practice at 2^-96
# Secrets are credentials and keys, not blobs: a cap keeps a mistaken `--file` from sealing a disk
# image into the state directory.
MAX_VALUE_BYTES = 1 << 20

# Lower-case letters, digits, '.', '_', '-'; starts with a letter or digit so that no name is
# hidden, relative ('..') or collides with the key file. Matches policy `secret:` references.
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def validate_secret_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == SEALING_KEY_FILE:
        raise BadInput(
            f"invalid secret name {name!r}: use 1-64 characters of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit (for example 'github' or 'web1.tls-key')"
        )
    return name


class Secret(bytes):
    """A secret value. It is bytes (so it can be used wherever bytes are expected), but its repr,
    str and format show only its name: `Secret(name='github', ****)`. reveal() gives plain bytes."""

    _secret_name: str

    def __new__(cls, name: str, value: bytes):
        self = super().__new__(cls, value)
        self._secret_name = name
        return self

    @property
    def name(self) -> str:
        return self._secret_name

    def reveal(self) -> bytes:
        return bytes(self)

    def __repr__(self) -> str:
        return f"Secret(name={self._secret_name!r}, ****)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self):
        raise TypeError("a Secret cannot be pickled")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _canonical(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


class SecretStore:
    """Named secrets sealed under a host key in one directory."""

    def __init__(self, directory: Path | str, key_file: Path | str | None = None):
        self.directory = Path(directory)
        self.key_file = Path(key_file) if key_file else self.directory / SEALING_KEY_FILE
        self._aead = None

    def __repr__(self) -> str:
        return f"SecretStore({str(self.directory)!r})"

    # ---- public API -------------------------------------------------------------------------

    def set(self, name: str, value: bytes, metadata: dict | None = None) -> dict:
        """Seal `value` under `name` (replacing any previous value). Returns its public metadata."""
        validate_secret_name(name)
        if not isinstance(value, (bytes, bytearray)):
            raise BadInput(f"secret {name!r}: the value must be bytes")
        if len(value) == 0:
            raise BadInput(f"secret {name!r}: refusing an empty value")
        if len(value) > MAX_VALUE_BYTES:
            raise BadInput(f"secret {name!r}: value is {len(value)} bytes, the limit is {MAX_VALUE_BYTES}")
        metadata = dict(metadata or {})
        try:
            _canonical(metadata)
        except (TypeError, ValueError):
            raise BadInput(f"secret {name!r}: metadata must be JSON-serialisable (strings, numbers)") from None
        self._sealer()
        with self._locked():
            return self._set_locked(name, bytes(value), metadata)

    def _set_locked(self, name: str, value: bytes, metadata: dict) -> dict:
        aead = self._sealer()
        try:
            previous = self._read_header(name) if self._path(name).exists() else None
        except CredentialError:
            previous = None  # a damaged file is being replaced: that is how it gets repaired
        now = _now()
        header = {
            "version": FORMAT_VERSION,
            "name": name,
            "size": len(value),
            "created": previous["created"] if previous else now,
            "updated": now,
            "metadata": metadata,
        }
        nonce = _random.token_bytes(NONCE_BYTES)
        ciphertext = aead.encrypt(nonce, value, _canonical(header))
        record = dict(header, nonce=base64.b64encode(nonce).decode(),
                      ciphertext=base64.b64encode(ciphertext).decode())
        fsutil.write_private(self._path(name), json.dumps(record, sort_keys=True).encode() + b"\n")
        return header

    def get(self, name: str) -> Secret:
        """The value of `name` as a Secret (a bytes subclass). Raises CredentialError if it is
        missing or its file fails authentication."""
        validate_secret_name(name)
        path = self._path(name)
        record = self._read_record(name)
        header = {k: record[k] for k in ("version", "name", "size", "created", "updated", "metadata")}
        try:
            nonce = base64.b64decode(record["nonce"], validate=True)
            ciphertext = base64.b64decode(record["ciphertext"], validate=True)
        except (ValueError, TypeError):
            raise self._tampered(name, path) from None
        from cryptography.exceptions import InvalidTag

        try:
            value = self._sealer().decrypt(nonce, ciphertext, _canonical(header))
        except (InvalidTag, ValueError):
            raise self._tampered(name, path) from None
        if header["name"] != name:
            raise self._tampered(name, path)
        return Secret(name, value)

    def exists(self, name: str) -> bool:
        validate_secret_name(name)
        return self._path(name).exists()

    def version(self, name: str) -> tuple | None:
        """What identifies the sealed file of `name` now (inode, mtime, size), None when there is
        none: a caller that keeps a value in memory compares it on each use, so that a secret
        removed or replaced by another process (every write is a new file, renamed into place) is
        not used from memory. Cheap: one stat, no decryption."""
        validate_secret_name(name)
        try:
            st = self._path(name).stat()
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def list(self) -> list[dict]:
        """Public metadata of every secret, sorted by name: name, size, created, updated, metadata.
        Never a value, and needs no sealing key."""
        if not self.directory.is_dir():
            return []
        out = []
        for path in sorted(self.directory.glob("*" + SEALED_SUFFIX)):
            name = path.name[: -len(SEALED_SUFFIX)]
            if not _NAME.fullmatch(name):
                continue
            out.append(self._read_header(name))
        return out

    def remove(self, name: str) -> None:
        validate_secret_name(name)
        with self._locked():
            path = self._path(name)
            try:
                path.unlink()
            except FileNotFoundError:
                raise CredentialError(
                    f"no secret named {name!r} in {self.directory}; `skyguard secret list` shows the names"
                ) from None
            fsutil.fsync_directory(self.directory)

    def get_or_create(self, name: str, make_value, metadata: dict | None = None) -> Secret:
        """The value of `name`, sealing make_value() under it first if it does not exist. Used for
        keys skyguard generates for itself (the SSH proxy's VM key and host key)."""
        validate_secret_name(name)
        if not self._path(name).exists():
            value = make_value()
            with self._locked():
                if not self._path(name).exists():  # another process may have won the race
                    self._set_locked(name, bytes(value), dict(metadata or {}))
        return self.get(name)

    # ---- internals --------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.directory / (name + SEALED_SUFFIX)

    def _tampered(self, name: str, path: Path) -> CredentialError:
        return CredentialError(
            f"secret {name!r} ({path}) failed authentication: the file was modified, or the sealing "
            f"key {self.key_file} is not the one it was sealed with. Restore both from backup, or "
            f"set the secret again with `skyguard secret set {name}`"
        )

    def _read_record(self, name: str) -> dict:
        path = self._path(name)
        try:
            raw = fsutil.read_regular_file(path)  # a FIFO put here is refused, never waited on
        except FileNotFoundError:
            raise CredentialError(
                f"no secret named {name!r} in {self.directory}; add it with `skyguard secret set {name}`"
            ) from None
        except OSError as e:
            raise CredentialError(f"cannot read secret {name!r} ({path}): {e.strerror}") from None
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or record.get("version") != FORMAT_VERSION:
                raise ValueError
            for key in ("name", "size", "created", "updated", "metadata", "nonce", "ciphertext"):
                record[key]
        except (ValueError, KeyError, UnicodeDecodeError):
            raise self._tampered(name, path) from None
        return record

    def _read_header(self, name: str) -> dict:
        record = self._read_record(name)
        return {k: record[k] for k in ("name", "size", "created", "updated", "metadata")}

    def _ensure_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        mode = stat.S_IMODE(self.directory.stat().st_mode)
        if mode & 0o077:
            os.chmod(self.directory, 0o700)

    def _sealer(self):
        if self._aead is None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._aead = AESGCM(self._load_or_create_key())
        return self._aead

    def _load_or_create_key(self) -> bytes:
        self._ensure_directory()
        # A key sealed by the TPM (`skyguard tpm seal-store`, skyguard/tpm/sealing.py) is the only
        # key: a TPM that is missing or refuses keeps the store shut, and no file key is made.
        from skyguard.tpm.sealing import SealedKey

        sealed = SealedKey(self.key_file.parent)
        if sealed.exists():
            return sealed.load()
        if not self.key_file.exists():
            # Create under a temporary name and link() into place: link fails if another process
            # won the race, and then both use the winner's key.
            tmp = self.key_file.with_name(f".{self.key_file.name}.{os.getpid()}.{_random.token_hex(4)}")
            fsutil.create_private(tmp, _random.token_bytes(KEY_BYTES))
            try:
                os.link(tmp, self.key_file)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
            fsutil.fsync_directory(self.key_file.parent)
        # Opened as fsutil.open_regular does: whoever can write the directory can put a FIFO
        # here, and a plain open() of one waits forever for a writer (the part taking a policy
        # would hang); anything but a regular file is refused, and the store stays shut.
        try:
            with fsutil.open_regular(self.key_file) as f:
                mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
                if mode & 0o077:
                    # Fail closed: a key others could read seals nothing.
                    raise CredentialError(
                        f"sealing key {self.key_file} has mode {mode:04o}; other users may have read it. "
                        f"Run `chmod 600 {self.key_file}` (and rotate the secrets if they did)"
                    )
                key = f.read(KEY_BYTES + 1)
        except OSError as e:
            raise CredentialError(f"cannot read the sealing key {self.key_file}: {e.strerror or e}; the "
                                  "secrets stay closed until it is restored from backup") from None
        if len(key) != KEY_BYTES:
            raise CredentialError(
                f"sealing key {self.key_file} is {'over ' if len(key) > KEY_BYTES else ''}"
                f"{min(len(key), KEY_BYTES)} bytes, expected {KEY_BYTES}: the file is damaged; restore it from backup"
            )
        return key

    @contextmanager
    def _locked(self):
        self._ensure_directory()
        with store_lock(self.directory):
            yield


@contextmanager
def store_lock(directory: Path):
    """The store's `.lock`, which serialises writes between processes: waited for at most
    config.LOCK_WAIT_S (a holder stuck on a hung TPM, sealing the key, must not hang a part
    taking a policy); CredentialError naming the file and its holder past that."""
    path = Path(directory) / ".lock"
    try:
        with fsutil.exclusive_lock(path, config.LOCK_WAIT_S):
            yield
    except fsutil.LockTimeout as e:
        raise CredentialError(f"the secret store's lock {e}: nothing was written; try again once it is done "
                              f"(a part tries again at the next policy load)") from None
