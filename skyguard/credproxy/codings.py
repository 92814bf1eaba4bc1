"""Content codings of HTTP bodies undone, bounded and fail-closed: gzip (every member), deflate
(zlib-wrapped or raw), identity. Anything else is refused, since a body that cannot be decoded
cannot be proven free of secrets or of blocked content.

A module of its own so the decoding loop is the one place that knows zlib's quirks, and so the fuzz
harness can leave it uninstrumented (atheris 2.3's bytecode rewriting breaks this loop's
try/except on Python 3.11 with a bogus SystemError that the plain interpreter never raises).
"""

from __future__ import annotations

import zlib

from skyguard.errors import CredentialError

Headers = tuple[tuple[bytes, bytes], ...]


# Content codings registered with IANA that the proxy does not decode (named in its refusal).
_KNOWN_CODINGS = frozenset({b"br", b"zstd", b"compress", b"x-compress", b"exi", b"pack200-gzip", b"aes128gcm",
                            b"dcb", b"dcz"})


class UnscrubbableResponse(CredentialError):
    """A response body the proxy cannot decode, so cannot prove free of secrets."""


def decode_body(headers: Headers, body: bytes, limit: int) -> bytes:
    """The body with its Content-Encoding undone (gzip, deflate, identity), at most `limit` bytes.

    Every gzip member is decoded (a body may hold several, RFC 1952 2.2), so nothing after the
    first is cut off unseen; a stream that ends early, or bytes after a deflate stream, are
    refused. Anything else (br, zstd, stacked unknowns) raises UnscrubbableResponse: fail closed."""
    codings = [c.strip().lower() for n, v in headers if n == b"content-encoding" for c in v.split(b",")]
    for coding in reversed([c for c in codings if c and c != b"identity"]):
        if coding in (b"gzip", b"x-gzip"):
            body = _inflate(body, 16 + zlib.MAX_WBITS, limit, members=True)
        elif coding == b"deflate":
            body = _inflate(body, zlib.MAX_WBITS if body[:1] == b"\x78" else -zlib.MAX_WBITS, limit, members=False)
        else:
            # Named only when it is a registered coding: the header is the upstream's to fill,
            # and this message goes to the VM.
            name = repr(coding.decode()) if coding in _KNOWN_CODINGS else "an unregistered one"
            raise UnscrubbableResponse(f"upstream used content coding {name}, which the proxy cannot inspect")
    return body


def _inflate(data: bytes, wbits: int, limit: int, members: bool) -> bytes:
    if not data:
        return data  # HEAD, 204, 304: a coding named, nothing to decode
    out = bytearray()
    while True:
        decoder = zlib.decompressobj(wbits)
        try:
            out += decoder.decompress(data, limit + 1 - len(out))
        except zlib.error:
            raise UnscrubbableResponse("upstream sent a body that does not decode") from None
        if len(out) > limit or decoder.unconsumed_tail:
            raise UnscrubbableResponse("decoded response body is larger than the proxy's limit")
        if not decoder.eof:
            raise UnscrubbableResponse("upstream sent a compressed body that ends early")
        data = decoder.unused_data
        if not data:
            return bytes(out)
        if not members:
            raise UnscrubbableResponse("upstream sent bytes after the end of a deflate stream")


