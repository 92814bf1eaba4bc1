"""Sessions of the identity-aware proxy, sans-io: the encrypted session cookie, the table of
signed-in sessions, sign-ins under way (state, nonce, PKCE verifier, return path) and the access
decision. No sockets, no issuer calls: proxy.py does those and asks here.

The cookie is a JWE (joserfc, `dir` + A256GCM, key from the sealed store) holding only the
session id, the app's host and an expiry: its name has the `__Host-` prefix (the browser keeps it
for exactly this host, Secure, Path=/, no Domain), it is HttpOnly and SameSite=Lax (Lax: the
issuer's redirect back is a top-level navigation from another site). Everything else about the
session (user, groups, the issuer's access token) stays in this table, so a stolen cookie is
worthless once the session is logged out, expired or revoked, and a cookie of one app is refused
by another (the host inside it must match). Sessions live in the daemon's memory: a restart signs
everyone out (fail closed).
"""

from __future__ import annotations

import functools
import json
import secrets
import time
from dataclasses import dataclass, field

from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

from skyguard.conncap import source_of
from skyguard.policy.apps import App

SESSION_COOKIE = "__Host-skyguard-session"
LOGIN_COOKIE = "__Host-skyguard-login"  # binds a sign-in under way to the browser that began it
PENDING_TTL = 600.0  # seconds a sign-in may take at the issuer
MAX_PENDING = 10_000  # sign-ins under way at once: each costs a little memory
# ... and per client source (an address, an IPv6 /64; its own oldest dropped), so that one client
# starting sign-ins in a loop cannot push everyone else's out between their redirect and their
# return (SessionTable).
MAX_PENDING_PER_CLIENT = 32
MAX_RETURN_PATH = 2048
MAX_OPENED = 50_000  # opened cookies remembered (a few hundred bytes each)
_OURS = (SESSION_COOKIE.encode(), LOGIN_COOKIE.encode())


@dataclass
class Session:
    sid: str
    app: str
    host: str
    user: str
    subject: str
    name: str
    groups: tuple[str, ...]
    access_token: str
    created: float
    expires: float
    checked: float  # when the issuer last confirmed the user (and their groups)
    tunnels: set = field(default_factory=set)  # live WebSocket tasks, cancelled when it ends

    def __repr__(self) -> str:  # never the access token
        return f"Session(user={self.user!r}, app={self.app!r}, expires={self.expires:.0f})"

    def summary(self, now: float) -> dict:
        return {"user": self.user, "name": self.name, "app": self.app, "host": self.host,
                "groups": list(self.groups), "signed_in": round(self.created, 3),
                "expires_in": max(0, int(self.expires - now)), "websockets": len(self.tunnels)}


@dataclass
class Pending:
    app: str
    nonce: str
    verifier: str
    return_path: str
    created: float
    client: str = ""  # the address that began it


class CookieSealer:
    """Encrypt and open session cookies with one 256-bit key."""

    def __init__(self, key: bytes):
        if len(key) != 32:
            raise ValueError("the session cookie key must be 32 bytes")
        self._key = OctKey.import_key(bytes(key))
        # Cookies already opened: exact value -> (sid, host, exp). A decryption per request was
        # half the proxy's time per request (bench/apps.py); an exact-value hit is what a
        # decryption would give, and expiry and host are still checked on every request.
        self._opened: dict[str, tuple[str, str, int]] = {}

    def __repr__(self) -> str:
        return "CookieSealer(<key hidden>)"

    def seal(self, sid: str, host: str, expires: float) -> str:
        payload = json.dumps({"sid": sid, "host": host, "exp": int(expires)}).encode()
        return jwe.encrypt_compact({"alg": "dir", "enc": "A256GCM"}, payload, self._key)

    def open(self, value: str, host: str, now: float) -> tuple[str | None, str]:
        """(session id, "") or (None, reason): tampered/foreign-keyed, another app's, expired."""
        if value in self._opened:
            sid, cookie_host, exp = self._opened[value]
        else:
            try:
                data = json.loads(jwe.decrypt_compact(value, self._key, algorithms=["dir", "A256GCM"]).plaintext)
                sid, cookie_host, exp = data["sid"], data["host"], data["exp"]
            except (JoseError, ValueError, KeyError, TypeError):
                return None, "cookie_invalid"
            if len(self._opened) >= MAX_OPENED:
                self._opened.clear()  # bounded; the next requests decrypt again
            self._opened[value] = (sid, cookie_host, exp)
        if cookie_host != host:
            return None, "cookie_for_another_app"
        if not isinstance(exp, int) or exp <= now:
            return None, "session_expired"
        return str(sid), ""


