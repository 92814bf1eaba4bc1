"""The transparent credential-swap proxy: asyncio protocols + httptools (llhttp, strict mode),
HTTP on one listener, intercepted HTTPS on another. It moves bytes, keeps the limits and asks
swap.SwapEngine what to do.

One client connection gets its upstream connections from a pool keyed by the address the VM
originally connected to (SO_ORIGINAL_DST after the nftables redirect of steering.py), with TLS
verified against the system or a configured CA bundle under the SNI the VM sent. Messages are
buffered whole (bounded): a secret split across reads must still be found, swapped or scrubbed.
Not here: the swap rules (swap.py), the CA (ca.py), steering (steering.py), the daemon wiring.

Why protocols and llhttp rather than streams and h11: the proxy is CPU-bound in Python, and
these halve the interpreter work per request (bench/credproxy.py). llhttp is the parser of
Node.js, strict by default (no obs-fold, bare CR, CL+TE, duplicate CL); the readers below add
what a proxy needs on top of it: HTTP/1.0 and 1.1 only, chunked as the only transfer coding,
bounded heads and bodies, and trailers dropped.

Failure policy: fail closed. Malformed or unreadable requests get 4xx and the connection is
closed; anything the proxy cannot inspect (upgrades, h2, unknown content codings) is refused;
an upstream failure is a 502. No client input can raise out of a connection handler.
"""

from __future__ import annotations

import asyncio
import collections
import http
import ipaddress
import logging
import re
import socket
import ssl
import struct
from dataclasses import dataclass
from typing import Callable

import httptools

from skyguard.credproxy.ca import CertificateAuthority, new_server_context
from skyguard.credproxy.interfaces import (
    BLOCKED_PROTOCOL,
    CredentialMetrics,
    DecisionLog,
    SecretSource,
)
from skyguard.credproxy.swap import (
    HOP_BY_HOP,
    ConnectionFacts,
    HttpRequest,
    SwapEngine,
    UnscrubbableResponse,
    Verdict,
    decode_body,
    normalise_name,
)
from skyguard.custody.pemload import load_cert_chain_from_memory, split_pem
from skyguard.errors import CredentialError
from skyguard.policy.model import Policy

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
# Whole requests parsed ahead of the one being answered (pipelining); reading pauses beyond.
MAX_PIPELINED = 2
# A request target as h11 accepted it (RFC 9112 3.2: visible ASCII only).
_TARGET = re.compile(rb"[\x21-\x7e]+")
# What may never appear in a header name, value or reason phrase we write (CR and LF would end
# the line: response splitting, request smuggling). Everything we emit is checked in one search.
_UNSAFE_IN_HEAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Statuses whose responses never have a body (RFC 9110 6.4.1), whatever the headers say.
_NO_BODY_STATUS = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Lingering close after a refusal: the client may still be sending what was refused (a body over
# the limit), and closing with unread input resets the connection, which can destroy the answer
# before the client reads it. So input is read and discarded until it pauses LINGER_QUIET, for at
# most LINGER_MAX seconds (it costs no memory), then the connection closes.
LINGER_QUIET = 0.2
LINGER_MAX = 2.0
_REFUSED_WHILE_ARRIVING = frozenset({413, 431})  # too large: the rest is likely still coming


@dataclass(frozen=True)
class ProxyLimits:
    """Every bound the proxy enforces. Times in seconds, sizes in bytes."""

    max_header_bytes: int = 32 * 1024  # request line + headers (and the same for responses)
    header_timeout: float = 10.0  # whole request head, from its first byte (slowloris)
    idle_timeout: float = 60.0  # keep-alive wait for the next request
    body_read_timeout: float = 10.0  # between two reads of a body
    max_request_body: int = 1 << 20
    max_response_body: int = 16 << 20  # decoded
    upstream_timeout: float = 30.0  # connect, TLS handshake, and the whole response
    max_connections: int = 1024


@dataclass(frozen=True)
class ClientCertificate:
    """Outbound mutual TLS toward one destination name: a PEM bundle (certificate chain and
    key) in the store, presented only for requests from these zones."""

    store_name: str
    zones: tuple[str, ...]


class ProtocolRefusal(Exception):
    """Internal: this request cannot be handled; answer `status` with `reason` and close."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class UpstreamProtocolError(Exception):
    """The upstream's answer is not HTTP/1.1 the proxy can read: the client gets a 502."""


class UnsafeHead(ValueError):
    """A message head the proxy would write holds a control character or an unforwardable
    status: writing it could split the message, so nothing is written."""


async def listen(protocol_factory, hosts: str | list[str], port: int, **kwargs):
    """Listen on every host on ONE port (asyncio would give each host its own ephemeral port
    when port is 0, and steering redirects to a single port). Returns (servers, port)."""
    loop = asyncio.get_running_loop()
    servers = []
    for host in [hosts] if isinstance(hosts, str) else hosts:
        server = await loop.create_server(protocol_factory, host, port, reuse_address=True, **kwargs)
        port = server.sockets[0].getsockname()[1]
        servers.append(server)
    return servers, port


async def start_servers(callback, hosts: str | list[str], port: int, **kwargs):
    """listen() for asyncio streams: `callback(reader, writer)` per connection."""
    loop = asyncio.get_running_loop()

    def factory():
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), callback, loop=loop)

    return await listen(factory, hosts, port, **kwargs)


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """Where the client meant to connect before the nftables redirect; None if not redirected."""
    try:
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!2xH4s", raw)
            address = str(ipaddress.IPv4Address(packed))
        else:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port, packed = struct.unpack_from("!2xH4x16s", raw)
            address = str(ipaddress.IPv6Address(packed))
    except OSError:
        return None
    local = sock.getsockname()
    if (address, port) == (local[0], local[1]):
        return None  # connected straight to the proxy port: no destination to forward to
    return address, port


