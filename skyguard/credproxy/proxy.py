"""The transparent credential-swap proxy: HTTP on one listener, intercepted HTTPS on another.
It moves bytes, keeps the limits and asks swap.SwapEngine what to do.

One client connection (client.py) gets its upstream connections from a pool (upstream.py)
keyed by the address the VM originally connected to (SO_ORIGINAL_DST after the nftables
redirect of steering.py), with TLS verified under the SNI the VM sent. HTTPS is accepted by
tlsaccept.py, which reads the SNI before the handshake so that interception certificates are
minted in a worker thread, within a per-VM budget, never on the event loop.

Policy: everything a request is decided under (swap engine, who is which workload, client
certificates) is one immutable PolicyState; set_policy() replaces it with one assignment on the
loop, and each request reads it once, so a request is decided and its response scrubbed wholly
under the old policy or wholly under the new one.

Off the loop, which carries every VM's traffic: a request body past bodywork.INLINE_BYTES (64 KiB)
is searched for secrets and placeholders, and a response past it or with a content coding decoded
and scrubbed, in a body worker thread (skyguard/bodywork.py); smaller ones in place, where the hop
would cost more than the work.

Why protocols and llhttp rather than streams and h11: the proxy is CPU-bound in Python, and
these halve the interpreter work per request (bench/credproxy.py).

Failure policy: fail closed. Malformed or unreadable requests get 4xx and the connection is
closed; anything the proxy cannot inspect (upgrades, h2, unknown content codings) is refused;
an upstream failure is a 502; a request whose entry the signed log refuses (its disk full or
stalled) is a 503 with a JSON reason, before anything is forwarded. A swap waits until its entry is
durable (the writer's next group commit): a secret leaves only on record. No client input can
raise out of a connection handler.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import ipaddress
import json
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from skyguard import bodywork
from skyguard.content.httpfilter import BLOCKED_CONTENT_TYPE, BLOCKED_STATUS, blocked_body, judge_body
from skyguard.content.inspector import ContentEngine, ContentVerdict
from skyguard.credproxy.ca import CertificateAuthority
from skyguard.credproxy.client import ClientConnection
from skyguard.credproxy.codings import UnscrubbableResponse, decode_body
from skyguard.credproxy.fairness import Slots, TokenBuckets
from skyguard.credproxy.http1 import (
    ProtocolRefusal,
    ProxyLimits,
    UnsafeHead,
    UpstreamProtocolError,
    serialise_response,
)
from skyguard.credproxy.interfaces import BLOCKED_PROTOCOL, LOG_REFUSED, CredentialMetrics, DecisionLog, SecretSource
from skyguard.credproxy.sockets import listen, original_destination
from skyguard.credproxy.swap import (
    ConnectionFacts,
    HttpRequest,
    SwapEngine,
    normalise_name,
)
from skyguard.credproxy.tlsaccept import ALERT_UNRECOGNIZED_NAME, PeekingTlsListener
from skyguard.credproxy.upstream import UpstreamPool, UpstreamTls
from skyguard.errors import CredentialError, LogError
from skyguard.keys.tlskey import ClientCertificate  # a value of the key custody services (below this part)
from skyguard.parts import entries_durable
from skyguard.policy.model import Policy

log = logging.getLogger(__name__)

_NO_SNI = "TLS ClientHello without a usable SNI"
_MINT_LIMITED = "too many new TLS names from this VM: interception certificates are rate-limited"


@dataclass(frozen=True)
class PolicyState:
    """What one policy says to the proxy. Immutable: replaced whole, never edited."""

    engine: SwapEngine
    workload_by_address: dict[str, tuple[str, str]]  # compressed address -> (workload, zone)
    client_certificates: dict[str, ClientCertificate]  # destination name -> certificate
    content_patterns: tuple = ()
    content: ContentEngine | None = None  # the policy's content rules (skyguard/content), if any
    limits: ProxyLimits = ProxyLimits()  # the proxy's own
    zone_limits: dict[str, ProxyLimits] = field(default_factory=dict)  # zone -> limits other than those

    @classmethod
    def build(cls, policy: Policy, secrets: SecretSource, client_certificates, content_patterns,
              limits: ProxyLimits) -> PolicyState:
        """Reads the secrets from the store: call off the loop when the store is on disk."""
        return cls(SwapEngine(policy.credentials, secrets, content_patterns),
                   {str(a): (w.name, w.zone) for w in policy.workloads() for a in w.addresses},
                   dict(client_certificates or {}), tuple(content_patterns),
                   # Only rules over HTTP concern the proxy (SFTP ones are the access proxy's).
                   ContentEngine(policy.content) if policy.content.zones_for("http") else None,
                   limits, _zone_limits(policy, limits))

    def identify(self, address: str) -> tuple[str | None, str | None]:
        try:
            address = ipaddress.ip_address(address.split("%", 1)[0]).compressed
        except ValueError:
            return None, None
        return self.workload_by_address.get(address, (None, None))

    def request_limits(self, address: str) -> ProxyLimits:
        """The limits for a connection from `address` (see _zone_limits)."""
        if not self.zone_limits:
            return self.limits
        _, zone = self.identify(address)
        return self.zone_limits.get(zone, self.limits)

    def client_certificate_for(self, host: str | None, zone: str | None) -> str | None:
        """The store name of the client certificate to present to `host` for `zone`, if any."""
        certificate = self.client_certificates.get(host)
        return certificate.store_name if certificate and zone in certificate.zones else None


def _zone_limits(policy: Policy, limits: ProxyLimits) -> dict[str, ProxyLimits]:
    """A zone under HTTP upload content rules may send bodies up to content.max_inspect_bytes
    (judged whole; larger ones are refused unscanned); other zones keep the proxy's own limit.
    Made once per policy: connections look their zone up."""
    content = policy.content
    if content.max_inspect_bytes <= limits.max_request_body:
        return {}
    raised = dataclasses.replace(limits, max_request_body=content.max_inspect_bytes)
    return {zone: raised for rule in content.rules if "upload" in rule.directions and "http" in rule.protocols
            for zone in rule.zones}


@dataclass
class Origin:
    """What a client connection itself says (never its requests): who, and where it was going.
    facts() gives the swap engine's view under one PolicyState (cached per state)."""

    peer: str
    address: str
    port: int
    tls: bool
    sni: str | None
    address_matches: Callable[[str, str], bool]
    _cached: tuple = field(default=(None, None), repr=False)

    def facts(self, state: PolicyState) -> ConnectionFacts:
        if self._cached[0] is not state:
            workload, zone = state.identify(self.peer)
            self._cached = (state, ConnectionFacts(workload, zone, self.sni, self.address, self.port, self.tls,
                                                   self.address_matches))
        return self._cached[1]


