"""The DNS proxy's transport: asyncio UDP and TCP listeners for VMs, and the upstream client.

It moves bytes and enforces transport limits (sizes, timeouts, per-client concurrency); every
decision is the resolver's (resolver.py). Queries reach it through the nftables steering
(steering.py), so the VM's original destination address answers.

Spoofing resistance (RFC 5452): an upstream query leaves from a socket drawn at random from a
pool of UPSTREAM_POOL UDP sockets per address family on kernel-randomised ephemeral ports, each
replaced by a fresh one (a new random port) after ROTATE_AFTER queries or ROTATE_SECONDS, so a
scan of the host finds ports that are soon gone; with a random ID and its name in a random
letter case (DNS 0x20, resolver.py). A reply counts only if it comes from the upstream we
asked, on the socket we asked from, with our ID and our question octet for octet; anything
else is discarded and counted (skyguard_dns_upstream_mismatched_total). Identical questions in
flight (same name in any case, type, class, flags and upstreams) share one upstream query and
each waiting client is answered from its reply with its own ID and case, so a VM keeping many
queries for one name waiting gives a spoofer no more chances than one query.
Why a small pool and not a socket per query: opening and closing one costs ~30 us on the path
every answer waits on (bench/run dns: -24 % queries/s), and with 256 sockets the replies spread
over as many sockets, one wake-up each (-30 %); 16 sockets cost -10 % against the 8 fixed ones
they replace (same run), and a forged reply must still guess the port (1/16), the ID (1/65536)
and the case of every letter of the name. The pool also bounds the host's connection-table
entries (one per source port and upstream) by the rotation rate.
A truncated upstream reply is retried over TCP. No answer within
UPSTREAM_TIMEOUT from any upstream: SERVFAIL, counted.

Fail closed: if this process dies, nothing answers the VMs (the steering keeps sending their
queries here), and flows already allowed keep flowing because the datapath holds them.
A question the VM's answer cache holds (decision.cached) is answered from it, never sent.
Not a resolver. One event loop owns a server; it is not thread-safe.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import socket
import struct
import time
from dataclasses import dataclass

from skyguard.dns import wire
from skyguard.dns.learned import StateWriter
from skyguard.dns.listeners import ClientUdp, ClientUdp6
from skyguard.dns.resolver import Decision, DnsPolicyResolver, fit_udp
from skyguard.errors import DnsError, LogError
from skyguard.timeouts import within

DEFAULT_PORT = 5353  # where steering redirects VM queries (never 53: the host may run a resolver)
UPSTREAM_TIMEOUT = 2.0  # seconds per upstream before trying the next one
UPSTREAM_POOL = 16  # UDP sockets per address family queries are spread over (opened lazily; see above)
ROTATE_AFTER = 16  # queries one upstream socket carries before a fresh one takes its place
ROTATE_SECONDS = 10.0  # ... or seconds after it was opened, whichever comes first
UPSTREAM_BATCH = 16  # datagrams read from one upstream socket per wake-up (spoofs included)
PER_CLIENT_INFLIGHT = 256  # forwarded queries one VM may have outstanding; more are dropped
TCP_IDLE_TIMEOUT = 10.0  # seconds a VM's TCP connection may sit idle between queries
TCP_READ_TIMEOUT = 5.0  # seconds to receive one length-prefixed message once it started, or to send one
TCP_MAX_QUERIES = 1000  # per connection, then we close it
TCP_MAX_CONNECTIONS_PER_CLIENT = 16
MAX_QUERY_SIZE = 4096  # a real query is < 300 octets; bigger ones over TCP are closed on
MAX_TCP_REPLY = 65535
DEADLINE_SLACK = 0.001  # seconds early a deadline may fire: uvloop rounds timers to whole ms, and
# a sweep woken a fraction of a ms early must not find nothing and re-arm in a tight loop
STATE_FLUSH_SECONDS = 5.0  # how often refreshed learned state is written (new IPs: at once)
STATE_PRUNE_ROUNDS = 12  # flush rounds between sweeps of expired entries out of memory (a minute)


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int = 53

    @classmethod
    def parse(cls, text: str) -> Upstream:
        """"192.0.2.53", "192.0.2.53:5300", "[2001:db8::53]:53", "2001:db8::53"."""
        host, port = text, 53
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            if rest.startswith(":"):
                port = int(rest[1:])
        elif text.count(":") == 1:
            host, port_text = text.split(":")
            port = int(port_text)
        try:
            ipaddress.ip_address(host)
        except ValueError as e:
            raise DnsError(f"dns.upstreams entry {text!r} is not an IP address (host names "
                           "would need DNS to find DNS); write e.g. 192.0.2.53") from e
        return cls(host, port)


class _Pending:
    """One upstream query in flight: which upstream it is at, its socket, and who waits for it:
    `decision` and `on_done` of the client it was sent for, then `joined`, the (decision,
    on_done) of clients that asked the same question meanwhile. Its deadline lives in
    DnsServer._deadlines."""

    __slots__ = ("decision", "upstreams", "upstream_index", "on_done", "socket", "key", "joined", "group")

    def __init__(self, decision: Decision, upstreams: list, on_done):
        self.decision = decision
        self.upstreams = upstreams  # the list at forward time: a hot swap may replace the server's
        self.upstream_index = 0
        self.on_done = on_done  # called once with the bytes to release (answer or SERVFAIL)
        self.socket: _UpstreamSocket | None = None  # where it waits on UDP
        self.key: tuple | None = None  # (host, port) the reply must come from
        self.joined: list[tuple[Decision, object]] = []
        self.group: tuple | None = None  # its key in DnsServer._groups while others may join


class _UpstreamSocket:
    """One socket of the upstream pool: the queries waiting on it, by upstream ID."""

    __slots__ = ("sock", "pending", "uses", "born", "retired")

    def __init__(self, sock: socket.socket, born: float):
        self.sock = sock
        self.pending: dict[int, _Pending] = {}
        self.uses = 0
        self.born = born
        self.retired = False  # out of the pool: closed once its last query is done


class DnsServer:
    def __init__(self, resolver: DnsPolicyResolver, upstreams: list[Upstream],
                 listen: list[tuple[str, int]] | None = None, upstream_timeout: float = UPSTREAM_TIMEOUT):
        # No upstreams is valid (a policy without FQDN rules needs no dns section): the resolver
        # then refuses every query itself, and _forward() has a backstop if one slips through.
        self.resolver = resolver
        self.upstreams = upstreams
        self.listen = listen or [("0.0.0.0", DEFAULT_PORT)]
        self.upstream_timeout = upstream_timeout
        self.metrics = resolver.metrics
        self.state_writer = StateWriter(resolver.store, self.metrics)
        self._servers: list = []
        self._udp_transports: list = []
        self._inflight: dict[str, int] = {}
        self._tcp_conns: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()
        self._flusher: asyncio.Task | None = None
        # Upstream deadlines of queries in flight, in the order they were sent. Every query gets
        # the same timeout, so that is also deadline order: one timer (the sweep) serves them
        # all, instead of a timer created and cancelled per query (which cost ~1.5 us and two
        # garbage-collected objects each, on the path every answer waits on).
        self._deadlines: dict[_Pending, float] = {}
        # Upstream queries others may still join (see _forward), by question.
        self._groups: dict[tuple, _Pending] = {}
        self._pools: dict[int, list[_UpstreamSocket | None]] = {
            socket.AF_INET: [None] * UPSTREAM_POOL, socket.AF_INET6: [None] * UPSTREAM_POOL}
        self._upstream_sockets: set[_UpstreamSocket] = set()  # open ones, pooled or retired
        self._sweep_timer: asyncio.TimerHandle | None = None
        self.bound: list[tuple[str, int]] = []

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.listen:
            udp, tcp, port = self._bind_pair(host, port)
            if udp.family == socket.AF_INET6:
                self._udp_transports.append(ClientUdp6(self, udp, loop))
            else:
                transport, _ = await loop.create_datagram_endpoint(lambda: ClientUdp(self), sock=udp)
                self._udp_transports.append(transport)
            self._servers.append(await asyncio.start_server(self._on_tcp_client, sock=tcp, limit=MAX_TCP_REPLY + 2))
            self.bound.append((host, port))
        self._flusher = loop.create_task(self._flush_state_periodically())

    @staticmethod
    def _bind_pair(host: str, port: int) -> tuple[socket.socket, socket.socket, int]:
        """A UDP and a TCP socket bound to the same port. Port 0: UDP picks an ephemeral port and
        TCP takes the same number, which something may already hold over TCP: then another."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _ in range(16 if port == 0 else 1):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            tcp = socket.socket(family, socket.SOCK_STREAM)
            bound = port
            try:
                # SO_REUSEADDR on TCP only (a restart binds past TIME_WAIT): on UDP it would let
                # any program that sets it too (avahi on 5353) share the port and get the queries.
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    for s in (udp, tcp):
                        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                udp.bind((host, port))
                bound = udp.getsockname()[1]
                tcp.bind((host, bound))
                return udp, tcp, bound
            except OSError as e:
                udp.close()
                tcp.close()
                error = e
        raise DnsError(f"cannot listen for DNS on {host}:{bound} ({error.strerror}); pick a "
                       "free port or stop what holds it") from error

    async def close(self) -> None:
        if self._flusher:
            self._flusher.cancel()
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        for listener in (*self._servers, *self._udp_transports):
            listener.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        # each ends now, with its connection (or its pending task is destroyed, unclosed, at exit)
        await asyncio.gather(*tasks, return_exceptions=True)
        for pending in list(self._deadlines):
            self._unregister(pending)
        self._groups.clear()
        for us in list(self._upstream_sockets):
            self._close_socket(us)
        for server in self._servers:
            await server.wait_closed()
        await self.resolver.learning.drain()  # what the log writes of the answers queued for it is saved
        # Off the loop (other parts go on): a write in flight, then the last one, each fsync'd.
        await asyncio.to_thread(self.state_writer.close)
        if self.resolver.store.dirty:
            await asyncio.to_thread(self.resolver.store.save, time.time())

    async def _flush_state_periodically(self):
        rounds = 0
        while True:
            await asyncio.sleep(STATE_FLUSH_SECONDS)
            rounds += 1
            self._close_idle_sockets()
            if rounds % STATE_PRUNE_ROUNDS == 0:
                self.resolver.store.prune(time.time())  # expired entries leave memory
            if self.resolver.store.dirty:
                await self.state_writer.save()

    # ---- UDP clients ---------------------------------------------------------------------

    def on_udp_query(self, transport, data: bytes, addr) -> None:
        client_ip = addr[0]
        try:
            decision = self.resolver.decide(data, client_ip)
        except LogError:  # the signed log refuses the decision: no answer (the writer said why, once)
            self.metrics.dropped.labels("log-refused").inc()
            return
        if decision.action == "reply":
            transport.sendto(decision.reply, addr)
        elif decision.action == "forward":
            if self._inflight.get(client_ip, 0) >= PER_CLIENT_INFLIGHT:
                self.metrics.dropped.labels("client-inflight-limit").inc()
                return

            def release(reply: bytes) -> None:
                if not transport.is_closing():
                    transport.sendto(fit_udp(decision, reply), addr)

            self._forward(decision, release)

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- TCP clients ---------------------------------------------------------------------

    async def _on_tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        peer = writer.get_extra_info("peername")
        client_ip = peer[0] if peer else ""
        if self._tcp_conns.get(client_ip, 0) >= TCP_MAX_CONNECTIONS_PER_CLIENT:
            self.metrics.dropped.labels("client-tcp-limit").inc()
            writer.close()
            return
        self._tcp_conns[client_ip] = self._tcp_conns.get(client_ip, 0) + 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)  # close() ends it
        try:
            for _ in range(TCP_MAX_QUERIES):
                try:
                    prefix = await within(reader.readexactly(2), TCP_IDLE_TIMEOUT)
                    (length,) = struct.unpack("!H", prefix)
                    if length == 0 or length > MAX_QUERY_SIZE:
                        self.metrics.dropped.labels("tcp-size").inc()
                        return
                    data = await within(reader.readexactly(length), TCP_READ_TIMEOUT)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                decision = self.resolver.decide(data, client_ip)
                if decision.action == "drop":
                    return
                if decision.action == "reply":
                    reply = decision.reply
                elif self._inflight.get(client_ip, 0) >= PER_CLIENT_INFLIGHT:
                    self.metrics.dropped.labels("client-inflight-limit").inc()
                    return
                else:
                    reply = await self.resolve(decision)
                writer.write(struct.pack("!H", len(reply)) + reply)
                try:  # a client that never reads must not hold its connection and buffers
                    await within(writer.drain(), TCP_READ_TIMEOUT)
                except TimeoutError:
                    writer.transport.abort()  # what it did not read is dropped, not kept
                    return
        except ConnectionError:
            pass
        except LogError:  # as on_udp_query: the connection closes unanswered
            self.metrics.dropped.labels("log-refused").inc()
        finally:
            self._tasks.discard(task)
            self._tcp_conns[client_ip] -= 1
            if not self._tcp_conns[client_ip]:
                del self._tcp_conns[client_ip]
            writer.close()

    # ---- upstream ------------------------------------------------------------------------

    async def resolve(self, decision: Decision) -> bytes:
        """Forward decision's query; the released reply bytes or SERVFAIL. Never raises."""
        future = asyncio.get_running_loop().create_future()
        self._forward(decision, lambda reply: None if future.done() else future.set_result(reply))
        return await future

    # The UDP fast path is callbacks, not a task per query: a task plus wait_for cost more than
    # the whole policy decision. Order per upstream: UDP; on TC, TCP; on timeout, the next one.

    def _forward(self, decision: Decision, on_done) -> None:
        client_ip = decision.client_ip
        self._inflight[client_ip] = self._inflight.get(client_ip, 0) + 1
        if decision.cached:  # the resolver's answer cache held it: no upstream query
            try:  # answer() matched these bytes (never truncated ones) when they were stored
                self._release(decision, on_done, self.resolver.answer(decision, decision.cached))
            except Exception as e:  # noqa: BLE001 - a bug costs one answer, never the listener
                self._finish(decision, on_done, self.resolver.fail(
                    decision, "internal", f"internal error: {type(e).__name__}"))
            return
        upstreams = self.upstreams
        if not upstreams:  # backstop: the resolver refuses before forwarding in this case
            self._finish(decision, on_done, self.resolver.fail(decision, "no-upstream",
                                                               "the policy has no dns.upstreams"))
            return
        # Identical questions share one upstream query (RFC 5452 section 9.1): a VM holding many
        # queries for one name in flight must not multiply a spoofer's chances. Identical: the
        # same name in any case, type, class, header flags and EDNS, to the same upstreams (the
        # list object: a hot swap's new list starts new groups).
        question = decision.question
        query = decision.upstream_query
        group = (id(upstreams), question.key, question.qtype, question.qclass, query[2:12], query[question.end:])
        pending = self._groups.get(group)
        if pending is not None:
            pending.joined.append((decision, on_done))
            return
        pending = _Pending(decision, upstreams, on_done)
        pending.group = group
        self._groups[group] = pending
        self._send_udp(pending)

    def _close_group(self, pending: _Pending) -> None:
        """No one joins pending any more (its reply is in, or it failed)."""
        if pending.group is not None:
            if self._groups.get(pending.group) is pending:
                del self._groups[pending.group]
            pending.group = None

    def _finish(self, decision: Decision, on_done, reply: bytes) -> None:
        client_ip = decision.client_ip
        left = self._inflight.get(client_ip, 1) - 1
        if left:
            self._inflight[client_ip] = left
        else:
            self._inflight.pop(client_ip, None)
        on_done(reply)

    def _fail_all(self, pending: _Pending, kind: str, reason: str) -> None:
        self._close_group(pending)
        for decision, on_done in [(pending.decision, pending.on_done), *pending.joined]:
            self._finish(decision, on_done, self.resolver.fail(decision, kind, reason))

    def _release(self, decision: Decision, on_done, answer) -> None:
        if answer.persist:  # its new address goes to disk first (durability), off the loop
            self._spawn(self._persist_then_finish(decision, on_done, answer.reply))
        else:
            self._finish(decision, on_done, answer.reply)

    async def _persist_then_finish(self, decision: Decision, on_done, reply: bytes) -> None:
        await self.state_writer.save()  # a failed write is counted, and the answer still goes
        self._finish(decision, on_done, reply)

    def _release_joined(self, pending: _Pending, data: bytes) -> None:
        """Answer every client that joined pending from the reply data (already matched to the
        query we sent): each is decided, learned and logged on its own, with its ID and case."""
        lead = pending.decision
        for decision, on_done in pending.joined:
            decision.upstream_id, decision.upstream_query = lead.upstream_id, lead.upstream_query
            try:
                answer = self.resolver.answer(decision, data)
            except Exception as e:  # noqa: BLE001 - a bug costs one answer, never the socket
                answer = None
                reply = self.resolver.fail(decision, "internal", f"internal error: {type(e).__name__}")
            else:
                if answer is None or answer.truncated:  # cannot be: the same bytes matched
                    answer = None
                    reply = self.resolver.fail(decision, "mismatch", "upstream reply did not "
                                               "match a joined question")
            if answer is None:
                self._finish(decision, on_done, reply)
            else:
                self._release(decision, on_done, answer)

    def _send_udp(self, pending: _Pending) -> None:
        decision = pending.decision
        upstream = pending.upstreams[pending.upstream_index]
        try:
            us = self._pick_socket(socket.AF_INET6 if ":" in upstream.host else socket.AF_INET)
        except OSError as e:  # no IPv6 here, or out of file descriptors
            self._next_upstream(pending, "network", f"upstream {upstream.host}: {e.strerror}")
            return
        while decision.upstream_id in us.pending:  # an ID clash on this socket: re-draw
            decision.upstream_id = secrets.randbits(16)
            decision.upstream_query = wire.with_id(decision.upstream_query, decision.upstream_id)
        pending.socket, pending.key = us, (upstream.host, upstream.port)
        us.pending[decision.upstream_id] = pending
        loop = asyncio.get_running_loop()
        self._deadlines[pending] = deadline = loop.time() + self.upstream_timeout
        if self._sweep_timer is None:
            self._sweep_timer = loop.call_at(deadline, self._sweep_deadlines)
        try:
            us.sock.sendto(decision.upstream_query, pending.key)
        except OSError as e:
            self._next_upstream(pending, "network", f"upstream {upstream.host}: {e.strerror}")

    def _pick_socket(self, family: int) -> _UpstreamSocket:
        """A socket drawn at random from the family's pool; a slot that is empty, or whose socket
        has carried ROTATE_AFTER queries or is ROTATE_SECONDS old, gets a fresh socket first."""
        pool = self._pools[family]
        index = int.from_bytes(wire.random_bytes(4), "big") % UPSTREAM_POOL  # 32 bits: no bias worth a name
        us = pool[index]
        loop = asyncio.get_running_loop()
        now = loop.time()
        if us is None or us.uses >= ROTATE_AFTER or now - us.born >= ROTATE_SECONDS:
            if us is not None:
                pool[index] = None
                self._retire(us)
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                # a random free port of net.ipv4.ip_local_port_range, drawn by the kernel
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
                us = _UpstreamSocket(sock, now)
                loop.add_reader(sock.fileno(), self._on_upstream_readable, us)
            except BaseException:
                sock.close()
                raise
            self._upstream_sockets.add(us)
            pool[index] = us
        us.uses += 1
        return us

    def _retire(self, us: _UpstreamSocket) -> None:
        us.retired = True
        if not us.pending:
            self._close_socket(us)

    def _close_socket(self, us: _UpstreamSocket) -> None:
        if us in self._upstream_sockets:
            self._upstream_sockets.discard(us)
            try:
                asyncio.get_running_loop().remove_reader(us.sock.fileno())
            except RuntimeError:  # no loop running any more: nothing to remove it from
                pass
            us.sock.close()

    def _close_idle_sockets(self) -> None:
        """Close pooled sockets past ROTATE_SECONDS that nothing waits on: an idle proxy does
        not keep ports open for a scan to find (the next query opens a fresh one)."""
        now = asyncio.get_running_loop().time()
        for pool in self._pools.values():
            for index, us in enumerate(pool):
                if us is not None and not us.pending and now - us.born >= ROTATE_SECONDS:
                    pool[index] = None
                    self._retire(us)

    def _on_upstream_readable(self, us: _UpstreamSocket) -> None:
        for _ in range(UPSTREAM_BATCH):
            if us not in self._upstream_sockets:
                return  # closed by an earlier datagram of this batch
            try:
                data, addr = us.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error queued on the socket: the timeout handles it
                continue
            pending = us.pending.get((data[0] << 8) | data[1]) if len(data) >= 2 else None
            if pending is None or (addr[0], addr[1]) != pending.key:
                self.metrics.mismatched.inc()  # another ID, source or port: a spoof, or late
                continue
            self._on_upstream_reply(pending, data)

    def _sweep_deadlines(self) -> None:
        """Time out every query whose deadline has passed, then sleep until the next deadline.
        A finished query only leaves the dict; the sweep wakes at most once per timeout for
        nothing and re-arms for the oldest query still waiting."""
        self._sweep_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        expired = []
        for pending, deadline in self._deadlines.items():
            if deadline > now + DEADLINE_SLACK:
                break
            expired.append(pending)
        for pending in expired:
            if pending in self._deadlines:
                self._on_upstream_timeout(pending)  # may re-send: a new deadline at the end
        if self._deadlines and self._sweep_timer is None:
            self._sweep_timer = loop.call_at(next(iter(self._deadlines.values())), self._sweep_deadlines)

    def _unregister(self, pending: _Pending) -> None:
        self._deadlines.pop(pending, None)
        us = pending.socket
        if us is not None:
            pending.socket = None
            if us.pending.get(pending.decision.upstream_id) is pending:
                del us.pending[pending.decision.upstream_id]
            if us.retired and not us.pending:
                self._close_socket(us)

    def _on_upstream_timeout(self, pending: _Pending) -> None:
        host = pending.upstreams[pending.upstream_index].host
        self._next_upstream(pending, "timeout", f"upstream {host} timed out")

    def _next_upstream(self, pending: _Pending, kind: str, reason: str) -> None:
        self._unregister(pending)
        pending.upstream_index += 1
        if pending.upstream_index < len(pending.upstreams):
            self._send_udp(pending)
        else:
            self._fail_all(pending, kind, reason)

    def _on_upstream_reply(self, pending: _Pending, data: bytes) -> None:
        decision = pending.decision
        try:
            answer = self.resolver.answer(decision, data)
        except Exception as e:  # noqa: BLE001 - a bug costs one answer, never the socket
            self._unregister(pending)
            self._fail_all(pending, "internal", f"internal error: {type(e).__name__}")
            return
        if answer is None:
            return  # not ours after all (wrong question): keep waiting until its deadline
        self._unregister(pending)
        self._close_group(pending)
        if answer.truncated:
            self._spawn(self._retry_tcp(pending))
        else:
            self._release(decision, pending.on_done, answer)
            self._release_joined(pending, data)

    async def _retry_tcp(self, pending: _Pending) -> None:
        upstream = pending.upstreams[pending.upstream_index]
        data = None
        try:
            data, answer = await self._ask_tcp(upstream, pending.decision)
        except TimeoutError:
            answer, kind, reason = None, "timeout", f"upstream {upstream.host} timed out (TCP)"
        except OSError as e:
            answer, kind, reason = None, "network", f"upstream {upstream.host}: {e.strerror or e}"
        except Exception as e:  # noqa: BLE001
            answer, kind, reason = None, "internal", f"internal error: {type(e).__name__}"
        else:
            kind, reason = "mismatch", f"upstream {upstream.host} sent no matching TCP reply"
        if answer is not None:
            self._release(pending.decision, pending.on_done, answer)
            self._release_joined(pending, data)
        else:
            self._next_upstream(pending, kind, reason)

    async def _ask_tcp(self, upstream: Upstream, decision: Decision):
        """(reply bytes, Answer) over TCP, or (None, None) when no matching reply came."""
        async def exchange():
            reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
            try:
                writer.write(struct.pack("!H", len(decision.upstream_query))
                             + decision.upstream_query)
                await writer.drain()
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                return await reader.readexactly(length)
            finally:
                writer.close()

        try:
            data = await within(exchange(), self.upstream_timeout)
        except asyncio.IncompleteReadError:
            return None, None
        answer = self.resolver.answer(decision, data)
        if answer is None or answer.truncated:
            return None, None
        return data, answer


def local_addresses() -> list[str]:
    """Every address of this network namespace (for rebinding protection)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr() if a.get_attr("IFA_ADDRESS")]
