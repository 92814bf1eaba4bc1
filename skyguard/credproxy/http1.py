"""HTTP/1.1 framing for the credential proxy, sans-io: bytes from a VM become whole requests
(RequestReader), bytes from an upstream become one response (ResponseReader), and the messages
the proxy writes are serialised here (serialise_request, serialise_response). No sockets, no
policy: proxy.py and upstream.py move the bytes, swap.py decides.

Both readers sit on llhttp (httptools), the parser of Node.js, strict by default (no obs-fold,
bare CR, CL+TE, duplicate CL); they add what a proxy needs on top of it: HTTP/1.0 and 1.1 only,
chunked as the only transfer coding (in both directions), bounded heads and bodies, and trailers dropped (never
forwarded in either direction). Messages are buffered whole (bounded): a secret split across
reads or chunks must still be found, swapped or scrubbed.

Public for tests and fuzz harnesses (tests/fuzz/harnesses.py feeds both readers).
"""

from __future__ import annotations

import collections
import http
import re
from dataclasses import dataclass

import httptools

from skyguard.credproxy.codings import UnscrubbableResponse
from skyguard.credproxy.swap import HOP_BY_HOP, HttpRequest

# A request target as h11 accepted it (RFC 9112 3.2: visible ASCII only).
_TARGET = re.compile(rb"[\x21-\x7e]+")
# What may never appear in a header name, value or reason phrase we write (CR and LF would end
# the line: response splitting, request smuggling). Everything we emit is checked in one search.
_UNSAFE_IN_HEAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# The same bytes, deleted by bytes.translate (_unsafe_lines: one C pass, 4x faster than the search).
_UNSAFE_BYTES = bytes(b for b in range(256) if _UNSAFE_IN_HEAD.match(bytes([b])))
# Request headers never forwarded (serialise_request): hop-by-hop, and Expect (the proxy answers it).
_NOT_FORWARDED = HOP_BY_HOP | {b"expect"}
# Statuses whose responses never have a body (RFC 9110 6.4.1), whatever the headers say.
NO_BODY_STATUS = frozenset({204, 304})
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

IDLE, HEAD, BODY = "idle", "head", "body"  # RequestReader.state
_FRAMING = frozenset({b"host", b"transfer-encoding", b"content-length", b"expect"})  # what on_headers_complete reads


@dataclass(frozen=True)
class ProxyLimits:
    """Every bound the proxy enforces. Times in seconds, sizes in bytes."""

    max_header_bytes: int = 32 * 1024  # request line + headers (and the same for responses)
    header_timeout: float = 10.0  # whole request head (and TLS ClientHello), from its first byte
    idle_timeout: float = 60.0  # keep-alive wait for the next request
    body_read_timeout: float = 10.0  # between two reads of a body
    max_request_body: int = 1 << 20
    max_response_body: int = 16 << 20  # decoded
    upstream_timeout: float = 30.0  # connect, TLS handshake, and the whole response
    # Open client connections per VM (workload); clients that are no workload of the policy
    # share one such allowance. Per VM, so one VM holding idle connections never locks the
    # others out; the total is bounded by (workloads + 1) x this.
    max_connections_per_vm: int = 256
    # Interception certificates minted per VM (names not already cached): a token bucket of
    # this many per second, holding at most `mint_burst_per_vm`. Minting costs a signature, so
    # a VM cycling through random SNIs could otherwise keep a core busy for everyone.
    mint_rate_per_vm: float = 2.0
    mint_burst_per_vm: int = 64
    max_idle_upstream: int = 512  # kept-alive upstream connections waiting for reuse, in total


class ProtocolRefusal(Exception):
    """This request cannot be handled; answer `status` with `reason` and close."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class UpstreamProtocolError(Exception):
    """The upstream's answer is not HTTP/1.1 the proxy can read: the client gets a 502."""


class UnsafeHead(ValueError):
    """A message head the proxy would write holds a control character or an unforwardable
    status: writing it could split the message, so nothing is written."""


class Upgraded(Exception):
    """The last queued request switches protocols; the bytes after it are not HTTP/1.1."""


class StaleConnection(ConnectionResetError):
    """A pooled upstream connection was closed before it answered: safe to retry once."""


class _Stop(Exception):
    """Internal: stop parsing this read (the response is whole; what follows is not ours)."""


# ---- requests from the VM ---------------------------------------------------------------------