class CredentialProxy:
    """Run with `await proxy.start(...)`; stop with `await proxy.stop()`. One event loop."""

    def __init__(
        self,
        policy: Policy,
        secrets: SecretSource,
        ca: CertificateAuthority,
        *,
        address_matches: Callable[[str, str], bool],
        decision_log: DecisionLog,
        metrics: CredentialMetrics,
        upstream_ca_file: str | None = None,
        client_certificates: dict[str, ClientCertificate] | None = None,
        content_patterns=(),
        limits: ProxyLimits = ProxyLimits(),
        destination_of: Callable[[socket.socket], tuple[str, int] | None] = original_destination,
    ):
        self.engine = SwapEngine(policy.credentials, secrets, content_patterns)
        self.ca = ca
        self.address_matches = address_matches
        self.decision_log = decision_log
        self.metrics = metrics
        self.limits = limits
        self.destination_of = destination_of
        self._secrets = secrets
        self._workload_by_address = {
            str(address): (w.name, w.zone) for w in policy.workloads() for address in w.addresses
        }
        self._upstream_ca_file = upstream_ca_file
        self._client_certificates = dict(client_certificates or {})  # destination name -> certificate
        self._client_contexts: dict[str | None, ssl.SSLContext] = {}
        self.upstreams = UpstreamPool(self)
        self._servers: list[asyncio.base_events.Server] = []
        self._connections: set[_ClientConnection] = set()
        self._tls_context = self._interception_context()

    def __repr__(self) -> str:
        return f"CredentialProxy({self.engine!r})"

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self, host: str | list[str] = "0.0.0.0", http_port: int = 0, https_port: int = 0) -> tuple[int, int]:
        """Listen; returns the (http, https) ports actually bound."""
        http_servers, http_port = await listen(lambda: _ClientConnection(self, tls=False), host, http_port)
        https_servers, https_port = await listen(
            lambda: _ClientConnection(self, tls=True), host, https_port, ssl=self._tls_context,
            ssl_handshake_timeout=self.limits.header_timeout,
        )
        self._servers = http_servers + https_servers
        return http_port, https_port

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        connections = list(self._connections)
        for connection in connections:
            connection.abort()
        await asyncio.gather(*(c.task for c in connections if c.task), return_exceptions=True)
        self.upstreams.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers = []

    # ---- TLS ------------------------------------------------------------------------------

    def _interception_context(self) -> ssl.SSLContext:
        context = new_server_context()

        def choose_certificate(ssl_object, server_name, _context):
            name = normalise_name(server_name)
            if name is None:
                # Without a name there is nothing to check Host against: refuse the handshake.
                self.metrics.count(None, BLOCKED_PROTOCOL)
                self.decision_log.record({
                    "event": "credential", "credential": None, "zone": None, "workload": None,
                    "destination": "-", "result": BLOCKED_PROTOCOL, "reason": "TLS ClientHello without a usable SNI",
                })
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            try:
                leaf = self.ca.server_context(name)
            except Exception:  # never let a certificate problem escape into the TLS stack
                log.exception("minting a certificate failed")
                return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
            ssl_object.context = leaf
            return None

        context.sni_callback = choose_certificate
        # The default context still needs a certificate to start a handshake.
        load_cert_chain_from_memory(context, self.ca.mint("skyguard.invalid") + self.ca.certificate_pem,
                                    self.ca._leaf_key_pem)
        return context

    def _client_certificate_for(self, host: str | None, zone: str | None) -> str | None:
        """The store name of the client certificate to present to `host` for `zone`, if any."""
        certificate = self._client_certificates.get(host)
        return certificate.store_name if certificate and zone in certificate.zones else None

    def _client_context(self, certificate: str | None) -> ssl.SSLContext:
        """Upstream TLS settings, verified against the system or the configured bundle."""
        context = self._client_contexts.get(certificate)
        if context is None:
            context = ssl.create_default_context(cafile=self._upstream_ca_file)
            context.set_alpn_protocols(["http/1.1"])
            if certificate is not None:
                # Outbound mutual TLS: the client certificate lives in the store, never in the VM.
                chain, private_key = split_pem(bytes(self._secrets.get(certificate)))
                load_cert_chain_from_memory(context, chain, private_key)
            self._client_contexts[certificate] = context
        return context

    # ---- one request ----------------------------------------------------------------------

    def _facts(self, transport: asyncio.Transport, tls: bool) -> ConnectionFacts | None:
        """What the connection itself says (never the request); None when it was not redirected."""
        destination = self.destination_of(transport.get_extra_info("socket"))
        if destination is None:
            return None
        sni = None
        if tls:
            leaf = transport.get_extra_info("ssl_object").context
            sni = getattr(leaf, "skyguard_name", None)
        peer = transport.get_extra_info("peername")
        workload, zone = self._workload_by_address.get(ipaddress.ip_address(peer[0]).compressed, (None, None))
        return ConnectionFacts(workload, zone, sni, destination[0], destination[1], tls, self.address_matches)

    async def _answer(self, request: HttpRequest, facts: ConnectionFacts, keep_alive: bool) -> bytes | ProtocolRefusal:
        """Decide, forward and make the answer safe: the whole response to send, or the refusal
        to answer with before closing."""
        verdict = self.engine.decide(request, facts)
        self._account(verdict)
        if verdict.action == "block":
            return ProtocolRefusal(verdict.status, verdict.reason)
        try:
            status, headers, body = await self.upstreams.exchange(facts, verdict.request, verdict.host)
            headers, body = self._safe_response(verdict, request, headers, body, facts)
            return _serialise_response(request.method, keep_alive, status, headers, body)
        except (UnscrubbableResponse, CredentialError) as error:
            return ProtocolRefusal(502, str(error))
        except (OSError, ssl.SSLError, asyncio.TimeoutError, UpstreamProtocolError, UnsafeHead) as error:
            return ProtocolRefusal(502, f"upstream failed: {type(error).__name__}")

    def _safe_response(self, verdict: Verdict, request: HttpRequest, headers, body: bytes, facts: ConnectionFacts):
        body = decode_body(headers, body, self.limits.max_response_body)
        length = next((v for n, v in headers if n == b"content-length"), None)
        safe_headers, safe_body, scrubbed = self.engine.scrub_response(verdict.host, headers, body)
        if scrubbed:
            # Not a metric result (those count requests); the log says which response held it.
            entry = {"event": "credential", "credential": None, "zone": facts.zone, "workload": facts.workload,
                     "destination": verdict.host, "address": facts.address, "port": facts.port,
                     "result": "scrubbed", "reason": f"{scrubbed} secret occurrences removed from a response"}
            self.decision_log.record(entry)
        if request.method == b"HEAD" and length is not None:
            safe_headers += ((b"content-length", length),)
        return safe_headers, safe_body

    def _account(self, verdict: Verdict) -> None:
        for credential, result in verdict.results:
            self.metrics.count(credential, result)
        for entry in verdict.entries:
            self.decision_log.record(entry)

    def _account_protocol_block(self, facts: ConnectionFacts, reason: str) -> None:
        self.metrics.count(None, BLOCKED_PROTOCOL)
        self.decision_log.record({
            "event": "credential", "credential": None, "zone": facts.zone, "workload": facts.workload,
            "destination": facts.sni or "-", "address": facts.address, "port": facts.port,
            "result": BLOCKED_PROTOCOL, "reason": reason,
        })


