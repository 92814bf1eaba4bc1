"""Every spelling of a secret the proxy must recognise. Used both ways: to block outbound requests
that carry a real secret (content filtering) and to scrub responses before they reach the VM.
Pure functions over bytes; no I/O.

The forms recognised (one compiled regex; `tests/unit/test_cred_forms.py` has one test each):

 1. raw bytes;
 2. per byte, in any mix within one occurrence:
    - percent-encoding `%4a` / `%4A`, applied once or more (`%254A`, `%25254A`), and `%u004A`;
    - `+` for a space (form encoding);
    - JSON / JavaScript escapes `\\u004a`, `\\/` for `/`, and `\\x4a`;
    - HTML / XML character references: decimal `&#74;`, hex `&#x4a;` (leading zeros, either
      case, with or without the `;`), and the HTML5 named references of ASCII characters
      (`&sol;`, `&plus;`, `&equals;`, `&lpar;` ...);
    - quoted-printable `=4A`, with soft line breaks (`=` CRLF or `=` LF) anywhere between bytes;
 3. hex of the whole secret, either case;
 4. base64, standard and URL-safe alphabets, at each of the 3 alignments the secret can have
    inside a longer encoded stream (so it is found inside Basic auth's "user:secret"), with line
    breaks (CRLF or LF, as MIME and PEM wrap) allowed between any two characters;
 5. base32 (RFC 4648) and base32hex, either case, at each of the 5 alignments, line breaks
    allowed the same way;
 6. UTF-16, little- and big-endian, of the secret's text.

Out of reach here, by design: encryption, compression inside a body (the proxy decodes the
content codings it accepts first, and refuses the others), and nested encodings (base64 of hex,
UTF-16 of base64, ...); an upstream that reflects a secret through such a transformation is not
caught, and neither is one that returns PART of it: a destination that stores what it is sent
(an object store a body-injected credential was written to, read back by byte ranges) or quotes
a truncated token in an error hands the secret out piece by piece. Give credentials only to
destinations that never echo them, and body injection only to endpoints that do not store bodies.
Secrets shorter than MIN_ENCODED_LEN are matched raw, per byte and in hex only.
"""

from __future__ import annotations

import base64
import bisect
import html.entities
import re
from collections.abc import Iterable

REDACTED = b"[skyguard-redacted]"

# Secrets shorter than this would match ordinary text too often; the store should refuse them,
# and here they are still matched raw but not in their short encoded forms.
MIN_ENCODED_LEN = 6

_SOFT_BREAK = rb"(?:=\r?\n)?"  # a quoted-printable soft line break
_B32HEX = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", b"0123456789ABCDEFGHIJKLMNOPQRSTUV")


def _named_references() -> dict[int, list[bytes]]:
    """HTML5 named character references of single ASCII characters, by character."""
    names: dict[int, list[bytes]] = {}
    for name, text in html.entities.html5.items():
        if len(text) == 1 and ord(text) < 0x80:
            names.setdefault(ord(text), []).append(name.encode())
    return names


_NAMED = _named_references()


def _hex_either_case(byte: int) -> bytes:
    hi, lo = tuple(f"{byte:02x}")  # two hex digits, always
    return b"".join(b"[" + c.lower().encode() + c.upper().encode() + b"]" if c.isalpha() else c.encode()
                    for c in (hi, lo))


def _byte_alternatives(byte: int) -> bytes:
    """A regex matching one byte in any of the per-byte spellings (form 2 of the list)."""
    hex2 = _hex_either_case(byte)
    options = [re.escape(bytes([byte])),
               b"%(?:25)*" + hex2,  # percent-encoded once, twice, ...
               rb"%[uU]00" + hex2,
               rb"=" + hex2,  # quoted-printable
               rb"\\x" + hex2]
    if byte == 0x20:
        options.append(rb"\+")  # application/x-www-form-urlencoded space
    if byte < 0x80:
        options.append(rb"\\u00" + hex2)
        options.append(rb"&#0*" + str(byte).encode() + b";?")
        options.append(rb"&#[xX]0*" + hex2 + b";?")
        for name in _NAMED.get(byte, ()):
            options.append(b"&" + re.escape(name))
    if byte == 0x2F:
        options.append(rb"\\/")  # JSON may escape the solidus
    return b"(?:" + b"|".join(options) + b")"


