"""Keys held by this host's TPM (`keys.backend: tpm`), used through tpm2-tools (skyguard/tpm/device.py).

Each key is an ECC P-256 signing key made inside the TPM under the owner hierarchy's storage
primary key (the same primary sealing.py uses: made again from the standard template on every
use, so nothing of it is stored). Its attributes are fixedtpm|fixedparent|sensitivedataorigin|
userwithauth|sign: the TPM generated the private part, never lets it out in the clear and never
re-parents it, and the key signs only. What skyguard keeps is the TPM's public and private blobs
in <state dir>/keys/tpm/<name>.json (the private blob is encrypted by this TPM's storage key:
useless without this TPM, so not a secret), with the public key as PEM for `key public` and verify.

What the TPM backend can honestly do: sign a SHA-256/384/512 digest with an ec-p256 key (ECDSA,
DER as OpenSSL writes it), verify in software with the public key. It refuses ed25519 and
rsa-3072 keys (skyguard's TPM keys are P-256 only) and decrypt (its keys only sign), and TLS
(tlskey.py has no TPM engine). Removing a key deletes its blob: the key is then gone.

Same interface as filebackend.FileBackend. Not here: policy, HTTP, the TCTI choice (device.py).
"""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

from skyguard import fsutil
from skyguard.keys.types import (
    KeyCustodyError,
    KeyInfo,
    KeyOperationRefused,
    digest_algorithm,
    validate_key_name,
    validate_key_type,
)
from skyguard.tpm.device import Tpm, TpmError, TpmUnavailable

KEY_TYPE = "ec-p256"
ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign"
FORMAT = 1


