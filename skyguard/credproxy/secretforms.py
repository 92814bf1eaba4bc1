"""Every spelling of a secret the proxy must recognise: raw, percent-encoded (any mix), JSON
\\u-escaped, hex (any case) and base64 (standard and URL-safe, at every byte alignment, so the
secret is found inside a longer base64 blob such as Basic auth's "user:secret").

Used both ways: to block outbound requests that carry a real secret (content filtering) and to
scrub responses before they reach the VM. Pure functions over bytes; no I/O. Not a general DLP
engine: double encodings, compression and encryption are out of reach here (the proxy handles
compression by decoding first, and refuses what it cannot decode).
"""

from __future__ import annotations

import base64
import re
from typing import Iterable

REDACTED = b"[skyguard-redacted]"

# Secrets shorter than this would match ordinary text too often; the store should refuse them,
# and here they are still matched raw but not in their short encoded forms.
MIN_ENCODED_LEN = 6


def _byte_alternatives(byte: int) -> bytes:
    """A regex matching one byte written literally, percent-encoded (either case) or \\u-escaped."""
    options = [re.escape(bytes([byte]))]
    options.append(b"%" + _hex_either_case(byte))
    if byte == 0x20:
        options.append(rb"\+")  # application/x-www-form-urlencoded space
    if byte < 0x80:
        options.append(rb"\\u00" + _hex_either_case(byte))
    if byte == 0x2F:
        options.append(rb"\\/")  # JSON may escape the solidus
    return b"(?:" + b"|".join(options) + b")"


def _hex_either_case(byte: int) -> bytes:
    hi, lo = f"{byte:02x}"
    return b"".join(b"[" + c.lower().encode() + c.upper().encode() + b"]" if c.isalpha() else c.encode()
                    for c in (hi, lo))


def _base64_cores(secret: bytes) -> set[bytes]:
    """The base64 characters fully determined by the secret, at each of the 3 alignments it can
    have inside a longer encoded stream, in both alphabets."""
    cores = set()
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + secret).rstrip(b"=")
        first = -(-8 * shift // 6)  # first character whose 6 bits all come from the secret
        last = (8 * (shift + len(secret))) // 6  # one past the last such character
        core = encoded[first:last]
        if len(core) >= MIN_ENCODED_LEN:
            cores.add(core)
            cores.add(core.translate(bytes.maketrans(b"+/", b"-_")))
    return cores


def secret_pattern(secrets: Iterable[bytes]) -> re.Pattern[bytes] | None:
    """One compiled regex matching any form of any of the secrets (None when there are none)."""
    branches: list[bytes] = []
    for secret in sorted(set(s for s in secrets if s), key=len, reverse=True):
        branches.append(b"".join(_byte_alternatives(b) for b in secret))
        if len(secret) * 2 >= MIN_ENCODED_LEN:
            branches.append(b"(?i:" + secret.hex().encode() + b")")
        branches.extend(re.escape(core) for core in _base64_cores(secret))
    if not branches:
        return None
    return re.compile(b"|".join(branches))


class SecretForms:
    """Finds and scrubs the secrets given at construction. Its repr never shows them."""

    __slots__ = ("_pattern", "_count")

    def __init__(self, secrets: Iterable[bytes]):
        secrets = [s for s in secrets if s]
        self._count = len(set(secrets))
        self._pattern = secret_pattern(secrets)

    def found_in(self, data: bytes) -> bool:
        return bool(self._pattern and data and self._pattern.search(data))

    def scrub(self, data: bytes) -> tuple[bytes, int]:
        """Data with every form of every secret replaced, and how many replacements were made."""
        if not self._pattern or not data:
            return data, 0
        return self._pattern.subn(REDACTED, data)

    def __repr__(self) -> str:
        return f"SecretForms({self._count} secrets)"