def _aligned_cores(secret: bytes, group: int, encode) -> set[bytes]:
    """The characters of an encoding with `group`-byte quanta that are fully determined by the
    secret, at each alignment the secret can have inside a longer encoded stream."""
    bits = {3: 6, 5: 5}[group]
    cores = set()
    for shift in range(group):
        encoded = encode(b"\0" * shift + secret).rstrip(b"=")
        first = -(-8 * shift // bits)  # first character whose bits all come from the secret
        last = (8 * (shift + len(secret))) // bits  # one past the last such character
        core = encoded[first:last]
        if len(core) >= MIN_ENCODED_LEN:
            cores.add(core)
    return cores


def byte_wise_pattern(secret: bytes) -> bytes:
    """The regex of form 2: each byte in any per-byte spelling, QP soft breaks between bytes."""
    return _SOFT_BREAK.join(_byte_alternatives(b) for b in secret)


def literal_forms(secret: bytes) -> set[bytes]:
    """Forms 3 to 6 as fixed strings, in lower case: they are searched in the data without line
    breaks and in lower case. Lower case costs nothing for hex and base32 (either case is
    valid); for base64 and UTF-16 it only makes the match broader (fail closed), and these
    strings are long enough that ordinary text does not hit them."""
    forms: set[bytes] = set()
    if len(secret) * 2 >= MIN_ENCODED_LEN:
        forms.add(secret.hex().encode())
    for core in _aligned_cores(secret, 3, base64.b64encode):
        forms |= {core.lower(), core.translate(bytes.maketrans(b"+/", b"-_")).lower()}
    for core in _aligned_cores(secret, 5, base64.b32encode):
        forms |= {core.lower(), core.translate(_B32HEX).lower()}
    text = secret.decode("utf-8", errors="surrogateescape")
    try:
        forms |= {text.encode("utf-16-le").lower(), text.encode("utf-16-be").lower()}
    except UnicodeEncodeError:  # not text: there is no UTF-16 spelling of it
        pass
    return forms


_BREAKS = re.compile(rb"[\r\n]")


class _Views:
    """The data as it is, without CR and LF (wrapped base64 and base32 become contiguous),
    and that in lower case; offsets in the last two map back to the data (`span`)."""

    __slots__ = ("data", "unwrapped", "_lowered", "_removed")

    def __init__(self, data: bytes):
        self.data = data
        if b"\n" in data or b"\r" in data:  # rare in headers and small bodies: the fast path skips this
            # bytes.replace, not a regex: a twentieth of the time, and the GIL is held for one
            # call at a time (a 16 MiB body is scrubbed in a worker thread, beside the loop).
            self.unwrapped = data.replace(b"\r", b"").replace(b"\n", b"")
            self._removed: list[int] | None = None  # found when a match needs mapping back (span)
        else:
            self._removed = []
            self.unwrapped = data
        self._lowered: bytes | None = None

    @property
    def lowered(self) -> bytes:
        if self._lowered is None:
            self._lowered = self.unwrapped.lower()  # same length and offsets: ASCII only
        return self._lowered

    def span(self, start: int, end: int) -> tuple[int, int]:
        """An unwrapped [start, end) as a span of the data (line breaks inside included)."""
        if self._removed is None:
            # For each removed byte: the unwrapped offset it would have had.
            self._removed = [m.start() - k for k, m in enumerate(_BREAKS.finditer(self.data))]
        if not self._removed:
            return start, end
        return (start + bisect.bisect_right(self._removed, start),
                end - 1 + bisect.bisect_right(self._removed, end - 1) + 1)


# Below this many bytes the fixed forms are looked for with one regex alternation, above it
# with bytes.find per form: find prepares its needle on every call (costly for short data),
# the alternation tries every form at every position (costly for long data).
ALTERNATION_BELOW = 4096
GRAM = 4  # bytes per sample of the fixed-form prefilter (see _Prefilter)


class _Prefilter:
    """Exact, cheap "no fixed form can be here": every GRAM-byte substring of every fixed form
    is in a set, and data holding a form of length >= L holds one of them at an offset that is
    a multiple of L - GRAM + 1. So sampling the data at that stride finds every occurrence's
    neighbourhood; only data with a hit is searched properly (most messages have none)."""

    __slots__ = ("grams", "step")

    def __init__(self, forms: tuple[bytes, ...]):
        self.grams = frozenset(form[i:i + GRAM] for form in forms for i in range(len(form) - GRAM + 1))
        self.step = max(1, min((len(form) for form in forms), default=GRAM) - GRAM + 1)

    def may_hold(self, data: bytes) -> bool:
        return not self.grams.isdisjoint([data[at:at + GRAM] for at in range(0, len(data) - GRAM + 1, self.step)])


class SecretForms:
    """Finds and scrubs the secrets given at construction. Its repr never shows them.

    One regex per secret for the per-byte forms, written so the regex engine can skip ahead to
    the few bytes a match can start with; the other forms are fixed strings looked for in the
    data unwrapped and in lower case (see ALTERNATION_BELOW). One alternation of everything
    would lose the shortcuts and cost several times more per byte (the proxy scans every
    message). Data shorter than the shortest form of any secret is not scanned at all."""

    __slots__ = ("_byte_wise", "_literal", "_literal_alternation", "_prefilter", "_shortest", "_count")

    def __init__(self, secrets: Iterable[bytes]):
        secrets = sorted(set(s for s in secrets if s), key=len, reverse=True)
        self._count = len(secrets)
        self._byte_wise = tuple(re.compile(byte_wise_pattern(s)) for s in secrets)
        self._literal = tuple(sorted(set().union(*(literal_forms(s) for s in secrets)), key=len, reverse=True))
        self._literal_alternation = re.compile(b"|".join(re.escape(f) for f in self._literal)) if self._literal else None
        self._prefilter = _Prefilter(self._literal)
        # Every per-byte spelling takes at least a byte per byte of the secret.
        self._shortest = min([len(s) for s in secrets] + [len(f) for f in self._literal], default=0)

    def found_in(self, data: bytes) -> bool:
        if len(data) < self._shortest or not self._count:
            return False
        for pattern in self._byte_wise:
            if pattern.search(data):
                return True
        if not self._literal:
            return False
        lowered = _Views(data).lowered
        if not self._prefilter.may_hold(lowered):
            return False
        if len(lowered) < ALTERNATION_BELOW:
            return self._literal_alternation.search(lowered) is not None
        for form in self._literal:
            if form in lowered:
                return True
        return False

    def scrub(self, data: bytes) -> tuple[bytes, int]:
        """Data with every form of every secret replaced, and how many replacements were made
        (overlapping matches of different forms count once)."""
        if len(data) < self._shortest or not self._count:
            return data, 0
        spans = [m.span() for pattern in self._byte_wise for m in pattern.finditer(data)]
        views = _Views(data)
        lowered = views.lowered
        if self._literal and self._prefilter.may_hold(lowered):
            if len(lowered) < ALTERNATION_BELOW:
                spans += [views.span(*m.span()) for m in self._literal_alternation.finditer(lowered)]
            else:
                for form in self._literal:
                    at = lowered.find(form)
                    while at >= 0:
                        spans.append(views.span(at, at + len(form)))
                        at = lowered.find(form, at + 1)
        if not spans:
            return data, 0
        spans.sort()
        merged: list[list[int]] = []
        for start, end in spans:
            if merged and start < merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        out, at = [], 0
        for start, end in merged:
            out += [data[at:start], REDACTED]
            at = end
        out.append(data[at:])
        return b"".join(out), len(merged)

    def __repr__(self) -> str:
        return f"SecretForms({self._count} secrets)"
