"""The identity-aware proxy as a daemon part (skyguard/parts.py): one TLS listener per app of the
policy, the session table, the issuer client, the cookie and assertion keys, the decision log
and metrics. proxy.py serves the connections; this module is what they share (the "gate").

Keys come from the sealed store: the issuer's client secret (the policy names it), the session
cookie key and the assertion signing key (made there on first use, so the JWKS stays the same
across restarts). A listener whose certificate is missing stays closed and the part runs
Degraded; an issuer that cannot be reached does not stop the part (sign-in fails closed with a
page saying so, and recovers when the issuer is back).

The signed log: a sign-in, and a group gained at the issuer, grant access only once their entries
are durable (parts.entries_durable); a log that refuses or does not write them in time refuses the
sign-in (a 503 page, counted LOG_REFUSED) or holds the group back. What ends access (a sign-out,
expiry, a revocation, a lost group, a policy change, an operator's logout) never waits for or
depends on the log: its entry is best effort, and one the log refuses is said in the host log.

For other parts (the web console of issue 21): `AppsService.identify(host, headers)` says who is
signed in on a request, see its docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import time
from concurrent.futures import Future
from dataclasses import dataclass

from skyguard.apps import assertion
from skyguard.apps.oidc import AppsError, IssuerClient
from skyguard.apps.proxy import AppConnection
from skyguard.apps.sessions import (
    SESSION_COOKIE,
    CookieSealer,
    Session,
    SessionTable,
    allowed,
    cookie_value,
    new_session,
)
from skyguard.apps.upstream import IdleUpstreams
from skyguard.conncap import UnauthenticatedConnections
from skyguard.credproxy.ca import new_server_context
from skyguard.custody.pemload import load_cert_chain_from_memory, split_pem
from skyguard.errors import LogError
from skyguard.parts import BrakedRefusals, Degraded, entries_durable
from skyguard.policy.apps import App
from skyguard.policy.model import Policy
from skyguard.timeouts import within

log = logging.getLogger(__name__)

COOKIE_KEY = "apps-cookie-key"  # the session cookie's key in the sealed store (32 random bytes)
HOUSEKEEPING_PERIOD = 1.0  # seconds between sweeps: expiry, and re-checks of sessions with WebSockets
HANDSHAKE_TIMEOUT = 10.0
# Open client connections per client source (an IPv4 address, an IPv6 /64: conncap.source_of),
# across all apps, until they carry a signed-in request: each costs descriptors the whole daemon
# shares (DNS and the credential proxy too), so a source nobody signed in from must not take them
# all. People behind one NAT share an address: signed-in connections do not count. In all (many
# sources), at most MAX_UNSIGNED_CONNECTIONS such connections.
MAX_CONNECTIONS_PER_CLIENT = 256
MAX_UNSIGNED_CONNECTIONS = 1024
LOG_REFUSED = "log_refused"  # a sign-in refused because the signed log cannot record it (a result label)


@dataclass(frozen=True)
class SignedIn:
    """Who a request comes from, as identify() returns it."""

    user: str
    name: str
    groups: tuple[str, ...]
    app: str


class AppsService:
    """The part. Use on the daemon's event loop (constructor: off the loop, it reads the store)."""

    def __init__(self, policy: Policy, secrets, *, decision_log, registry=None, ca_file: str | None = None,
                 max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT,
                 max_unsigned_connections: int = MAX_UNSIGNED_CONNECTIONS):
        self.policy = policy
        # connections not signed in, per client source (an IPv6 /64 is one) and in all (skyguard/conncap.py)
        self.clients = UnauthenticatedConnections(max_connections_per_client, max_unsigned_connections)
        self.secrets = secrets
        self.log = decision_log
        # Refusals and denials, which anyone (signed in or not) can repeat at request rate: braked
        # per client source and kind in the signed log (parts.BrakedRefusals); metrics count each.
        self.refusals = BrakedRefusals(decision_log, log)
        self.ca_file = ca_file
        self.sessions = SessionTable()
        self.sealer = CookieSealer(bytes(secrets.get_or_create(COOKIE_KEY, lambda: os.urandom(32))))
        self.signer = assertion.AssertionSigner(bytes(secrets.get_or_create(assertion.KEY_NAME, assertion.new_key_pem)))
        self.issuer: IssuerClient | None = None
        self._issuer_key: tuple | None = None  # the identity the issuer client was made for
        self._servers: dict[str, tuple[tuple, list]] = {}  # app name -> (config key, servers)
        self.upstreams = IdleUpstreams()  # kept-alive connections to apps between client connections
        self._housekeeping: asyncio.Task | None = None
        self._metrics(registry)

    def __repr__(self) -> str:
        return f"AppsService({[a.name for a in self.policy.apps]})"

    def _metrics(self, registry) -> None:
        from prometheus_client import Counter, Gauge

        kw = {"registry": registry}  # None: not registered anywhere (tests that build the part alone)
        self._counters: dict[tuple[str, str], Counter] = {}  # (app, result) -> the labelled counter
        self.requests = Counter("skyguard_apps_requests_total", "Requests to apps through the identity-aware "
                                "proxy, by outcome (forwarded, denied, signin_redirect, refused reasons, ...)",
                                ["app", "result"], **kw)
        self.active = Gauge("skyguard_apps_sessions", "Signed-in sessions of the identity-aware proxy", **kw)
        self.active.set_function(lambda: len(self.sessions.sessions))

    # ---- the part ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._housekeeping = asyncio.get_running_loop().create_task(self._sweep())
        await self.set_policy(self.policy)

    async def stop(self) -> None:
        if self._housekeeping:
            self._housekeeping.cancel()
        for name in list(self._servers):
            await self._close(name)
        self.upstreams.close()
        for session in list(self.sessions.sessions.values()):
            self.sessions.end(session.sid)
        self.refusals.flush()

    async def set_policy(self, policy: Policy) -> None:
        """Hot swap: listeners of unchanged apps stay; sessions of removed apps (or apps whose host
        changed) end; the access decision of every next request is the new policy's."""
        self.policy = policy
        problems = []
        identity = policy.identity
        if identity is not None and (identity, ) != self._issuer_key:
            try:
                secret = await asyncio.to_thread(self.secrets.get, identity.client_secret)
                self.issuer = IssuerClient(identity, bytes(secret), self.ca_file)
                self._issuer_key = (identity, )
            except Exception:
                self.issuer, self._issuer_key = None, None
                problems.append(f"the identity client secret {identity.client_secret!r} is not in the store; "
                                f"add it with `skyguard secret set {identity.client_secret}` (nobody can sign in)")
        apps = {a.name: a for a in policy.apps}
        self.end_sessions([s for s in self.sessions.sessions.values()
                           if (app := apps.get(s.app)) is None or app.host != s.host], "app_removed_from_policy")
        for name in [n for n in self._servers if n not in apps]:
            await self._close(name)
        for app in policy.apps:
            try:
                bundle = bytes(await asyncio.to_thread(self.secrets.get, app.certificate))
            except Exception:
                await self._close(app.name)
                problems.append(f"app {app.name}: certificate {app.certificate!r} is not in the store; add the "
                                f"PEM (certificate then key) with `skyguard secret set {app.certificate}`")
                continue
            key = (app, hashlib.sha256(bundle).hexdigest())
            if app.name in self._servers and self._servers[app.name][0] == key:
                continue
            await self._close(app.name)
            self.upstreams.close(app.name)  # its workload or port may have changed
            try:
                context = new_server_context()
                certificate, private = split_pem(bundle)
                load_cert_chain_from_memory(context, certificate, private)
                host, port = app.listen.rsplit(":", 1)
                server = await asyncio.get_running_loop().create_server(
                    functools.partial(AppConnection, self, app.name), host.strip("[]"), int(port), ssl=context,
                    reuse_address=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
            except Exception as e:
                problems.append(f"app {app.name}: cannot listen on {app.listen}: {type(e).__name__}: {e}")
                continue
            self._servers[app.name] = (key, [server])
        if problems:
            raise Degraded("; ".join(problems))

    async def _close(self, name: str) -> None:
        self.upstreams.close(name)
        entry = self._servers.pop(name, None)
        if entry:
            for server in entry[1]:
                server.close()
                with contextlib.suppress(Exception):
                    await within(server.wait_closed(), 2)

    async def _sweep(self) -> None:
        """Expire sessions; re-check at the issuer the sessions that hold WebSockets (a request
        re-checks its own session; a WebSocket sends none), cutting them when access is gone or
        the policy no longer lets the app take WebSockets."""
        while True:
            await asyncio.sleep(HOUSEKEEPING_PERIOD)
            try:
                await self._sweep_once()
            except Exception:  # the sweep never stops: without it no WebSocket is ever cut
                log.exception("apps: housekeeping failed")

    async def _sweep_once(self) -> None:
        now = time.time()
        self._best_effort("apps_session_ended", self.sessions.expire(now), reason="expired")
        for session in [s for s in self.sessions.sessions.values() if s.tunnels]:
            app = self.app(session.app)
            try:
                still = await self.check_at_issuer(session)
            except Exception as e:  # AppsError, or anything else: the session is not confirmed
                still = False  # fail closed: a tunnel is not kept open on an unconfirmed session
                if not isinstance(e, AppsError):
                    log.exception("apps: re-checking a session failed")
                self.end_session(session, "issuer_unavailable")
            if still and app is not None and not (allowed(app, session.user, session.groups) and app.websockets):
                for task in list(session.tunnels):
                    task.cancel()
                reason = "websockets_not_allowed" if allowed(app, session.user, session.groups) else "access_withdrawn"
                self._best_effort("apps_denied", [session], reason=reason, websockets_cut=True)

    # ---- what connections share --------------------------------------------------------------

    def app(self, name: str) -> App | None:
        return next((a for a in self.policy.apps if a.name == name), None)

    def vm_address(self, app: App) -> str:
        workload = self.policy.workload(app.workload)
        addresses = sorted(workload.addresses, key=lambda a: a.version)  # IPv4 first
        return str(addresses[0])

    def session_for(self, app: App, headers) -> tuple[Session | None, str]:
        """(session, "") for a valid cookie of this app, else (None, reason or "")."""
        value = cookie_value(headers, SESSION_COOKIE)
        if not value:
            return None, ""
        now = time.time()
        sid, reason = self.sealer.open(value, app.host, now)
        if sid is None:
            return None, "" if reason == "session_expired" else reason
        session = self.sessions.sessions.get(sid)
        if session is None or session.host != app.host or session.expires <= now:
            return None, ""  # logged out, expired or from before a restart: sign in again
        return session, ""

    def checked_recently(self, session: Session) -> bool:
        """True while the session check interval has not passed (no issuer call needed)."""
        identity = self.policy.identity
        return (identity is not None and self.issuer is not None
                and time.time() - session.checked < identity.session_check)

    async def check_at_issuer(self, session: Session) -> bool:
        """Re-confirm the user at the issuer when the session check interval has passed; False
        (and the session ended) when the issuer no longer knows the session. Raises
        IssuerUnavailable (the caller fails closed)."""
        identity = self.policy.identity
        if identity is None or self.issuer is None:
            self.end_session(session, "identity_removed_from_policy")
            return False
        if time.time() - session.checked < identity.session_check:
            return True
        groups = await self.issuer.userinfo(session.access_token, session.subject)
        if groups is None:
            self.end_session(session, "revoked_at_issuer")
            return False
        if groups != session.groups:
            groups = await self._groups_on_record(session, groups)
        session.groups, session.checked = groups, time.time()
        return True

    async def _groups_on_record(self, session: Session, groups: tuple[str, ...]) -> tuple[str, ...]:
        """The groups the session goes on with now that the issuer names `groups`: all of them once
        apps_groups_changed is durable. A lost group takes effect whatever the log does; a gained
        one (access granted) only on record: if the log refuses the entry or does not write it
        within ENTRY_WAIT_S, the session keeps the groups it had and still has (the next check
        tries again), said in the host log."""
        gained = [group for group in groups if group not in session.groups]
        try:
            queued = self._record("apps_groups_changed", session, before=list(session.groups), after=list(groups))
            if gained:
                await entries_durable([queued], self.log)
        except LogError as e:
            log.error("apps: %s's change of groups on %s was not written to the signed log (%s): %s", session.user,
                      session.app, f"gained {gained} held back until it is" if gained else "it takes effect anyway", e)
            return tuple(group for group in groups if group in session.groups)
        return groups

    async def signed_in(self, app: App, sign_in, client: str) -> Session | None:
        """The session of a sign-in the issuer confirmed, kept (its cookie then lets the user in)
        only once its apps_signin entry is durable: nobody is let in with no record of it. None
        when the signed log refuses the entry or has not written it within ENTRY_WAIT_S: nothing
        of the sign-in is kept, it is counted LOG_REFUSED and said in the host log (a 503 page)."""
        session = new_session(app, sign_in, self.policy.identity.session_lifetime)
        try:
            await entries_durable([self._record("apps_signin", session, client=client)], self.log)
        except LogError as e:
            self.count(app, LOG_REFUSED)
            log.error("apps: %s: skyguard cannot record the sign-in of %s from %s, so it is refused: %s", app.name,
                      session.user, client, e)
            return None
        self.count(app, "signed_in")
        return self.sessions.add(session)

    def end_session(self, session: Session, reason: str) -> None:
        self.end_sessions([session], reason)

    def end_sessions(self, sessions: list[Session], reason: str) -> int:
        """End `sessions` now (their cookies let nobody in, their WebSockets are cut), whatever
        the signed log does; their apps_session_ended entries are best effort. How many ended."""
        ended = [s for s in sessions if self.sessions.end(s.sid) is not None]
        self._best_effort("apps_session_ended", ended, reason=reason)
        return len(ended)

    def deny(self, app: App, session: Session, client: str) -> None:
        self.refusals.record("apps_denied", client, {"app": session.app, "user": session.user},
                             groups=list(session.groups), client=client, reason="not_in_users_or_groups")
        self.count(app, "denied")

    def refuse(self, app: App, reason: str, *, client: str, user: str | None = None, **fields) -> None:
        """A request refused before any access decision (bad cookie, replayed state, ...), from
        `client` (its address): an `apps_refused` entry, braked per client source, app, reason
        and user (parts.BrakedRefusals: past a burst, about one summary entry a second)."""
        words = {"app": app.name, "reason": reason} | ({"user": user} if user is not None else {})
        self.refusals.record("apps_refused", client, words, client=client, **fields)
        self.count(app, reason)

    def count(self, app: App, result: str) -> None:
        # labels() takes a lock and builds its key on every call: the children are kept here
        # (bounded: apps x results)
        child = self._counters.get((app.name, result))
        if child is None:
            child = self._counters[(app.name, result)] = self.requests.labels(app.name, result)
        child.inc()

    def _record(self, kind: str, session: Session, **fields) -> Future | None:
        """Queue the entry (LogError if the log refuses it now); its Future, for what must wait."""
        return self.log.record(kind, app=session.app, user=session.user, groups=list(session.groups), **fields)

    def _best_effort(self, kind: str, sessions: list[Session], **fields) -> None:
        """Record `kind` for each session, for what has taken effect already (access ended, a
        WebSocket cut) and stands whatever the log does: entries the log refuses are said in the
        host log, once for the lot, without a traceback; nothing is raised."""
        refused: list[Session] = []
        error: LogError | None = None
        for session in sessions:
            try:
                self._record(kind, session, **fields)
            except LogError as e:
                refused.append(session)
                error = e
            except Exception:  # noqa: BLE001 - the end of access must not fail on its record
                log.exception("apps: could not record %s", kind)
        if refused:
            who = sorted({f"{s.user} on {s.app}" for s in refused})
            log.error("apps: %d %s %s (%s: %s%s) not written to the signed log; what they record stands: %s",
                      len(refused), kind, "entry was" if len(refused) == 1 else "entries were", fields.get("reason", ""),
                      ", ".join(who[:5]), f" and {len(who) - 5} more" if len(who) > 5 else "", error)

    # ---- for other parts and the CLI ---------------------------------------------------------

    def identify(self, host: str, headers) -> SignedIn | None:
        """Who is signed in on a request to `host` (an app's host name), from its headers
        ([(name, value)] as bytes, names lower-case, as skyguard's HTTP readers give them):
        None when the request carries no valid session cookie of that host (not signed in,
        tampered, another app's, expired, logged out). It does not re-check at the issuer or
        decide access: the caller applies its own rule to `user` and `groups` (for an app of the
        policy, sessions.allowed). Call on the daemon's loop."""
        app = next((a for a in self.policy.apps if a.host == host.lower()), None)
        if app is None:
            return None
        session, _ = self.session_for(app, headers)
        if session is None:
            return None
        return SignedIn(session.user, session.name, session.groups, session.app)

    async def control(self, args: dict) -> dict:
        op = args.get("action")
        now = time.time()
        if op == "list":
            return {"apps": [{"name": a.name, "workload": a.workload, "port": a.port, "host": a.host,
                              "listen": a.listen, "origin": a.origin, "users": list(a.users),
                              "groups": list(a.groups), "websockets": a.websockets,
                              "identity_header": a.identity_header, "listening": a.name in self._servers,
                              "sessions": sum(1 for s in self.sessions.sessions.values() if s.app == a.name)}
                             for a in self.policy.apps],
                    "issuer": self.policy.identity.issuer if self.policy.identity else None}
        if op == "sessions":
            return {"sessions": [s.summary(now) for s in self.sessions.sessions.values()]}
        if op == "logout":
            user = args.get("user")
            if not isinstance(user, str) or not user:
                raise AppsError("apps logout needs a user name")
            ended = self.end_sessions(self.sessions.of_user(user), "logged_out_by_operator")
            return {"user": user, "ended": ended}
        if op == "jwks":
            return self.signer.jwks()
        raise AppsError(f"unknown apps operation {op!r}")


def apps_op(daemon, args: dict) -> dict:
    """The daemon's control handler for `skyguard apps ...` (runs on the control thread)."""
    part = daemon._part("apps")
    if part is None:
        if args.get("action") == "jwks":  # the key exists whether or not an app is configured
            from skyguard.custody.store import SecretStore

            store = SecretStore(daemon.state_dir / "secrets")
            return assertion.AssertionSigner(bytes(store.get_or_create(assertion.KEY_NAME, assertion.new_key_pem))).jwks()
        if args.get("action") in ("list", "sessions"):
            return {"apps": [], "sessions": [], "issuer": None}
        raise AppsError("the identity-aware proxy is not running (the policy has no apps)")
    return daemon.loop_thread.call(part.control(args))

