"""The console proxy: the daemon part through which operators open VNC consoles of VMs.

Listens on `admin.console.listen` for native VNC clients and on `admin.console.web` for the web
console (web.py); each connection is one session (session.py), admitted by a one-time ticket
(tickets.py). The part has the shape of every
loop-hosted part (skyguard/parts.py): start(), set_policy(), stop(), on the daemon's loop. A new
policy takes effect at once: the listener follows `listen`, and every open session the new
policy would not allow (target gone, operator no longer in the zone) is ended, result "revoked".

Decisions, closed by default: the clipboard passes only in the directions the target allows,
each transfer once its `console_clipboard` entry is durable in the signed log (session.py);
RDP targets are served through a private Xvnc that FreeRDP draws into (rdp.py), Degraded
if FreeRDP or Xvnc is missing; a source (an address, an IPv6 /64) that fails
too many logins is refused before authentication (the SSH door's limiter), and every login while
the signed log refuses entries (its disk full or stalled) before its ticket is judged. Not here: the
datapath grant that lets this host reach the VMs' console ports.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from skyguard.admin.access import AccessRefused
from skyguard.admin.decisionlog import DecisionLog
from skyguard.admin.proxy import parse_listen
from skyguard.admin.ratelimit import AuthFailureLimiter
from skyguard.admin.recording import SessionArchive
from skyguard.admin.transcript import ClosingRecords, recording_metrics, report_left_open
from skyguard.console.rdp import missing_tools
from skyguard.console.session import ConsoleSession
from skyguard.console.tickets import Ticket, TicketBook, match_token
from skyguard.custody.store import SecretStore
from skyguard.diskwork import DiskWork
from skyguard.errors import AdminError, SkyguardError
from skyguard.parts import BrakedRefusals, Degraded, record_or_report
from skyguard.policy.model import Policy

if TYPE_CHECKING:
    from skyguard.console.web import WebConsole

log = logging.getLogger("skyguard.console")


SIGN_IN_CHECK = 2.0  # seconds between checks that a web session's operator is still signed in
# Threads for the console tickets' file work, and the operations in flight (running or waiting)
# past which a login is refused ("try again later"): each takes milliseconds on a healthy disk; on
# a stalled one each login waits until it answers (tickets.py).
TICKET_WORKERS = 2
MAX_TICKET_WORK = 16


@dataclass
class ConsoleConfig:
    connect_timeout: float = 10.0  # seconds to reach a VM's VNC server
    max_failures: int = 5  # bad tickets per source (an address, an IPv6 /64: conncap.source_of) ...
    failure_window: float = 60.0  # ... within this many seconds ...
    block_for: float = 300.0  # ... block that source this long
    # A session whose recording's writer falls behind (admin/transcript.py: a slow or stalled
    # disk) relays nothing more from the VM; after recording_notice_after seconds the host's log
    # is told, after recording_stall_timeout the session is ended (fail closed).
    recording_notice_after: float = 5.0
    recording_stall_timeout: float = 60.0
    recording_close_wait: float = 5.0  # how long stop() waits for ended sessions' records (AdminProxyConfig)


class ConsoleMetrics:
    """Labels are bounded: operators come from the policy, reasons and directions are fixed words."""

    def __init__(self, registry: CollectorRegistry | None):
        registry = registry if registry is not None else CollectorRegistry()
        self.sessions = Counter("skyguard_console_sessions_total", "Console sessions ended, by operator and result",
                                ["operator", "result"], registry=registry)
        self.active = Gauge("skyguard_console_active_sessions", "Console sessions open now", registry=registry)
        self.auth_failures = Counter("skyguard_console_refused_total",
                                     "Console logins refused, by reason", ["reason"], registry=registry)
        self.clipboard = Counter("skyguard_console_clipboard_total", "Clipboard transfers, by direction and verdict",
                                 ["direction", "verdict"], registry=registry)
        self.recording_paused, self.recording_pauses, self.recording_backlog = recording_metrics(
            registry, "skyguard_console", "console")

class ConsoleProxy:
    def __init__(self, policy: Policy, store: SecretStore, state_dir: Path | str, decision_log: DecisionLog,
                 registry: CollectorRegistry | None = None, config: ConsoleConfig | None = None,
                 identify: Callable[[str, list], Any] | None = None, archive: SessionArchive | None = None):
        """`identify(host, headers)`: the identity-aware proxy's check of a request's session
        (skyguard/apps/service.py AppsService.identify: a SignedIn with user and groups, or None);
        the web console lists and opens targets for that user when admin.console.web_app is set.
        `archive`: where sessions are recorded; the daemon passes the one it shares with the SSH
        proxy (by default the proxy makes its own over <state>/admin/sessions)."""
        self.identify = identify
        self.config = config or ConsoleConfig()
        self.state_dir = Path(state_dir)
        self.store = store
        self.decision_log = decision_log
        # Refused logins, which anyone can repeat at will (a forged ticket, a request from another
        # origin): braked per source and kind in the signed log (parts.BrakedRefusals).
        self.refusals = BrakedRefusals(decision_log, log)
        self.metrics = ConsoleMetrics(registry)
        self.archive = archive or SessionArchive(self.state_dir / "admin" / "sessions", decision_log)
        self.tickets = TicketBook(self.state_dir / "console" / "tickets")
        # The tickets' reads and deletes, off the loop and out of its default executor (diskwork.py).
        self.ticket_work = DiskWork("console ticket operations", TICKET_WORKERS, MAX_TICKET_WORK)
        self.limiter = AuthFailureLimiter(self.config.max_failures, self.config.failure_window,
                                          self.config.block_for)
        self.sessions: set[ConsoleSession] = set()
        self.records_closing = ClosingRecords()  # of sessions ended (session.py)
        self.metrics.recording_backlog.set_function(  # at scrape time: list() copies the set in one step
            lambda: self.records_closing.backlog(s.recording for s in list(self.sessions) if s.recording is not None))
        self.address: tuple[str, int] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._listen: str | None = None
        self._vm_locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._web_key: tuple | None = None  # (web, app) the web console listens for
        self.web_problem = ""
        self.web: WebConsole | None = None  # the web console while admin.console.web is set
        self._started = False
        self._watch: asyncio.Task | None = None  # _watch_sign_ins
        self.policy = self._checked(policy)

    @staticmethod
    def _checked(policy: Policy) -> Policy:
        console = policy.admin_console
        for listen in (console.listen, console.web) if console is not None else ():
            if listen is not None:
                parse_listen(listen)
        return policy

    def _unsupported(self) -> str:
        console = self.policy.admin_console
        problems = []
        rdp = [t.name for t in console.targets if t.protocol == "rdp"] if console else []
        if rdp and (missing := missing_tools()):
            # Those targets fail at login (session.py logs why); the others work.
            problems.append(f"RDP console targets need {', '.join(missing)}, not installed: {', '.join(rdp)}")
        if console is not None and console.web_app and self.web_problem:
            problems.append(self.web_problem)
        return "; ".join(problems)

    def web_app(self):
        """The app (apps:) whose sign-in and certificate the web console uses, or None."""
        console = self.policy.admin_console
        name = console.web_app if console is not None else None
        return next((a for a in getattr(self.policy, "apps", ()) if a.name == name), None) if name else None

    def _web_tls(self, app):
        from skyguard.credproxy.ca import new_server_context
        from skyguard.custody.pemload import load_cert_chain_from_memory, split_pem

        context = new_server_context()
        load_cert_chain_from_memory(context, *split_pem(bytes(self.store.get(app.certificate))))
        return context

    # -- the part's interface --------------------------------------------------------------------

    async def start(self):
        self._started = True
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_sign_ins())
        # Off the loop, which the other parts share: recovery reads and hashes transcripts.
        for session_id in await self.archive.work.run(self.archive.recover_once):
            log.warning("session %s was interrupted by a restart; its record is closed", session_id)
        await self._follow_policy()
        if problem := self._unsupported():
            raise Degraded(problem)
        return self.address

    async def set_policy(self, policy: Policy) -> None:
        self.policy = self._checked(policy)
        try:
            if self._started:
                await self._follow_policy()
        finally:
            self._end_revoked()
        if problem := self._unsupported():
            raise Degraded(problem)

    async def stop(self) -> None:
        self._started = False
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        await self._close_listener()
        if self.web is not None:
            await self.web.stop()
            self.web, self._web_key = None, None
        for session in list(self.sessions):
            session.end("shutdown")
        self.refusals.flush()
        # Every ended session's record is on disk before stop() returns, unless the disk does not answer.
        if left := await self.records_closing.wait(self.config.recording_close_wait):
            report_left_open(left, self.config.recording_close_wait, "console", self.record)

    # -- the listener ------------------------------------------------------------------------------

    async def _follow_policy(self) -> None:
        console = self.policy.admin_console
        web = console.web if console is not None else None
        app = self.web_app()
        self.web_problem = ""
        if console is not None and console.web_app and (app is None or self.identify is None):
            # Fail closed: a web console meant to sit behind sign-in never opens without it.
            self.web_problem = (f"admin.console.web_app {console.web_app!r} names no app of the policy's apps:"
                                if app is None else "the identity-aware proxy is not running")
            self.web_problem += "; the web console stays closed"
            web = None
        wanted_web = (web, app)
        if self._web_key != wanted_web:
            if self.web is not None:
                await self.web.stop()
                self.web = None
            self._web_key = None
            if web is not None:
                from skyguard.console.web import WebConsole  # websockets is imported only when needed

                try:
                    # The sealed store (a slow disk, a TPM unsealing its key) in a worker thread.
                    tls = await asyncio.to_thread(self._web_tls, app) if app is not None else None
                except SkyguardError as e:
                    self.web_problem = f"the web console's certificate {app.certificate!r}: {e}; it stays closed"
                else:
                    web_console = WebConsole(self, web, app=app, tls=tls)
                    await web_console.start()
                    self.web, self._web_key = web_console, wanted_web
        wanted = console.listen if console is not None else None
        if wanted == self._listen:
            return
        await self._close_listener()
        if wanted is not None:
            host, port = parse_listen(wanted)
            try:
                self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
            except OSError as e:
                raise AdminError(f"cannot listen on {host}:{port} for the console proxy: {e.strerror}") from None
            self._listen = wanted
            self.address = tuple(self._server.sockets[0].getsockname()[:2])
            log.info("console proxy listening on %s:%s", *self.address)

    async def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._server, self._listen, self.address = None, None, None

    async def _serve(self, reader, writer) -> None:
        await self.serve_session(ConsoleSession(self, reader, writer))

    async def serve_session(self, session: ConsoleSession) -> None:
        """Run one session (a native client's, or the web console's) to its end."""
        self.sessions.add(session)
        try:
            await session.run()
        except Exception:  # noqa: BLE001 - one session's bug must not take the listener down
            log.exception("console session from %s failed", session.source)
            session.end("error")
        finally:
            self.sessions.discard(session)

    # -- revocation --------------------------------------------------------------------------------

    def _end_revoked(self) -> None:
        for session in list(self.sessions):
            if not session.admitted:  # not yet checked after its VM login: _admit checks it then
                continue
            try:
                session.recheck()
            except AccessRefused as e:
                self.record("console_access_revoked",
                            session=session.recording.id if session.recording is not None else None,
                            operator=session.ticket.operator, target=session.target.name, reason=e.reason)
                session.end("revoked", e.reason)

    async def _watch_sign_ins(self) -> None:
        """Web sessions behind sign-in end when their operator signs out, is logged out
        (`skyguard apps logout`) or loses the group that let them in, not only at a swap."""
        while True:
            await asyncio.sleep(SIGN_IN_CHECK)
            if any(s.signed_in is not None for s in self.sessions):
                self._end_revoked()

    async def redeem_token(self, token: str) -> Ticket | None:
        """TicketBook.redeem_token, its file work off the loop (Busy while that work is at its bound)."""
        ticket = match_token(await self.ticket_work.start(self.tickets.load), token)
        return ticket if ticket is not None and await self.ticket_work.run(self.tickets.consume, ticket) else None

    def vm_login_lock(self, address: str, port: int) -> asyncio.Lock:
        """The lock that serialises skyguard's logins to one VM's VNC server (see session.py)."""
        return self._vm_locks.setdefault((address, port), asyncio.Lock())

    def refused(self, reason: str, /, address: str, *, operator: str | None, door: str | None = None,
                **fields) -> None:
        """Count and log one refused console login (bad ticket, target not allowed, VM side
        failed, ...), whichever door it came through, from `address` (the client's): each counted
        in the metrics, the `console_access_refused` entries braked per source, reason, door and
        operator (parts.BrakedRefusals: past a burst, about one summary entry a second)."""
        self.metrics.auth_failures.labels(reason).inc()
        words = {"reason": reason, "operator": operator} | ({"door": door} if door is not None else {})
        self.refusals.record("console_access_refused", address, words, **fields)

    def record(self, kind: str, /, **fields) -> None:
        record_or_report(self.decision_log, log, kind, **fields)