# ---- the client side ----------------------------------------------------------------------

_IDLE, _HEAD, _BODY = "idle", "head", "body"


class _RequestReader:
    """Sans-io: bytes from one client connection in, whole HttpRequests out (`complete`).

    llhttp frames the messages; this adds the proxy's rules. feed() raises ProtocolRefusal for
    anything refused, or _Upgraded after a request that switches protocols (it is queued, and
    decide() refuses it; nothing after it is read)."""

    def __init__(self, limits: ProxyLimits):
        self.limits = limits
        self.parser = httptools.HttpRequestParser(self)
        self.complete: collections.deque[HttpRequest] = collections.deque()
        self.state = _IDLE
        self.messages_begun = 0
        self.expects_continue = False  # a client waits for "100 Continue" before its body
        self._new_message()

    def _new_message(self) -> None:
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()
        self._head_size = 0  # request line and headers (and trailers) parsed so far
        self._head_reads = 0  # bytes of later reads while the head is still incomplete

    def feed(self, data: bytes) -> None:
        begun = self.messages_begun
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            if isinstance(error.__context__, ProtocolRefusal):
                raise error.__context__ from None
            raise ProtocolRefusal(400, "malformed HTTP request") from None
        except httptools.HttpParserUpgrade:
            raise _Upgraded() from None
        except httptools.HttpParserError as error:
            if str(error).startswith("Pause on PRI"):  # the HTTP/2 connection preface
                raise ProtocolRefusal(505, "only HTTP/1.0 and HTTP/1.1 are inspected") from None
            raise ProtocolRefusal(400, "malformed HTTP request") from None
        if self.state is _HEAD and self.messages_begun == begun:
            # A head still incomplete after a further read. The limit itself is checked exactly
            # as parts complete (_grow_head); this bounds the memory of an unfinished line that
            # llhttp keeps to itself (an endless header), loosely, by the bytes that arrived.
            self._head_reads += len(data)
            if self._head_reads > 2 * self.limits.max_header_bytes:
                raise ProtocolRefusal(431, "request head larger than the proxy's limit")

    def _grow_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self.limits.max_header_bytes:
            raise ProtocolRefusal(431, "request head larger than the proxy's limit")

    # llhttp callbacks (exceptions raised here come back out of feed_data)

    def on_message_begin(self) -> None:
        self._new_message()
        self.state = _HEAD
        self.messages_begun += 1

    def on_url(self, target: bytes) -> None:
        self._grow_head(len(target))
        self._target += target

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow_head(len(name) + len(value) + 4)
        if self.state is _HEAD:  # a trailer after a chunked body is dropped, never forwarded
            self._headers.append((name.lower(), value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        version = self.parser.get_http_version()
        if version not in ("1.0", "1.1"):
            raise ProtocolRefusal(505, "only HTTP/1.0 and HTTP/1.1 are inspected")
        if not _TARGET.fullmatch(self._target):
            raise ProtocolRefusal(400, "malformed request target")
        hosts = sum(1 for n, _ in self._headers if n == b"host")
        if hosts > 1 or (hosts == 0 and version == "1.1"):  # as h11: exactly one Host in HTTP/1.1
            raise ProtocolRefusal(400, "missing or repeated Host header")
        codings = [v for n, v in self._headers if n == b"transfer-encoding"]
        lengths = [v for n, v in self._headers if n == b"content-length"]
        if codings and lengths:  # llhttp refuses this too; a proxy must never guess
            raise ProtocolRefusal(400, "both Content-Length and Transfer-Encoding")
        if codings and (len(codings) > 1 or codings[0].lower() != b"chunked"):
            raise ProtocolRefusal(501, "only the chunked transfer coding is supported")
        if lengths and int(lengths[0]) > self.limits.max_request_body:  # llhttp checked the digits
            raise ProtocolRefusal(413, "request body larger than the proxy's limit")
        self.expects_continue = version == "1.1" and any(
            n == b"expect" and v.lower() == b"100-continue" for n, v in self._headers)
        self._method = self.parser.get_method()
        self._version = version.encode()
        self.state = _BODY

    def on_body(self, data: bytes) -> None:
        self._body += data
        if len(self._body) > self.limits.max_request_body:
            raise ProtocolRefusal(413, "request body larger than the proxy's limit")

    def on_message_complete(self) -> None:
        self.complete.append(HttpRequest(self._method, self._target, tuple(self._headers), bytes(self._body),
                                         self._version))
        self.state = _IDLE
        self.expects_continue = False


class _Upgraded(Exception):
    """Internal: the last queued request switches protocols; the bytes after it are not HTTP/1.1."""


class _ClientConnection(asyncio.Protocol):
    """One VM connection. data_received parses what arrives into whole requests; one task
    (_serve) answers them in order. Every read deadline is one lazily re-armed timer."""

    def __init__(self, proxy: CredentialProxy, tls: bool):
        self.proxy = proxy
        self.tls = tls
        self.limits = proxy.limits
        self.reader = _RequestReader(proxy.limits)
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None
        self.refusal: ProtocolRefusal | None = None  # answered after the requests before it
        self.eof = False  # nothing more will be read
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future | None = None  # the task waiting for input
        self._reading_paused = False
        self._messages_seen = 0
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._linger_ends: float | None = None  # set while closing after a refusal
        self._last_heard = 0.0

    # ---- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        if len(self.proxy._connections) >= self.limits.max_connections:
            transport.abort()  # over the connection limit: close at once rather than queue
            return
        self.proxy._connections.add(self)
        self._arm(self.limits.idle_timeout)
        self.task = self._loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        if self._linger_ends is not None:
            self._last_heard = self._loop.time()  # discarded: lingering keeps no input
            return
        if self.refusal is not None or self.eof:
            return  # nothing after a refusal or an upgrade is read
        reader = self.reader
        try:
            reader.feed(data)
        except ProtocolRefusal as refusal:
            self._stop_reading(refusal)
            return
        except _Upgraded:
            self._stop_reading(None)
            return
        if reader.state is _BODY:
            self._arm(self.limits.body_read_timeout)  # between two reads of a body
            if reader.expects_continue:
                reader.expects_continue = False
                self.transport.write(_CONTINUE)
        elif reader.state is _HEAD and reader.messages_begun != self._messages_seen:
            self._arm(self.limits.header_timeout)  # the whole head, from its first byte
        elif reader.state is _IDLE:
            self._deadline = None  # whole requests only: the task answers them
        self._messages_seen = reader.messages_begun
        if len(reader.complete) >= MAX_PIPELINED and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        if self._linger_ends is not None:
            self._close_now()
        self._wake()
        # Plain TCP: keep the write side open, requests already read are still answered. (TLS
        # cannot half-close; asyncio warns when asked to.)
        return not self.tls

    def connection_lost(self, exc) -> None:
        self.eof = True
        self.proxy._connections.discard(self)
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._write_paused = False
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    # ---- the task -------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            facts = None if self.transport.is_closing() else self.proxy._facts(self.transport, self.tls)
            while facts is not None:
                try:
                    request = await self._next_request()
                except ProtocolRefusal as refusal:
                    self.proxy._account_protocol_block(facts, refusal.reason)
                    await self._refuse(refusal.status, refusal.reason)
                    return
                if request is None:
                    return
                keep_alive = _client_keeps_alive(request)
                answer = await self.proxy._answer(request, facts, keep_alive)
                if isinstance(answer, ProtocolRefusal):
                    await self._refuse(answer.status, answer.reason)
                    return
                if not await self._send(answer) or not keep_alive:
                    return
                if self.reader.state is _IDLE and not self.reader.complete:
                    self._arm(self.limits.idle_timeout)
        except Exception:  # the last line of defence: one connection never takes the proxy down
            log.exception("credential proxy connection failed")
        finally:
            self._close()

    async def _next_request(self) -> HttpRequest | None:
        """The next whole request; None when the client is gone or idle too long."""
        reader = self.reader
        while True:
            if reader.complete:
                if self._reading_paused and not self.eof and self.refusal is None:
                    self._reading_paused = False
                    self.transport.resume_reading()
                    if reader.state is not _IDLE:  # its deadline must not run while we did not read
                        self._arm(self.limits.header_timeout if reader.state is _HEAD else self.limits.body_read_timeout)
                return reader.complete.popleft()
            if self.refusal is not None:
                raise self.refusal
            if self.eof:
                if reader.state is not _IDLE and not self.transport.is_closing():
                    raise ProtocolRefusal(400, "connection closed mid-request")
                return None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def _send(self, data: bytes) -> bool:
        """Write; wait only when the socket pushed back. False when the client is gone."""
        if self.transport.is_closing():
            return False
        self.transport.write(data)
        if not self._write_paused:
            return True
        try:
            async with asyncio.timeout(self.limits.body_read_timeout):
                while self._write_paused:
                    self._waiter = self._loop.create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
        except asyncio.TimeoutError:
            return False
        return not self.transport.is_closing()

    async def _refuse(self, status: int, reason: str) -> None:
        body = f"skyguard: {reason}\n".encode()
        await self._send(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
                         b"connection: close\r\n\r\n%s" % (status, _reason_phrase(status), len(body), body))

    # ---- helpers --------------------------------------------------------------------------

    def _stop_reading(self, refusal: ProtocolRefusal | None) -> None:
        self.refusal = refusal
        self.eof = refusal is None
        self._deadline = None
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _arm(self, seconds: float) -> None:
        """Set the read deadline; one timer serves every re-arm (it re-checks when it fires)."""
        self._deadline = self._loop.time() + seconds
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._timer = None
        if self._deadline is None or self.eof or self.refusal is not None:
            return
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._deadline_passed)
            return
        if self.reader.state is _IDLE:
            self._stop_reading(None)  # idle keep-alive connection: close quietly
        else:
            self._stop_reading(ProtocolRefusal(408, "request not received in time"))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        if self.task is not None:
            self.task.cancel()

    def _close(self) -> None:
        if self.transport.is_closing():
            return
        if self.refusal is not None and self.refusal.status in _REFUSED_WHILE_ARRIVING and not self.eof:
            self._linger()
        else:
            self._close_now()

    def _linger(self) -> None:
        """Close once the client's input goes quiet (see LINGER_QUIET), discarding it."""
        now = self._loop.time()
        self._linger_ends, self._last_heard = now + LINGER_MAX, now
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        self._loop.call_later(LINGER_QUIET, self._linger_check)

    def _linger_check(self) -> None:
        if self.transport.is_closing():
            return
        now = self._loop.time()
        quiet_at = self._last_heard + LINGER_QUIET
        if now >= quiet_at or now >= self._linger_ends:
            self._close_now()
        else:
            self._loop.call_at(min(quiet_at, self._linger_ends), self._linger_check)

    def _close_now(self) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        transport.close()  # flushes what is buffered first; a client that never reads is cut off
        if transport.get_write_buffer_size():
            self._loop.call_later(self.limits.body_read_timeout, transport.abort)


def _reason_phrase(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Error"


def _client_keeps_alive(request: HttpRequest) -> bool:
    """RFC 9112 9.3 (and h11): HTTP/1.1 without `Connection: close` keeps the connection open."""
    if request.http_version < b"1.1":
        return False
    for name, value in request.headers:
        if name == b"connection" and b"close" in (t.strip().lower() for t in value.split(b",")):
            return False
    return True


def _serialise_response(method: bytes, keep_alive: bool, status, headers, body: bytes) -> bytes:
    """One whole HTTP/1.1 response, always framed by Content-Length (the proxy buffers bodies),
    with `Connection: close` when the connection ends after it. Headers must be free of framing
    and hop-by-hop headers (scrub_response drops them), except a HEAD response's Content-Length."""
    status_code, reason = status
    if not 200 <= status_code <= 999:
        raise UnsafeHead(f"cannot forward status {status_code}")
    if not any(n == b"content-length" for n, _ in headers):
        headers = (*headers, (b"content-length", b"%d" % len(body)))
    if not keep_alive:
        headers = (*headers, (b"connection", b"close"))
    lines = [b"HTTP/1.1 %d %s\r\n" % (status_code, reason)]
    lines.extend(b"%s: %s\r\n" % pair for pair in headers)
    if _UNSAFE_IN_HEAD.search(b"".join(b"".join(pair) for pair in headers) + reason):
        raise UnsafeHead("refusing to write a header with CR, LF or NUL")
    lines.append(b"\r\n")
    if body and method != b"HEAD" and status_code not in _NO_BODY_STATUS:
        lines.append(body)
    return b"".join(lines)


def _serialise_request(request: HttpRequest) -> bytes:
    """The request as the proxy forwards it: HTTP/1.1, hop-by-hop headers (and those the client's
    Connection header names) dropped, the body framed by Content-Length."""
    connection_tokens = {t.strip().lower() for n, v in request.headers if n == b"connection" for t in v.split(b",")}
    headers = [(n, v) for n, v in request.headers
               if n not in HOP_BY_HOP and n != b"expect" and n not in connection_tokens]
    if request.body or any(n in (b"content-length", b"transfer-encoding") for n, _ in request.headers):
        headers.append((b"content-length", b"%d" % len(request.body)))
    if _UNSAFE_IN_HEAD.search(b"".join(b"".join(pair) for pair in headers)):
        raise UnsafeHead("refusing to forward a header with a control character")
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method, request.target)]
    lines.extend(b"%s: %s\r\n" % pair for pair in headers)
    lines.append(b"\r\n")
    lines.append(request.body)
    return b"".join(lines)


