"""One client connection to an app's TLS listener: HTTP/1.1 requests read with the credential
proxy's sans-io readers (skyguard/credproxy/http1.py, llhttp), each one answered by the gate
(gate.py: the Host check, sign-in, callback, logout, the session and the access decision) or
forwarded to the app in its VM with the signed identity header; WebSocket upgrades are spliced
as bytes while the session lives.

What the client sent in the identity header, the X-Forwarded-* headers and the other
forwarding headers (any of them spelt with `_` for `-` too) and skyguard's own cookies never
reach the app; skyguard's cookies set by the app never reach the client, and the app's own
reach it host-only (no Domain: none for sibling apps), in any answer (a 101's head is read whole
and filtered too, before the splice). Bodies are buffered whole, within
ProxyLimits; a head must be whole within header_timeout of its first byte, and one client
source (an address, an IPv6 /64) holds at most the gate's share of connections that carried no
signed-in request. Requests are answered one at a time, in order (pipelined ones wait, and
reading pauses past MAX_PIPELINED). Bytes that came in the same
read as an upgrade request, after it, are dropped (WebSocket clients wait for the 101), and so
are those that come before the app's 101; an app that answers an upgrade request with anything
else has answered a request (written as any answer, then the connection closes): nothing more
of the client's reaches it unchecked. Not here: what a session is (sessions.py), the issuer
(oidc.py), listeners and policy (service.py), the app's side (upstream.py).

Callbacks, not a coroutine per connection: the usual request (signed in, checked at the issuer
within the check interval) is decided and forwarded inside data_received, and the app's answer
written back from the app side's data_received; a task is made only when a request must wait
for something else (the issuer, a new connection to the app, a WebSocket splice). StreamReader
and StreamWriter coroutines per request were most of the proxy's own time (bench/apps.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from skyguard.apps.gate import Checks, Reply
from skyguard.apps.sessions import LOGIN_COOKIE, SESSION_COOKIE, host_only, sets_our_cookie, without_cookies
from skyguard.apps.upstream import AppSide
from skyguard.credproxy.http1 import (
    BODY,
    HEAD,
    IDLE,
    ProtocolRefusal,
    ProxyLimits,
    RequestReader,
    ResponseReader,
    StaleConnection,
    Upgraded,
    UpstreamProtocolError,
    client_keeps_alive,
    serialise_request,
    serialise_response,
    serialise_switching_head,
)
from skyguard.credproxy.swap import HOP_BY_HOP, HttpRequest
from skyguard.httpheaders import is_forwarding_header
from skyguard.timeouts import within

log = logging.getLogger(__name__)

LIMITS = ProxyLimits()
CONNECT_TIMEOUT = 5.0  # seconds to reach the app in its VM
WATCHDOG_PERIOD = 1.0  # seconds between a connection's timeout checks (timeouts fire up to this late)
MAX_NAMES_REMEMBERED = 64  # header names whose verdict a connection keeps (_clients_own)
MAX_PIPELINED = 2  # whole requests read ahead of the one being answered; reading pauses beyond
# Bytes of body a request without a session may bring (a form posted after the session ended):
# it is answered with the sign-in redirect anyway, so a longer one is refused (413), not held.
MAX_UNSIGNED_BODY = 64 * 1024
# Request headers a client may never hand the app: httpheaders.FORWARDED (apps read the client's
# address, scheme, host or path prefix from them; the proxy writes some of them itself), and
# the identity header, compared the same way (`_` as `-`).
OUR_COOKIES = (SESSION_COOKIE, LOGIN_COOKIE)  # never sent to the app
HOP_BY_HOP_BUT_LENGTH = HOP_BY_HOP - {b"content-length"}  # dropped from an answer to HEAD


def _for_client(headers, dropped: frozenset) -> list[tuple[bytes, bytes]]:
    """An app's answer's headers as the client may see them, whatever the status (a 101 too):
    one pass drops the names in `dropped` (hop-by-hop) and any Set-Cookie of skyguard's
    cookies (sessions.sets_our_cookie: an app must not end, replace or fix a session), and
    makes the app's own cookies host-only (sessions.host_only: no cookie for sibling apps)."""
    out = []
    for n, v in headers:
        if n == b"set-cookie":
            if sets_our_cookie(v):
                continue
            v = host_only(v)
        elif n in dropped:
            continue
        out.append((n, v))
    return out


