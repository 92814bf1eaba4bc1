"""What every key backend shares: the key types skyguard makes, the description of a key, the one
error class of key custody, and the encodings that make a token's raw outputs speak standard
formats (DER ECDSA signatures, PKCS#1 DigestInfo, SubjectPublicKeyInfo PEM).

Not here: any token or file access (pkcs11.py, filebackend.py), policy, HTTP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from skyguard.errors import BadInput, SkyguardError

# `skyguard key create --type`: what each type signs and whether it decrypts.
KEY_TYPES = ("ec-p256", "ed25519", "rsa-3072")
DECRYPTING_TYPES = ("rsa-3072",)  # RSA-OAEP (SHA-256); EC and Ed25519 keys only sign
# Digest sizes a VM may ask to sign: SHA-256, SHA-384, SHA-512 (Ed25519 signs the digest bytes).
DIGEST_SIZES = {32: "sha256", 48: "sha384", 64: "sha512"}

# Key names: the same shape as a secret's name, so a file-backend key maps onto the sealed store.
KEY_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,58}$")


class KeyCustodyError(SkyguardError):
    """A key backend failed (token missing, wrong PIN, no such key). Never carries a PIN or key.
    Its text may name host paths, the TPM's address or the token: the crypto proxy logs it and
    tells a VM only that the backend is unavailable."""


class KeyOperationRefused(KeyCustodyError):
    """The key cannot do what was asked (its type does not, or the input is not for it). The text
    names only the key and the operation: the crypto proxy shows it to the VM that asked (403)."""


class KeyInputRefused(KeyOperationRefused):
    """The key can do the operation, but not with this input (a ciphertext it cannot decrypt):
    the caller's mistake, answered 400 by the crypto proxy."""


def validate_key_name(name: str) -> str:
    if not isinstance(name, str) or not KEY_NAME_RE.fullmatch(name):
        raise BadInput(f"invalid key name {str(name)[:70]!r}: use 1-59 characters of a-z, 0-9, '.', '_', "
                       "'-', starting with a letter or digit (for example 'release' or 'web1.tls')")
    return name


def validate_key_type(key_type: str) -> str:
    if key_type not in KEY_TYPES:
        raise BadInput(f"unknown key type {str(key_type)[:40]!r}; choose one of {', '.join(KEY_TYPES)}")
    return key_type


@dataclass(frozen=True)
class KeyInfo:
    name: str
    type: str  # one of KEY_TYPES
    backend: str  # file | pkcs11 | tpm
    extractable: bool = False  # what the token says of the private key (pkcs11); file keys: False via skyguard

    def as_dict(self) -> dict:
        return {"name": self.name, "type": self.type, "backend": self.backend, "extractable": self.extractable}


# ---- encodings ---------------------------------------------------------------------------------

# DER DigestInfo prefixes (RFC 8017 section 9.2, note 1): RSA PKCS#1 v1.5 signs prefix || digest.
DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


def digest_algorithm(digest: bytes) -> str:
    try:
        return DIGEST_SIZES[len(digest)]
    except KeyError:
        raise BadInput(f"a digest is 32, 48 or 64 bytes (SHA-256/384/512), not {len(digest)}") from None


def hash_algorithm(digest: bytes):
    """The cryptography hash object of a digest, by its length."""
    from cryptography.hazmat.primitives import hashes

    algorithm: hashes.HashAlgorithm = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(),
                                       "sha512": hashes.SHA512()}[digest_algorithm(digest)]
    return algorithm


def ecdsa_raw_to_der(raw: bytes) -> bytes:
    """PKCS#11 returns r || s; OpenSSL and every X.509 tool expect DER SEQUENCE { r, s }."""
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    half = len(raw) // 2
    return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))


def public_key_from_pem(pem: bytes):
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    return load_pem_public_key(pem)


def verify_signature(public_pem: bytes, key_type: str, digest: bytes, signature: bytes) -> bool:
    """Check a signature made by sign() of any backend, with the public key alone."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

    key = public_key_from_pem(public_pem)
    algorithm = hash_algorithm(digest)
    try:
        if key_type == "ed25519":
            key.verify(signature, digest)
        elif key_type == "ec-p256":
            key.verify(signature, digest, ec.ECDSA(utils.Prehashed(algorithm)))
        else:
            key.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(algorithm))
    except (InvalidSignature, ValueError):
        return False
    return True