class TpmBackend:
    name = "tpm"

    def __init__(self, state_dir: Path, tcti: str | None = None):
        try:
            self.tpm = Tpm.for_state_dir(Path(state_dir), tcti)
        except TpmUnavailable as e:
            raise KeyCustodyError(f"the tpm key backend has no TPM: {e}") from None
        self.directory = Path(state_dir) / "keys" / "tpm"
        # The proxy signs from worker threads; the TPM and the work folder's files are one at a time.
        self._lock = threading.Lock()
        # name -> (context file of the key loaded (saved) in this TPM, the private blob it was loaded
        # from): used only while the key's record holds that blob, so a key removed and made again
        # under its name by another process (`key rm`, `key create`) is never signed with.
        self._loaded: dict[str, tuple[str, str]] = {}

    def __repr__(self) -> str:
        return f"TpmBackend({self.tpm.tcti!r})"

    def close(self) -> None:
        self._loaded.clear()

    # ---- keys ------------------------------------------------------------------------------

    def create(self, name: str, key_type: str) -> KeyInfo:
        validate_key_name(name)
        validate_key_type(key_type)
        if key_type != KEY_TYPE:
            raise KeyCustodyError(f"the tpm backend makes ec-p256 keys only, not {key_type}; use "
                                  f"`--type ec-p256`, or the pkcs11 backend for ed25519 and rsa-3072")
        path = self._path(name)
        if path.exists():
            raise KeyCustodyError(f"a key named {name!r} exists; `skyguard key rm {name}` first, or choose another name")
        with self._lock, self.tpm.locked():
            primary = self._primary()
            pub, priv = self.tpm.file(f"{name}.pub"), self.tpm.file(f"{name}.priv")
            self._run("tpm2_create", "-C", primary, "-G", "ecc256", "-a", ATTRIBUTES, "-u", str(pub), "-r", str(priv))
            ctx = self._load_blobs(name, primary, pub.read_bytes(), priv.read_bytes())
            pem = self.tpm.file(f"{name}.pem")
            self._run("tpm2_readpublic", "-c", ctx, "-f", "pem", "-o", str(pem))
            record = {"version": FORMAT, "key_type": KEY_TYPE, "attributes": ATTRIBUTES,
                      "public": base64.b64encode(pub.read_bytes()).decode(),
                      "private": base64.b64encode(priv.read_bytes()).decode(), "public_pem": pem.read_text()}
            for f in (pub, priv, pem):
                f.unlink()
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fsutil.write_private(path, json.dumps(record, indent=2, sort_keys=True).encode() + b"\n")
        return KeyInfo(name, KEY_TYPE, self.name)

    def list(self) -> list[KeyInfo]:
        if not self.directory.is_dir():
            return []
        return [KeyInfo(p.stem, KEY_TYPE, self.name) for p in sorted(self.directory.glob("*.json"))]

    def info(self, name: str) -> KeyInfo:
        self._record(name)
        return KeyInfo(name, KEY_TYPE, self.name)

    def public_pem(self, name: str) -> bytes:
        return self._record(name)["public_pem"].encode()

    def key_type(self, name: str) -> str:
        self._record(name)
        return KEY_TYPE

    def remove(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise KeyCustodyError(f"no key named {name!r}; `skyguard key list` shows them") from None
        self._loaded.pop(name, None)

    def export_private(self, name: str) -> bytes:
        self._record(name)
        raise KeyCustodyError(f"key {name!r} lives in the TPM (fixedtpm, fixedparent): its private part "
                              f"never leaves it, and skyguard does not export private keys")

    def decrypt(self, name: str, ciphertext: bytes) -> bytes:
        self._record(name)
        raise KeyOperationRefused(f"key {name!r} is a TPM ec-p256 signing key: it signs, it does not decrypt")

    def sign(self, name: str, digest: bytes) -> bytes:
        """ECDSA over `digest` (32, 48 or 64 bytes) inside the TPM; the signature in DER."""
        hash_name = digest_algorithm(digest)
        record = self._record(name)
        with self._lock, self.tpm.locked():
            data, sig = self.tpm.file("sign.digest"), self.tpm.file("sign.sig")
            data.write_bytes(digest)
            args = ("-g", hash_name, "-s", "ecdsa", "-d", "-f", "plain", "-o", str(sig), str(data))
            loaded = self._loaded.get(name)
            ctx = loaded[0] if loaded is not None and loaded[1] == record.get("private") else None
            signed = False
            if ctx is not None:
                try:
                    self._run("tpm2_sign", "-c", ctx, *args)
                    signed = True
                except KeyCustodyError:
                    pass  # a saved context does not survive a TPM restart: load the blobs again, once
            if not signed:
                self._run("tpm2_sign", "-c", self._load_record(name, record), *args)
            signature = sig.read_bytes()
            sig.unlink()
        return signature

    # ---- the TPM ---------------------------------------------------------------------------

    def _run(self, tool: str, *args: str) -> str:
        try:
            return self.tpm.run(tool, *args)
        except TpmUnavailable as e:
            raise KeyCustodyError(f"the tpm key backend cannot reach its TPM: {e}") from None
        except TpmError as e:
            raise KeyCustodyError(f"the TPM refused: {e}") from None

    def _primary(self) -> str:
        from skyguard.tpm.sealing import storage_primary  # one definition of the storage primary key

        try:
            return storage_primary(self.tpm)
        except TpmError as e:
            raise KeyCustodyError(f"the TPM cannot make its storage primary key: {e}") from None

    def _load_blobs(self, name: str, primary: str, public: bytes, private: bytes) -> str:
        pub, priv, ctx = (self.tpm.file(f"{name}.{ext}") for ext in ("load.pub", "load.priv", "ctx"))
        pub.write_bytes(public)
        priv.write_bytes(private)
        try:
            self.tpm.run("tpm2_load", "-C", primary, "-u", str(pub), "-r", str(priv), "-c", str(ctx))
        except TpmUnavailable as e:
            raise KeyCustodyError(f"the tpm key backend cannot reach its TPM: {e}") from None
        except TpmError as e:
            raise KeyCustodyError(f"this TPM cannot load key {name!r}: it was made by another TPM (a state dir "
                                  f"copied from another host?) or its blob is damaged ({e})") from None
        finally:
            pub.unlink(missing_ok=True)
            priv.unlink(missing_ok=True)
        return str(ctx)

    def _load_record(self, name: str, record: dict) -> str:
        self._loaded.pop(name, None)
        try:
            public, private = base64.b64decode(record["public"]), base64.b64decode(record["private"])
        except (KeyError, TypeError, ValueError):
            raise KeyCustodyError(f"the blob of TPM key {name!r} ({self._path(name)}) is damaged") from None
        ctx = self._load_blobs(name, self._primary(), public, private)
        self._loaded[name] = (ctx, record["private"])
        return ctx

    def _path(self, name: str) -> Path:
        return self.directory / f"{validate_key_name(name)}.json"

    def _record(self, name: str) -> dict:
        path = self._path(name)
        try:
            record = json.loads(fsutil.read_regular_file(path))  # a FIFO is refused, never waited on
        except FileNotFoundError:
            raise KeyCustodyError(f"no key named {name!r}; create it with `skyguard key create {name} "
                                  f"--type ec-p256`") from None
        except OSError as e:
            raise KeyCustodyError(f"cannot read TPM key {name!r} ({path}): {e.strerror or e}") from None
        except ValueError as e:
            raise KeyCustodyError(f"cannot read TPM key {name!r} ({path}): {e}") from None
        if not isinstance(record, dict) or record.get("key_type") != KEY_TYPE or "public_pem" not in record:
            raise KeyCustodyError(f"{path} is not a skyguard TPM key")
        return record
