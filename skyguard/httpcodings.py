"""Content codings of HTTP bodies undone, bounded and fail-closed: gzip (every member), deflate
(zlib-wrapped or raw), identity. Anything else is refused, since a body that cannot be decoded
cannot be proven free of secrets or of blocked content. Used by the credential proxy (responses it
scrubs) and the content filter (bodies it judges), each with its own error.

A module of its own so the decoding loop is the one place that knows zlib's quirks, and so the fuzz
harness can leave it uninstrumented (atheris 2.3's bytecode rewriting breaks this loop's
try/except on Python 3.11 with a bogus SystemError that the plain interpreter never raises).
"""

from __future__ import annotations

import zlib

Headers = tuple[tuple[bytes, bytes], ...]


# Content codings registered with IANA that the proxy does not decode (named in its refusal).
_KNOWN_CODINGS = frozenset({b"br", b"zstd", b"compress", b"x-compress", b"exi", b"pack200-gzip", b"aes128gcm",
                            b"dcb", b"dcz"})


def decode_body(headers: Headers, body: bytes, limit: int, error: type[Exception],
                limit_name: str = "the limit") -> bytes:
    """The body with its Content-Encoding undone (gzip, deflate, identity), at most `limit` bytes.

    Every gzip member is decoded (a body may hold several, RFC 1952 2.2), so nothing after the
    first is cut off unseen; a stream that ends early, or bytes after a deflate stream, are
    refused. Anything else (br, zstd, stacked unknowns) raises `error` (UnscrubbableResponse for
    the proxy's responses, the content filter's Uninspectable for what it judges): fail closed.
    `limit_name` names the limit in that message ("the inspection buffer")."""
    codings = [c.strip().lower() for n, v in headers if n == b"content-encoding" for c in v.split(b",")]
    for coding in reversed([c for c in codings if c and c != b"identity"]):
        if coding in (b"gzip", b"x-gzip"):
            body = _inflate(body, 16 + zlib.MAX_WBITS, limit, True, error, limit_name)
        elif coding == b"deflate":
            wbits = zlib.MAX_WBITS if body[:1] == b"\x78" else -zlib.MAX_WBITS  # zlib-wrapped or raw
            body = _inflate(body, wbits, limit, False, error, limit_name)
        else:
            # Named only when it is a registered coding: the header is the peer's to fill, and
            # this message may go back to a VM.
            name = repr(coding.decode()) if coding in _KNOWN_CODINGS else "an unregistered one"
            raise error(f"content coding {name}, which skyguard cannot inspect (only gzip and deflate)")
    return body


def _inflate(data: bytes, wbits: int, limit: int, members: bool, error: type[Exception], limit_name: str) -> bytes:
    """zlib-decode at most `limit` bytes of output (never more is allocated)."""
    if not data:
        return data  # HEAD, 204, 304: a coding named, nothing to decode
    out = bytearray()
    while True:
        decoder = zlib.decompressobj(wbits)
        try:
            out += decoder.decompress(data, limit + 1 - len(out))
        except zlib.error:
            raise error("a compressed body that does not decode") from None
        if len(out) > limit or decoder.unconsumed_tail:
            raise error(f"a body that decodes to more than {limit_name} ({limit} bytes)")
        if not decoder.eof:
            raise error("a compressed body that ends early")
        data = decoder.unused_data
        if not data:
            return bytes(out)
        if not members:
            raise error("bytes after the end of a deflate stream")
