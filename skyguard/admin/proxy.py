"""The SSH access proxy: the one door through which operators reach VMs.

An asyncssh server on `admin.ssh.listen`. Operators log in as OPERATOR+WORKLOAD (access.py) with
their own key from the policy; the proxy checks that the workload's zone is in their
`may_access`, opens its own SSH connection to the VM with skyguard's VM key (keys.py), and
bridges each session channel (shell with pty, exec, subsystem), recording it (recording.py).

Decisions, made here deliberately and all closed by default:
- port forwarding (-L/-W) is refused unless `admin.ssh.port_forwarding`; when allowed, the
  connection is opened from the VM (through skyguard's connection to it), never from the host.
  Remote forwarding (-R) is always refused (not supported).
- agent forwarding is refused unless `admin.ssh.agent_forwarding`; when allowed, the VM's agent
  requests are relayed to the operator's agent.
- SFTP and scp are refused unless `admin.ssh.sftp`; when allowed, file names are logged.
- VM host keys are trusted on first use and pinned (`<state>/admin/vm_host_keys.json`); a
  changed key refuses the session until an administrator removes the pin.
- An address with too many failed logins is refused before authentication (ratelimit.py).
Errors meant for the operator are written to the session's stderr with a non-zero exit status
(1 refused, 255 VM unreachable), so the OpenSSH client shows them. This module is not the
datapath rule that keeps direct SSH to VMs out, and not the signed log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import asyncssh
from prometheus_client import CollectorRegistry, Counter, Gauge

from skyguard import fsutil
from skyguard.admin import access, keys
from skyguard.admin.decisionlog import DecisionLog
from skyguard.admin.ratelimit import AuthFailureLimiter
from skyguard.admin.recording import SessionArchive, SessionRecording
from skyguard.admin.sftp import SftpRequestWatcher
from skyguard.custody.store import SecretStore
from skyguard.errors import AdminError, BadInput, SkyguardError
from skyguard.policy.model import Policy

log = logging.getLogger("skyguard.admin")

EXIT_REFUSED = 1
EXIT_UNREACHABLE = 255  # what OpenSSH itself returns when it cannot reach a host
SHUTDOWN_GRACE = 2.0  # seconds a revoked or shut-down connection gets to deliver its last words


@dataclass
class AdminProxyConfig:
    vm_user: str = "root"  # the account skyguard logs into on every VM
    vm_port: int = 22
    connect_timeout: float = 10.0  # seconds to wait for a VM's sshd before telling the operator
    login_timeout: float = 30.0  # seconds an unauthenticated client may hold a connection
    max_keys_per_connection: int = 6  # like OpenSSH's MaxAuthTries
    max_failures: int = 5  # failed logins per source address ...
    failure_window: float = 60.0  # ... within this many seconds ...
    block_for: float = 300.0  # ... block that address this long


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
                                "Channel requests refused by policy (forwarding, sftp, agent)",
                                ["request"], registry=registry)


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise BadInput(f"admin.ssh.listen {listen!r} must be HOST:PORT, e.g. 0.0.0.0:2222")
    return host.strip("[]") or "0.0.0.0", int(port)


class VmHostKeys:
    """Trust-on-first-use pins of VM host keys, one per workload, in a JSON file."""

    def __init__(self, path: Path):
        self.path = path

    def _load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            raise AdminError(f"{self.path} is damaged; fix or remove it (VM host keys are re-pinned)") from None

    def check(self, workload: str, key: asyncssh.SSHKey) -> bool:
        pins = self._load()
        line = keys.public_line(key).split()[:2]
        pinned = pins.get(workload)
        if pinned is None:
            pins[workload] = " ".join(line)
            fsutil.write_private(self.path, json.dumps(pins, indent=1, sort_keys=True).encode())
            log.info("pinned host key of %s: %s", workload, keys.fingerprint(key))
            return True
        return pinned.split()[:2] == line


class AdminSshProxy:
    """The access proxy. start() listens; close() stops listening and ends open sessions."""

    def __init__(self, policy: Policy, store: SecretStore, state_dir: Path | str,
                 decision_log: DecisionLog, registry: CollectorRegistry | None = None,
                 config: AdminProxyConfig | None = None):
        if policy.admin_ssh is None:
            raise BadInput("the policy has no admin.ssh section: nothing to serve")
        self.config = config or AdminProxyConfig()
        self.state_dir = Path(state_dir)
        admin_dir = self.state_dir / "admin"
        admin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = store
        self.decision_log = decision_log
        self.metrics = AdminMetrics(registry)
        self.archive = SessionArchive(admin_dir / "sessions", decision_log)
        self.vm_host_keys = VmHostKeys(admin_dir / "vm_host_keys.json")
        self.limiter = AuthFailureLimiter(self.config.max_failures, self.config.failure_window,
                                          self.config.block_for)
        self.vm_key = keys.vm_key(store)
        self.host_key = keys.proxy_host_key(store)
        self._server = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: set[_OperatorConnection] = set()
        self.update_policy(policy)

    def update_policy(self, policy: Policy) -> None:
        """Use a new policy from now on. Open connections whose operator, key or target the new
        policy no longer allows are ended (revocation takes effect at once). Thread-safe: the
        swap and the revocation run in the proxy's event loop. `listen` and `agent_forwarding`
        take effect at the next start."""
        if policy.admin_ssh is None:
            raise BadInput("the policy has no admin.ssh section")
        operator_keys = {}
        for op in policy.admin_ssh.operators:
            try:
                operator_keys[op.name] = asyncssh.import_public_key(op.public_key)
            except (asyncssh.KeyImportError, ValueError):
                raise BadInput(f"admin.ssh.operators: the public_key of operator {op.name!r} is not an "
                               "OpenSSH public key line (ssh-ed25519 AAAA...)") from None
        if self._loop is None:
            self._apply(policy, operator_keys)
        else:
            self._loop.call_soon_threadsafe(self._apply, policy, operator_keys)

    def _apply(self, policy: Policy, operator_keys: dict) -> None:
        self.policy, self.operator_keys = policy, operator_keys
        self._end_revoked()

    def _still_allowed(self, connection: "_OperatorConnection") -> bool:
        if connection.operator is None or connection.workload is None:
            return True  # not past authentication and authorisation yet: the new policy applies
        operator = access.find_operator(self.policy.admin_ssh, connection.operator.name)
        key = self.operator_keys.get(connection.operator.name)
        if operator is None or key is None or keys.fingerprint(key) != connection.key_fingerprint:
            return False
        try:
            access.authorize(self.policy, operator, connection.login)
        except access.AccessRefused:
            return False
        return True

    def _end_revoked(self) -> None:
        for connection in list(self._connections):
            if not self._still_allowed(connection):
                self.record({"type": "admin_access_revoked", "operator": connection.operator.name,
                             "workload": connection.workload.name, "source": connection.source})
                connection.shutdown("access revoked by a policy change", result="revoked")

    def record(self, entry: dict) -> None:
        try:
            self.decision_log.record(entry)
        except Exception:  # noqa: BLE001 - a log failure must not crash the proxy; it is reported
            log.exception("could not record %s in the decision log", entry.get("type"))

    async def start(self, listen: str | None = None) -> tuple[str, int]:
        host, port = parse_listen(listen or self.policy.admin_ssh.listen)
        self._loop = asyncio.get_running_loop()
        for session_id in self.archive.recover_interrupted():
            log.warning("session %s was interrupted by a proxy restart; its record is closed", session_id)
        try:
            self._server = await asyncssh.create_server(
                lambda: _OperatorConnection(self), host, port,
                server_host_keys=[self.host_key], encoding=None,
                login_timeout=self.config.login_timeout,
                # Read once at start: a policy change of this switch takes effect on restart.
                agent_forwarding=self.policy.admin_ssh.agent_forwarding,
                allow_scp=False, x11_forwarding=False, password_auth=False, kbdint_auth=False,
                keepalive_interval=30,
                # asyncssh defaults to False: a restarted daemon would then fail to listen for
                # a minute while the killed one's connections sit in TIME_WAIT.
                reuse_address=True,
            )
        except OSError as e:
            raise AdminError(f"cannot listen on {host}:{port} for the SSH access proxy: {e.strerror}") from None
        address = self._server.sockets[0].getsockname()
        log.info("SSH access proxy listening on %s:%s", address[0], address[1])
        return address[0], address[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for connection in list(self._connections):
            connection.shutdown("the SSH access proxy is shutting down")
        for _ in range(50):
            if not self._connections:
                break
            await asyncio.sleep(0.05)


class _VmClient(asyncssh.SSHClient):
    def __init__(self, proxy: AdminSshProxy, workload: str):
        self.proxy = proxy
        self.workload = workload
        self.host_key_changed = False

    def validate_host_public_key(self, host, addr, port, key) -> bool:
        if self.proxy.vm_host_keys.check(self.workload, key):
            return True
        self.host_key_changed = True
        return False


class _OperatorConnection(asyncssh.SSHServer):
    """One operator's connection: authentication, the target, and the upstream connection."""

    def __init__(self, proxy: AdminSshProxy):
        self.proxy = proxy
        self.conn: asyncssh.SSHServerConnection | None = None
        self.source = "?"
        self.login: access.Login | None = None
        self.operator = None
        self.key_fingerprint = None
        self.authenticated = False
        self.auth_attempted = False
        self.rejected_keys = 0
        self.workload = None
        self.refusal: access.AccessRefused | None = None
        self._upstream: asyncssh.SSHClientConnection | None = None
        self._upstream_lock = asyncio.Lock()
        self.sessions: set[_ProxySession] = set()
        self.closing = False

    # -- connection and authentication ---------------------------------------------------------

    def connection_made(self, conn) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("?",)
        self.source = str(peer[0])
        self.proxy._connections.add(self)

    def connection_lost(self, exc) -> None:
        self.proxy._connections.discard(self)
        if self.auth_attempted and not self.authenticated:
            self._auth_failed("bad_key")
        if self._upstream is not None:
            self._upstream.close()

    def shutdown(self, reason: str, result: str = "proxy_shutdown") -> None:
        """End every session with `reason` on the operator's terminal, then the connection. The
        connection closes once the sessions have (closing it at once could drop the message),
        or after SHUTDOWN_GRACE seconds at the latest."""
        self.closing = True
        for session in list(self.sessions):
            session.end_with_message(f"\r\nskyguard: {reason}\r\n", EXIT_UNREACHABLE, result)
        if not self.sessions:
            self.close_now()
        else:
            asyncio.get_running_loop().call_later(SHUTDOWN_GRACE, self.close_now)

    def close_now(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def session_closed(self, session: "_ProxySession") -> None:
        self.sessions.discard(session)
        if self.closing and not self.sessions:
            self.close_now()

    def _auth_failed(self, reason: str) -> None:
        self.proxy.metrics.auth_failures.labels(reason).inc()
        self.proxy.record({"type": "admin_auth_failure", "source": self.source, "reason": reason,
                           "user": (self.login.operator if self.login else None)})
        log.warning("SSH login failed from %s (%s)", self.source, reason)
        if self.proxy.limiter.failure(self.source):
            self.proxy.record({"type": "admin_source_blocked", "source": self.source,
                               "seconds": self.proxy.config.block_for})
            log.warning("blocking SSH logins from %s for %ss after repeated failures", self.source,
                        self.proxy.config.block_for)

    def begin_auth(self, username: str) -> bool:
        if self.proxy.limiter.is_blocked(self.source):
            self.proxy.metrics.auth_failures.labels("rate_limited").inc()
            self.proxy.record({"type": "admin_auth_failure", "source": self.source, "reason": "rate_limited"})
            self.conn.disconnect(asyncssh.DISC_HOST_NOT_ALLOWED_TO_CONNECT,
                                 "too many failed logins from your address; try again later")
            return True
        self.auth_attempted = True
        try:
            self.login = access.parse_login(username)
        except BadInput:
            self.login = None  # authentication will fail: no operator has that name
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Parse the name of this very request: SSH lets a client change it between attempts.
        try:
            login = access.parse_login(username)
        except BadInput:
            login = None
        operator = access.find_operator(self.proxy.policy.admin_ssh, login.operator) if login else None
        expected = self.proxy.operator_keys.get(operator.name) if operator else None
        if expected is not None and expected.public_data == key.public_data:
            self.login, self.operator = login, operator
            self.key_fingerprint = keys.fingerprint(key)
            return True
        self.rejected_keys += 1
        if self.rejected_keys >= self.proxy.config.max_keys_per_connection:
            self.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "too many keys offered")
        return False

    def auth_completed(self) -> None:
        self.authenticated = True
        self.proxy.limiter.success(self.source)
        try:
            self.workload = access.authorize(self.proxy.policy, self.operator, self.login)
        except access.AccessRefused as refused:
            # Told to the operator when they open a session (an SSH login has no place for text).
            self.refusal = refused
            self.proxy.record({"type": "admin_access_refused", "operator": self.operator.name,
                               "key_fingerprint": self.key_fingerprint, "source": self.source,
                               "workload": self.login.workload, "reason": refused.reason})

    # -- the VM side ------------------------------------------------------------------------------

    async def upstream(self) -> asyncssh.SSHClientConnection:
        """skyguard's own connection to the VM, opened on first use and shared by the channels."""
        async with self._upstream_lock:
            if self._upstream is not None:
                return self._upstream
            workload = self.workload
            address = access.workload_ssh_address(workload)
            cfg = self.proxy.config
            client = _VmClient(self.proxy, workload.name)
            # Relay the VM's agent requests to the operator's agent only when policy allows it
            # and the operator forwarded one.
            agent = self.conn.get_agent_path() if self.proxy.policy.admin_ssh.agent_forwarding else None
            try:
                conn, _ = await asyncio.wait_for(asyncssh.create_connection(
                    lambda: client, address, cfg.vm_port, username=cfg.vm_user,
                    client_keys=[self.proxy.vm_key], known_hosts=([], [], []),
                    server_host_key_algs="default", agent_path=agent,
                    agent_forwarding=agent is not None, encoding=None,
                    preferred_auth="publickey", connect_timeout=cfg.connect_timeout,
                ), cfg.connect_timeout)
            except (asyncio.TimeoutError, TimeoutError):
                raise access.AccessRefused("vm_unreachable",
                    f"skyguard: {workload.name} ({address}:{cfg.vm_port}) did not answer within "
                    f"{cfg.connect_timeout:g} s; the VM may be down or its sshd not running") from None
            except asyncssh.PermissionDenied:
                raise access.AccessRefused("vm_refused_key",
                    f"skyguard: {workload.name} refused skyguard's VM key; add the line from "
                    f"`skyguard admin vm-key` to {cfg.vm_user}'s authorized_keys on the VM") from None
            except (OSError, asyncssh.Error) as e:
                if client.host_key_changed:
                    raise access.AccessRefused("vm_host_key_changed",
                        f"skyguard: the host key of {workload.name} changed since it was pinned; if "
                        f"the VM was reinstalled, remove its entry from {self.proxy.vm_host_keys.path}") from None
                errno = getattr(e, "errno", None)
                reason = (os.strerror(errno) if errno else None) or getattr(e, "reason", None) or type(e).__name__
                raise access.AccessRefused("vm_unreachable",
                    f"skyguard: cannot reach {workload.name} ({address}:{cfg.vm_port}): {reason}; "
                    "is the VM up and its sshd running?") from None
            self._upstream = conn
            return conn

    # -- channels -----------------------------------------------------------------------------------

    def session_requested(self):
        return _ProxySession(self)

    def _refuse(self, request: str, message: str, **details):
        self.proxy.metrics.refusals.labels(request).inc()
        self.proxy.record({"type": "admin_request_refused", "request": request,
                           "operator": self.operator.name if self.operator else None,
                           "workload": self.workload.name if self.workload else None,
                           "source": self.source, **details})
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, message)

    def connection_requested(self, dest_host, dest_port, orig_host, orig_port):
        if self.workload is None:
            self._refuse("port_forward", "skyguard: no VM selected for this connection",
                         dest=f"{dest_host}:{dest_port}")
        if not self.proxy.policy.admin_ssh.port_forwarding:
            self._refuse("port_forward", "port forwarding is disabled by skyguard policy "
                         "(admin.ssh.port_forwarding)", dest=f"{dest_host}:{dest_port}")
        self.proxy.record({"type": "admin_port_forward", "operator": self.operator.name,
                           "workload": self.workload.name, "dest": f"{dest_host}:{dest_port}"})

        async def bridge(reader, writer):
            try:
                upstream = await self.upstream()
                vm_reader, vm_writer = await upstream.open_connection(dest_host, dest_port)
            except (access.AccessRefused, asyncssh.Error, OSError):
                writer.close()
                return

            async def pump(src, dst):
                try:
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                finally:
                    dst.write_eof()

            await asyncio.gather(pump(reader, vm_writer), pump(vm_reader, writer), return_exceptions=True)
            writer.close()
            vm_writer.close()

        return bridge

    def server_requested(self, listen_host, listen_port):
        self.proxy.metrics.refusals.labels("remote_forward").inc()
        self.proxy.record({"type": "admin_request_refused", "request": "remote_forward",
                           "operator": self.operator.name if self.operator else None,
                           "workload": self.workload.name if self.workload else None,
                           "source": self.source, "listen": f"{listen_host}:{listen_port}"})
        return False

    def unix_connection_requested(self, dest_path):
        self._refuse("unix_forward", "UNIX socket forwarding is not allowed by skyguard")

    def unix_server_requested(self, listen_path):
        return False