class RequestReader:
    """Bytes from one client connection in, whole HttpRequests out (`complete`).

    llhttp frames the messages; this adds the proxy's rules. feed() raises ProtocolRefusal for
    anything refused, or Upgraded after a request that switches protocols (it is queued, and
    decide() refuses it; nothing after it is read)."""

    def __init__(self, limits: ProxyLimits):
        self.limits = limits
        self.parser = httptools.HttpRequestParser(self)
        self.complete: collections.deque[HttpRequest] = collections.deque()
        self.state = IDLE
        self.messages_begun = 0
        self.expects_continue = False  # a client waits for "100 Continue" before its body
        self.head_reads = 0  # bytes of later reads while the head is still incomplete
        self._new_message()

    def _new_message(self) -> None:
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()
        self._head_size = 0  # request line and headers (and trailers) parsed so far
        self.head_reads = 0

    @property
    def head(self) -> list[tuple[bytes, bytes]]:
        """The headers of the message being read (in state BODY: its body is still coming),
        names lower-case as in the HttpRequests this reader makes."""
        return self._headers

    def feed(self, data: bytes) -> None:
        begun = self.messages_begun
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            if isinstance(error.__context__, ProtocolRefusal):
                raise error.__context__ from None
            raise ProtocolRefusal(400, "malformed HTTP request") from None
        except httptools.HttpParserUpgrade:
            raise Upgraded() from None
        except httptools.HttpParserError as error:
            if str(error).startswith("Pause on PRI"):  # the HTTP/2 connection preface
                raise ProtocolRefusal(505, "only HTTP/1.0 and HTTP/1.1 are inspected") from None
            raise ProtocolRefusal(400, "malformed HTTP request") from None
        if self.state is HEAD and self.messages_begun == begun:
            # A head still incomplete after a further read. The limit itself is checked exactly
            # as parts complete (_grow_head); this bounds the memory of an unfinished line that
            # llhttp keeps to itself (an endless header), loosely, by the bytes that arrived.
            self.head_reads += len(data)
            if self.head_reads > 2 * self.limits.max_header_bytes:
                raise ProtocolRefusal(431, "request head larger than the proxy's limit")

    def _grow_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self.limits.max_header_bytes:
            raise ProtocolRefusal(431, "request head larger than the proxy's limit")

    # llhttp callbacks (exceptions raised here come back out of feed_data)

    def on_message_begin(self) -> None:
        self._new_message()
        self.state = HEAD
        self.messages_begun += 1

    def on_url(self, target: bytes) -> None:
        self._grow_head(len(target))
        self._target += target

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4  # _grow_head, inline: this runs per header
        if self._head_size > self.limits.max_header_bytes:
            raise ProtocolRefusal(431, "request head larger than the proxy's limit")
        if self.state is HEAD:  # a trailer after a chunked body is dropped, never forwarded
            self._headers.append((name.lower(), value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        version = self.parser.get_http_version()
        if version not in ("1.0", "1.1"):
            raise ProtocolRefusal(505, "only HTTP/1.0 and HTTP/1.1 are inspected")
        if not _TARGET.fullmatch(self._target):
            raise ProtocolRefusal(400, "malformed request target")
        hosts, codings, lengths, expect = 0, [], [], False
        for name, value in self._headers:  # one pass over the names the rules below read
            if name in _FRAMING:
                if name == b"host":
                    hosts += 1
                elif name == b"transfer-encoding":
                    codings.append(value)
                elif name == b"content-length":
                    lengths.append(value)
                elif value.lower() == b"100-continue":
                    expect = True
        if hosts > 1 or (hosts == 0 and version == "1.1"):  # as h11: exactly one Host in HTTP/1.1
            raise ProtocolRefusal(400, "missing or repeated Host header")
        if codings and lengths:  # llhttp refuses this too; a proxy must never guess
            raise ProtocolRefusal(400, "both Content-Length and Transfer-Encoding")
        if codings and (len(codings) > 1 or codings[0].lower() != b"chunked"):
            raise ProtocolRefusal(501, "only the chunked transfer coding is supported")
        if lengths and int(lengths[0]) > self.limits.max_request_body:  # llhttp checked the digits
            raise ProtocolRefusal(413, "request body larger than the proxy's limit")
        self.expects_continue = version == "1.1" and expect
        self._method = self.parser.get_method()
        self._version = version.encode()
        self.state = BODY

    def on_body(self, data: bytes) -> None:
        self._body += data
        if len(self._body) > self.limits.max_request_body:
            raise ProtocolRefusal(413, "request body larger than the proxy's limit")

    def on_message_complete(self) -> None:
        self.complete.append(HttpRequest(self._method, self._target, tuple(self._headers), bytes(self._body),
                                         self._version))
        self.state = IDLE
        self.expects_continue = False


def client_keeps_alive(request: HttpRequest) -> bool:
    """RFC 9112 9.3 (and h11): HTTP/1.1 without `Connection: close` keeps the connection open."""
    if request.http_version < b"1.1":
        return False
    for name, value in request.headers:
        if name == b"connection" and b"close" in (t.strip().lower() for t in value.split(b",")):
            return False
    return True


def serialise_request(request: HttpRequest, headers=None) -> bytes:
    """The request as the proxy forwards it: HTTP/1.1, hop-by-hop headers dropped, the body
    framed by Content-Length. The headers are the verdict's: headers the client's Connection
    header named were already dropped (or kept, when the decision relies on them) by
    swap.SwapEngine.decide, so nothing the decision saw is removed here. `headers`: forward these
    instead of the request's (the identity-aware proxy's rewritten ones, which keep the
    request's framing headers), without building another HttpRequest per request."""
    given = request.headers if headers is None else headers
    headers = [pair for pair in given if pair[0] not in _NOT_FORWARDED]
    if request.body or (len(headers) != len(given)  # framing headers are among those dropped
                        and any(n in (b"content-length", b"transfer-encoding") for n, _ in given)):
        headers.append((b"content-length", b"%d" % len(request.body)))
    lines = b"".join([b"%s: %s\r\n" % pair for pair in headers])
    if _unsafe_lines(lines, len(headers)):
        raise UnsafeHead("refusing to forward a header with a control character")
    return b"%s %s HTTP/1.1\r\n%s\r\n%s" % (request.method, request.target, lines, request.body)


def _unsafe_lines(lines: bytes, count: int) -> bool:
    """Whether `count` header lines written as `name: value\r\n` (or a status line) hold a
    control character in a name, value or reason, as _UNSAFE_IN_HEAD would find in the parts:
    the written bytes hold exactly the line ends' CR and LF (two per line) and no other. One
    pass over the written bytes instead of joining the parts again and searching them."""
    return len(lines) - len(lines.translate(None, _UNSAFE_BYTES)) != 2 * count


# ---- responses from upstreams -----------------------------------------------------------------


def reason_phrase(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Error"


def refusal_response(status: int, reason: str) -> bytes:
    """The proxy's own answer when it refuses: text, never anything an upstream sent."""
    body = f"skyguard: {reason}\n".encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, reason_phrase(status), len(body), body))


def serialise_response(method: bytes, keep_alive: bool, status, headers, body: bytes) -> bytes:
    """One whole HTTP/1.1 response, always framed by Content-Length (the proxy buffers bodies),
    with `Connection: close` when the connection ends after it. Headers must be free of framing
    and hop-by-hop headers (scrub_response drops them), except a HEAD response's Content-Length."""
    status_code, reason = status
    if not 200 <= status_code <= 999:
        raise UnsafeHead(f"cannot forward status {status_code}")
    for name, _ in headers:
        if name == b"content-length":
            break
    else:
        headers = (*headers, (b"content-length", b"%d" % len(body)))
    if not keep_alive:
        headers = (*headers, (b"connection", b"close"))
    lines = b"".join([b"HTTP/1.1 %d %s\r\n" % (status_code, reason)] + [b"%s: %s\r\n" % pair for pair in headers])
    if _unsafe_lines(lines, len(headers) + 1):
        raise UnsafeHead("refusing to write a header with CR, LF or NUL")
    if body and method != b"HEAD" and status_code not in NO_BODY_STATUS:
        return b"%s\r\n%s" % (lines, body)
    return lines + b"\r\n"


def read_switching_head(head: bytes) -> list[tuple[bytes, bytes]]:
    """The headers of an upstream's 101 answer (names lower-case), `head` being the whole of
    it from the status line to the blank line, as a proxy must read it before passing it on
    (the bytes after it are the new protocol's). llhttp parses it as strictly as any answer (no
    bare LF, no obs-fold); anything but a well-formed HTTP/1.1 101 with an Upgrade header is an
    UpstreamProtocolError."""
    sink = _SwitchingHead()
    parser = httptools.HttpResponseParser(sink)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade as upgrade:  # llhttp stops where the new protocol begins
        if upgrade.args and upgrade.args[0] != len(head):
            raise UpstreamProtocolError("upstream 101 head does not end where it should") from None
    except httptools.HttpParserError as error:  # the same stop when no Upgrade header was seen
        if not str(error).startswith("Pause on CONNECT/Upgrade"):
            raise UpstreamProtocolError("malformed upstream 101 head") from None
    if not sink.complete or parser.get_status_code() != 101 or parser.get_http_version() != "1.1":
        raise UpstreamProtocolError("upstream answer is not an HTTP/1.1 101")
    if not any(name == b"upgrade" and value for name, value in sink.headers):
        raise UpstreamProtocolError("upstream 101 names no protocol (no Upgrade header)")
    return sink.headers


class _SwitchingHead:
    """llhttp's callbacks for read_switching_head."""

    def __init__(self):
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        self.complete = True


def serialise_switching_head(headers) -> bytes:
    """A 101 head as the proxy writes it to its client: `headers` must already be the ones
    the client may see (the caller filters them and adds Connection and Upgrade)."""
    lines = b"".join([b"HTTP/1.1 101 Switching Protocols\r\n"] + [b"%s: %s\r\n" % pair for pair in headers])
    if _unsafe_lines(lines, len(headers) + 1):
        raise UnsafeHead("refusing to write a header with CR, LF or NUL")
    return lines + b"\r\n"


class ResponseReader:
    """One upstream response, parsed by llhttp. `done` once whole; `reusable` says whether the
    connection may carry another exchange afterwards. Trailers are dropped: never forwarded."""

    def __init__(self, head_request: bool, limit: int, max_header_bytes: int):
        self.parser = httptools.HttpResponseParser(self)
        self.head_request = head_request
        self.limit = limit
        self.max_header_bytes = max_header_bytes
        self.status: int | None = None
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.done = False
        self.received = False
        self.extra = False  # bytes beyond the response arrived: the connection is out of step
        self._keep_alive = False  # llhttp's verdict, read when the message completes
        self._in_head = False
        self._informational = False
        self._head_size = 0  # status line and headers parsed so far
        self._head_reads = 0  # bytes read while the head is incomplete

    @property
    def reusable(self) -> bool:
        # After HEAD the proxy stops at the head, so it cannot tell whether a (wrong) body
        # follows: never reuse then. Bytes beyond the response would be read as the next
        # response, perhaps for another client.
        return self.done and self._keep_alive and not self.extra and not self.head_request

    def feed(self, data: bytes) -> None:
        self.received = True
        if self.done:
            self.extra = True
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            if isinstance(cause, _Stop):
                return
            if isinstance(cause, (UnscrubbableResponse, UpstreamProtocolError)):
                raise cause from None
            raise UpstreamProtocolError("upstream response could not be read") from None
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as error:
            if self.done:  # the response is whole; what llhttp choked on after it is not ours
                self.extra = True
                return
            if isinstance(error, httptools.HttpParserUpgrade):
                raise UpstreamProtocolError("upstream switched protocols") from None
            raise UpstreamProtocolError("malformed upstream response") from None
        if self._in_head:  # an unfinished head line is llhttp's: bound its memory by the reads
            self._head_reads += len(data)
            if self._head_reads > 2 * self.max_header_bytes:
                raise UpstreamProtocolError("upstream response head larger than the proxy's limit")

    def finish(self) -> None:
        """The upstream closed its side: a body delimited by the close is whole now."""
        if self.done:
            return
        if not self.received:
            raise StaleConnection("upstream closed before answering")
        if self.status is not None and not self._in_head and self._until_close():
            self.done = True
            return
        raise ConnectionResetError("upstream closed mid-response")

    def _until_close(self) -> bool:
        return not any(n in (b"content-length", b"transfer-encoding") for n, _ in self.headers) \
            and self.status not in NO_BODY_STATUS and not self.head_request

    def _grow_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self.max_header_bytes:
            raise UpstreamProtocolError("upstream response head larger than the proxy's limit")

    # llhttp callbacks

    def on_message_begin(self) -> None:
        if self.done:
            self.extra = True
            raise _Stop()
        self.reason, self.headers, self._head_size, self._head_reads, self._in_head = b"", [], 0, 0, True

    def on_status(self, reason: bytes) -> None:
        self._grow_head(len(reason))
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow_head(len(name) + len(value) + 4)
        if self._in_head:  # trailers are dropped
            self.headers.append((name.lower(), value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        status = self.parser.get_status_code()
        if status < 200:
            self._informational = True  # 100 Continue and friends: the real answer follows
            return
        self.status = status
        if self.head_request:
            self.done = True  # llhttp would wait for the body a HEAD response never has
            raise _Stop()
        codings = [c.strip().lower() for n, v in self.headers if n == b"transfer-encoding" for c in v.split(b",")]
        if codings and codings != [b"chunked"] and status not in NO_BODY_STATUS:
            # llhttp undoes only the chunked framing: the body of "gzip, chunked" would still be
            # gzip, which neither the scrubber nor the VM's Content-Encoding would know of.
            raise UpstreamProtocolError("upstream used a transfer coding other than chunked")

    def on_body(self, data: bytes) -> None:
        self.body += data
        if len(self.body) > self.limit:
            raise UnscrubbableResponse("response body larger than the proxy's limit")

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self.done = True
        self._keep_alive = self.parser.should_keep_alive()  # reset once the callback returns