class AppConnection(Checks, asyncio.Protocol):
    """Serves one client connection of the app named `app_name` (looked up when the connection
    opens and again for each request: an app gone from the policy is closed); `gate` is the service (sessions,
    issuer, log, metrics, the idle connections to apps)."""

    def __init__(self, gate, app_name: str):
        self.gate, self.app_name = gate, app_name
        self.app: Any = None
        self._policy: Any = None  # the policy self.app was looked up in (_follow_policy)
        self._own = b""  # the app's identity header, as the readers spell names (_serve_app)
        self._names: dict[bytes, bool] = {}  # header name -> only skyguard may send it (_clients_own)
        self.client = "?"
        self.transport: Any = None
        self.requests = RequestReader(LIMITS)
        self.upstream: AppSide | None = None  # kept alive from one request to the next
        self._loop = asyncio.get_running_loop()
        self._busy = False  # a request is being answered: the next ones wait
        self._closed = False
        self._upgrade = False  # the last queued request switches protocols
        self._refusal: ProtocolRefusal | None = None  # answered once the requests before it are
        self._reading_paused = False
        self._write_paused = False
        self._task: asyncio.Task | None = None  # deciding a request that waits, or a splice
        self._splice_done: asyncio.Future | None = None
        # The request at the app: (method, keep-alive, serialised, on a reused connection).
        self._exchange: tuple[bytes, bool, bytes, bool] | None = None
        # Timeouts: one watchdog per connection instead of a timer per read (asyncio.timeout and
        # wait_for per read were a tenth of the proxy's time per request, bench/apps.py). While
        # the connection waits for the client (idle_timeout) or for the app's answer
        # (upstream_timeout), `_deadline` is set and `_on_timeout` says what ends the wait
        # (client: the connection closes; app: 502).
        self._deadline = float("inf")
        self._on_timeout: Any = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._head_of, self._head_due = 0, 0.0  # the message whose head is awaited, and its deadline
        self._body_of, self._unsigned_body = 0, False  # the message whose body is awaited; without a session?
        self._counted = False  # holds one of its address's connections not signed in (gate.clients)

    # ---- the client's side (asyncio.Protocol) --------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.client = str(peer[0])
        self._policy = self.gate.policy
        self.app = self.gate.app(self.app_name)
        if self.app is None or self.gate.issuer is None:
            self._closed = True
            transport.close()  # fail closed: no app, or nobody can sign in
            return
        if self.gate.clients.admit(self.client) is not None:  # this address's source (its /64) holds its share, or all do
            self._closed = True
            transport.abort()
            return
        self._counted = True
        self._serve_app(self.app)
        self._forwarded = [(b"x-forwarded-for", self.client.encode()), (b"x-forwarded-proto", b"https")]
        self._wait(LIMITS.idle_timeout, self._idle_too_long)
        self._watchdog = self._loop.call_later(WATCHDOG_PERIOD, self._watch)

    def data_received(self, data: bytes) -> None:
        if self._splice_done is not None:  # upgraded: the bytes go to the app as they come, once it switched
            side = self.upstream
            if side is not None and side.splice is not None and side.switching is None:
                side.transport.write(data)
            return
        if self._closed or self._upgrade or self._refusal is not None:
            return  # nothing after an upgrade request or a refusal is read
        try:
            self.requests.feed(data)
        except Upgraded:
            self._upgrade = True
            self._pause_reading()
        except ProtocolRefusal as refusal:
            self._refusal = refusal
            self._pause_reading()
        except Exception:  # one connection's failure never reaches the loop
            log.exception("app %s: connection failed", self.app_name)
            self._close()
            return
        if self.requests.state is BODY and self._body_of != self.requests.messages_begun:
            self._body_coming()
        if not self._busy:
            self._await_client()
        if len(self.requests.complete) >= MAX_PIPELINED:
            self._pause_reading()
        self._next()

    def eof_received(self) -> bool:
        return False  # TLS: no half-close; connection_lost follows

    def connection_lost(self, exc) -> None:
        self._closed = True
        self._uncount()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._splice_done is not None and not self._splice_done.done():
            self._splice_done.set_result(None)
        elif self._task is not None and not self._task.done():
            self._task.cancel()  # a request waiting for the issuer or the app: nobody to answer
        self._release_upstream()

    def pause_writing(self) -> None:
        self._write_paused = True  # the client reads slowly: answer nothing more until it catches up
        if self._splice_done is not None and self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._splice_done is not None:
            if self.upstream is not None and not self.upstream.transport.is_closing():
                self.upstream.transport.resume_reading()
            return
        self._next()

    # ---- answering, in order ---------------------------------------------------------------

    def _next(self) -> None:
        """Answer queued requests until one must wait (for the app, the issuer, the client)."""
        try:
            while not (self._busy or self._closed or self._write_paused):
                requests = self.requests.complete
                if requests:
                    request = requests.popleft()
                    if not self._follow_policy():
                        self._write(Reply(421, f"{self.app_name} is no longer served here.", close=True)
                                    .wire(request.method, False))
                        self._close()
                        return
                    if self._upgrade and not requests:
                        self._busy = True
                        self._task = self._loop.create_task(self._upgrade_to(request))
                        return
                    self._answer(request, client_keeps_alive(request), self.check(request))
                    continue
                if self._refusal is not None:
                    refusal = self._refusal
                    self._write(Reply(refusal.status, f"skyguard: {refusal.reason}", close=True).wire(b"GET", False))
                    self._close()
                    return
                if self._reading_paused and not self._upgrade:
                    self._reading_paused = False
                    self.transport.resume_reading()
                return
        except Exception:  # one connection's failure never reaches the loop
            log.exception("app %s: connection failed", self.app_name)
            self._close()

    def _follow_policy(self) -> bool:
        """Each request is decided under the policy as it is now, not as it was when the
        connection opened (a kept-alive connection outlives a policy change): the app as the
        policy names it now, or False when it is gone. After a swap the connection to the app is
        made again if the app changed or its workload moved (the old address may be another
        VM's now). Looked at again only when the policy object changed: this runs per request."""
        if self.gate.issuer is None:
            return False
        policy = self.gate.policy
        if policy is self._policy:
            return self.app is not None
        self._policy = policy
        app = self.gate.app(self.app_name)
        if app is None:
            self.app = None
            return False
        if app != self.app:
            self._drop_upstream()
            self._serve_app(app)
        elif self.upstream is not None and self.upstream.key != self._upstream_key():
            self._drop_upstream()
        return True

    def _answer(self, request: HttpRequest, keep: bool, outcome) -> None:
        if isinstance(outcome, Reply):
            self._write(outcome.wire(request.method, keep))
            if not keep or outcome.close:
                self._close()
            else:
                self._wait(LIMITS.idle_timeout, self._idle_too_long)  # the next request, from now
        elif isinstance(outcome, tuple):  # it waits for the issuer: a task, the next requests wait
            self._busy = True
            self._task = self._loop.create_task(self._decided_later(request, keep, outcome))
        else:
            self._forward(request, outcome, keep)

    async def _decided_later(self, request: HttpRequest, keep: bool, step: tuple) -> None:
        try:
            outcome = await self.decide(request, step)
        except Exception:
            log.exception("app %s: connection failed", self.app_name)
            self._close()
            return
        self._busy = False
        if not self._closed:
            self._answer(request, keep, outcome)
            self._next()

    def _write(self, data: bytes) -> None:
        if not self._closed:
            self.transport.write(data)

    def _close(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.close()  # what was written is flushed first

    def _pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    # ---- timeouts ------------------------------------------------------------------------------

    def _wait(self, seconds: float, on_timeout) -> None:
        self._deadline, self._on_timeout = self._loop.time() + seconds, on_timeout

    def _body_coming(self) -> None:
        """A request's body spans reads. Without a session the answer is the sign-in redirect
        whatever the body: a long one is refused now (413) rather than held, and the whole
        request must come within header_timeout (_await_client), so a client that has not
        signed in cannot make the proxy keep bodies."""
        self._body_of = self.requests.messages_begun
        head = self.requests.head
        self._unsigned_body = self.gate.session_for(self.app, head)[0] is None
        if not self._unsigned_body:
            return
        lengths = [v for n, v in head if n == b"content-length"]
        if not lengths or int(lengths[0]) > MAX_UNSIGNED_BODY:  # chunked, or too long to hold
            self._refusal = ProtocolRefusal(413, "sign in before sending a body this long")
            self._pause_reading()

    def _await_client(self) -> None:
        """Wait for what the client owes: the rest of a head within header_timeout of its first
        byte (a byte now and then does not extend it: slowloris), a body's next bytes within
        body_read_timeout, or the next request within idle_timeout."""
        reader = self.requests
        if reader.state is IDLE:
            self._wait(LIMITS.idle_timeout, self._idle_too_long)
        elif reader.state is HEAD or self._unsigned_body:  # the body of a request without a session too
            if self._head_of != reader.messages_begun:  # a new head began in this read
                self._head_of = reader.messages_begun
                self._head_due = self._loop.time() + LIMITS.header_timeout
            self._deadline, self._on_timeout = self._head_due, self._idle_too_long
        else:
            self._wait(LIMITS.body_read_timeout, self._idle_too_long)

    def _done_waiting(self) -> None:
        self._deadline, self._on_timeout = float("inf"), None

    def _watch(self) -> None:
        if self._loop.time() >= self._deadline and self._on_timeout is not None:
            on_timeout = self._on_timeout
            self._done_waiting()
            on_timeout()
        if not self._closed:
            self._watchdog = self._loop.call_later(WATCHDOG_PERIOD, self._watch)

    def _idle_too_long(self) -> None:
        if not self._busy:
            self._closed = True
            self.transport.abort()

    # ---- to the app ----------------------------------------------------------------------------

    def _headers_for_app(self, request: HttpRequest, session) -> list[tuple[bytes, bytes]]:
        """The client's headers less those it may never hand the app (the identity header and
        the forwarding headers, skyguard's cookies), then ours: one pass, each name's verdict
        remembered for the connection (re-deciding every name of every request was a tenth
        of the proxy's time per request, bench/apps.py)."""
        verdicts = self._names
        headers = []
        for name, value in request.headers:
            clients_own = verdicts.get(name)
            if clients_own is None:
                clients_own = self._clients_own(name)
            if clients_own:
                continue
            if name == b"cookie":
                headers += without_cookies(((name, value),), OUR_COOKIES)
            else:
                headers.append((name, value))
        headers += self._forwarded
        headers.append((self._own, self.gate.signer.sign(self.app, session.user, session.name,
                                                          session.groups).encode()))
        return headers

    def _clients_own(self, name: bytes) -> bool:
        """Is `name` a header only skyguard may hand the app: the identity header or a
        forwarding header, in any `_`/`-` spelling? Remembered in `_names` (bounded: the client
        picks the names)."""
        own = self._own.replace(b"_", b"-")
        verdict = name.replace(b"_", b"-") == own or is_forwarding_header(name)
        if len(self._names) < MAX_NAMES_REMEMBERED:
            self._names[name] = verdict
        return verdict

    def _serve_app(self, app) -> None:
        """Serve `app` (as the policy names it now) from the next request on."""
        self.app, self._own = app, app.identity_header.lower().encode()  # spelt as the readers give names
        self._names = {}

    def _upstream_key(self) -> tuple:
        return (self.app.name, self.gate.vm_address(self.app), self.app.port)

    async def _connect(self) -> AppSide:
        """A connection to the app: an idle one kept for it, else a new one."""
        key = self._upstream_key()
        side = self.gate.upstreams.take(key)
        if side is None:
            _, side = await within(self._loop.create_connection(AppSide, key[1], key[2]), CONNECT_TIMEOUT)
            side.key = key
        side.owner = self
        return side

    def _release_upstream(self) -> None:
        """The client connection ends: an idle connection to the app is kept for the next one."""
        side, self.upstream = self.upstream, None
        if side is not None:
            if side.ready and self._splice_done is None:
                self.gate.upstreams.give(side.key, side)  # where it leads, whatever the policy says now
            else:
                side.close()

    def _drop_upstream(self) -> None:
        side, self.upstream = self.upstream, None
        if side is not None:
            side.close()

    def _uncount(self) -> None:
        """This connection no longer counts against its source: it closed, or it carried a
        signed-in request (people behind one NAT share an address; the cap is for connections
        nobody signed in on)."""
        if self._counted:
            self._counted = False
            self.gate.clients.release(self.client)

    def _forward(self, request: HttpRequest, session, keep: bool) -> None:
        if self._counted:
            self._uncount()
        self._busy = True
        try:
            data = serialise_request(request, self._headers_for_app(request, session))
        except Exception as e:  # a header the proxy will not write (a control character)
            self._exchange = (request.method, keep, b"", False)
            self._app_failed(e)
            return
        side = self.upstream
        if side is not None and side.ready:
            self._exchange = (request.method, keep, data, True)
            self._send(side)
        else:
            self._exchange = (request.method, keep, data, False)
            self._task = self._loop.create_task(self._connect_and_send())

    async def _connect_and_send(self) -> None:
        self._drop_upstream()
        try:
            side = await self._connect()
        except Exception as e:  # the app is down, or its VM does not answer
            self._app_failed(e)
            return
        if self._closed:
            side.close()
            return
        self.upstream = side
        self._send(side)

    def _send(self, side: AppSide) -> None:
        method, _, data, _ = self._exchange
        self._wait(LIMITS.upstream_timeout, self._app_too_slow)
        side.send(data, ResponseReader(method == b"HEAD", LIMITS.max_response_body, LIMITS.max_header_bytes))

    def _app_too_slow(self) -> None:
        self._app_failed(TimeoutError("the app did not answer in time"))

    def _app_answered(self) -> None:
        """The app's whole answer is in (AppSide calls this): write it to the client."""
        side, exchange = self.upstream, self._exchange
        response, side.response, self._exchange = side.response, None, None
        self._done_waiting()
        method, keep, _, _ = exchange
        if not response.reusable:
            self._drop_upstream()
        # Hop-by-hop headers (a HEAD answer keeps its length) never reach the client.
        headers = _for_client(response.headers, HOP_BY_HOP_BUT_LENGTH if method == b"HEAD" else HOP_BY_HOP)
        try:
            data = serialise_response(method, keep, (response.status, response.reason or b"OK"), headers,
                                      bytes(response.body))
        except Exception as e:  # a header or status the proxy will not write
            self._app_failed(e, exchange)
            return
        self.gate.count(self.app, "forwarded")
        self._finish(data, keep)

    def _app_failed(self, error: BaseException, exchange=None) -> None:
        """The app is down, slow or speaks no HTTP: 502, never a crash. A kept-alive connection
        the app closed before answering is retried once on a new one."""
        exchange = exchange or self._exchange
        self._exchange = None
        self._done_waiting()
        self._drop_upstream()
        if self._closed or exchange is None:
            return
        method, keep, data, reused = exchange
        if isinstance(error, StaleConnection) and reused:
            self._exchange = (method, keep, data, False)
            self._task = self._loop.create_task(self._connect_and_send())
            return
        self.gate.count(self.app, "app_unreachable")
        log.info("app %s: %s", self.app.name, type(error).__name__)
        self._finish(Reply(502, f"{self.app.name} did not answer.").wire(method, keep), keep)

    def _finish(self, data: bytes, keep: bool) -> None:
        self._write(data)
        self._busy = False
        if not keep:
            self._close()
            return
        self._wait(LIMITS.idle_timeout, self._idle_too_long)
        self._next()

    # ---- WebSockets ----------------------------------------------------------------------------

    async def _upgrade_to(self, request: HttpRequest) -> None:
        """A WebSocket (or other) upgrade: decide as for any request, then splice the bytes both
        ways until either side closes or the session ends (sessions.end cancels this task)."""
        try:
            outcome = await self.decide(request)
            if isinstance(outcome, Reply):
                self._write(outcome.wire(request.method, False))
                return
            session = outcome
            self._uncount()
            refusal = self.upgrade_refusal(request, session)
            if refusal is not None:
                self._write(refusal.wire(request.method, False))
                return
            headers = [(n, v) for n, v in self._headers_for_app(request, session) if n not in HOP_BY_HOP]
            headers += [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")]  # the only one upgrade_refusal lets by
            head = b"%s %s HTTP/1.1\r\n" % (request.method, request.target)
            head += b"".join(b"%s: %s\r\n" % pair for pair in headers) + b"\r\n"
            side = self.upstream if self.upstream is not None and self.upstream.ready else None
            if side is None:
                self._drop_upstream()
                try:
                    side = await self._connect()
                except Exception:
                    self._write(Reply(502, f"{self.app.name} did not answer.").wire(request.method, False))
                    return
            if self._closed:
                side.close()
                return
            await self._splice(side, head, session, request.method)
        except asyncio.CancelledError:
            pass  # the session ended, or the client went away: both sides close below
        except Exception:
            log.exception("app %s: connection failed", self.app_name)
        finally:
            self._drop_upstream()
            self._close()

    async def _splice(self, side: AppSide, head: bytes, session, method: bytes) -> None:
        self.upstream, side.splice = side, self.transport
        side.switching = ResponseReader(method == b"HEAD", LIMITS.max_response_body, LIMITS.max_header_bytes)
        self._exchange = (method, False, b"", False)  # answered like any request if the app does not switch
        self._splice_done = self._loop.create_future()
        task = asyncio.current_task()
        session.tunnels.add(task)
        try:
            self._wait(LIMITS.upstream_timeout, self._app_too_slow)
            side.transport.write(head)
            if self._reading_paused:  # paused at the upgrade request: the client's bytes now pass
                self._reading_paused = False
                self.transport.resume_reading()
            await self._splice_done
        finally:
            session.tunnels.discard(task)

    def _switched(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        """The app switched protocols (AppSide calls this with its 101's headers): the head
        the client gets, filtered as every answer (_for_client: no skyguard Set-Cookie, no
        hop-by-hop header) with the app's Upgrade and Connection: Upgrade; the splice goes on.
        Raises UnsafeHead (the caller answers 502) when a header cannot be written."""
        upgrade = next(v for n, v in headers if n == b"upgrade")
        if upgrade.lower() != b"websocket":  # the client asked for a WebSocket (gate.upgrade_refusal)
            raise UpstreamProtocolError("the app switched to another protocol than WebSocket")
        head = serialise_switching_head(_for_client(headers, HOP_BY_HOP)
                                        + [(b"connection", b"Upgrade"), (b"upgrade", upgrade)])
        self._done_waiting()
        self._exchange = None
        self.gate.count(self.app, "websocket")
        return head

    def _splice_ended(self) -> None:
        """The app closed its side of a splice (AppSide calls this)."""
        if self._splice_done is not None and not self._splice_done.done():
            self._splice_done.set_result(None)