class _VmSession(asyncssh.SSHClientSession):
    """The VM's side of one bridged channel: output goes to the operator and the transcript."""

    def __init__(self, front: "_ProxySession"):
        self.front = front
        self.exit_status = None
        self.exit_signal = None

    def data_received(self, data, datatype):
        self.front.from_vm(data, datatype)

    def eof_received(self):
        self.front.chan.write_eof()
        return True

    def pause_writing(self):
        self.front.chan.pause_reading()  # the VM is not keeping up: stop reading the operator

    def resume_writing(self):
        self.front.chan.resume_reading()

    def exit_status_received(self, status):
        self.exit_status = status

    def exit_signal_received(self, signal, core_dumped, msg, lang):
        self.exit_signal = signal

    def connection_lost(self, exc):
        self.front.vm_closed(self.exit_status, self.exit_signal)


class _ProxySession(asyncssh.SSHServerSession):
    """The operator's side of one channel: what was asked (pty, shell, exec, subsystem)."""

    def __init__(self, owner: _OperatorConnection):
        self.owner = owner
        self.proxy = owner.proxy
        self.chan = None
        self.vm_chan = None
        self.term = None
        self.size = (80, 24, 0, 0)
        self.modes = {}
        self.kind = None
        self.command = None
        self.recording: SessionRecording | None = None
        self.sftp_watch: SftpRequestWatcher | None = None
        self.ended = False
        self.active_counted = False
        self.pending: list[bytes] = []
        self.pending_eof = False

    def connection_made(self, chan):
        self.chan = chan
        self.owner.sessions.add(self)

    def pty_requested(self, term_type, term_size, term_modes):
        self.term, self.size, self.modes = term_type, term_size, term_modes
        return True

    def shell_requested(self):
        self.kind = "shell"
        return True

    def exec_requested(self, command):
        self.kind, self.command = "exec", command.decode("utf-8", "replace") if isinstance(command, bytes) else command
        return True

    def subsystem_requested(self, subsystem):
        self.kind, self.command = "subsystem", subsystem.decode("utf-8", "replace") if isinstance(subsystem, bytes) else subsystem
        return True

    def session_started(self):
        self.chan.pause_reading()  # nothing reaches the VM before it is authorised and connected
        self._opening = asyncio.get_running_loop().create_task(self._open())  # keep a reference

    async def _open(self):
        owner = self.owner
        operator = owner.operator.name
        try:
            if owner.refusal is not None:
                raise owner.refusal
            workload = owner.workload
            transfer = self.kind == "subsystem" and self.command == "sftp" or (
                self.kind == "exec" and access.looks_like_scp(self.command or ""))
            if self.kind == "subsystem" and self.command != "sftp":
                raise access.AccessRefused("subsystem", f"skyguard: subsystem {self.command!r} is not allowed")
            if transfer and not self.proxy.policy.admin_ssh.sftp:
                self.proxy.metrics.refusals.labels("file_transfer").inc()
                raise access.AccessRefused(
                    "file_transfer_refused",
                    "skyguard: file transfer (SFTP/scp) is disabled by policy (admin.ssh.sftp)")
            upstream = await owner.upstream()
            if self.ended:  # the operator left while the VM was being reached
                return
        except access.AccessRefused as refused:
            self._refused(refused)
            return
        except Exception:  # noqa: BLE001 - one session's surprise must not take the proxy down
            log.exception("SSH session setup failed")
            self._refused(access.AccessRefused("error", "skyguard: internal error opening the session"))
            return
        width, height = self.size[0] or 80, self.size[1] or 24
        self.recording = self.proxy.archive.begin(
            operator=operator, key_fingerprint=owner.key_fingerprint, workload=workload.name,
            zone=workload.zone, source=owner.source, kind=self.kind, command=self.command,
            width=width, height=height, term=self.term)
        if self.kind == "subsystem":
            self.sftp_watch = SftpRequestWatcher()
        self.proxy.metrics.active.inc()
        self.active_counted = True
        try:
            self.vm_chan, _ = await upstream.create_session(
                lambda: _VmSession(self), command=self.command if self.kind == "exec" else None,
                subsystem=self.command if self.kind == "subsystem" else None,
                term_type=self.term, term_size=self.size if self.term else None,
                term_modes=self.modes if self.term else None, encoding=None,
                request_pty=bool(self.term))
        except (asyncssh.Error, OSError) as e:
            reason = getattr(e, "reason", None) or type(e).__name__
            self.end_with_message(f"skyguard: {workload.name} refused the session: {reason}\r\n",
                                  EXIT_UNREACHABLE, "vm_refused_session")
            return
        if self.ended:  # the operator went away while the VM was being reached
            self.vm_chan.close()
            return
        pending, self.pending = self.pending, []
        for data in pending:
            self.data_received(data, None)
        if self.pending_eof:
            self.vm_chan.write_eof()
        self.chan.resume_reading()

    def _refused(self, refused: access.AccessRefused):
        if self.ended:
            return
        self.ended = True
        operator = self.owner.operator.name
        self.proxy.metrics.sessions.labels(operator, refused.reason).inc()
        self.proxy.record({"type": "admin_session_refused", "operator": operator,
                           "key_fingerprint": self.owner.key_fingerprint, "source": self.owner.source,
                           "workload": self.owner.login.workload if self.owner.login else None,
                           "kind": self.kind, "command": self.command, "reason": refused.reason})
        code = EXIT_UNREACHABLE if refused.reason.startswith("vm_") else EXIT_REFUSED
        try:
            self.chan.write_stderr((str(refused) + "\r\n").encode())
            self.chan.exit(code)
        except (asyncssh.Error, OSError):
            pass  # the operator is already gone

    # operator -> VM
    def data_received(self, data, datatype):
        if self.vm_chan is None:
            # Reading is paused until the VM is connected; anything already in flight waits here
            # (bounded by the channel window the client was granted).
            if not self.ended:
                self.pending.append(data)
            return
        if self.recording:
            self.recording.input(data)
        if self.sftp_watch is not None:
            for op, path in self.sftp_watch.feed(data):
                self.recording.note("files", {"op": op, "path": path})
                self.proxy.record({"type": "admin_file_transfer", "session": self.recording.id,
                                   "operator": self.owner.operator.name,
                                   "workload": self.owner.workload.name, "op": op, "path": path})
        self.vm_chan.write(data)

    def eof_received(self):
        if self.vm_chan is not None:
            self.vm_chan.write_eof()
        else:
            self.pending_eof = True
        return True

    def terminal_size_changed(self, width, height, pixwidth, pixheight):
        self.size = (width, height, pixwidth, pixheight)
        if self.vm_chan is not None:
            self.vm_chan.change_terminal_size(width, height, pixwidth, pixheight)
        if self.recording:
            self.recording.resize(width, height)

    def signal_received(self, signal):
        if self.vm_chan is not None:
            self.vm_chan.send_signal(signal)

    def break_received(self, msec):
        if self.vm_chan is not None:
            self.vm_chan.send_break(msec)
            return True
        return False

    def pause_writing(self):
        if self.vm_chan is not None:
            self.vm_chan.pause_reading()

    def resume_writing(self):
        if self.vm_chan is not None:
            self.vm_chan.resume_reading()

    # VM -> operator
    def from_vm(self, data: bytes, datatype):
        if self.ended:
            return
        if self.recording:
            self.recording.output(data)
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self.chan.write_stderr(data)
        else:
            self.chan.write(data)

    def vm_closed(self, exit_status, exit_signal):
        if self.ended:
            return
        if exit_signal:
            self._finish("ok", exit_status, exit_signal)
            self.chan.exit_with_signal(exit_signal)
        elif exit_status is not None:
            self._finish("ok", exit_status, None)
            self.chan.exit(exit_status)
        else:
            self.end_with_message("\r\nskyguard: the connection to the VM was lost\r\n",
                                  EXIT_UNREACHABLE, "vm_lost")

    def end_with_message(self, message: str, code: int, result: str):
        if self.ended:
            return
        if self.recording:
            self.recording.output(message.encode())
        self._finish(result, code, None)
        try:
            self.chan.write_stderr(message.encode())
            self.chan.exit(code)
        except (asyncssh.Error, OSError, BrokenPipeError):
            pass
        if self.vm_chan is not None:
            self.vm_chan.close()

    def _finish(self, result: str, exit_status, exit_signal):
        self.ended = True
        if self.active_counted:
            self.proxy.metrics.active.dec()
            self.active_counted = False
        self.proxy.metrics.sessions.labels(self.owner.operator.name, result).inc()
        if self.recording:
            try:
                self.recording.finish(result, exit_status, exit_signal)
            except (OSError, SkyguardError):
                log.exception("could not finish the recording of session %s", self.recording.id)

    def connection_lost(self, exc):
        """The operator's channel is gone (client exited or was killed): close the VM side and
        finish the record with what was transferred up to now."""
        if not self.ended:
            self._finish("client_disconnected", None, None)
            if self.vm_chan is not None:
                self.vm_chan.close()
        self.owner.session_closed(self)