def cookie_value(headers, name: str) -> str | None:
    """The first cookie `name` in the request's Cookie headers (names are case-sensitive)."""
    wanted = name.encode("latin-1")
    for header, value in headers:
        if header != b"cookie" or wanted not in value:
            continue
        for part in value.split(b";"):
            key, _, val = part.strip().partition(b"=")
            if key == wanted:
                return val.decode("latin-1")
    return None


def same_origin(headers, origin: str) -> bool:
    """Whether a browser sent this request from a page of `origin` (e.g. "https://wiki.example.com:8443"):
    its Origin header is exactly that, or (a page whose referrer policy makes the browser send
    `Origin: null`, or none) its Sec-Fetch-Site says same-origin. What a page of another origin
    can make a browser send never passes: the browser sets both headers, and another app of the
    same site (which SameSite=Lax cookies do reach) is another origin. A request with neither
    header (not a browser's), or with either header twice, does not pass either."""
    origins = [value for name, value in headers if name == b"origin"]
    sites = [value for name, value in headers if name == b"sec-fetch-site"]
    if len(origins) > 1 or len(sites) > 1:
        return False
    if origins and origins[0] != b"null":
        return origins[0] == origin.encode("latin-1")
    return sites == [b"same-origin"]


def from_another_origin(headers, origin: str) -> bool:
    """Whether a browser sent this request from a page of another origin than `origin` (a
    sibling app of the same site, whose requests carry this app's SameSite=Lax cookie, is
    another origin): its Origin header names another origin; or, with no Origin or `Origin:
    null` (a page whose referrer policy hides it, a sandboxed frame), its Sec-Fetch-Site is
    neither same-origin nor none (the person's own doing: the address bar, a bookmark); or it
    has `Origin: null` and no Sec-Fetch-Site (a sandboxed frame in a browser without Fetch
    Metadata). A request with neither header is not a browser's: nobody's cookie rides it. A
    header sent twice counts as another origin."""
    origins = [value for name, value in headers if name == b"origin"]
    sites = [value for name, value in headers if name == b"sec-fetch-site"]
    if len(origins) > 1 or len(sites) > 1:
        return True
    if origins and origins[0] != b"null":
        return origins[0] != origin.encode("latin-1")
    if sites:
        return sites[0] not in (b"same-origin", b"none")
    return bool(origins)


def without_cookies(headers, names: tuple[str, ...]) -> list[tuple[bytes, bytes]]:
    """The headers with skyguard's own cookies removed (the app never sees them). A Cookie
    header naming none of them passes as it came."""
    ours = _as_bytes(names)
    out = []
    for header, value in headers:
        if header == b"cookie" and _names_any(value, ours):
            parts = (p.strip() for p in value.split(b";"))
            value = b"; ".join([p for p in parts if p and p.partition(b"=")[0] not in ours])
            if not value:
                continue
        out.append((header, value))
    return out


def _names_any(value: bytes, names: tuple[bytes, ...]) -> bool:
    for name in names:
        if name in value:
            return True
    return False


