"""Checkpoints in the C2SP formats: tlog-checkpoint bodies inside Ed25519 signed notes.

https://c2sp.org/signed-note and https://c2sp.org/tlog-checkpoint. A note is a text ending in a
newline, a blank line, and signature lines `— <key name> <base64(key hash || signature)>` where
the key hash is SHA-256(name || 0x0A || 0x01 || public key)[:4]. A checkpoint body is the origin
line, the decimal tree size and the base64 root hash. Verifier keys travel as
`<name>+<hex key hash>+<base64(0x01 || public key)>`.

Parsing follows the specs to the letter, as the Go reference does (golang.org/x/mod/sumdb/note
`Open`, transparency-dev/formats `log.Checkpoint`): a note is valid UTF-8 with no control
character but newline; key names are non-empty with no Unicode space (Go's unicode.IsSpace) and no
'+'; at most 100 signatures; a checkpoint's size is ASCII digits with no leading zero, at most
2**64 - 1; extension lines are non-empty. One deliberate strictness beyond the reference: base64
must be canonical (RFC 4648 section 3.5), so one checkpoint has one text. What we sign is held to
more than what we accept: a signer refuses any text the reference would refuse to open, and a
checkpoint refuses an origin that is not printable.

Not here: where the key lives (hostkey.py) and when checkpoints are made (store.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from skyguard.tlog.errors import BadLogInput, VerificationError
from skyguard.tlog.hashing import HASH_SIZE

ALG_ED25519 = 0x01
SIGNATURE_PREFIX = "\u2014 "  # an em dash and a space, as signed-note requires
MAX_SIGNATURES = 100  # the reference refuses more (signed-note: verifiers must accept 16)
MAX_TREE_SIZE = (1 << 64) - 1  # the reference parses the size as a uint64

# Unicode White_Space, which is what Go's unicode.IsSpace tests (the reference's isValidName).
# Written out rather than str.isspace(), whose set differs (it includes U+001C..U+001F).
_UNICODE_SPACES = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
                            "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_SIZE_RE = re.compile(r"0|[1-9][0-9]*", re.ASCII)
_HEX8_RE = re.compile(r"[0-9a-fA-F]{8}", re.ASCII)


def valid_key_name(name) -> bool:
    """signed-note: non-empty, no Unicode space, no '+' (and no control character: a note
    holding one does not open)."""
    return (isinstance(name, str) and name != "" and "+" not in name
            and not any(c in _UNICODE_SPACES or c < " " or "\ud800" <= c <= "\udfff"
                        for c in name))


def _check_key_name(name: str) -> None:
    if not valid_key_name(name):
        raise BadLogInput(f"key name {name!r} must be non-empty, with no spaces, no '+' and no "
                          f"control characters (signed-note)")


_NOT_IN_A_NOTE = re.compile("[\x00-\x09\x0b-\x1f\ud800-\udfff]")


def check_note_characters(note: str) -> None:
    """signed-note: valid UTF-8 (no lone surrogate) and no ASCII control character but newline."""
    bad = _NOT_IN_A_NOTE.search(note)  # a regex, not a loop per character: verify reads many notes
    if bad:
        raise BadLogInput(f"not a signed note: it holds the character U+{ord(bad.group()):04X} "
                          f"(control characters other than newline are not allowed)")


def b64decode_canonical(text: str, what: str) -> bytes:
    """Standard base64 (RFC 4648 section 4) in its one canonical form, or BadLogInput."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadLogInput(f"{what} is not base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise BadLogInput(f"{what} is not canonical base64 (padding or trailing bits)")
    return raw


def key_hash(name: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public_key).digest()[:4]


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


