"""TPM 2.0 structures a verifier reads, parsed here from their bytes (TPM 2.0 Part 2), and the
quote's signature checked with `cryptography`: no TPM and no tpm2-tools needed to verify.

    TPMS_ATTEST     magic, type, qualifiedSigner, extraData (the nonce), clockInfo,
                    firmwareVersion, and for a quote TPMS_QUOTE_INFO (PCR selection, PCR digest)
    TPMT_SIGNATURE  RSASSA (PKCS#1 v1.5), RSAPSS or ECDSA (r, s) over the attest bytes

All integers are big-endian (the TPM's byte order). A short or malformed structure raises
QuoteFormatError naming the field; nothing here trusts a length it has not checked.
Not here: deciding whether the quoted values are acceptable (quote.py).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from skyguard.errors import BadInput

TPM_GENERATED_VALUE = 0xFF544347  # "\xffTCG": only the TPM itself signs structures that start so
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ALG_SHA256 = 0x000B
TPM_ALG_RSASSA = 0x0014
TPM_ALG_RSAPSS = 0x0016
TPM_ALG_ECDSA = 0x0018
HASH_NAMES = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512"}


class QuoteFormatError(BadInput):
    """The quote or signature bytes are not the TPM structure they claim to be."""


class _Reader:
    def __init__(self, data: bytes, what: str):
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int, field: str) -> bytes:
        if self.pos + n > len(self.data):
            raise QuoteFormatError(f"{self.what} ends inside {field} (offset {self.pos}, needs {n} bytes)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return struct.unpack(">H", self.take(2, field))[0]

    def u32(self, field: str) -> int:
        return struct.unpack(">I", self.take(4, field))[0]

    def u64(self, field: str) -> int:
        return struct.unpack(">Q", self.take(8, field))[0]

    def tpm2b(self, field: str) -> bytes:
        return self.take(self.u16(field + ".size"), field)

    def done(self) -> None:
        if self.pos != len(self.data):
            raise QuoteFormatError(f"{self.what} has {len(self.data) - self.pos} bytes after its end")


@dataclass(frozen=True)
class QuoteInfo:
    """A parsed TPMS_ATTEST of type quote."""

    qualified_signer: bytes
    extra_data: bytes  # the verifier's nonce
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    selection: dict[str, tuple[int, ...]]  # bank name -> PCR indexes, in the quote's order
    pcr_digest: bytes


def parse_attest(data: bytes) -> QuoteInfo:
    r = _Reader(data, "TPMS_ATTEST")
    if r.u32("magic") != TPM_GENERATED_VALUE:
        raise QuoteFormatError("TPMS_ATTEST magic is not TPM_GENERATED_VALUE: not made by a TPM")
    kind = r.u16("type")
    if kind != TPM_ST_ATTEST_QUOTE:
        raise QuoteFormatError(f"TPMS_ATTEST type is {kind:#06x}, not a quote ({TPM_ST_ATTEST_QUOTE:#06x})")
    signer = r.tpm2b("qualifiedSigner")
    extra = r.tpm2b("extraData")
    clock, reset, restart, safe = r.u64("clock"), r.u32("resetCount"), r.u32("restartCount"), r.u8("safe")
    firmware = r.u64("firmwareVersion")
    selection: dict[str, tuple[int, ...]] = {}
    for _ in range(r.u32("pcrSelect.count")):
        alg = r.u16("pcrSelect.hash")
        bitmap = r.take(r.u8("pcrSelect.sizeofSelect"), "pcrSelect.pcrSelect")
        name = HASH_NAMES.get(alg, f"alg{alg:#06x}")
        selection[name] = tuple(i * 8 + bit for i, byte in enumerate(bitmap) for bit in range(8) if byte >> bit & 1)
    digest = r.tpm2b("pcrDigest")
    r.done()
    return QuoteInfo(signer, extra, clock, reset, restart, bool(safe), firmware, selection, digest)


@dataclass(frozen=True)
class Signature:
    scheme: int
    hash_alg: int
    rsa: bytes = b""
    ecdsa_r: bytes = b""
    ecdsa_s: bytes = b""


def parse_signature(data: bytes) -> Signature:
    r = _Reader(data, "TPMT_SIGNATURE")
    scheme, hash_alg = r.u16("sigAlg"), r.u16("hash")
    if scheme in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS):
        sig = Signature(scheme, hash_alg, rsa=r.tpm2b("signature"))
    elif scheme == TPM_ALG_ECDSA:
        sig = Signature(scheme, hash_alg, ecdsa_r=r.tpm2b("signatureR"), ecdsa_s=r.tpm2b("signatureS"))
    else:
        raise QuoteFormatError(f"signature scheme {scheme:#06x} is not RSASSA, RSAPSS or ECDSA")
    r.done()
    return sig


def verify_signature(public_key_pem: str | bytes, attest: bytes, signature: bytes) -> bool:
    """True when `signature` (TPMT_SIGNATURE) over `attest` was made by the key in the PEM."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

    sig = parse_signature(signature)
    hash_cls = {0x0004: hashes.SHA1, 0x000B: hashes.SHA256, 0x000C: hashes.SHA384,
                0x000D: hashes.SHA512}.get(sig.hash_alg)
    if hash_cls is None:
        raise QuoteFormatError(f"signature hash {sig.hash_alg:#06x} is not one skyguard accepts")
    try:
        key = serialization.load_pem_public_key(public_key_pem.encode() if isinstance(public_key_pem, str)
                                                else public_key_pem)
    except ValueError:
        raise BadInput("the AK is not a PEM public key (give the file `skyguard tpm init` printed)") from None
    try:
        if isinstance(key, ec.EllipticCurvePublicKey) and sig.scheme == TPM_ALG_ECDSA:
            der = utils.encode_dss_signature(int.from_bytes(sig.ecdsa_r, "big"), int.from_bytes(sig.ecdsa_s, "big"))
            key.verify(der, attest, ec.ECDSA(hash_cls()))  # type: ignore[abstract]  # a concrete SHA
        elif isinstance(key, rsa.RSAPublicKey) and sig.scheme == TPM_ALG_RSASSA:
            key.verify(sig.rsa, attest, padding.PKCS1v15(), hash_cls())  # type: ignore[abstract]
        elif isinstance(key, rsa.RSAPublicKey) and sig.scheme == TPM_ALG_RSAPSS:
            key.verify(sig.rsa, attest, padding.PSS(padding.MGF1(hash_cls()), padding.PSS.AUTO),  # type: ignore[abstract]
                       hash_cls())  # type: ignore[abstract]
        else:
            return False  # a key of another type than the signature: not this key's signature
    except InvalidSignature:
        return False
    return True


def pcr_digest(values: list[bytes]) -> bytes:
    """The quote's pcrDigest: SHA-256 over the selected PCR values concatenated in selection order."""
    return hashlib.sha256(b"".join(values)).digest()


def extend(old: bytes, digest: bytes) -> bytes:
    """What a sha256 PCR holds after extending `digest` into `old`."""
    return hashlib.sha256(old + digest).digest()
