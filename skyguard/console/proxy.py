"""The console proxy: the daemon part through which operators open VNC consoles of VMs.

Listens on `admin.console.listen` for native VNC clients and on `admin.console.web` for the web
console (web.py); each connection is one session (session.py), admitted by a one-time ticket
(tickets.py). The part has the shape of every
loop-hosted part (skyguard/parts.py): start(), set_policy(), stop(), on the daemon's loop. A new
policy takes effect at once: the listener follows `listen`, and every open session the new
policy would not allow (target gone, operator no longer in the zone) is ended, result "revoked".

Decisions, closed by default: the clipboard passes only in the directions the target allows;
RDP targets are refused (not relayed yet) and reported as Degraded; a source address that fails
too many logins is refused before authentication (the SSH door's limiter). Not here: the
datapath grant that lets this host reach the VMs' console ports.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

from skyguard.admin.access import AccessRefused
from skyguard.admin.decisionlog import DecisionLog
from skyguard.admin.proxy import parse_listen
from skyguard.admin.ratelimit import AuthFailureLimiter
from skyguard.admin.recording import SessionArchive
from skyguard.console import access
from skyguard.console.session import ConsoleSession
from skyguard.console.tickets import TicketBook
from skyguard.custody.store import SecretStore
from skyguard.errors import AdminError
from skyguard.parts import Degraded
from skyguard.policy.model import Policy

if TYPE_CHECKING:
    from skyguard.console.web import WebConsole

log = logging.getLogger("skyguard.console")


@dataclass
class ConsoleConfig:
    connect_timeout: float = 10.0  # seconds to reach a VM's VNC server
    max_failures: int = 5  # bad tickets per source address ...
    failure_window: float = 60.0  # ... within this many seconds ...
    block_for: float = 300.0  # ... block that address this long


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


class ConsoleProxy:
    def __init__(self, policy: Policy, store: SecretStore, state_dir: Path | str, decision_log: DecisionLog,
                 registry: CollectorRegistry | None = None, config: ConsoleConfig | None = None):
        self.config = config or ConsoleConfig()
        self.state_dir = Path(state_dir)
        self.store = store
        self.decision_log = decision_log
        self.metrics = ConsoleMetrics(registry)
        self.archive = SessionArchive(self.state_dir / "admin" / "sessions", decision_log)
        self.tickets = TicketBook(self.state_dir / "console" / "tickets")
        self.limiter = AuthFailureLimiter(self.config.max_failures, self.config.failure_window,
                                          self.config.block_for)
        self.sessions: set[ConsoleSession] = set()
        self.address: tuple[str, int] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._listen: str | None = None
        self._vm_locks: dict[tuple[str, int], asyncio.Lock] = {}
        self.web: WebConsole | None = None  # the web console while admin.console.web is set
        self._started = False
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
        rdp = [t.name for t in console.targets if t.protocol != "vnc"] if console else []
        return f"RDP console targets are not relayed yet (refused): {', '.join(rdp)}" if rdp else ""

    # -- the part's interface --------------------------------------------------------------------

    async def start(self):
        self._started = True
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
        await self._close_listener()
        if self.web is not None:
            await self.web.stop()
            self.web = None
        for session in list(self.sessions):
            session.end("shutdown")

    # -- the listener ------------------------------------------------------------------------------

    async def _follow_policy(self) -> None:
        console = self.policy.admin_console
        web = console.web if console is not None else None
        if (self.web.listen if self.web else None) != web:
            if self.web is not None:
                await self.web.stop()
                self.web = None
            if web is not None:
                from skyguard.console.web import WebConsole  # websockets is imported only when needed

                web_console = WebConsole(self, web)
                await web_console.start()
                self.web = web_console
        wanted = console.listen if console is not None else None
        if wanted == self._listen:
            return
        await self._close_listener()
        if wanted is not None:
            host, port = parse_listen(wanted)
            (self.state_dir / "admin").mkdir(parents=True, exist_ok=True, mode=0o700)
            for session_id in self.archive.recover_interrupted():
                log.warning("session %s was interrupted by a restart; its record is closed", session_id)
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
            if session.recording is None:
                continue
            try:
                access.authorize(self.policy, session.ticket.operator, session.ticket.groups, session.target.name)
            except AccessRefused as e:
                self.record("console_access_revoked", session=session.recording.id,
                            operator=session.ticket.operator, target=session.target.name, reason=e.reason)
                session.end("revoked", e.reason)

    def vm_login_lock(self, address: str, port: int) -> asyncio.Lock:
        """The lock that serialises skyguard's logins to one VM's VNC server (see session.py)."""
        return self._vm_locks.setdefault((address, port), asyncio.Lock())

    def record(self, kind: str, /, **fields) -> None:
        try:
            self.decision_log.record(kind, **fields)
        except Exception:  # noqa: BLE001 - a log failure must not crash the proxy; it is reported
            log.exception("could not record %s in the decision log", kind)
