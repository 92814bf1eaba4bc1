"""The web console: VNC in the browser (noVNC) through skyguard, on `admin.console.web`.

One listener serves three things:
- `/console/`: skyguard's page (console.html and console.js beside this file), which opens the session named by
  the one-time web ticket in its URL fragment (`#ticket=...`; a fragment is never sent in a
  request, so no access log on the way holds it);
- `/novnc/...`: Debian's noVNC (package novnc, /usr/share/novnc), read-only, files only;
- `/console/ws?ticket=...`: the WebSocket that carries RFB. The ticket is redeemed when the
  WebSocket opens (once: a reused or forged one is refused with close code 1008), and binds the
  connection to that ticket's operator and target; the RFB session behind it is session.py's,
  so the policy checks, clipboard rule, recording and log are the native door's. The browser is
  offered RFB security type None: it never sees a VNC password, and the VM's password is used
  only on the skyguard -> VM leg.

Sign-in: with `admin.console.web_app: APP`, the console answers on that app's host name with its
certificate (HTTPS), and the identity-aware proxy's session cookie of that host (a host cookie is
sent to every port of its host) says who is signed in (AppsService.identify): `/console/` lists
the targets that user (and their groups) may open, each a button that POSTs to
`/console/open?target=NAME`, which decides and redirects to `/console/view#ticket=...`; a target
they may not open is refused (403) and logged, and anyone not signed in is sent to sign in at the
app. Opening is a POST from the console's own origin (Origin, or Sec-Fetch-Site where the page's
no-referrer policy makes the browser send `Origin: null`): a link (GET: 405), an <img> or a form
on another origin, another site or the same site (the app this console rides on, another app:
their POSTs carry the SameSite=Lax cookie), opens no console in the operator's browser.
The WebSocket must carry the sign-in of the ticket's operator, and the session ends when that
sign-in does (logout, expiry) or no longer holds a group that lets them open the target (checked
every few seconds: proxy.py). Without web_app there is no sign-in: web tickets come from
`skyguard admin console-ticket --web`, and the listener is plain HTTP (put it on an address only
operators reach).

Connections before authentication are capped: one not yet in a session (a page request, a
WebSocket whose ticket and sign-in are not yet checked, or a client that connects and says
nothing, held until the handshake timeout) is pending; past MAX_PENDING_PER_SOURCE pending from
one address its next connection is answered 429, past MAX_PENDING in all 503, and closed at once,
so a client cannot hold the daemon's file descriptors. Refusals go to the host's log (at most one
line a second per source and status, with the count), not the signed log, which a flood would grow.
Refused logins (a forged ticket, a request from another origin) are in the signed log, braked per
source and kind (ConsoleProxy.refused: a burst, then a summary entry about every second).
A TLS connection is counted once its TLS handshake is done (asyncio bounds that by OPEN_TIMEOUT).
"""

from __future__ import annotations

import asyncio
import html
import logging
import mimetypes
import ssl
import time
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from skyguard.admin.access import AccessRefused
from skyguard.admin.proxy import parse_listen
from skyguard.apps.sessions import same_origin
from skyguard.conncap import UnauthenticatedConnections
from skyguard.console import access, rfb
from skyguard.console.session import ConsoleSession
from skyguard.diskwork import Busy
from skyguard.errors import AdminError, BadInput

log = logging.getLogger("skyguard.console")

