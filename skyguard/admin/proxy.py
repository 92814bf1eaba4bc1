"""The SSH access proxy: the one door through which operators reach VMs.

An asyncssh server on `admin.ssh.listen`. Operators log in as OPERATOR+WORKLOAD (access.py) with
their own key from the policy; the proxy checks that the workload's zone is in their
`may_access`, opens its own SSH connection to the VM with skyguard's VM key (keys.py), and
bridges each session channel (shell with pty, exec, subsystem), recording it (recording.py).
connection.py holds one operator's connection, session.py one bridged channel, commands.py what
may run in it.

A part of the daemon with the shape every loop-hosted part has: `start()`, `stop()` and
`set_policy(policy)`, all called on the proxy's event loop. The part exists whatever the policy
says; it listens only while the policy has an `admin.ssh` section, and a new policy takes effect
at once: the listener follows `listen` (and `agent_forwarding`, which asyncssh fixes per
listener), and every open connection or session the new policy would not allow is ended.

Decisions, made here deliberately and all closed by default:
- port forwarding (-L/-W) is refused unless `admin.ssh.port_forwarding`; when allowed, the
  connection is opened from the VM (through skyguard's connection to it), never from the host.
  Remote forwarding (-R) is always refused (not supported).
- agent forwarding is refused unless `admin.ssh.agent_forwarding`; when allowed, the VM's agent
  requests are relayed to the operator's agent.
- file transfer (SFTP, scp, rsync, ... by any name: commands.py) is refused unless
  `admin.ssh.sftp`; when allowed, SFTP file names are logged. With a command allow-list only the
  listed commands run, and no shell.
- VM host keys are trusted on first use and pinned (`<state>/admin/vm_host_keys.json`); a
  changed key refuses the session until an administrator removes the pin.
- A source (an address, an IPv6 /64) with too many failed logins is refused before
  authentication (ratelimit.py).
- Connections not yet authenticated are capped per source (an address, an IPv6 /64) and in all
  (skyguard/conncap.py): past the cap the next is disconnected at once, so silent clients
  cannot hold the daemon's descriptors.
This module is not the datapath rule that keeps direct SSH to VMs out, and not the signed log.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import asyncssh
from prometheus_client import CollectorRegistry, Counter, Gauge

from skyguard.admin import commands, keys
from skyguard.admin.connection import OperatorConnection, VmHostKeys
from skyguard.admin.decisionlog import DecisionLog
from skyguard.admin.ratelimit import AuthFailureLimiter
from skyguard.admin.recording import SessionArchive
from skyguard.admin.sftp import ReplayTurn
from skyguard.admin.transcript import ClosingRecords, recording_metrics, report_left_open
from skyguard.conncap import RefusalSummary, UnauthenticatedConnections
from skyguard.content.record import ContentMetrics
from skyguard.custody.store import SecretStore
from skyguard.errors import AdminError, BadInput
from skyguard.parts import Degraded, record_or_report
from skyguard.policy.model import Policy

if TYPE_CHECKING:
    from asyncssh import SSHAcceptor

log = logging.getLogger("skyguard.admin")

STOP_WAIT = 2.5  # seconds stop() waits for connections to close (past connection.SHUTDOWN_GRACE)


@dataclass
class AdminProxyConfig:
    vm_user: str = "root"  # the account skyguard logs into on every VM
    vm_port: int = 22
    connect_timeout: float = 10.0  # seconds to wait for a VM's sshd before telling the operator
    login_timeout: float = 30.0  # seconds an unauthenticated client may hold a connection
    # Connections not yet authenticated that one address, and all, may hold (ratelimit.py); past
    # either the next is refused at once (OpenSSH: MaxStartups 10:30:100).
    max_unauthenticated_per_source: int = 16
    max_unauthenticated: int = 128
    max_keys_per_connection: int = 6  # like OpenSSH's MaxAuthTries; key checks (offers and signatures): twice this
    max_failures: int = 5  # failed logins per source (an address, an IPv6 /64: conncap.source_of) ...
    failure_window: float = 60.0  # ... within this many seconds ...
    block_for: float = 300.0  # ... block that source this long
    # A session whose transcript's writer falls behind (admin/transcript.py: a slow or stalled
    # disk) is paused; after recording_notice_after seconds the operator is told, after
    # recording_stall_timeout it is ended (fail closed). Longer rides out a longer disk hiccup,
    # with the operator's session frozen meanwhile.
    recording_notice_after: float = 5.0
    recording_stall_timeout: float = 60.0
    # stop() waits this long for the records of ended sessions to close (on a healthy disk:
    # milliseconds), then goes on; the ones left are logged and closed later (transcript.py
    # report_left_open). Longer: a slow disk's records close as 'ok' more often, a stalled one
    # holds a shutdown (and the programs' detaching) longer.
    recording_close_wait: float = 5.0


class AdminMetrics:
    """The proxy's Prometheus metrics. Labels are bounded: operator names come from the policy
    (an unknown user name is counted as reason, never as a label value)."""

    def __init__(self, registry: CollectorRegistry | None):
        registry = registry if registry is not None else CollectorRegistry()
        self.sessions = Counter("skyguard_admin_ssh_sessions_total",
                                "SSH sessions through the access proxy, by operator and result",
                                ["operator", "result"], registry=registry)
        self.active = Gauge("skyguard_admin_ssh_active_sessions", "SSH sessions open now", registry=registry)
        self.auth_failures = Counter("skyguard_admin_ssh_auth_failures_total",
                                     "Failed or refused SSH logins at the access proxy, by reason",
                                     ["reason"], registry=registry)
        self.refusals = Counter("skyguard_admin_ssh_refused_requests_total",
                                "Requests refused by policy (forwarding, file transfer, commands, shells)",
                                ["request"], registry=registry)
        # SFTP requests skyguard answered itself, never passed to the VM (admin/sftplog.py, sftp.py).
        self.sftp_refused = Counter("skyguard_admin_ssh_sftp_refused_requests_total",
                                    "SFTP requests refused at the access proxy, never passed to the VM, by reason "
                                    "(log_refused, unsupported, unknown_handle, content_rules)",
                                    ["reason"], registry=registry)
        self.recording_paused, self.recording_pauses, self.recording_backlog = recording_metrics(
            registry, "skyguard_admin_ssh", "SSH")
        # SFTP uploads judged under content rules (admin/sftp.py), by zone, rule and verdict.
        self.content = ContentMetrics(registry, "skyguard_admin_sftp_content_decisions",
                                      "SFTP uploads judged by the content filter at the SSH access proxy")


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise BadInput(f"admin.ssh.listen {listen!r} must be HOST:PORT, e.g. 0.0.0.0:2222")
    return host.strip("[]") or "0.0.0.0", int(port)


def sftp_content_engine(policy: Policy):
    """The policy's content rules compiled for SFTP uploads (admin/sftp.py), or None when no rule
    covers SFTP. Compiles YARA: call off the event loop."""
    if not policy.content.zones_for("sftp"):
        return None
    from skyguard.content.inspector import ContentEngine

    return ContentEngine(policy.content)


def operator_keys(policy: Policy) -> dict[str, asyncssh.SSHKey]:
    """Every operator's public key, parsed; BadInput naming the operator whose key is not one."""
    parsed = {}
    for op in policy.admin_ssh.operators if policy.admin_ssh is not None else ():
        try:
            parsed[op.name] = asyncssh.import_public_key(op.public_key)
        except (asyncssh.KeyImportError, ValueError):
            raise BadInput(f"admin.ssh.operators: the public_key of operator {op.name!r} is not an "
                           "OpenSSH public key line (ssh-ed25519 AAAA...)") from None
    return parsed