class Signer:
    """Signs notes with an Ed25519 key under a key name. Its repr never shows the key."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey):
        _check_key_name(name)
        if not name.isprintable():   # stricter for what we sign: no format or private-use chars
            raise BadLogInput(f"key name {name!r} must be printable")
        self.name = name
        self._key = private_key
        self.verifier = Verifier(name, _raw_public(private_key.public_key()))

    def __repr__(self):
        return f"Signer(name={self.name!r}, key_hash={self.verifier.key_hash.hex()})"

    def sign(self, text: str) -> str:
        """The signed note: text, a blank line, and this signer's signature line."""
        if not text.endswith("\n"):
            raise BadLogInput("a note text must end with a newline")
        check_note_characters(text)   # never sign what a verifier must refuse to open
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
    def from_vkey(cls, vkey: str) -> Verifier:
        """Parse name+hash+base64key exactly as the reference's NewVerifier does."""
        usage = ("a verifier key has the form name+hash+base64key "
                 "(as printed by `skyguard log checkpoint --public-key`)")
        if not isinstance(vkey, str) or vkey.count("+") < 2:
            raise BadLogInput(usage)
        name, hash_hex, blob = vkey.split("+", 2)  # base64 may itself contain "+"
        if not valid_key_name(name) or not _HEX8_RE.fullmatch(hash_hex):
            raise BadLogInput(usage)
        raw = b64decode_canonical(blob, "the verifier key")
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise BadLogInput("verifier key is not an Ed25519 key (algorithm byte 0x01, 32 bytes)")
        verifier = cls(name, raw[1:])
        if verifier.key_hash != bytes.fromhex(hash_hex):
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
    """(text, [(key name, key hash || signature)]); raises BadLogInput if malformed.

    As the reference's Open: the text ends at the last blank line; each signature line is the
    em dash, a space, a valid key name, a space and base64 of at least 5 bytes."""
    if not isinstance(note, str):
        raise BadLogInput("not a signed note: not text")
    check_note_characters(note)
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
                              f"with an em dash and a space")
        name, _, blob_text = line[len(SIGNATURE_PREFIX):].partition(" ")
        if not valid_key_name(name):
            raise BadLogInput(f"not a signed note: signature line names an invalid key "
                              f"{name[:40]!r} (empty, a space, '+' or a control character)")
        if not blob_text:
            raise BadLogInput("not a signed note: a signature line is '\u2014 name base64'")
        blob = b64decode_canonical(blob_text, "not a signed note: the signature")
        if len(blob) < 5:
            raise BadLogInput("not a signed note: signature too short")
        signatures.append((name, blob))
        if len(signatures) > MAX_SIGNATURES:
            raise BadLogInput(f"a signed note has at most {MAX_SIGNATURES} signatures")
    return text, signatures


def _check_origin(origin) -> None:
    """What we sign as an origin: non-empty printable text (no control or format characters,
    no newline); tlog-checkpoint only requires non-empty, the rest keeps notes readable."""
    if not isinstance(origin, str) or not origin or not origin.isprintable():
        raise BadLogInput(f"checkpoint origin {origin!r} must be non-empty printable text")


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement: the log named origin has `size` entries whose tree root is `hash`.

    `extensions` are tlog-checkpoint's optional extension lines: opaque, each non-empty; this
    log never writes any, and accepts them in notes others sign."""

    origin: str
    size: int
    hash: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> str:
        _check_origin(self.origin)
        if isinstance(self.size, bool) or not isinstance(self.size, int) \
                or not 0 <= self.size <= MAX_TREE_SIZE:
            raise BadLogInput(f"checkpoint size {self.size!r} is not an integer 0..2**64-1")
        if not isinstance(self.hash, (bytes, bytearray)) or len(self.hash) != HASH_SIZE:
            raise BadLogInput("checkpoint root hash must be 32 bytes")
        for line in self.extensions:
            if not isinstance(line, str) or not line or not line.isprintable():
                raise BadLogInput("checkpoint extension lines must be non-empty printable text")
        extra = "".join(f"{line}\n" for line in self.extensions)
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.hash).decode()}\n{extra}"

    def sign(self, signer: Signer) -> str:
        return signer.sign(self.body())

    @classmethod
    def parse_body(cls, text: str) -> Checkpoint:
        """tlog-checkpoint's note text: at least three non-empty lines, each ending in a
        newline: origin, size (ASCII decimal, no leading zero), base64 root hash; then any
        non-empty extension lines."""
        check_note_characters(text)
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise BadLogInput("a checkpoint body has an origin, a size and a root hash line, "
                              "each ending in a newline")
        origin, size_text, hash_text, *extensions = lines[:-1]
        if not origin:
            raise BadLogInput("checkpoint origin line is empty")
        # The length first: int() refuses (ValueError) more than 4300 digits.
        if (len(size_text) > 20 or not _SIZE_RE.fullmatch(size_text)
                or int(size_text) > MAX_TREE_SIZE):
            raise BadLogInput(f"checkpoint size {size_text[:30]!r} is not ASCII decimal digits "
                              f"without a leading zero (0..2**64-1)")
        root = b64decode_canonical(hash_text, "checkpoint root hash")
        if len(root) != HASH_SIZE:
            raise BadLogInput("checkpoint root hash is not 32 bytes")
        if any(not line for line in extensions):
            raise BadLogInput("checkpoint extension lines must be non-empty")
        return cls(origin, int(size_text), root, tuple(extensions))


def parse_and_verify(note: str, verifier: Verifier, origin: str | None = None) -> Checkpoint:
    """The checkpoint in a note signed by verifier (and of that origin, if given)."""
    checkpoint = Checkpoint.parse_body(verifier.verify(note))
    if origin is not None and checkpoint.origin != origin:
        raise VerificationError(f"checkpoint is for log {checkpoint.origin!r}, "
                                f"not for this log ({origin!r})")
    return checkpoint


def split_notes(text: str) -> list[str]:
    """Several notes in one file (a witness's collection, blank lines between allowed), split."""
    notes: list[str] = []
    body: list[str] = []
    signatures: list[str] = []
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
