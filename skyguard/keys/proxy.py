"""The crypto proxy: a daemon part (skyguard/parts.py) serving the key API (api.py) on every VM's
gateway address, so that VMs sign, verify and decrypt with keys they can never read.

Who is asking comes from the datapath, never from the request: the connection's source address as
the kernel delivered it (the datapath drops a frame whose source address is not its interface's
workload, before it reaches the host) must be a workload's, and the kernel's route back to it must
leave through that workload's interface (for IPv6 link-local peers, the interface is the socket's
scope). A connection that fails either is answered 403 and logged. The workload and zone are
looked up again for each request of a kept-alive connection, so a hot-swapped policy that moves a
VM to another zone (or out of the policy) applies to the connections it already holds. Reachability itself is the
datapath's: a zone reaches the proxy's port only where a rule lets it (see skyguard/policy/keys.py).

Every sign, verify and decrypt, and every refusal, is a `key_use` entry in the signed log (key,
zone, workload, operation, digest, outcome); an operation's entry is durable before its answer
leaves (none is given when the log cannot take it). Refusals are summarised, so a VM's flood does
not grow the log by an entry a request: at most about one entry per second per VM and key over
its rate limit, and per VM, key ("-" for names not offered), operation and outcome for the others
(its `refused` counts them; those after a second's entry are counted in an entry a second later,
also when the flood stops). A caller that is no VM counts as its source (conncap.source_of: an
IPv4 address, an IPv6 /64), for its entries and for its share of connections
(MAX_CONNECTIONS_PER_VM): a host going through the addresses of its /64 has one of each.
Prometheus counts operations by key, operation and outcome (key is "-" for names the policy does
not offer, so a VM cannot grow the label set). Key operations run in a small thread pool; the rate
limit is checked before, so one VM's flood never queues there.

Fail closed: a backend that cannot open (no PIN, no token) stops the part; keys the policy names
but the backend lacks are reported (Degraded) and answered 503. A backend that fails on a request
(a TPM that does not answer, an unreadable key file) is answered 503 "key backend unavailable":
the reason, which names host paths or the TPM's address, goes to the host's log only. 503 is for
those only: a key that cannot do what was asked (decrypt with a signing key) is a refusal (403),
input the key cannot use is the VM's (400), and over a rate limit is 429.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import ipaddress
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import h11

from skyguard.conncap import source_of
from skyguard.credproxy.fairness import Slots
from skyguard.keys import api
from skyguard.keys.types import KeyInputRefused, KeyOperationRefused, verify_signature
from skyguard.parts import Degraded, record_or_report
from skyguard.timeouts import within

log = logging.getLogger("skyguard.keys")

LISTEN_HOSTS = ("0.0.0.0", "::")  # the gateway addresses of every VM interface (and refused others)
IDLE_TIMEOUT = 30.0  # seconds a kept-alive connection may sit idle
REQUEST_TIMEOUT = 10.0  # seconds to send one whole request
MAX_HEADERS = 8192  # bytes of request line and headers
MAX_CONNECTIONS_PER_VM = 16  # open connections one VM may hold; more are closed at once
KEY_WORKERS = 2  # threads running key operations (each with its own token session)
ROUTE_CACHE_SECONDS = 5.0
# Interfaces remembered per caller address: callers that are no VM may come from ever new
# addresses (a host owns its IPv6 /64), so when this many are remembered the old ones go (all of
# them if none is old): a lookup more for a VM, memory that does not grow with the addresses seen.
MAX_ROUTES_CACHED = 4096


class CryptoProxy:
    def __init__(self, policy, state_dir, decisions, registry=None, hosts=LISTEN_HOSTS, durable=None):
        """decisions: the part's DecisionLog (refusals, queued). durable: record(kind, **fields)
        that returns once the entry is durable (the daemon's record), for the key operations that
        ran; without it, decisions.record."""
        from skyguard.keys.backends import open_backend

        self.state_dir, self.decisions, self.hosts = state_dir, decisions, tuple(hosts)
        self.durable = durable or decisions.record
        self.config = policy.keys
        self.backend = open_backend(self.config, state_dir)  # blocking: the daemon calls this off the loop
        self._workloads = _by_address(policy)
        self.limiter = api.RateLimiter()
        self.refusals = api.Refusals()
        self.pool = ThreadPoolExecutor(KEY_WORKERS, thread_name_prefix="sg-keys")
        self.servers: list = []
        self.port = None
        self._connections = Slots(MAX_CONNECTIONS_PER_VM)  # per VM (workload name, else the caller's source)
        self._tasks: set = set()
        self._pending: set[tuple] = set()  # kinds of refusal with refusals to log in a second
        self._routes: dict[str, tuple[str | None, float]] = {}
        self._route_lock = threading.Lock()
        self._ipr = None
        self._metrics = _metrics(registry)
        self.missing: list[str] = []

    def __repr__(self) -> str:
        return f"CryptoProxy(port={self.port}, backend={self.backend!r})"

    # ---- the part's life (skyguard/parts.py) -------------------------------------------------

    async def start(self):
        await self._listen(self.config.port)
        log.info("crypto proxy on port %d, %s backend, %d keys offered", self.port, self.backend.name,
                 len(self.config.grants))
        await self._check_keys()

    async def set_policy(self, policy):
        old, new = self.config, policy.keys
        if new is None:  # a policy without keys: (the daemon stops this part next) offer no key
            new = dataclasses.replace(old, grants=())
        if (old.backend, old.module, old.token, old.pin_secret) != (new.backend, new.module, new.token, new.pin_secret):
            from skyguard.keys.backends import open_backend

            backend = await asyncio.get_running_loop().run_in_executor(None, open_backend, new, self.state_dir)
            self.backend, previous = backend, self.backend
            self.pool.submit(previous.close)
        self.config, self._workloads = new, _by_address(policy)
        self.limiter.forget_except({g.name for g in new.grants})
        if new.port != self.port:
            self._close_servers()
            await self._listen(new.port)
        await self._check_keys()

    async def stop(self):
        self._close_servers()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, self._close_backend)

    def _close_backend(self):
        self.pool.shutdown(wait=True)
        self.backend.close()
        if self._ipr is not None:
            self._ipr.close()

    async def _listen(self, port: int):
        from skyguard.credproxy.sockets import listening_sockets

        sockets, self.port = listening_sockets(list(self.hosts), port)
        try:
            for sock in sockets:
                self.servers.append(await asyncio.start_server(self._accepted, sock=sock, limit=MAX_HEADERS * 2))
        except BaseException:
            self._close_servers()
            raise

    def _close_servers(self):
        for server in self.servers:
            server.close()
        self.servers = []

    async def _check_keys(self):
        def present():
            names = {k.name for k in self.backend.list()}
            return [g.name for g in self.config.grants if g.name not in names]

        self.missing = await asyncio.get_running_loop().run_in_executor(self.pool, present)
        if self.missing:
            raise Degraded(f"the {self.backend.name} backend has no key {', '.join(self.missing)}: requests "
                           f"for it are answered 503; create it with `skyguard key create NAME --type TYPE`")

    # ---- connections ---------------------------------------------------------------------------

    def _accepted(self, reader, writer):
        task = asyncio.get_running_loop().create_task(self._connection(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connection(self, reader, writer):
        sock = writer.get_extra_info("socket")
        peer = writer.get_extra_info("peername")
        try:
            caller = await asyncio.get_running_loop().run_in_executor(None, self._identify, sock, peer)
        except Exception:  # noqa: BLE001 - an unexpected peer shape: refuse, never crash
            log.exception("could not identify a crypto proxy client")
            writer.close()
            return
        who = caller.workload or source_of(caller.address)
        if not self._connections.acquire(who):
            self._metrics.labels("-", "-", "too-many-connections").inc()
            writer.close()
            return
        try:
            await self._serve(caller, reader, writer)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:  # noqa: BLE001 - one connection's bug must not take the proxy down
            log.exception("crypto proxy connection from %s failed", who)
        finally:
            self._connections.release(who)
            writer.close()

    async def _serve(self, caller, reader, writer):
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        while True:
            try:
                request, body, too_large = await self._read_request(conn, reader)
            except h11.RemoteProtocolError:
                reply = api.refuse(400, "bad-request", "malformed HTTP request")
                self._account(caller, None, reply)
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await self._send(conn, writer, reply, close=True)
                return
            if request is None:
                return
            if too_large:
                reply = api.refuse(413, "too-large", f"the body is over {api.MAX_BODY} bytes")
                self._account(caller, None, reply)
                await self._send(conn, writer, reply, close=True)
                return
            caller = self._in_policy(caller)  # each request by the policy in force (a hot swap may move the VM)
            reply = await self._handle(caller, request.method.decode("ascii", "replace"),
                                       request.target.decode("ascii", "replace"), body)
            await self._send(conn, writer, reply)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _read_request(self, conn, reader):
        """(request, body, too_large); (None, ...) when the client closed."""
        request, body = None, bytearray()
        deadline = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                timeout = IDLE_TIMEOUT if request is None and not body else REQUEST_TIMEOUT
                data = await within(reader.read(65536), timeout)
                if deadline is None:
                    deadline = time.monotonic() + REQUEST_TIMEOUT
                elif time.monotonic() > deadline:
                    raise TimeoutError
                conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None, b"", False
            if isinstance(event, h11.Request):
                request = event
                length = dict(event.headers).get(b"content-length")
                if length is not None and length.isdigit() and int(length) > api.MAX_BODY:
                    return request, b"", True
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > api.MAX_BODY:
                    return request, b"", True
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body), False

    async def _send(self, conn, writer, reply: api.Reply, close: bool = False):
        payload = reply.payload()
        headers = [("content-type", "application/json"), ("content-length", str(len(payload)))]
        if close:
            headers.append(("connection", "close"))
        # One write: three small ones can meet Nagle and the client's delayed ACK.
        writer.write(b"".join((conn.send(h11.Response(status_code=reply.status, headers=headers)),
                               conn.send(h11.Data(data=payload)), conn.send(h11.EndOfMessage()))))
        await writer.drain()

    # ---- one request ---------------------------------------------------------------------------

    async def _handle(self, caller: api.Caller, method: str, target: str, body: bytes) -> api.Reply:
        op = api.parse(method, target, body)
        if isinstance(op, api.Reply):
            self._account(caller, None, op)
            return op
        refusal = api.authorize(op, caller, self.config, self.limiter)
        if refusal is not None:
            self._account(caller, op, refusal)
            return refusal
        if op.operation == "list":
            reply = api.listing(caller, self.config)
            self._account(caller, op, reply)
            return reply
        try:
            reply = await asyncio.get_running_loop().run_in_executor(self.pool, self._run_logged, caller, op)
        except KeyInputRefused as e:  # the VM's input (its text names only the key)
            reply = api.refuse(400, "bad-request", str(e))
        except KeyOperationRefused as e:  # the key's type cannot do it: a refusal, not a backend failure
            reply = api.refuse(403, "denied-operation", str(e))
        except Exception as e:  # noqa: BLE001 - any backend failure: its detail (paths, the TPM's address) is the host's
            missing = op.key in self.missing
            reply = api.refuse(503, "key-missing" if missing else "error",
                               f"key {op.key!r} is not available" if missing else "key backend unavailable")
            if not missing:
                log.warning("crypto proxy: %s of key %r for %s failed: %s: %s", op.operation, op.key,
                            caller.workload, type(e).__name__, e)
        self._account(caller, op, reply, logged=reply.status == 200)
        return reply

    def _run_logged(self, caller: api.Caller, op: api.Operation) -> api.Reply:
        """On a key worker thread: run `op`, and for a key operation make its log entry durable
        before the VM gets the answer (no signature or plaintext leaves without its entry). A log
        that cannot take the entry withholds the answer (fail closed)."""
        reply = self._run(op)
        if op.operation in api.OPERATIONS:
            try:
                self.durable("key_use", **self._fields(caller, op, reply))
            except Exception:  # noqa: BLE001 - any log failure: the answer is not given
                log.exception("crypto proxy: the signed log did not take a key_use entry")
                return api.refuse(503, "log-failed", "the operation could not be logged, so its result is withheld")
        return reply

    def _run(self, op: api.Operation) -> api.Reply:
        """On a key worker thread: the one place a key is used."""
        if op.operation == "public":
            return api.Reply(200, {"key": op.key, "type": self.backend.key_type(op.key),
                                   "public_key": self.backend.public_pem(op.key).decode()}, "ok")
        if op.operation == "sign":
            signature = self.backend.sign(op.key, op.data)
            return api.Reply(200, {"key": op.key, "signature": base64.b64encode(signature).decode()}, "ok")
        if op.operation == "verify":
            valid = verify_signature(self.backend.public_pem(op.key), self.backend.key_type(op.key),
                                     op.data, op.signature)
            return api.Reply(200, {"key": op.key, "valid": valid}, "ok")
        plaintext = self.backend.decrypt(op.key, op.data)
        return api.Reply(200, {"key": op.key, "plaintext": base64.b64encode(plaintext).decode()}, "ok")

    def _fields(self, caller: api.Caller, op: api.Operation | None, reply: api.Reply) -> dict:
        return {"key": op.key if op is not None else None, "zone": caller.zone, "workload": caller.workload,
                "interface": caller.interface, "address": caller.address,
                "operation": op.operation if op is not None else "-",
                "digest": op.digest_hex if op is not None else None, "outcome": reply.outcome,
                "status": reply.status}

    def _account(self, caller: api.Caller, op: api.Operation | None, reply: api.Reply, logged: bool = False) -> None:
        """Metrics for every request; a log entry for every refusal (key operations that ran were
        logged durably by _run_logged)."""
        key = op.key if op is not None and self.config.grant(op.key) is not None else "-"
        operation = op.operation if op is not None else "-"
        self._metrics.labels(key, operation, reply.outcome).inc()
        if logged or (op is not None and op.operation in ("list", "public") and reply.status == 200):
            return  # logged already, or reading public material (counted, not logged)
        fields = self._fields(caller, op, reply)
        if op is not None and reply.outcome == "rate-limited":
            name, workload = api.bucket_of(op), caller.workload
            kind: tuple = ("rate-limited", name, workload)
            count = self.limiter.refusals_to_log(name, workload)
            pending = lambda: self.limiter.refusals_to_log(name, workload, force=True)  # noqa: E731
        else:  # by bounded words only: a VM's made-up key names are "-", as in the metrics
            kind = (caller.workload or source_of(caller.address), key, operation, reply.outcome)
            count = self.refusals.refused(kind)
            pending = lambda: self.refusals.to_log(kind, force=True)  # noqa: E731
        if not count:
            self._log_pending_later(kind, pending, fields)
            return
        fields["refused"] = count  # refusals this entry stands for (about one entry a second)
        self.decisions.record("key_use", **fields)

    def _log_pending_later(self, kind: tuple, pending, fields: dict) -> None:
        """Refusals counted but not yet logged (a flood within the second after its last entry) go
        in an entry a second later, so a flood that stops is not left out of the log. pending():
        how many there are, taken as logged."""
        if kind in self._pending:
            return
        self._pending.add(kind)

        def flush():
            self._pending.discard(kind)
            count = pending()
            if count:
                record_or_report(self.decisions, log, "key_use", **dict(fields, refused=count))

        asyncio.get_running_loop().call_later(1.0, flush)

    # ---- who is asking -----------------------------------------------------------------------

    def _identify(self, sock, peer) -> api.Caller:
        address = peer[0].split("%", 1)[0]
        try:
            address = str(ipaddress.ip_address(address))
        except ValueError:
            return api.Caller(None, None, None, address[:64])
        if address.startswith("::ffff:"):
            address = address[7:]
        found = self._workloads.get(address)
        if len(peer) >= 4 and peer[3]:  # an IPv6 link-local peer: the socket names its interface
            try:
                interface = socket.if_indextoname(peer[3])
            except OSError:
                interface = None
        else:
            interface = self._route_interface(address)
        if found is None or interface != found[2]:
            return api.Caller(None, None, interface, address)  # not a workload, or not on its interface
        return api.Caller(found[0], found[1], interface, address)

    def _in_policy(self, caller: api.Caller) -> api.Caller:
        """The caller of a kept-alive connection as the current policy knows it: the address and
        interface the connection came from, its workload and zone looked up again."""
        found = self._workloads.get(caller.address)
        if found is None or caller.interface != found[2]:
            return api.Caller(None, None, caller.interface, caller.address)
        return api.Caller(found[0], found[1], caller.interface, caller.address)

    def _route_interface(self, address: str) -> str | None:
        """The interface the kernel routes `address` through (where its packets come from)."""
        now = time.monotonic()
        with self._route_lock:
            hit = self._routes.get(address)
            if hit is not None and now - hit[1] < ROUTE_CACHE_SECONDS:
                return hit[0]
            try:
                if self._ipr is None:
                    from pyroute2 import IPRoute

                    self._ipr = IPRoute()
                routes = self._ipr.route("get", dst=address)
                index = routes[0].get_attr("RTA_OIF") if routes else None
                name = socket.if_indextoname(index) if index else None
            except Exception:  # noqa: BLE001 - no route: the caller is unidentified (refused)
                name = None
            if len(self._routes) >= MAX_ROUTES_CACHED:
                self._routes = {a: seen for a, seen in self._routes.items() if now - seen[1] < ROUTE_CACHE_SECONDS}
                if len(self._routes) >= MAX_ROUTES_CACHED:
                    self._routes.clear()
            self._routes[address] = (name, now)
            return name


def _by_address(policy) -> dict[str, tuple[str, str, str]]:
    """address -> (workload, zone, interface): the policy's addresses, and each VM's IPv6 link-local
    address (EUI-64 of its MAC, which the datapath lets it send), for VMs that call fe80::1."""
    from skyguard.datapath.compile import eui64_link_local

    out = {}
    for w in policy.workloads():
        out[str(eui64_link_local(w.mac))] = (w.name, w.zone, w.interface)
        for a in w.addresses:
            out[str(a)] = (w.name, w.zone, w.interface)
    return out


def _metrics(registry):
    from prometheus_client import Counter

    return Counter("skyguard_crypto_operations", "Crypto proxy requests by key, operation and outcome "
                   "(ok, denied-zone, denied-operation, rate-limited, bad-request, too-large, "
                   "not-a-workload, unknown-key, key-missing, error)",
                   ["key", "operation", "outcome"], registry=registry)
