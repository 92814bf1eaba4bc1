"""Checkpoints in the C2SP formats: tlog-checkpoint bodies inside Ed25519 signed notes.

https://c2sp.org/signed-note and https://c2sp.org/tlog-checkpoint. A note is a text ending in a
newline, a blank line, and signature lines `— <key name> <base64(key hash || signature)>` where
the key hash is SHA-256(name || 0x0A || 0x01 || public key)[:4]. A checkpoint body is the origin
line, the decimal tree size and the base64 root hash. Verifier keys travel as
`<name>+<hex key hash>+<base64(0x01 || public key)>`.

Not here: where the key lives (hostkey.py) and when checkpoints are made (store.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from skyguard.tlog.errors import BadLogInput, VerificationError
from skyguard.tlog.hashing import HASH_SIZE

ALG_ED25519 = 0x01
SIGNATURE_PREFIX = "\u2014 "  # an em dash and a space, as signed-note requires
MAX_SIGNATURES = 100  # signed-note lets verifiers bound the work a note can demand


def _check_key_name(name: str) -> None:
    if not name or any(c.isspace() for c in name) or "+" in name:
        raise BadLogInput(f"key name {name!r} must be non-empty with no spaces or '+'")


def key_hash(name: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public_key).digest()[:4]


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


class Signer:
    """Signs notes with an Ed25519 key under a key name. Its repr never shows the key."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey):
        _check_key_name(name)
        self.name = name
        self._key = private_key
        self.verifier = Verifier(name, _raw_public(private_key.public_key()))

    def __repr__(self):
        return f"Signer(name={self.name!r}, key_hash={self.verifier.key_hash.hex()})"

    def sign(self, text: str) -> str:
        """The signed note: text, a blank line, and this signer's signature line."""
        if not text.endswith("\n"):
            raise BadLogInput("a note text must end with a newline")
        signature = self._key.sign(text.encode("utf-8"))
        blob = base64.b64encode(self.verifier.key_hash + signature).decode()
        return f"{text}\n{SIGNATURE_PREFIX}{self.name} {blob}\n"


class Verifier:
    """Checks a note's signature by one named Ed25519 public key."""

    def __init__(self, name: str, public_key: bytes):
        _check_key_name(name)
        if len(public_key) != 32:
            raise BadLogInput("an Ed25519 public key is 32 bytes")
        self.name = name
        self.public_key = public_key
        self.key_hash = key_hash(name, public_key)
        self._key = Ed25519PublicKey.from_public_bytes(public_key)

    def __repr__(self):
        return f"Verifier({self.vkey()!r})"

    def vkey(self) -> str:
        """The verifier key string: name+hash+base64(0x01 || public key)."""
        blob = base64.b64encode(bytes([ALG_ED25519]) + self.public_key).decode()
        return f"{self.name}+{self.key_hash.hex()}+{blob}"

    @classmethod
    def from_vkey(cls, vkey: str) -> "Verifier":
        parts = vkey.strip().split("+", 2)  # base64 may itself contain "+"
        if len(parts) != 3:
            raise BadLogInput("a verifier key has the form name+hash+base64key "
                              "(as printed by `skyguard log checkpoint --public-key`)")
        name, hash_hex, blob = parts
        try:
            raw = base64.b64decode(blob, validate=True)
            expected_hash = bytes.fromhex(hash_hex)
        except (binascii.Error, ValueError):
            raise BadLogInput("verifier key is not valid hex and base64") from None
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise BadLogInput("verifier key is not an Ed25519 key (algorithm byte 0x01, 32 bytes)")
        verifier = cls(name, raw[1:])
        if verifier.key_hash != expected_hash:
            raise BadLogInput("verifier key hash does not match its name and key")
        return verifier

    def verify(self, note: str) -> str:
        """The note's text if it carries a valid signature by this key; raises otherwise."""
        text, signatures = split_note(note)
        for name, blob in signatures:
            if name != self.name or blob[:4] != self.key_hash:
                continue
            try:
                self._key.verify(blob[4:], text.encode("utf-8"))
            except InvalidSignature:
                raise VerificationError(f"note signature by key {self.name!r} is invalid: "
                                        f"the note was altered or signed by another key") from None
            return text
        names = ", ".join(sorted({n for n, _ in signatures})) or "none"
        raise VerificationError(f"note is not signed by key {self.name!r} "
                                f"(hash {self.key_hash.hex()}); it carries signatures by: {names}")


