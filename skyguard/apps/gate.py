"""What the identity-aware proxy answers to one request, apart from moving bytes (proxy.py):
the Host check, skyguard's own paths (the issuer's callback, logout), the session and the access
decision (an upgrade's too: upgrade_refusal), and the pages the proxy writes itself (Reply).

Request order: the Host must name this app (421 otherwise: a cookie of one app is never
presented to another through a shared listener); skyguard's own paths (/.skyguard/...); a change
(any method but GET, HEAD, OPTIONS) from a page of another origin is refused (403); then the
session (service.AppsService.session_for) and the access decision. Refusals are logged and
counted by the service (refuse, deny). Checks.check decides at once what needs nothing but
memory (the usual signed-in request); what needs the issuer (sign-in, callback, a session due
for its check) finishes in Checks.decide. A sign-in the signed log cannot record is a 503 page
and no cookie (service.AppsService.signed_in); a sign-out signs out whatever the log does.
"""

from __future__ import annotations

import html
import re
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from skyguard.apps.oidc import IssuerUnavailable, TokenRejected
from skyguard.apps.sessions import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    Pending,
    allowed,
    cookie_value,
    from_another_origin,
    safe_return_path,
    same_origin,
    set_cookie,
)
from skyguard.credproxy.http1 import serialise_response
from skyguard.credproxy.swap import HttpRequest

PREFIX = "/.skyguard/"
CALLBACK = PREFIX + "callback"
LOGOUT = PREFIX + "logout"
_PREFIX = PREFIX.encode("latin-1")  # request targets stay bytes (latin-1: one byte per character)
REASONS = {200: b"OK", 302: b"Found", 303: b"See Other", 400: b"Bad Request", 403: b"Forbidden",
           405: b"Method Not Allowed", 413: b"Content Too Large", 421: b"Misdirected Request",
           431: b"Request Header Fields Too Large", 501: b"Not Implemented", 502: b"Bad Gateway",
           503: b"Service Unavailable", 505: b"HTTP Version Not Supported"}
# Methods a page of another origin may make a browser send with this app's cookie: they change
# nothing (RFC 9110 9.2.1; a CORS preflight carries no cookie). Any other method from another
# origin is refused (Checks.check: cross-app CSRF).
SAFE_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS"))
# Why a request cannot be decided at once (Checks.check's "wait" outcomes).
SIGN_IN, RECHECK, CALLBACK_STEP = "sign_in", "recheck", "callback"
_PORT = re.compile(r"[0-9]{0,5}")  # after the Host's name (empty: RFC 3986 allows "host:")


