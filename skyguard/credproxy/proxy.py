"""The transparent credential-swap proxy: asyncio + h11, HTTP on one listener, intercepted HTTPS
on another. It moves bytes, keeps the limits and asks swap.SwapEngine what to do.

One client connection gets at most one upstream connection, to the address the VM originally
connected to (SO_ORIGINAL_DST after the nftables redirect of steering.py), with TLS verified
against the system or a configured CA bundle under the SNI the VM sent. Messages are buffered
whole (bounded): a secret split across chunks must still be found, swapped or scrubbed.
Not here: the swap rules (swap.py), the CA (ca.py), steering (steering.py), the daemon wiring.

Failure policy: fail closed. Malformed or unreadable requests get 400 and the connection is
closed; anything the proxy cannot inspect (upgrades, h2, unknown content codings) is refused;
an upstream failure is a 502. No client input can raise out of a connection handler.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import ssl
import struct
from dataclasses import dataclass
from typing import Callable

import h11

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
READ_CHUNK = 65536
# Obsolete line folding (a header line starting with space or tab) is a smuggling vector:
# h11 would silently join it, an upstream might not. Refused.
_OBS_FOLD = re.compile(rb"\n[ \t]")


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


async def start_servers(callback, hosts: str | list[str], port: int, **kwargs):
    """Listen on every host on ONE port (asyncio would give each host its own ephemeral port
    when port is 0, and steering redirects to a single port). Returns (servers, port)."""
    servers = []
    for host in [hosts] if isinstance(hosts, str) else hosts:
        server = await asyncio.start_server(callback, host, port, reuse_address=True, **kwargs)
        port = server.sockets[0].getsockname()[1]
        servers.append(server)
    return servers, port


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
        self._slots = asyncio.Semaphore(limits.max_connections)
        self._tasks: set[asyncio.Task] = set()
        self._tls_context = self._interception_context()

    def __repr__(self) -> str:
        return f"CredentialProxy({self.engine!r})"

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self, host: str | list[str] = "0.0.0.0", http_port: int = 0, https_port: int = 0) -> tuple[int, int]:
        """Listen; returns the (http, https) ports actually bound."""
        http, http_port = await start_servers(lambda r, w: self._accept(r, w, tls=False), host, http_port)
        https, https_port = await start_servers(
            lambda r, w: self._accept(r, w, tls=True), host, https_port, ssl=self._tls_context,
            ssl_handshake_timeout=self.limits.header_timeout,
        )
        self._servers = http + https
        return http_port, https_port

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
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

    # ---- one client connection ------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: bool) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            if self._slots.locked():
                return  # over the connection limit: close at once rather than queue
            async with self._slots:
                await self._serve_connection(reader, writer, tls)
        except Exception:  # the last line of defence: one connection never takes the proxy down
            log.exception("credential proxy connection failed")
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve_connection(self, reader, writer, tls: bool) -> None:
        sock = writer.get_extra_info("socket")
        peer = writer.get_extra_info("peername")
        destination = self.destination_of(sock)
        if destination is None:
            return
        sni = None
        if tls:
            leaf = writer.get_extra_info("ssl_object").context
            sni = getattr(leaf, "skyguard_name", None)
        workload, zone = self._workload_by_address.get(ipaddress.ip_address(peer[0]).compressed, (None, None))
        facts = ConnectionFacts(workload, zone, sni, destination[0], destination[1], tls, self.address_matches)
        leftover = b""
        while True:
            # A fresh h11 parser per request: the proxy writes responses itself (see
            # _serialise_response), so h11 only ever parses, and a parser that never sees our
            # responses must not be reused. Bytes of a pipelined next request carry over.
            server = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
            if leftover:
                server.receive_data(leftover)
            try:
                request = await self._read_request(reader, writer, server)
            except ProtocolRefusal as refusal:
                self._account_protocol_block(facts, refusal.reason)
                await self._refuse(writer, server, refusal.status, refusal.reason)
                return
            if request is None:
                return
            verdict = self.engine.decide(request, facts)
            self._account(verdict)
            if verdict.action == "block":
                await self._refuse(writer, server, verdict.status, verdict.reason)
                return
            try:
                status, headers, body = await self.upstreams.exchange(facts, verdict.request, verdict.host)
                headers, body = self._safe_response(verdict, request, headers, body, facts)
            except (UnscrubbableResponse, CredentialError) as error:
                await self._refuse(writer, server, 502, str(error))
                return
            except (OSError, ssl.SSLError, asyncio.TimeoutError, h11.ProtocolError) as error:
                await self._refuse(writer, server, 502, f"upstream failed: {type(error).__name__}")
                return
            keep_alive = _client_keeps_alive(request)
            if not await self._respond(writer, request.method, keep_alive, status, headers, body):
                return
            if not keep_alive or server.their_state is not h11.DONE:
                return
            leftover = server.trailing_data[0]

    async def _read_request(self, reader, writer, server: h11.Connection) -> HttpRequest | None:
        loop = asyncio.get_running_loop()
        head = bytearray(server.trailing_data[0])
        deadline = None if not head else loop.time() + self.limits.header_timeout
        request = None
        body = bytearray()
        # With nothing buffered, asking h11 first can only answer NEED_DATA: read straight away.
        nothing_buffered = not head
        while True:
            try:
                event = h11.NEED_DATA if nothing_buffered else server.next_event()
                nothing_buffered = False
            except h11.RemoteProtocolError as error:
                raise ProtocolRefusal(error.error_status_hint or 400, "malformed HTTP request") from None
            if event is h11.NEED_DATA:
                if request is None:
                    timeout = self.limits.idle_timeout if deadline is None else deadline - loop.time()
                else:
                    timeout = self.limits.body_read_timeout
                    if server.they_are_waiting_for_100_continue:
                        writer.write(server.send(h11.InformationalResponse(status_code=100, headers=[])))
                try:
                    async with asyncio.timeout(max(timeout, 0.001)):  # no extra task, unlike wait_for
                        data = await reader.read(READ_CHUNK)
                except (asyncio.TimeoutError, ConnectionError, ssl.SSLError):
                    if request is None and not head:
                        return None  # idle keep-alive connection went away or timed out
                    raise ProtocolRefusal(408, "request not received in time") from None
                if request is None:
                    if deadline is None:
                        deadline = loop.time() + self.limits.header_timeout
                    if len(head) <= self.limits.max_header_bytes:
                        head += data
                server.receive_data(data)
                if not data and request is None and not head:
                    return None
                continue
            if event is h11.PAUSED:
                raise ProtocolRefusal(400, "malformed HTTP request")
            if isinstance(event, h11.ConnectionClosed):
                if request is None and not head:
                    return None
                raise ProtocolRefusal(400, "connection closed mid-request")
            if isinstance(event, h11.Request):
                _check_head(event, bytes(head), self.limits.max_header_bytes)
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.limits.max_request_body:
                    raise ProtocolRefusal(413, "request body larger than the proxy's limit")
            elif isinstance(event, h11.EndOfMessage):
                return HttpRequest(request.method, request.target, tuple(request.headers), bytes(body),
                                   request.http_version)

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

    async def _refuse(self, writer, server: h11.Connection, status: int, reason: str) -> None:
        if server.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"skyguard: {reason}\n".encode()
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            writer.write(server.send(h11.Response(status_code=status, headers=headers)))
            writer.write(server.send(h11.Data(data=body)))
            writer.write(server.send(h11.EndOfMessage()))
            async with asyncio.timeout(self.limits.body_read_timeout):
                await writer.drain()
        except (h11.LocalProtocolError, ConnectionError, asyncio.TimeoutError, ssl.SSLError):
            pass

    async def _respond(self, writer, method: bytes, keep_alive: bool, status, headers, body) -> bool:
        try:
            writer.write(_serialise_response(method, keep_alive, status, headers, body))
            if writer.transport.get_write_buffer_size() > 0:  # only wait when the socket pushed back
                async with asyncio.timeout(self.limits.body_read_timeout):
                    await writer.drain()
        except (h11.LocalProtocolError, ConnectionError, asyncio.TimeoutError, ssl.SSLError):
            return False
        return True


# What may never appear in a header name, value or reason phrase we write (CR and LF would end
# the line: response splitting, request smuggling). h11 refuses these on input; this re-checks
# everything we emit in one search, because the fast path skips h11's per-header validation.
_UNSAFE_IN_HEAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Statuses whose responses never have a body (RFC 9110 6.4.1), whatever the headers say.
_NO_BODY_STATUS = frozenset({204, 304})


def _client_keeps_alive(request: HttpRequest) -> bool:
    """h11's rule: HTTP/1.1 without `Connection: close` keeps the connection open."""
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
        raise h11.LocalProtocolError(f"cannot forward status {status_code}")
    if not any(n == b"content-length" for n, _ in headers):
        headers = (*headers, (b"content-length", b"%d" % len(body)))
    if not keep_alive:
        headers = (*headers, (b"connection", b"close"))
    lines = [b"HTTP/1.1 %d %s\r\n" % (status_code, reason)]
    lines.extend(b"%s: %s\r\n" % pair for pair in headers)
    if _UNSAFE_IN_HEAD.search(b"".join(b"".join(pair) for pair in headers) + reason):
        raise h11.LocalProtocolError("refusing to write a header with CR, LF or NUL")
    lines.append(b"\r\n")
    if body and method != b"HEAD" and status_code not in _NO_BODY_STATUS:
        lines.append(body)
    return b"".join(lines)