@functools.lru_cache(maxsize=8)
def _as_bytes(names: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(n.encode("latin-1") for n in names)


def without_our_set_cookies(headers) -> list[tuple[bytes, bytes]]:
    """An app's response headers without any Set-Cookie naming skyguard's cookies: an app cannot
    forge a session (the value is encrypted), but it must not be able to end or replace one."""
    return [(n, v) for n, v in headers if not (n == b"set-cookie" and sets_our_cookie(v))]


def sets_our_cookie(value: bytes) -> bool:
    """Whether a Set-Cookie value names one of skyguard's cookies (without_our_set_cookies)."""
    return value.partition(b"=")[0].strip() in _OURS


def host_only(value: bytes) -> bytes:
    """An app's Set-Cookie value without its Domain attribute(s): the cookie is kept by the
    browser for the app's own host alone. With `Domain=apps.test`, app A's answer would set a
    cookie every sibling app of the site receives (session fixation against an app that keeps
    its own session, a forged double-submit CSRF token). Attribute names are case-insensitive
    and may have spaces around the `=` (RFC 6265 5.2), as browsers read them. A compromised
    app's script can still set a site-wide cookie (document.cookie): apps that must be kept
    apart from that need host names under different sites."""
    if b"domain" not in value.lower():
        return value
    parts = value.split(b";")
    return b";".join([parts[0]] + [p for p in parts[1:] if p.partition(b"=")[0].strip().lower() != b"domain"])


def set_cookie(name: str, value: str, max_age: int) -> tuple[bytes, bytes]:
    return (b"set-cookie", f"{name}={value}; Path=/; Max-Age={max_age}; Secure; HttpOnly; SameSite=Lax".encode())


def safe_return_path(target: str) -> str:
    """Where to send the browser after sign-in: a path on this app, never another site (an
    open redirect through `//evil`, `/\\evil`, a scheme, or control characters becomes "/")."""
    if (not target.startswith("/") or target.startswith("//") or target.startswith("/\\")
            or len(target) > MAX_RETURN_PATH or any(ord(c) < 0x21 or ord(c) == 0x7f for c in target)):
        return "/"
    return target


def allowed(app: App, user: str, groups: tuple[str, ...]) -> bool:
    """The access decision: the user is named, or is in a named group."""
    return user in app.users or any(group in app.groups for group in groups)


def new_session(app: App, sign_in, lifetime: int, now: float | None = None) -> Session:
    """A session for `sign_in` (oidc.SignIn), not yet in any table (SessionTable.add)."""
    now = time.time() if now is None else now
    return Session(secrets.token_urlsafe(32), app.name, app.host, sign_in.user, sign_in.subject, sign_in.name,
                   sign_in.groups, sign_in.access_token, now, now + lifetime, now)


class SessionTable:
    """Signed-in sessions and sign-ins under way. Use on the event loop only.

    Sign-ins under way are booked per source (conncap.source_of: an IPv4 address, an IPv6 /64):
    a source keeps its last MAX_PENDING_PER_CLIENT; a full table (MAX_PENDING) drops the oldest
    of the source holding the most. A flood of sign-ins, from one host's /64 or from many
    addresses, pushes out its own, and a person's one sign-in goes only once every source in
    the table holds as few."""

    def __init__(self):
        self.sessions: dict[str, Session] = {}
        self.pending: dict[str, Pending] = {}  # oldest first
        self._by_source: dict[str, list[str]] = {}  # source -> its pending states, oldest first
        # sources by how many sign-ins they hold (1..MAX_PENDING_PER_CLIENT), each in the order
        # they came to hold that many: the table's biggest holder without a scan
        self._holding: dict[int, dict[str, None]] = {}

    def begin(self, state: str, pending: Pending) -> None:
        self._expire_pending(pending.created)
        source = source_of(pending.client)
        mine = self._by_source.get(source)
        if mine is not None and len(mine) >= MAX_PENDING_PER_CLIENT:
            self._drop_pending(mine[0])
        if len(self.pending) >= MAX_PENDING:
            self._drop_pending(self._by_source[self._biggest_holder()][0])
        self.pending[state] = pending
        states = self._by_source.setdefault(source, [])
        self._move(source, len(states), len(states) + 1)
        states.append(state)

    def take(self, state: str, now: float) -> Pending | None:
        """The sign-in for this state, once: a replayed state finds nothing."""
        self._expire_pending(now)
        if state not in self.pending:
            return None
        pending = self.pending[state]
        self._drop_pending(state)
        return pending

    def _biggest_holder(self) -> str:
        for count in range(MAX_PENDING_PER_CLIENT, 0, -1):
            holders = self._holding.get(count)
            if holders:
                return next(iter(holders))
        raise LookupError("no sign-in under way")

    def _move(self, source: str, before: int, after: int) -> None:
        if before:
            holders = self._holding[before]
            del holders[source]
            if not holders:
                del self._holding[before]
        if after:
            self._holding.setdefault(after, {})[source] = None

    def _drop_pending(self, state: str) -> None:
        pending = self.pending.pop(state)
        source = source_of(pending.client)
        states = self._by_source[source]
        self._move(source, len(states), len(states) - 1)
        states.remove(state)
        if not states:
            del self._by_source[source]

    def _expire_pending(self, now: float) -> None:
        """From the oldest (insertion order), so a sign-in costs what expired, not every entry."""
        while self.pending:
            state, pending = next(iter(self.pending.items()))
            if now - pending.created <= PENDING_TTL:
                return
            self._drop_pending(state)

    def create(self, app: App, sign_in, lifetime: int, now: float | None = None) -> Session:
        return self.add(new_session(app, sign_in, lifetime, now))

    def add(self, session: Session) -> Session:
        """Keep a session made by new_session: from now on its cookie lets its user in."""
        self.sessions[session.sid] = session
        return session

    def end(self, sid: str) -> Session | None:
        """Remove a session and cut its WebSockets."""
        session = self.sessions.pop(sid, None)
        if session is not None:
            for task in list(session.tunnels):
                task.cancel()
        return session

    def of_user(self, user: str) -> list[Session]:
        return [s for s in self.sessions.values() if s.user == user]

    def expire(self, now: float) -> list[Session]:
        return [self.end(s.sid) for s in list(self.sessions.values()) if s.expires <= now]