def load_keys(store: SecretStore) -> tuple[asyncssh.SSHKey, asyncssh.SSHKey]:
    """The VM key and the proxy's host key from the sealed store, each generated on first use.
    Blocks (file lock, disk, TPM): call off the event loop. AdminError or CredentialError says why
    they cannot be had."""
    try:
        return keys.vm_key(store), keys.proxy_host_key(store)
    except OSError as e:  # the store's directory or lock file: no key material in the message
        raise AdminError(f"cannot load the SSH access proxy's keys from the sealed store {store.directory}: "
                         f"{e.strerror or type(e).__name__}; it does not listen until they can be") from None


class AdminSshProxy:
    """The access proxy. start() listens if the policy has admin.ssh; set_policy() applies a new
    policy to the listener and to open connections; stop() stops listening and ends every open
    session. All three run on the event loop that serves the connections."""

    def __init__(self, policy: Policy, store: SecretStore, state_dir: Path | str,
                 decision_log: DecisionLog, registry: CollectorRegistry | None = None,
                 config: AdminProxyConfig | None = None, archive: SessionArchive | None = None):
        """`archive`: where sessions are recorded; the daemon passes the one it shares with the
        console proxy (by default the proxy makes its own over <state>/admin/sessions)."""
        self.config = config or AdminProxyConfig()
        self.state_dir = Path(state_dir)
        self.store = store
        self.decision_log = decision_log
        self.metrics = AdminMetrics(registry)
        admin_dir = self.state_dir / "admin"
        self.archive = archive or SessionArchive(admin_dir / "sessions", decision_log)
        self.vm_host_keys = VmHostKeys(admin_dir / "vm_host_keys.json")
        self.limiter = AuthFailureLimiter(self.config.max_failures, self.config.failure_window,
                                          self.config.block_for)
        self.unauthenticated = UnauthenticatedConnections(self.config.max_unauthenticated_per_source,
                                                          self.config.max_unauthenticated)
        self.blocked_refusals = RefusalSummary()  # logins refused from blocked sources, for the host's log
        # Loaded from the sealed store when the proxy first listens: a policy without admin.ssh
        # creates no SSH keys.
        self.vm_key: asyncssh.SSHKey | None = None
        self.host_key: asyncssh.SSHKey | None = None
        self.connections: set[OperatorConnection] = set()
        self.records_closing = ClosingRecords()  # of sessions ended (session.close_record)
        self._sftp_turns: dict[str, ReplayTurn] = {}  # workload name -> its channels' turn (sftp.py)
        self.address: tuple[str, int] | None = None  # where it listens now
        self._server: SSHAcceptor | None = None
        self._serving: tuple[str, bool] | None = None  # (listen, agent_forwarding) of _server
        self._started = False
        self.policy, self.operator_keys = self._checked(policy)
        # Built here and in set_policy, never in a session's start path (on the loop).
        self.content_engine = sftp_content_engine(self.policy)
        self.metrics.content.follow(lambda: self.content_engine)  # clamd's state, read at scrape time
        self.metrics.recording_backlog.set_function(self._recording_backlog)

    def _recording_backlog(self) -> int:
        """At scrape time, in the exporter's thread: list() copies a set in one step."""
        return self.records_closing.backlog(session.recording for connection in list(self.connections)
                                            for session in list(connection.sessions) if session.recording is not None)

    @staticmethod
    def _checked(policy: Policy) -> tuple[Policy, dict]:
        """Everything in `policy` that could fail, checked before any of it is used."""
        if policy.admin_ssh is not None:
            parse_listen(policy.admin_ssh.listen)
        commands.allow_list(policy)
        return policy, operator_keys(policy)

    # -- the part's interface --------------------------------------------------------------------

    async def start(self) -> tuple[str, int] | None:
        """Listen on admin.ssh.listen, if the policy has admin.ssh (else wait for a policy that
        has). Returns the address listened on, or None."""
        self._started = True
        await self._follow_policy()
        await self._check_clamd()
        return self.address

    async def set_policy(self, policy: Policy) -> None:
        """Use `policy` from now on. Raises BadInput, changing nothing, if it cannot be used.
        Listener: closed when admin.ssh is gone, moved when `listen` changed. Open connections
        and sessions the new policy would not allow are ended at once (revocation), open port
        forwards closed if forwarding was turned off. If the new address cannot be listened on,
        AdminError: the proxy then does not listen (it fails closed) until a policy or restart fixes it.
        Degraded, with the policy in force, when its SFTP content rules have no usable clamd."""
        checked, keys_of = self._checked(policy)
        engine = self.content_engine
        if engine is None or engine.content != checked.content:  # recompiled only when the rules changed
            engine = await asyncio.to_thread(sftp_content_engine, checked)
        self.policy, self.operator_keys, self.content_engine = checked, keys_of, engine
        try:
            if self._started:
                await self._follow_policy()
        finally:
            self._end_revoked()
        if self._started:
            await self._check_clamd()

    async def _check_clamd(self) -> None:
        """Degraded when SFTP content rules need a clamd that is down or does not flag what it
        skips (their uploads are refused meanwhile): said in status at once, not at the first upload."""
        problem = await self.content_engine.clamd_problem() if self.content_engine is not None else None
        if problem:
            raise Degraded(f"SFTP content rules: {problem}")

    async def stop(self) -> None:
        """Stop listening and end every open session, telling the operators why."""
        self._started = False
        await self._close_listener()
        for connection in list(self.connections):
            connection.shutdown("the SSH access proxy is shutting down")
        for _ in range(int(STOP_WAIT / 0.05)):
            if not self.connections:
                break
            await asyncio.sleep(0.05)
        # Every ended session's record is on disk before stop() returns, unless the disk does not answer.
        if left := await self.records_closing.wait(self.config.recording_close_wait):
            report_left_open(left, self.config.recording_close_wait, "admin", self.record)

    # -- the listener -----------------------------------------------------------------------------

    async def _follow_policy(self) -> None:
        ssh = self.policy.admin_ssh
        wanted = (ssh.listen, ssh.agent_forwarding) if ssh is not None else None
        if wanted == self._serving:
            return
        await self._close_listener()
        if wanted is not None:
            await self._listen(*wanted)

    async def _listen(self, listen: str, agent_forwarding: bool) -> None:
        host, port = parse_listen(listen)
        if self.host_key is None:
            # Off the loop, which serves every other part's traffic: the sealed store may wait on
            # its lock (`skyguard secret set` in another process), a slow disk, or the TPM that
            # unseals its key. A failure raises here and nothing listens (fail closed).
            self.vm_key, self.host_key = await asyncio.to_thread(load_keys, self.store)
        recovered = await self.archive.work.run(self.archive.recover_once)  # reads and hashes transcripts
        if not self._started:
            return  # stopped while the keys were loading: stay closed
        for session_id in recovered:
            log.warning("session %s was interrupted by a proxy restart; its record is closed", session_id)
        try:
            server = await asyncssh.create_server(
                lambda: OperatorConnection(self), host, port,
                server_host_keys=[self.host_key], encoding=None,
                login_timeout=self.config.login_timeout,
                # Fixed per listener by asyncssh: a policy change of it re-listens.
                agent_forwarding=agent_forwarding,
                allow_scp=False, x11_forwarding=False, password_auth=False, kbdint_auth=False,
                keepalive_interval=30,
                # asyncssh defaults to False: a restarted daemon would then fail to listen for
                # a minute while the killed one's connections sit in TIME_WAIT.
                reuse_address=True,
            )
        except OSError as e:
            raise AdminError(f"cannot listen on {host}:{port} for the SSH access proxy: {e.strerror}") from None
        self._server, self._serving = server, (listen, agent_forwarding)
        self.address = tuple(server.sockets[0].getsockname()[:2])
        log.info("SSH access proxy listening on %s:%s", *self.address)

    async def _close_listener(self) -> None:
        """Stop accepting connections; open ones are left to the revocation check."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            log.info("SSH access proxy no longer listening on %s:%s", *self.address)
        self._server, self._serving, self.address = None, None, None

    # -- revocation -------------------------------------------------------------------------------

    def _end_revoked(self) -> None:
        ssh = self.policy.admin_ssh
        for connection in list(self.connections):
            reason = connection.revocation()
            if reason is not None:
                if connection.operator is not None:
                    self.record("admin_access_revoked", operator=connection.operator.name,
                                workload=connection.workload.name if connection.workload else None,
                                source=connection.source, reason=reason)
                connection.shutdown(reason, result="revoked")
                continue
            if ssh is not None and not ssh.port_forwarding:
                connection.close_tunnels()
            for session in list(connection.sessions):
                session.recheck()

    def sftp_turn(self, workload: str) -> ReplayTurn:
        """The one ReplayTurn of a VM, shared by every SFTP channel to it (of any connection)."""
        return self._sftp_turns.setdefault(workload, ReplayTurn())

    def record(self, kind: str, /, **fields) -> None:
        record_or_report(self.decision_log, log, kind, **fields)