def split_note(note: str) -> tuple[str, list[tuple[str, bytes]]]:
    """(text, [(key name, key hash || signature)]); raises BadLogInput if malformed."""
    if "\n\n" not in note:
        raise BadLogInput("not a signed note: no blank line between the text and the signatures")
    cut = note.rindex("\n\n")
    text, block = note[: cut + 1], note[cut + 2:]
    if not block.endswith("\n"):
        raise BadLogInput("not a signed note: the signature block must end with a newline")
    signatures = []
    for line in block[:-1].split("\n"):
        if not line.startswith(SIGNATURE_PREFIX):
            raise BadLogInput(f"not a signed note: signature line {line[:40]!r} does not start "
                              f"with an em dash")
        fields = line[len(SIGNATURE_PREFIX):].split(" ")
        if len(fields) != 2:
            raise BadLogInput("not a signed note: a signature line is '— name base64'")
        try:
            blob = base64.b64decode(fields[1], validate=True)
        except binascii.Error:
            raise BadLogInput("not a signed note: signature is not base64") from None
        if len(blob) < 5:
            raise BadLogInput("not a signed note: signature too short")
        signatures.append((fields[0], blob))
    if not signatures or len(signatures) > MAX_SIGNATURES:
        raise BadLogInput(f"a signed note needs 1 to {MAX_SIGNATURES} signatures")
    return text, signatures


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement: the log named origin has `size` entries whose tree root is `hash`."""

    origin: str
    size: int
    hash: bytes

    def body(self) -> str:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.hash).decode()}\n"

    def sign(self, signer: Signer) -> str:
        return signer.sign(self.body())

    @classmethod
    def parse_body(cls, text: str) -> "Checkpoint":
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise BadLogInput("a checkpoint body has an origin, a size and a root hash line")
        origin, size_text, hash_text = lines[0], lines[1], lines[2]
        if not origin:
            raise BadLogInput("checkpoint origin line is empty")
        if not size_text.isdigit() or (size_text != "0" and size_text.startswith("0")):
            raise BadLogInput(f"checkpoint size {size_text[:30]!r} is not a decimal number")
        try:
            root = base64.b64decode(hash_text, validate=True)
        except binascii.Error:
            raise BadLogInput("checkpoint root hash is not base64") from None
        if len(root) != HASH_SIZE:
            raise BadLogInput("checkpoint root hash is not 32 bytes")
        return cls(origin, int(size_text), root)


def parse_and_verify(note: str, verifier: Verifier, origin: str | None = None) -> Checkpoint:
    """The checkpoint in a note signed by verifier (and of that origin, if given)."""
    checkpoint = Checkpoint.parse_body(verifier.verify(note))
    if origin is not None and checkpoint.origin != origin:
        raise VerificationError(f"checkpoint is for log {checkpoint.origin!r}, "
                                f"not for this log ({origin!r})")
    return checkpoint


def split_notes(text: str) -> list[str]:
    """Several notes in one file (a witness's collection, blank lines between allowed), split."""
    notes, body, signatures = [], [], []
    for line in text.split("\n"):
        if line.startswith(SIGNATURE_PREFIX) and body and not body[-1]:
            signatures.append(line)
            continue
        if signatures:   # the first line after a signature block starts the next note
            notes.append("\n".join(body) + "\n" + "\n".join(signatures) + "\n")
            body, signatures = [], []
        if line or body:  # blank lines between notes are not part of any note
            body.append(line)
    if signatures:
        notes.append("\n".join(body) + "\n" + "\n".join(signatures) + "\n")
    elif any(body):
        raise BadLogInput("text after the last signed note (or no note) in the checkpoint file")
    if not notes:
        raise BadLogInput("no signed note found in the checkpoint file")
    return notes