def blocked_response(verdict: ContentVerdict, method: bytes, keep_alive: bool) -> bytes:
    """The 403 for a body the content filter blocked: its JSON reason, framed here (the filter
    does not import the proxy's HTTP/1 writer: the proxy imports the filter)."""
    return serialise_response(method, keep_alive, BLOCKED_STATUS, ((b"content-type", BLOCKED_CONTENT_TYPE),),
                              blocked_body(verdict))


LOG_REFUSED_STATUS = (503, b"Service Unavailable")
LOG_REFUSED_BODY = json.dumps({
    "error": LOG_REFUSED,
    "reason": "skyguard's signed log refuses entries (the host's `skyguard status` says why): "
              "the request was not forwarded; retry later"}).encode() + b"\n"


def log_refused_response(method: bytes, keep_alive: bool) -> bytes:
    """The 503 for a request whose entry the signed log refused: fixed words (the log's own
    reason names host paths and sizes, none of the VM's business)."""
    return serialise_response(method, keep_alive, LOG_REFUSED_STATUS, ((b"content-type", b"application/json"),),
                              LOG_REFUSED_BODY)


def safe_response(engine: SwapEngine, host: str | None, method: bytes, status, headers, body: bytes, limit: int):
    """Every byte the upstream sent that goes on to the VM, scrubbed: the reason phrase, header
    names and values, the body decoded (at most `limit` bytes: UnscrubbableResponse past it) and
    scrubbed (trailers were already dropped). Returns (status, headers, body, occurrences removed).
    No I/O, no state: any thread may run it (CredentialProxy._safe_response decides which)."""
    body = decode_body(headers, body, limit)
    code, reason = status
    reason, scrubbed_reason = engine.forms.scrub(reason)
    safe_headers, safe_body, scrubbed = engine.scrub_response(host, headers, body)
    if method == b"HEAD":
        length = next((v for n, v in headers if n == b"content-length"), None)
        if length is not None:
            safe_headers += ((b"content-length", length),)
    return (code, reason), safe_headers, safe_body, scrubbed + scrubbed_reason