NOVNC_DIR = Path("/usr/share/novnc")
PAGE = Path(__file__).with_name("console.html")
SCRIPT = Path(__file__).with_name("console.js")  # the page's script (no inline script: see the CSP)
WS_PATH = "/console/ws"
MAX_FRAME = 1 << 20  # bytes of one WebSocket message from a browser (RFB client messages are small)
OPEN_TIMEOUT = 10.0  # seconds a connection has for its TLS and HTTP/WebSocket handshake
# Connections not yet in an authenticated session. A browser loading noVNC opens about six at once;
# an operator's address needs few more. Overall: what one listener may hold of the daemon's fds.
MAX_PENDING_PER_SOURCE = 16
MAX_PENDING = 128
# Every response: no caching of the page, no framing by other sites, no referrer leaking the URL.
SECURITY_HEADERS = (("Cache-Control", "no-store"), ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer"),
                    ("X-Content-Type-Options", "nosniff"),
                    ("Content-Security-Policy", "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                                                "style-src 'self' 'unsafe-inline'"))


def _response(status: HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8") -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))), *SECURITY_HEADERS])
    return Response(status.value, status.phrase, headers, body)


def static_file(root: Path, relative: str) -> Path | None:
    """root/relative if it is a regular file inside root (no '..', no link out of it)."""
    try:
        path = (root / relative).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    return path if path.is_file() and path.is_relative_to(root.resolve()) else None


class WsReader:
    """readexactly() over a WebSocket's binary messages, for rfb's readers."""

    def __init__(self, ws: ServerConnection):
        self.ws, self.buffer = ws, bytearray()

    async def readexactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            try:
                message = await self.ws.recv()
            except ConnectionClosed:
                raise asyncio.IncompleteReadError(bytes(self.buffer), n) from None
            if isinstance(message, str):
                raise rfb.RfbError("the browser sent a text WebSocket message; RFB travels in binary ones")
            self.buffer += message
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data


class WsWriter:
    """The StreamWriter calls session.py makes, over a WebSocket: write() queues, drain() sends
    what was queued as one binary message."""

    def __init__(self, ws: ServerConnection):
        self.ws = ws
        self.pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.pending.append(data)

    async def drain(self) -> None:
        if self.pending:
            data, self.pending = b"".join(self.pending), []
            try:
                await self.ws.send(data)
            except ConnectionClosed:
                raise ConnectionResetError("the browser closed the console") from None

    def get_extra_info(self, name: str):
        return self.ws.remote_address if name == "peername" else None

    def is_closing(self) -> bool:
        return self.ws.state in (State.CLOSING, State.CLOSED)

    def close(self) -> None:
        if not self.is_closing():
            asyncio.get_running_loop().create_task(self.ws.close())


def _refusal(status: int) -> bytes:
    phrase = HTTPStatus(status).phrase
    body = b"too many connections from your address; try again shortly\n" if status == 429 else \
        b"the console has too many connections; try again shortly\n"
    head = [f"HTTP/1.1 {status} {phrase}", "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}", "Connection: close", "Retry-After: 10",
            *(f"{k}: {v}" for k, v in SECURITY_HEADERS)]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class _CountedConnection(ServerConnection):
    """A connection of the web console's listener, counted pending from accept (after TLS) until
    its session is authenticated or it closes (skyguard/conncap.py)."""

    pending: UnauthenticatedConnections  # set on the subclass each WebConsole makes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if peer else "?"
        self.counted: str | None = None
        refused = self.pending.admit(source)
        if refused is None:
            self.counted = source
            return
        status = HTTPStatus.TOO_MANY_REQUESTS.value if refused == "source" else HTTPStatus.SERVICE_UNAVAILABLE.value
        count = self.pending.refusals.to_log(source, time.monotonic())
        if count:
            log.warning("web console refused a connection from %s with %d: %d not yet authenticated from its source, "
                        "%d in all (limits %d, %d); %d refused since the last line", source, status,
                        self.pending.held(source), self.pending.count(), self.pending.per_source,
                        self.pending.total, count)
        transport.write(_refusal(status))  # type: ignore[attr-defined]
        transport.close()

    def authenticated(self) -> None:
        """The session is the operator's now: it no longer counts against the caps."""
        if getattr(self, "counted", None) is not None:
            self.pending.release(self.counted)
            self.counted = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.authenticated()
        super().connection_lost(exc)


class WebConsole:
    def __init__(self, proxy, listen: str, app=None, tls: ssl.SSLContext | None = None):
        """`app`: the app (apps:) whose sign-in this console sits behind, answering on its host
        name with `tls` (its certificate); None: no sign-in, tickets from the CLI only."""
        self.proxy = proxy
        self.listen = listen
        self.app, self.tls = app, tls
        self.address: tuple[str, int] | None = None
        self._server: Server | None = None
        self._pending = UnauthenticatedConnections(MAX_PENDING_PER_SOURCE, MAX_PENDING)
        self._connection = type("CountedConnection", (_CountedConnection,), {"pending": self._pending})

    def pending(self) -> int:
        """Connections open and not yet authenticated (skyguard/conncap.py)."""
        return self._pending.count()

    async def start(self) -> None:
        host, port = parse_listen(self.listen)
        try:
            self._server = await serve(self._session, host, port, process_request=self._http, max_size=MAX_FRAME,
                                       compression=None, server_header=None, reuse_address=True, ssl=self.tls,
                                       open_timeout=OPEN_TIMEOUT, create_connection=self._connection)
        except OSError as e:
            raise AdminError(f"cannot listen on {host}:{port} for the web console: {e.strerror}") from None
        self.address = tuple(next(iter(self._server.sockets)).getsockname()[:2])
        log.info("web console listening on %s:%s", *self.address)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == WS_PATH:
            return None  # on to the WebSocket handshake
        if path in ("/", "/console", "/console/"):
            if self.app is None:
                return _response(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
            return self._targets_page(request)
        if path == "/console/view":  # the session page; the ticket is in its fragment
            return _response(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
        if path == "/console/open" and self.app is not None:
            return await self._open(request, connection)
        if path == "/console/console.js":
            return _response(HTTPStatus.OK, SCRIPT.read_bytes(), "text/javascript")
        if path.startswith("/novnc/") and (found := static_file(NOVNC_DIR, path[len("/novnc/"):])):
            content_type = mimetypes.guess_type(found.name)[0] or "application/octet-stream"
            if found.suffix == ".js":
                content_type = "text/javascript"  # module scripts are refused under any other type
            return _response(HTTPStatus.OK, found.read_bytes(), content_type)
        return _response(HTTPStatus.NOT_FOUND, b"not found\n")

    # -- behind sign-in (admin.console.web_app) ---------------------------------------------------

    def _signed_in(self, request: Request):
        headers = [(k.lower().encode(), v.encode()) for k, v in request.headers.raw_items()]
        return self.proxy.identify(self.app.host, headers)

    def _sign_in_first(self) -> Response:
        url = f"https://{self.app.host}:{self.app.listen.rsplit(':', 1)[1]}/"
        body = (f"<!DOCTYPE html><title>skyguard console</title><p id=signin>Sign in first at "
                f"<a href=\"{html.escape(url)}\">{html.escape(url)}</a>, then come back here.</p>")
        return _response(HTTPStatus.UNAUTHORIZED, body.encode(), "text/html; charset=utf-8")

    def _targets_page(self, request: Request) -> Response:
        """The targets the signed-in operator may open, each a button (a POST) that opens it."""
        who = self._signed_in(request)
        if who is None:
            return self._sign_in_first()
        targets = access.reachable_targets(self.proxy.policy, who.user, tuple(who.groups))
        items = "".join(f"<li><form method=\"post\" action=\"/console/open?target={quote(t.name)}\">"
                        f"<button class=target>{html.escape(t.name)}</button> ({html.escape(t.workload)}, "
                        f"{t.protocol.upper()})</form></li>" for t in targets)
        body = (f"<!DOCTYPE html><title>skyguard console</title><p>Signed in as <b id=user>{html.escape(who.user)}"
                f"</b>.</p><ul id=targets>{items or '<li>no console you may open</li>'}</ul>")
        return _response(HTTPStatus.OK, body.encode(), "text/html; charset=utf-8")

    async def _open(self, request: Request, connection: ServerConnection) -> Response:
        """Open a target for the signed-in operator: decided here, then a one-time web ticket in
        the redirect's fragment. A target they may not open (a forged request) is refused and
        logged; so is a request no page of this console sent (see the module's docstring)."""
        if request.method != "POST":
            allow = Headers([("Allow", "POST"), ("Content-Length", "0"), *SECURITY_HEADERS])
            return Response(HTTPStatus.METHOD_NOT_ALLOWED.value, HTTPStatus.METHOD_NOT_ALLOWED.phrase, allow, b"")
        who = self._signed_in(request)
        address, source = _address(connection), _source(connection)
        name = parse_qs(urlsplit(request.path).query).get("target", [""])[0]
        sent = [(k.lower().encode(), v.encode()) for k, v in request.headers.raw_items()]
        hosts = request.headers.get_all("Host")
        if (len(hosts) != 1 or hosts[0].rsplit(":", 1)[0].lower() != self.app.host
                or not same_origin(sent, f"https://{hosts[0]}")):
            self.proxy.refused("not_same_origin", address, operator=who.user if who else None, door="web",
                               source=source, target=name[:64])
            return _response(HTTPStatus.FORBIDDEN, b"open a console with the buttons of /console/\n")
        if who is None:
            return self._sign_in_first()
        try:
            target, _ = access.authorize(self.proxy.policy, who.user, tuple(who.groups), name)
        except AccessRefused as e:
            self.proxy.refused(e.reason, address, operator=who.user, door="web", source=source, target=name[:64])
            return _response(HTTPStatus.FORBIDDEN, (str(e) + "\n").encode())
        try:  # written off the loop: the tickets' disk may stall
            ticket = await self.proxy.ticket_work.start(self.proxy.tickets.issue, who.user, target.name,
                                                        tuple(who.groups), web=True)
        except BadInput as e:  # too many tickets waiting
            return _response(HTTPStatus.SERVICE_UNAVAILABLE, (str(e) + "\n").encode())
        except Busy as e:
            log.warning("a web console ticket for %s is refused: %s", who.user, e)
            return _response(HTTPStatus.SERVICE_UNAVAILABLE, b"console tickets cannot be issued now (the disk under "
                                                             b"skyguard's state is not keeping up); try again later\n")
        headers = Headers([("Location", f"/console/view#ticket={ticket.password}"), ("Content-Length", "0"),
                           *SECURITY_HEADERS])
        return Response(HTTPStatus.SEE_OTHER.value, HTTPStatus.SEE_OTHER.phrase, headers, b"")

    async def _session(self, ws: ServerConnection) -> None:
        token = parse_qs(urlsplit(ws.request.path).query).get("ticket", [""])[0]
        try:  # off the loop: the tickets' disk may stall
            ticket = await self.proxy.redeem_token(token) if token else None
        except Busy as e:
            log.warning("a web console login is refused: %s", e)
            await ws.close(1013, "console tickets cannot be checked now; try again later")
            return
        if ticket is None:
            self.proxy.refused("bad_ticket", _address(ws), operator=None, door="web", source=_source(ws), target=None)
            await ws.close(1008, "unknown, used or expired console ticket")
            return
        signed_in = None
        if self.app is not None:
            # Behind sign-in the WebSocket carries the sign-in cookie too (a host cookie reaches
            # every port of its host): the session is the signed-in operator's, and lasts while
            # they stay signed in (session.py, proxy._watch_sign_ins).
            app, headers = self.app, [(k.lower().encode(), v.encode()) for k, v in ws.request.headers.raw_items()]
            signed_in = lambda: self.proxy.identify(app.host, headers)  # noqa: E731
            who = signed_in()
            if who is None or who.user != ticket.operator:
                self.proxy.refused("signed_out", _address(ws), operator=ticket.operator, door="web",
                                   source=_source(ws), target=ticket.target)
                await ws.close(1008, "not signed in as the ticket's operator")
                return
        if isinstance(ws, _CountedConnection):
            ws.authenticated()
        await self.proxy.serve_session(ConsoleSession(self.proxy, WsReader(ws), WsWriter(ws), ticket=ticket,
                                                      signed_in=signed_in))
        await ws.close()


def _source(ws: ServerConnection) -> str:
    peer = ws.remote_address or ("?", 0)
    return f"{peer[0]}:{peer[1]}"


def _address(ws: ServerConnection) -> str:
    """The client's address (what the signed log's brake counts against its source)."""
    return str((ws.remote_address or ("?",))[0])
