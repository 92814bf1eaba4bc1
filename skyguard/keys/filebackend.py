"""Keys sealed in skyguard's secret store (skyguard/custody/store.py) as PKCS#8 PEM, for hosts with
no token. Each key is the secret `key.<name>`, with its type in the secret's metadata. Weaker than
a token: the host's root can unseal the file; VMs still never see it (they only reach the crypto
proxy), and skyguard offers no command that prints a private key.

Same interface as pkcs11.Pkcs11Backend. Not here: policy, HTTP.
"""

from __future__ import annotations

from skyguard.custody.store import SecretStore
from skyguard.errors import CredentialError
from skyguard.keys.types import (
    DECRYPTING_TYPES,
    KeyCustodyError,
    KeyInfo,
    KeyInputRefused,
    KeyOperationRefused,
    hash_algorithm,
    validate_key_name,
    validate_key_type,
)

PREFIX = "key."
KIND = "skyguard-key"


class FileBackend:
    name = "file"

    def __init__(self, store: SecretStore):
        self.store = store
        # name -> (private key, type, the sealed file's version): used only while the file is that one,
        # so a key removed or replaced by `skyguard key rm/create` in another process is not used.
        self._cache: dict[str, tuple[object, str, tuple]] = {}

    def __repr__(self) -> str:
        return f"FileBackend({self.store!r})"

    def close(self) -> None:
        self._cache.clear()

    def create(self, name: str, key_type: str) -> KeyInfo:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

        validate_key_name(name)
        validate_key_type(key_type)
        if self.store.exists(PREFIX + name):
            raise KeyCustodyError(f"a key named {name!r} exists; `skyguard key rm {name}` first, or choose another name")
        key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
        if key_type == "ec-p256":
            key = ec.generate_private_key(ec.SECP256R1())
        elif key_type == "ed25519":
            key = ed25519.Ed25519PrivateKey.generate()
        else:
            key = rsa.generate_private_key(65537, 3072)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        self.store.set(PREFIX + name, pem, {"kind": KIND, "key_type": key_type})
        self._cache.pop(name, None)
        return KeyInfo(name, key_type, self.name)

    def list(self) -> list[KeyInfo]:
        out = []
        for entry in self.store.list():
            meta = entry.get("metadata") or {}
            if entry["name"].startswith(PREFIX) and meta.get("kind") == KIND:
                out.append(KeyInfo(entry["name"][len(PREFIX):], str(meta.get("key_type")), self.name))
        return out

    def info(self, name: str) -> KeyInfo:
        return KeyInfo(name, self._load(name)[1], self.name)

    def public_pem(self, name: str) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return self._load(name)[0].public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)

    def remove(self, name: str) -> None:
        validate_key_name(name)
        try:
            self.store.remove(PREFIX + name)
        except CredentialError:
            raise KeyCustodyError(f"no key named {name!r}; `skyguard key list` shows them") from None
        self._cache.pop(name, None)

    def export_private(self, name: str) -> bytes:
        raise KeyCustodyError(f"skyguard does not export private key {name!r}")

    def private_pem(self, name: str):
        """The sealed PEM, for the credential proxy's client certificates and TLS termination (which
        load it from memory, never a file). A Secret: its repr never shows the value."""
        validate_key_name(name)
        return self._secret(name)

    def key_type(self, name: str) -> str:
        return self._load(name)[1]

    def sign(self, name: str, digest: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

        algorithm = hash_algorithm(digest)
        key, key_type = self._load(name)
        if key_type == "ed25519":
            return key.sign(digest)
        if key_type == "ec-p256":
            return key.sign(digest, ec.ECDSA(utils.Prehashed(algorithm)))
        return key.sign(digest, padding.PKCS1v15(), utils.Prehashed(algorithm))

    def decrypt(self, name: str, ciphertext: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        key, key_type = self._load(name)
        if key_type not in DECRYPTING_TYPES:
            raise KeyOperationRefused(f"key {name!r} is {key_type}: it signs, it does not decrypt")
        try:
            return key.decrypt(ciphertext, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))  # as pkcs11.py
        except ValueError:
            raise KeyInputRefused(f"key {name!r} could not decrypt the ciphertext") from None

    def _secret(self, name: str):
        try:
            return self.store.get(PREFIX + name)
        except CredentialError:
            raise KeyCustodyError(f"no key named {name!r}; create it with `skyguard key create {name} --type TYPE`") from None

    def _load(self, name: str):
        validate_key_name(name)
        version = self.store.version(PREFIX + name)
        if version is None:
            self._cache.pop(name, None)
            self._secret(name)  # raises: no key named ...
        hit = self._cache.get(name)
        if hit is None or hit[2] != version:
            from cryptography.hazmat.primitives.serialization import load_pem_private_key

            meta = {e["name"]: e.get("metadata") or {} for e in self.store.list()}.get(PREFIX + name, {})
            key = load_pem_private_key(self._secret(name).reveal(), None)
            hit = self._cache[name] = (key, str(meta.get("key_type")), version)
        return hit[0], hit[1]