class CredentialProxy:
    """Run with `await proxy.start(...)`; stop with `await proxy.stop()`; `await
    proxy.set_policy(policy)` at any time in between. One event loop; every method on it."""

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
        upstream_cas: Sequence[str] = (),
        client_certificates: dict[str, ClientCertificate] | None = None,
        content_patterns=(),
        limits: ProxyLimits = ProxyLimits(),
        destination_of: Callable[[socket.socket], tuple[str, int] | None] = original_destination,
    ):
        """upstream_ca_file and upstream_cas: CA bundles trusted for upstreams in addition to
        the system store."""
        self.secrets = secrets
        self.state = PolicyState.build(policy, secrets, client_certificates, content_patterns, limits)
        metrics.content.follow(lambda: self.state.content)  # clamd's state, read at scrape time
        self.ca = ca
        self.address_matches = address_matches
        self.decision_log = decision_log
        self.metrics = metrics
        self.limits = limits
        self.destination_of = destination_of
        self.tls = UpstreamTls(secrets, [upstream_ca_file, *upstream_cas])
        self.tls.keys = policy.keys
        self.upstreams = UpstreamPool(self.tls, limits)
        self.slots = Slots(limits.max_connections_per_vm)
        self.mint_budget = TokenBuckets(limits.mint_rate_per_vm, limits.mint_burst_per_vm)
        self._servers: list[asyncio.base_events.Server] = []
        self._tls_listener: PeekingTlsListener | None = None
        self._connections: set[ClientConnection] = set()
        self._minting: dict[str, asyncio.Future] = {}
        self._mint_pool: concurrent.futures.ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"CredentialProxy({self.state.engine!r})"

    @property
    def engine(self) -> SwapEngine:
        return self.state.engine

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self, host: str | list[str] = "0.0.0.0", http_port: int = 0, https_port: int = 0) -> tuple[int, int]:
        """Listen; returns the (http, https) ports actually bound."""
        # One worker: minting is CPU work, so more threads would only contend for the GIL.
        self._mint_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sg-cert-mint")
        http_servers, http_port = await listen(lambda: ClientConnection(self, tls=False), host, http_port)
        self._servers = http_servers
        self._tls_listener = PeekingTlsListener(admit=self.admit, release=self.release, on_hello=self._tls_hello,
                                                hello_timeout=self.limits.header_timeout)
        try:
            https_port = await self._tls_listener.start(host, https_port)
        except BaseException:
            await self.stop()
            raise
        return http_port, https_port

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        if self._tls_listener is not None:
            await self._tls_listener.stop()  # also ends handshakes in progress
            self._tls_listener = None
        connections = list(self._connections)
        for connection in connections:
            connection.abort()
        await asyncio.gather(*(c.task for c in connections if c.task), return_exceptions=True)
        self.upstreams.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers = []
        if self._mint_pool is not None:
            self._mint_pool.shutdown(wait=False, cancel_futures=True)
            self._mint_pool = None

    async def set_policy(self, policy: Policy, *, client_certificates: dict[str, ClientCertificate] | None = None,
                         content_patterns=None) -> None:
        """Decide every later request under `policy`. None keeps the current client
        certificates or content patterns. Secrets are read in a worker thread; the switch
        itself is one assignment here on the loop."""
        old = self.state
        state = await asyncio.to_thread(
            PolicyState.build, policy, self.secrets,
            old.client_certificates if client_certificates is None else client_certificates,
            old.content_patterns if content_patterns is None else content_patterns, self.limits)
        self.state = state
        # Upstream TLS set up under the old policy (client certificates) is not reused.
        self.tls.keys = policy.keys
        self.tls.forget()
        self.upstreams.close()

    # ---- fairness: connection slots and certificate minting, per VM --------------------------

    def admit(self, peer: str):
        """A connection slot for this client's VM (its workload name; None for non-workloads),
        or None when that VM already holds its share."""
        workload, _ = self.state.identify(peer)
        return (workload,) if self.slots.acquire(workload) else None

    def release(self, slot) -> None:
        self.slots.release(slot[0])

    async def _tls_hello(self, sock: socket.socket, slot, server_name: str | None) -> None:
        """tlsaccept hands over a socket whose ClientHello is queued: pick (or mint) the
        certificate for its SNI, then run TLS and the connection on it."""
        made: list[ClientConnection] = []
        try:
            name = normalise_name(server_name)
            peer = sock.getpeername()[0]
            context = await self._leaf_context(name, slot[0]) if name else None
            if context is None:
                # Without a name there is nothing to check Host against; over the budget, no
                # certificate. Either way: refuse the handshake (an alert, then close).
                self._account_handshake(peer, sock, _NO_SNI if name is None else _MINT_LIMITED)
                sock.send(ALERT_UNRECOGNIZED_NAME)
                raise ConnectionAbortedError()

            def factory():
                made.append(ClientConnection(self, tls=True, slot=slot))
                return made[0]

            await asyncio.get_running_loop().connect_accepted_socket(
                factory, sock, ssl=context, ssl_handshake_timeout=self.limits.header_timeout)
        except BaseException as error:
            sock.close()
            if not made or made[0].transport is None:  # the connection never took the slot over
                self.release(slot)
            if not isinstance(error, (OSError, ssl.SSLError, asyncio.TimeoutError, CredentialError)):
                raise  # cancelled (stopping), or a bug: tlsaccept logs it

    async def _leaf_context(self, name: str, vm: str | None) -> ssl.SSLContext | None:
        """The interception context for `name`: cached, or minted in the worker thread when
        this VM's budget allows (None when it does not). Concurrent asks share one mint."""
        context = self.ca.cached_context(name)
        if context is not None:
            return context
        pending = self._minting.get(name)
        if pending is None:
            loop = asyncio.get_running_loop()
            if not self.mint_budget.take(vm, loop.time()):
                return None
            pending = loop.run_in_executor(self._mint_pool, self.ca.server_context, name)
            self._minting[name] = pending
            pending.add_done_callback(lambda _: self._minting.pop(name, None))
        try:
            return await asyncio.shield(pending)
        except Exception:  # never let a certificate problem escape: the handshake is refused
            log.exception("minting a certificate failed")
            raise CredentialError("cannot mint an interception certificate") from None

    # ---- one request ----------------------------------------------------------------------

    def origin(self, transport: asyncio.Transport, tls: bool) -> Origin | None:
        """The connection's Origin; None when it was not redirected (nowhere to forward to)."""
        destination = self.destination_of(transport.get_extra_info("socket"))
        if destination is None:
            return None
        sni = None
        if tls:
            sni = getattr(transport.get_extra_info("ssl_object").context, "skyguard_name", None)
        peer = transport.get_extra_info("peername")[0]
        return Origin(peer, destination[0], destination[1], tls, sni, self.address_matches)

    async def answer(self, request: HttpRequest, origin: Origin, keep_alive: bool) -> bytes | ProtocolRefusal:
        """Decide, forward and make the answer safe: the whole response to send, or the refusal
        to answer with before closing. The policy state is read once, here."""
        state = self.state
        facts = origin.facts(state)
        # decide() scans every byte for secrets and placeholders: up to a second or more for the
        # bodies of tens of MiB a zone under upload content rules may send (_zone_limits).
        verdict = state.engine.decide(request, facts) if len(request.body) <= bodywork.INLINE_BYTES \
            else await bodywork.off_loop(state.engine.decide, request, facts)
        try:
            return await self._answer(state, request, facts, verdict, keep_alive)
        except LogError:  # its entry was not written: nothing (more) goes on (the writer said why, once)
            return log_refused_response(request.method, keep_alive)

    async def _answer(self, state: PolicyState, request: HttpRequest, facts: ConnectionFacts, verdict,
                      keep_alive: bool) -> bytes | ProtocolRefusal:
        """answer() once decided; LogError when the signed log refuses an entry on the way."""
        await self._account(verdict)
        if verdict.action == "block":
            return ProtocolRefusal(verdict.status, verdict.reason)
        if state.content is not None:  # judged whole before a byte is forwarded (fail closed)
            blocked = await judge_body(state.content, facts, verdict.host, "upload", request.headers, request.body,
                                       self.decision_log, self.metrics.content, target=request.target)
            if blocked is not None:
                return blocked_response(blocked, request.method, keep_alive)
        certificate = state.client_certificate_for(verdict.host, facts.zone)
        try:
            status, headers, body = await self.upstreams.exchange(facts, verdict.request, verdict.host, certificate)
            status, headers, body = await self._safe_response(state.engine, verdict.host, request, status, headers,
                                                              body, facts)
            if state.content is not None:
                blocked = await judge_body(state.content, facts, verdict.host, "download", headers, body,
                                           self.decision_log, self.metrics.content)
                if blocked is not None:
                    return blocked_response(blocked, request.method, keep_alive)
            return serialise_response(request.method, keep_alive, status, headers, body)
        except (UnscrubbableResponse, CredentialError) as error:
            # Our own words, but scrubbed all the same: nothing after the upstream's answer
            # reaches the VM without passing the scrubber.
            return ProtocolRefusal(502, state.engine.forms.scrub(str(error).encode())[0].decode("utf-8", "replace"))
        except (TimeoutError, OSError, ssl.SSLError, UpstreamProtocolError, UnsafeHead) as error:
            return ProtocolRefusal(502, f"upstream failed: {type(error).__name__}")

    async def _safe_response(self, engine: SwapEngine, host: str | None, request: HttpRequest, status, headers,
                             body: bytes, facts: ConnectionFacts):
        """safe_response(), in place for a small body, else in a body worker thread (bodywork.py):
        the decoding and scrubbing of a large one would stall every VM's traffic on this loop."""
        args = (engine, host, request.method, status, headers, body, self.limits.max_response_body)
        status, headers, body, scrubbed = safe_response(*args) if bodywork.is_small(headers, body) \
            else await bodywork.off_loop(safe_response, *args)
        if scrubbed:
            # Not a metric result (those count requests); the log says which response held it.
            self.decision_log.record(
                "credential", credential=None, zone=facts.zone, workload=facts.workload,
                destination=host, address=facts.address, port=facts.port,
                result="scrubbed", reason=f"{scrubbed} secret occurrences removed from a response")
        return status, headers, body

    async def _account(self, verdict) -> None:
        """Record the verdict's entries, then count it. A swap waits until its entries are durable
        (entries_durable): a secret goes out only once its release is on record. A request whose
        entry the signed log refuses is counted as LOG_REFUSED (it is not forwarded) and LogError raised."""
        try:
            queued = [self.decision_log.record("credential", **entry) for entry in verdict.entries]
            if verdict.action == "swap":
                await entries_durable(queued, self.decision_log)
        except LogError:
            for credential, _ in verdict.results:
                self.metrics.count(credential, LOG_REFUSED)
            raise
        for credential, result in verdict.results:
            self.metrics.count(credential, result)

    def account_protocol_block(self, origin: Origin, reason: str) -> None:
        state = self.state
        facts = origin.facts(state)
        self.metrics.count(None, BLOCKED_PROTOCOL)
        sni = facts.sni if facts.sni and not state.engine.forms.found_in(facts.sni.encode()) else "-"  # never a secret
        self._record_block(
            credential=None, zone=facts.zone, workload=facts.workload,
            destination=sni, address=facts.address, port=facts.port,
            result=BLOCKED_PROTOCOL, reason=reason)

    def _account_handshake(self, peer: str, sock: socket.socket, reason: str) -> None:
        workload, zone = self.state.identify(peer)
        destination = self.destination_of(sock)
        self.metrics.count(None, BLOCKED_PROTOCOL)
        self._record_block(
            credential=None, zone=zone, workload=workload, destination="-",
            address=destination[0] if destination else None, port=destination[1] if destination else None,
            result=BLOCKED_PROTOCOL, reason=reason)

    def _record_block(self, **fields) -> None:
        """A refusal's entry: the refusal goes whether or not the signed log takes it (nothing is
        forwarded either way; the log counts what it refused and says why, once)."""
        try:
            self.decision_log.record("credential", **fields)
        except LogError:
            pass