def _check_head(request: h11.Request, raw_head: bytes, max_header_bytes: int) -> None:
    """Refuse what h11 tolerates but an upstream might read differently (request smuggling)."""
    if request.http_version not in (b"1.0", b"1.1"):
        raise ProtocolRefusal(505, "only HTTP/1.0 and HTTP/1.1 are inspected")
    names = [n for n, _ in request.headers]
    if b"transfer-encoding" in names and b"content-length" in names:
        raise ProtocolRefusal(400, "both Content-Length and Transfer-Encoding")
    end = raw_head.find(b"\r\n\r\n")
    if end < 0:
        end = raw_head.find(b"\n\n")
    if end < 0 or end > max_header_bytes:
        # h11 bounds only heads that arrive in pieces; one that arrives whole is bounded here.
        raise ProtocolRefusal(431, "request head larger than the proxy's limit")
    if _OBS_FOLD.search(raw_head[:end]):
        raise ProtocolRefusal(400, "obsolete header line folding")


class _StaleConnection(ConnectionResetError):
    """A pooled upstream connection was closed before it answered: safe to retry once."""


class _UpstreamConnection:
    """One upstream connection and its h11 state."""

    def __init__(self, reader, writer, max_header_bytes: int):
        self.reader, self.writer = reader, writer
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)
        self.idle_since = 0.0

    @property
    def reusable(self) -> bool:
        # Bytes already buffered beyond the response (say a body sent after a HEAD) would be
        # read as the start of the next response, perhaps for another client: never reuse then.
        conn = self.conn
        return (conn.our_state is h11.IDLE and conn.their_state is h11.IDLE and not self.reader.at_eof()
                and not conn.trailing_data[0])

    async def exchange(self, request: HttpRequest, limit: int):
        connection_tokens = {t.strip().lower() for n, v in request.headers if n == b"connection" for t in v.split(b",")}
        headers = [(n, v) for n, v in request.headers
                   if n not in HOP_BY_HOP and n != b"expect" and n not in connection_tokens]
        if request.body or any(n in (b"content-length", b"transfer-encoding") for n, _ in request.headers):
            headers.append((b"content-length", str(len(request.body)).encode()))
        if _UNSAFE_IN_HEAD.search(b"".join(b"".join(pair) for pair in headers)):
            raise h11.LocalProtocolError("refusing to forward a header with a control character")
        conn = self.conn
        # _parsed=True skips h11's per-header regexes (checked above in one pass); method and
        # target come from h11's own parse of the client's request.
        data = conn.send(h11.Request(method=request.method, target=request.target, headers=headers,
                                     http_version=b"1.1", _parsed=True))
        if request.body:
            data += conn.send(h11.Data(data=request.body))
        data += conn.send(h11.EndOfMessage())
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > 0:  # only wait when the socket pushed back
            await self.writer.drain()
        response = None
        body = bytearray()
        received = False
        nothing_buffered = not conn.trailing_data[0]  # then h11 could only answer NEED_DATA
        while True:
            event = h11.NEED_DATA if nothing_buffered else conn.next_event()
            nothing_buffered = False
            if event is h11.NEED_DATA:
                data = await self.reader.read(READ_CHUNK)
                if not data and not received:
                    raise _StaleConnection("upstream closed before answering")
                received = True
                conn.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    raise UnscrubbableResponse("response body larger than the proxy's limit")
            elif isinstance(event, h11.EndOfMessage):
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                return (response.status_code, response.reason), tuple(response.headers), bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("upstream closed mid-response")

    def close(self) -> None:
        self.writer.close()


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
        for attempt in range(2):
            connection = self._checkout(key) if attempt == 0 else None
            reused = connection is not None
            async with asyncio.timeout(limits.upstream_timeout):
                if connection is None:
                    context = self.proxy._client_context(certificate) if facts.tls else None
                    reader, writer = await asyncio.open_connection(
                        facts.address, facts.port, ssl=context, server_hostname=host if context else None)
                    connection = _UpstreamConnection(reader, writer, limits.max_header_bytes)
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
