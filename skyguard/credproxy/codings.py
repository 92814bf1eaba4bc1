"""The credential proxy's view of content codings (skyguard/httpcodings.py does the decoding): a
response it cannot decode cannot be proven free of secrets, so it is refused."""

from __future__ import annotations

from skyguard import httpcodings
from skyguard.errors import CredentialError

Headers = tuple[tuple[bytes, bytes], ...]


class UnscrubbableResponse(CredentialError):
    """A response body the proxy cannot decode, so cannot prove free of secrets."""


def decode_body(headers: Headers, body: bytes, limit: int) -> bytes:
    """The body with its Content-Encoding undone, at most `limit` bytes; UnscrubbableResponse if not."""
    for name, _ in headers:
        if name == b"content-encoding":
            return httpcodings.decode_body(headers, body, limit, UnscrubbableResponse, "the proxy's limit")
    return body  # no coding named: nothing to undo (the common case, skipped cheaply: issue 24)
