"""One client connection to an app's TLS listener: HTTP/1.1 requests read with the credential
proxy's sans-io readers (skyguard/credproxy/http1.py, llhttp), each one answered by the gate
(sign-in, callback, logout, refusal) or forwarded to the app in its VM with the signed identity
header; WebSocket upgrades are spliced as bytes while the session lives.

Request order, per request: the Host must name this app (421 otherwise: a cookie of one app is
never presented to another through a shared listener); skyguard's own paths (/.skyguard/...);
then the session (service.Gate.session_for) and the access decision. What the client sent in the
identity header and skyguard's own cookies never reach the app. Bodies are buffered whole,
within ProxyLimits. Bytes a client sends after an upgrade request before the app's 101 are not
forwarded (WebSocket clients wait for the 101). Not here: what a session is (sessions.py), the
issuer (oidc.py), listeners and policy (service.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import time
from urllib.parse import parse_qs, urlsplit

from skyguard.apps.oidc import IssuerUnavailable, TokenRejected
from skyguard.apps.sessions import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    Pending,
    allowed,
    cookie_value,
    safe_return_path,
    set_cookie,
    without_cookies,
    without_our_set_cookies,
)
from skyguard.credproxy.http1 import (
    ProtocolRefusal,
    ProxyLimits,
    RequestReader,
    ResponseReader,
    Upgraded,
    client_keeps_alive,
    serialise_request,
    serialise_response,
)
from skyguard.credproxy.swap import HOP_BY_HOP, HttpRequest

log = logging.getLogger(__name__)

LIMITS = ProxyLimits()
PREFIX = "/.skyguard/"
CALLBACK = PREFIX + "callback"
LOGOUT = PREFIX + "logout"
CONNECT_TIMEOUT = 5.0  # seconds to reach the app in its VM
CHUNK = 65536
WATCHDOG_PERIOD = 1.0  # seconds between a connection's timeout checks (timeouts fire up to this late)
# Request headers a client may never hand the app: the proxy writes them itself.
FORWARDED = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host")


class Reply:
    """A response the proxy writes itself."""

    def __init__(self, status: int, text: str = "", headers=(), close: bool = False):
        self.status, self.text, self.headers, self.close = status, text, list(headers), close

    def wire(self, method: bytes, keep_alive: bool) -> bytes:
        body = b""
        headers = [(b"cache-control", b"no-store")] + self.headers
        if self.text:
            body = (f"<!doctype html><html><head><title>skyguard</title></head><body>"
                    f"<p id=\"skyguard\">{html.escape(self.text)}</p></body></html>\n").encode()
            headers.append((b"content-type", b"text/html; charset=utf-8"))
        reason = {200: b"OK", 302: b"Found", 303: b"See Other", 400: b"Bad Request", 403: b"Forbidden",
                  421: b"Misdirected Request", 502: b"Bad Gateway", 503: b"Service Unavailable"}.get(self.status, b"")
        return serialise_response(method, keep_alive and not self.close, (self.status, reason), tuple(headers), body)


def redirect(location: str, *cookies, status: int = 302) -> Reply:
    return Reply(status, "", [(b"location", location.encode())] + list(cookies))


def _host_of(request: HttpRequest) -> str:
    value = next((v for n, v in request.headers if n == b"host"), b"").decode("latin-1").lower()
    host = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    return host.rstrip(".")


class AppConnection:
    """Serves one client connection of `app`; `gate` is the service (sessions, issuer, log)."""

    def __init__(self, gate, app, reader, writer):
        self.gate, self.app, self.reader, self.writer = gate, app, reader, writer
        peer = writer.get_extra_info("peername") or ("?", 0)
        self.client = str(peer[0])
        self.upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        # Timeouts: one watchdog per connection instead of a timer per read (asyncio.timeout and
        # wait_for per read were a tenth of the proxy's time per request, bench/apps.py). While
        # the connection waits for the client (idle_timeout) or for the app's answer
        # (upstream_timeout), `_deadline` is set; the watchdog aborts that side's transport once
        # it has passed, so the pending read ends (client: the connection closes; app: 502).
        self._loop = asyncio.get_running_loop()
        self._deadline = float("inf")
        self._waiting_on = None  # the StreamWriter whose transport the deadline aborts
        self._timed_out = False  # set by the watchdog: an answer cut short is never forwarded
        self._watchdog = self._loop.call_later(WATCHDOG_PERIOD, self._watch)

    def _wait_on(self, writer, seconds: float) -> None:
        self._waiting_on, self._deadline = writer, self._loop.time() + seconds

    def _done_waiting(self) -> None:
        self._waiting_on, self._deadline = None, float("inf")

    def _watch(self) -> None:
        if self._loop.time() >= self._deadline and self._waiting_on is not None:
            self._waiting_on.transport.abort()
            self._done_waiting()
            self._timed_out = True
        self._watchdog = self._loop.call_later(WATCHDOG_PERIOD, self._watch)

    async def run(self) -> None:
        requests = RequestReader(LIMITS)
        try:
            while True:
                self._wait_on(self.writer, LIMITS.idle_timeout)
                try:
                    data = await self.reader.read(CHUNK)
                except (ConnectionError, OSError):
                    return
                finally:
                    self._done_waiting()
                if not data:
                    return
                upgrade = False
                try:
                    requests.feed(data)
                except Upgraded:
                    upgrade = True
                except ProtocolRefusal as refusal:
                    self.writer.write(Reply(refusal.status, f"skyguard: {refusal.reason}", close=True).wire(b"GET", False))
                    return
                while requests.complete:
                    request = requests.complete.popleft()
                    if upgrade and not requests.complete:
                        await self.upgrade(request)
                        return
                    keep = client_keeps_alive(request)
                    if not await self.answer(request, keep):
                        return
                if upgrade:
                    return
        finally:
            self._watchdog.cancel()
            self._close_upstream()
            with contextlib.suppress(Exception):
                self.writer.close()

    # ---- one request -------------------------------------------------------------------------

    async def answer(self, request: HttpRequest, keep: bool) -> bool:
        """Answer one request; False when the connection ends after it."""
        outcome = await self.decide(request)
        if isinstance(outcome, Reply):
            self.writer.write(outcome.wire(request.method, keep))
            await self.writer.drain()
            return keep and not outcome.close
        return await self.forward(request, outcome, keep)

    async def decide(self, request: HttpRequest):
        """A Reply, or the session whose request goes to the app."""
        gate, app = self.gate, self.app
        if _host_of(request) != app.host:
            gate.refuse(app, "host_mismatch", client=self.client, host=_host_of(request)[:253])
            return Reply(421, f"This address serves {app.host}, not the host this request names.", close=True)
        target = request.target.decode("latin-1")
        if not target.startswith("/"):
            gate.refuse(app, "absolute_target", client=self.client)
            return Reply(400, "skyguard: only origin-form request targets are served", close=True)
        path = urlsplit(target).path
        if path == CALLBACK:
            return await self.callback(request, target)
        if path == LOGOUT:
            return self.logout(request)
        session, reason = gate.session_for(app, request.headers)
        if reason:
            gate.refuse(app, reason, client=self.client)
        if session is None:
            return await self.begin_sign_in(target)
        try:  # the issuer is asked only when the session check interval has passed
            still = gate.checked_recently(session) or await gate.check_at_issuer(session)
        except IssuerUnavailable as e:
            gate.refuse(app, "issuer_unavailable", client=self.client, user=session.user, detail=str(e))
            return Reply(503, "The identity provider cannot be reached, so nobody is let in until it is back. "
                              "Try again in a moment.")
        if not still:
            return await self.begin_sign_in(target)
        if not allowed(app, session.user, session.groups):
            gate.deny(app, session, client=self.client)
            return Reply(403, f"{session.user} may not use {app.name}. Ask its owner for access.")
        return session

    async def begin_sign_in(self, target: str) -> Reply:
        gate, app = self.gate, self.app
        try:
            url, state, nonce, verifier = await gate.issuer.authorization_url(app.origin + CALLBACK)
        except IssuerUnavailable as e:
            gate.refuse(app, "issuer_unavailable", client=self.client, detail=str(e))
            return Reply(503, "The identity provider cannot be reached, so nobody can sign in until it is back. "
                              "Try again in a moment.")
        gate.sessions.begin(state, Pending(app.name, nonce, verifier, safe_return_path(target), time.time()))
        gate.count(app, "signin_redirect")
        return redirect(url, set_cookie(LOGIN_COOKIE, state, 600))

    async def callback(self, request: HttpRequest, target: str) -> Reply:
        gate, app = self.gate, self.app
        query = parse_qs(urlsplit(target).query)
        state, code = query.get("state", [""])[0], query.get("code", [""])[0]
        if "error" in query:
            gate.refuse(app, "issuer_refused_sign_in", client=self.client)
            return Reply(403, "The identity provider did not sign you in.")
        if not state or cookie_value(request.headers, LOGIN_COOKIE) != state:
            gate.refuse(app, "state_mismatch", client=self.client)
            return Reply(400, "This sign-in was not started by this browser; start again from the app.")
        pending = gate.sessions.take(state, time.time())
        if pending is None or pending.app != app.name:
            gate.refuse(app, "state_unknown_or_replayed", client=self.client)
            return Reply(400, "This sign-in link was already used or has expired; start again from the app.")
        try:
            sign_in = await gate.issuer.finish(code, app.origin + CALLBACK, pending.nonce, pending.verifier)
        except TokenRejected as e:
            gate.refuse(app, e.reason, client=self.client)
            return Reply(403, "The identity provider's answer failed skyguard's checks; you are not signed in.")
        except IssuerUnavailable as e:
            gate.refuse(app, "issuer_unavailable", client=self.client, detail=str(e))
            return Reply(503, "The identity provider cannot be reached, so nobody can sign in until it is back.")
        session = gate.signed_in(app, sign_in, client=self.client)
        cookie = gate.sealer.seal(session.sid, app.host, session.expires)
        return redirect(pending.return_path, set_cookie(SESSION_COOKIE, cookie, int(session.expires - time.time())),
                        set_cookie(LOGIN_COOKIE, "", 0), status=303)

    def logout(self, request: HttpRequest) -> Reply:
        session, _ = self.gate.session_for(self.app, request.headers)
        if session is not None:
            self.gate.end_session(session, "signed_out")
        return Reply(200, "You are signed out of skyguard.", [set_cookie(SESSION_COOKIE, "", 0)])

    # ---- to the app ----------------------------------------------------------------------------

    def _headers_for_app(self, request: HttpRequest, session) -> list[tuple[bytes, bytes]]:
        own = self.app.identity_header.lower().encode()
        headers = [(n, v) for n, v in without_cookies(request.headers, (SESSION_COOKIE, LOGIN_COOKIE))
                   if n != own and n not in FORWARDED]
        headers += [(b"x-forwarded-for", self.client.encode()), (b"x-forwarded-proto", b"https"),
                    (own, self.gate.signer.sign(self.app, session.user, session.name, session.groups).encode())]
        return headers

    async def _connect(self):
        if self.upstream is None:
            address = self.gate.vm_address(self.app)
            self.upstream = await asyncio.wait_for(asyncio.open_connection(address, self.app.port), CONNECT_TIMEOUT)
        return self.upstream

    def _close_upstream(self) -> None:
        if self.upstream is not None:
            with contextlib.suppress(Exception):
                self.upstream[1].close()
            self.upstream = None

    async def forward(self, request: HttpRequest, session, keep: bool) -> bool:
        forwarded = HttpRequest(request.method, request.target, tuple(self._headers_for_app(request, session)),
                                request.body, b"1.1")
        try:
            reader, writer = await self._connect()
            writer.write(serialise_request(forwarded))
            response = ResponseReader(request.method == b"HEAD", LIMITS.max_response_body, LIMITS.max_header_bytes)
            self._wait_on(writer, LIMITS.upstream_timeout)  # on timeout: aborted, read ends, 502
            try:
                while not response.done:
                    data = await reader.read(CHUNK)
                    if not data:
                        response.finish()
                        break
                    response.feed(data)
            finally:
                self._done_waiting()
            if self._timed_out:
                raise TimeoutError("the app did not answer in time")
        except Exception as e:  # the app is down, slow or speaks no HTTP: 502, never a crash
            self._close_upstream()
            self.gate.count(self.app, "app_unreachable")
            log.info("app %s: %s", self.app.name, type(e).__name__)
            self.writer.write(Reply(502, f"{self.app.name} did not answer.").wire(request.method, keep))
            await self.writer.drain()
            return keep
        if not response.reusable:
            self._close_upstream()
        headers = tuple((n, v) for n, v in without_our_set_cookies(response.headers)
                        if n not in HOP_BY_HOP or (n == b"content-length" and request.method == b"HEAD"))
        self.gate.count(self.app, "forwarded")
        self.writer.write(serialise_response(request.method, keep, (response.status, response.reason or b"OK"),
                                             headers, bytes(response.body)))
        await self.writer.drain()
        return keep

    async def upgrade(self, request: HttpRequest) -> None:
        """A WebSocket (or other) upgrade: decide as for any request, then splice the bytes both
        ways until either side closes or the session ends (sessions.end cancels this task)."""
        outcome = await self.decide(request)
        if isinstance(outcome, Reply):
            self.writer.write(outcome.wire(request.method, False))
            await self.writer.drain()
            return
        session = outcome
        if not self.app.websockets:
            self.gate.refuse(self.app, "websockets_not_allowed", client=self.client, user=session.user)
            self.writer.write(Reply(403, f"{self.app.name} does not take WebSockets.").wire(request.method, False))
            await self.writer.drain()
            return
        upgrade = next((v for n, v in request.headers if n == b"upgrade"), b"websocket")
        headers = [(n, v) for n, v in self._headers_for_app(request, session) if n not in HOP_BY_HOP]
        headers += [(b"connection", b"Upgrade"), (b"upgrade", upgrade)]
        head = b"%s %s HTTP/1.1\r\n" % (request.method, request.target)
        head += b"".join(b"%s: %s\r\n" % pair for pair in headers) + b"\r\n"
        try:
            reader, writer = await self._connect()
        except Exception:
            self.writer.write(Reply(502, f"{self.app.name} did not answer.").wire(request.method, False))
            return
        self.upstream = None  # the splice owns it now
        task = asyncio.current_task()
        session.tunnels.add(task)
        self.gate.count(self.app, "websocket")
        try:
            writer.write(head)
            await asyncio.gather(_pump(reader, self.writer), _pump(self.reader, writer))
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass  # the session ended (cancelled) or a side went away: both close below
        finally:
            session.tunnels.discard(task)
            writer.close()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(CHUNK):
            sink.write(data)
            await sink.drain()
    finally:
        with contextlib.suppress(Exception):
            sink.close()