# ---- the upstream side --------------------------------------------------------------------


class _StaleConnection(ConnectionResetError):
    """A pooled upstream connection was closed before it answered: safe to retry once."""


class _Stop(Exception):
    """Internal: stop parsing this read (the response is whole; what follows is not ours)."""


class _ResponseReader:
    """Sans-io: one upstream response, parsed by llhttp. `done` once whole; `reusable` says
    whether the connection may carry another exchange afterwards."""

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
            raise _StaleConnection("upstream closed before answering")
        if self.status is not None and not self._in_head and self._until_close():
            self.done = True
            return
        raise ConnectionResetError("upstream closed mid-response")

    def _until_close(self) -> bool:
        return not any(n in (b"content-length", b"transfer-encoding") for n, _ in self.headers) \
            and self.status not in _NO_BODY_STATUS and not self.head_request

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


class _UpstreamConnection(asyncio.Protocol):
    """One upstream connection, one exchange at a time."""

    def __init__(self, max_header_bytes: int):
        self.max_header_bytes = max_header_bytes
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self._response: _ResponseReader | None = None
        self._waiter: asyncio.Future | None = None
        self._reusable = False

    @property
    def reusable(self) -> bool:
        return self._reusable and not self.lost and not self.transport.is_closing()

    async def exchange(self, request: HttpRequest, limit: int):
        if self.lost or self.transport.is_closing():
            raise _StaleConnection("upstream closed while the connection was pooled")
        data = _serialise_request(request)
        response = self._response = _ResponseReader(request.method == b"HEAD", limit, self.max_header_bytes)
        self._reusable = False
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        try:
            await self._waiter
        finally:
            self._waiter = None
            self._response = None
        self._reusable = response.reusable
        return (response.status, response.reason), tuple(response.headers), bytes(response.body)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None:
            self.lost = True  # bytes nobody asked for: this connection is out of step
            self.transport.abort()
            return
        try:
            response.feed(data)
        except Exception as error:  # reported to the exchange waiting for it
            self._settle(error)
            return
        if response.done:
            self._settle(None)

    def eof_received(self) -> bool:
        self._at_eof()
        return False

    def connection_lost(self, exc) -> None:
        self.lost = True
        self._at_eof()

    def _at_eof(self) -> None:
        if self._response is None:
            return
        try:
            self._response.finish()
        except Exception as error:
            self._settle(error)
            return
        self._settle(None)

    def _settle(self, error: BaseException | None) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Idle keep-alive upstream connections, shared by client connections.

    A connection is only reused for the same (address, port, TLS, verified name, client
    certificate): the name is what the certificate was checked against, so a connection is
    never lent to a request for another name. Reusing them spares an upstream TLS handshake per
    client connection (what makes short client connections cheap)."""

    MAX_IDLE_PER_KEY = 64
    IDLE_SECONDS = 30.0  # below common server keep-alive timeouts, so few stale retries

    def __init__(self, proxy: "CredentialProxy"):
        self.proxy = proxy
        self._idle: dict[tuple, list[_UpstreamConnection]] = {}

    async def exchange(self, facts: ConnectionFacts, request: HttpRequest, host: str):
        """`host` is the request's normalised Host (the verdict's): the name TLS is verified for."""
        certificate = self.proxy._client_certificate_for(host, facts.zone) if facts.tls else None
        key = (facts.address, facts.port, facts.tls, host if facts.tls else None, certificate)
        limits = self.proxy.limits
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            connection = self._checkout(key) if attempt == 0 else None
            reused = connection is not None
            async with asyncio.timeout(limits.upstream_timeout):
                if connection is None:
                    context = self.proxy._client_context(certificate) if facts.tls else None
                    _, connection = await loop.create_connection(
                        lambda: _UpstreamConnection(limits.max_header_bytes), facts.address, facts.port,
                        ssl=context, server_hostname=host if context else None)
                try:
                    result = await connection.exchange(request, limits.max_response_body)
                except _StaleConnection:
                    connection.close()
                    if reused:
                        continue
                    raise
                except BaseException:
                    connection.close()
                    raise
            if connection.reusable:
                self._checkin(key, connection)
            else:
                connection.close()
            return result
        raise _StaleConnection("upstream closed before answering")  # not reached: attempt 1 raises

    def _checkout(self, key) -> _UpstreamConnection | None:
        idle = self._idle.get(key)
        now = asyncio.get_running_loop().time()
        while idle:
            connection = idle.pop()
            if connection.reusable and now - connection.idle_since < self.IDLE_SECONDS:
                return connection
            connection.close()
        return None

    def _checkin(self, key, connection: _UpstreamConnection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.MAX_IDLE_PER_KEY:
            connection.close()
            return
        connection.idle_since = asyncio.get_running_loop().time()
        idle.append(connection)

    def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