class Reply:
    """A response the proxy writes itself."""

    def __init__(self, status: int, text: str = "", headers=(), close: bool = False, form: str = ""):
        """`form`: the path on this app the page's Sign out button POSTs to (shown after `text`)."""
        self.status, self.text, self.headers, self.close, self.form = status, text, list(headers), close, form

    def wire(self, method: bytes, keep_alive: bool) -> bytes:
        body = b""
        headers = [(b"cache-control", b"no-store")] + self.headers
        if self.text:
            form = ""
            if self.form:  # and no other site may frame the button (clickjacking)
                form = (f"<form method=\"post\" action=\"{html.escape(self.form)}\"><button id=\"confirm\">"
                        f"Sign out</button></form>")
                headers += [(b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'")]
            body = (f"<!doctype html><html><head><title>skyguard</title></head><body>"
                    f"<p id=\"skyguard\">{html.escape(self.text)}</p>{form}</body></html>\n").encode()
            headers.append((b"content-type", b"text/html; charset=utf-8"))
        return serialise_response(method, keep_alive and not self.close, (self.status, REASONS.get(self.status, b"")),
                                  tuple(headers), body)


def redirect(location: str, *cookies, status: int = 302) -> Reply:
    return Reply(status, "", [(b"location", location.encode())] + list(cookies))


def _host_of(request: HttpRequest) -> str:
    value = b""
    for name, v in request.headers:
        if name == b"host":
            value = v
            break
    host = value.decode("latin-1").lower()
    # Only a port may follow the name: the app builds links from its Host, and the name in
    # "app:@evil.test" or "app:1@evil.test" is evil.test (such a Host is compared whole: 421).
    named, colon, port = host.rpartition(":")
    if colon and ":" not in named and _PORT.fullmatch(port):
        host = named
    return host.rstrip(".")


class Checks:
    """The gate's decision on a request, and the flows of skyguard's own paths. Needs `gate`,
    `app` and `client` (the client's address, for the log)."""

    gate: Any
    app: Any
    client: str

    def check(self, request: HttpRequest):
        """What can be decided at once: a Reply, the session whose request goes to the app, or
        (step, ...) when the answer needs the issuer (finish with `decide`)."""
        gate, app = self.gate, self.app
        host = _host_of(request)
        if host != app.host:
            gate.refuse(app, "host_mismatch", client=self.client, host=host[:253])
            return Reply(421, f"This address serves {app.host}, not the host this request names.", close=True)
        if not request.target.startswith(b"/"):
            gate.refuse(app, "absolute_target", client=self.client)
            return Reply(400, "skyguard: only origin-form request targets are served", close=True)
        if _PREFIX in request.target:  # as urlsplit sees the path ("//x/.skyguard/..." too)
            target = request.target.decode("latin-1")
            path = urlsplit(target).path
            if path == CALLBACK:
                return (CALLBACK_STEP, target)
            if path == LOGOUT:
                return self.logout(request)
        if request.method not in SAFE_METHODS and from_another_origin(request.headers, app.origin):
            return self.cross_origin(request)
        session, reason = gate.session_for(app, request.headers)
        if reason:
            gate.refuse(app, reason, client=self.client)
        if session is None:
            return (SIGN_IN, request.target.decode("latin-1"))
        if not gate.checked_recently(session):  # the issuer is asked once the check interval passed
            return (RECHECK, request.target.decode("latin-1"), session)
        return self.admit(session)

    def cross_origin(self, request: HttpRequest) -> Reply:
        """A change (POST, PUT, DELETE, ...) sent from a page of another origin: another app of
        the same site, whose requests carry this app's SameSite=Lax session cookie, would act as
        the signed-in user (cross-app CSRF). Refused before any session is looked at."""
        def first(name: bytes, most: int) -> str:
            return next((v[:most].decode("latin-1") for n, v in request.headers if n == name), "")

        self.gate.refuse(self.app, "cross_origin_request", client=self.client,
                         method=request.method[:20].decode("latin-1"), origin=first(b"origin", 300),
                         site=first(b"sec-fetch-site", 40))
        return Reply(403, f"{self.app.name} takes changes (POST, PUT, DELETE, ...) only from its own pages.")

    def admit(self, session):
        if not allowed(self.app, session.user, session.groups):
            self.gate.deny(self.app, session, client=self.client)
            return Reply(403, f"{session.user} may not use {self.app.name}. Ask its owner for access.")
        return session

    def upgrade_refusal(self, request: HttpRequest, session) -> Reply | None:
        """Why an admitted upgrade request may not switch: the app takes no WebSockets, the
        protocol asked for is not WebSocket, or a page of another origin opened it (its Origin
        is not this app's). A WebSocket has no CORS: a page of another app of the same site,
        whose requests carry this app's SameSite=Lax cookie, would talk to this app as the user
        and read its answers. A request with no Origin is not a browser's (browsers always send
        one on a WebSocket), so nobody's cookie is ridden by it."""
        gate, app = self.gate, self.app
        if not app.websockets:
            gate.refuse(app, "websockets_not_allowed", client=self.client, user=session.user)
            return Reply(403, f"{app.name} does not take WebSockets.")
        if [value.lower() for name, value in request.headers if name == b"upgrade"] != [b"websocket"]:
            # h2c (or any other protocol) would carry requests to the app that no decision saw,
            # with the client's own identity and forwarding headers (h2c smuggling)
            gate.refuse(app, "upgrade_not_websocket", client=self.client, user=session.user)
            return Reply(403, f"{app.name} takes WebSocket upgrades only.")
        origins = [value for name, value in request.headers if name == b"origin"]
        if origins and origins != [app.origin.encode("latin-1")]:
            gate.refuse(app, "websocket_cross_origin", client=self.client, user=session.user,
                        origin=origins[0][:300].decode("latin-1"))
            return Reply(403, f"{app.name} takes WebSockets only from its own pages.")
        return None

    async def decide(self, request: HttpRequest, outcome=None):
        """A Reply, or the session whose request goes to the app; `outcome` is check()'s when
        the caller already has it."""
        outcome = self.check(request) if outcome is None else outcome
        if not isinstance(outcome, tuple):
            return outcome
        step, target = outcome[0], outcome[1]
        if step == CALLBACK_STEP:
            return await self.callback(request, target)
        if step == SIGN_IN:
            return await self.begin_sign_in(target)
        session = outcome[2]
        try:
            still = await self.gate.check_at_issuer(session)
        except IssuerUnavailable as e:
            self.gate.refuse(self.app, "issuer_unavailable", client=self.client, user=session.user, detail=str(e))
            return Reply(503, "The identity provider cannot be reached, so nobody is let in until it is back. "
                              "Try again in a moment.")
        if not still:
            return await self.begin_sign_in(target)
        return self.admit(session)

    async def begin_sign_in(self, target: str) -> Reply:
        gate, app = self.gate, self.app
        try:
            url, state, nonce, verifier = await gate.issuer.authorization_url(app.origin + CALLBACK)
        except IssuerUnavailable as e:
            gate.refuse(app, "issuer_unavailable", client=self.client, detail=str(e))
            return Reply(503, "The identity provider cannot be reached, so nobody can sign in until it is back. "
                              "Try again in a moment.")
        gate.sessions.begin(state, Pending(app.name, nonce, verifier, safe_return_path(target), time.time(),
                                           self.client))
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
        session = await gate.signed_in(app, sign_in, client=self.client)
        if session is None:  # the signed log cannot record it: nobody is let in off the record
            return Reply(503, "skyguard cannot record sign-ins now, so you are not signed in. Try again shortly.",
                         [set_cookie(LOGIN_COOKIE, "", 0)])
        cookie = gate.sealer.seal(session.sid, app.host, session.expires)
        return redirect(pending.return_path, set_cookie(SESSION_COOKIE, cookie, int(session.expires - time.time())),
                        set_cookie(LOGIN_COOKIE, "", 0), status=303)

    def logout(self, request: HttpRequest) -> Reply:
        """Signing out is a POST from a page of this app (the button of the page a GET shows):
        a link, an <img> or a form on another site, or on another app of the same site (whose
        POSTs carry the SameSite=Lax cookie), cannot sign anyone out."""
        if request.method in (b"GET", b"HEAD"):
            return Reply(200, "Sign out of skyguard?", form=LOGOUT)
        if request.method != b"POST":
            return Reply(405, "Sign out with a POST.", [(b"allow", b"GET, HEAD, POST")])
        if not same_origin(request.headers, self.app.origin):
            self.gate.refuse(self.app, "logout_not_same_origin", client=self.client)
            return Reply(403, "Sign out with the button of this app's sign-out page.", form=LOGOUT)
        session, _ = self.gate.session_for(self.app, request.headers)
        if session is not None:
            self.gate.end_session(session, "signed_out")
        return Reply(200, "You are signed out of skyguard.", [set_cookie(SESSION_COOKIE, "", 0)])
