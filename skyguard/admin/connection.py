"""One operator's SSH connection to the access proxy, and skyguard's own connection to the VM.

OperatorConnection authenticates the operator (their key from the policy, the brute-force brake),
resolves OPERATOR+WORKLOAD to a VM they may reach (access.py), opens skyguard's connection to that
VM with the VM key on first use (pinning the VM's host key: VmHostKeys), hands each session
channel to session.py and bridges port forwards when policy allows. `revocation()` says whether
the policy now in force still allows the connection; the proxy (proxy.py) asks it after every
policy change. Not the listener, not session recording.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import asyncssh

from skyguard import fsutil
from skyguard.admin import access, keys
from skyguard.admin.session import EXIT_UNREACHABLE, ProxySession, session_channel
from skyguard.conncap import source_of
from skyguard.errors import AdminError, BadInput, LogError
from skyguard.parts import entries_durable
from skyguard.policy.model import SshOperator, Workload
from skyguard.timeouts import within

if TYPE_CHECKING:
    from skyguard.admin.proxy import AdminSshProxy

log = logging.getLogger("skyguard.admin")
FORWARD_LOG_REFUSED = ("skyguard: the port forward cannot open: the signed log refuses entries now (its disk is "
                       "full or stalled); try again later")

SHUTDOWN_GRACE = 2.0  # seconds a revoked or shut-down connection gets to deliver its last words
MAX_LOGGED_REFUSALS = 10  # refused forwarding requests of a connection logged one by one (then summed)


class VmHostKeys:
    """Trust-on-first-use pins of VM host keys, one per workload, in a JSON file. Its methods read
    and write that file: call them off the loop (asyncio.to_thread). Thread-safe."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()  # one read-modify-write of the file at a time

    def _load(self) -> dict:
        try:
            return json.loads(fsutil.read_regular_file(self.path))  # a FIFO is refused, never waited on
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise AdminError(f"cannot read {self.path}: {e.strerror or e}; move it away (VM host keys are "
                             "re-pinned)") from None
        except ValueError:
            raise AdminError(f"{self.path} is damaged; fix or remove it (VM host keys are re-pinned)") from None

    def pinned(self, workload: str) -> str | None:
        """The pinned key of `workload` (`TYPE BASE64`), None before its first use."""
        with self._lock:
            return self._load().get(workload)

    def check(self, workload: str, key: asyncssh.SSHKey) -> bool:
        """Whether `key` is `workload`'s pinned key; the first key seen is pinned (written and
        fsynced before this returns)."""
        line = keys.public_line(key).split()[:2]
        with self._lock:
            pins = self._load()
            pinned = pins.get(workload)
            if pinned is None:
                pins[workload] = " ".join(line)
                fsutil.write_private(self.path, json.dumps(pins, indent=1, sort_keys=True).encode())
                log.info("pinned host key of %s: %s", workload, keys.fingerprint(key))
                return True
        return matches(pinned, key)


def matches(pinned: str, key: asyncssh.SSHKey) -> bool:
    return pinned.split()[:2] == keys.public_line(key).split()[:2]


# What asyncssh would otherwise take from the home and environment of the user skyguard runs as
# (root): ~/.ssh/config (Hostname, ProxyCommand, ProxyJump, IdentityAgent... would redirect or
# proxy skyguard's connection to a VM), ~/.ssh/ca-bundle.crt and ~/.ssh/crt (X.509 host keys
# trusted past the pinning), Kerberos. The VM key, known_hosts (none: VmClient pins) and the
# agent (the operator's, or none; never SSH_AUTH_SOCK) are given explicitly beside these.
OWN_SETTINGS_ONLY: dict = {"config": [], "proxy_command": None, "tunnel": None, "x509_trusted_certs": None,
                           "x509_trusted_cert_paths": None, "gss_kex": False, "gss_auth": False,
                           "pkcs11_provider": None}


class VmClient(asyncssh.SSHClient):
    """skyguard's client side to a VM. asyncssh asks for the host key on the loop, so the pin is
    read before connecting (`pinned`) and a first key is only noted here (`first_key`): the
    caller pins it off the loop before the connection is used (OperatorConnection.upstream)."""

    def __init__(self, workload: str, pinned: str | None):
        self.workload = workload
        self.pinned = pinned
        self.first_key: asyncssh.SSHKey | None = None
        self.host_key_changed = False

    def validate_host_public_key(self, host, addr, port, key) -> bool:
        if self.pinned is None:
            self.first_key = key
            return True
        if matches(self.pinned, key):
            return True
        self.host_key_changed = True
        return False


class OperatorConnection(asyncssh.SSHServer):
    """One operator's connection: authentication, the target, and the upstream connection."""

    def __init__(self, proxy: AdminSshProxy):
        self.proxy = proxy
        self.conn: Any = None  # the asyncssh connection, from connection_made() on
        self.source = "?"
        self.login: access.Login | None = None
        self.operator: SshOperator | None = None  # set once authenticated
        self.key_fingerprint: str | None = None
        self.authenticated = False
        self.auth_attempted = False
        self.rejected_keys = 0
        self.key_checks = 0  # public keys and signatures checked (validate_public_key calls)
        self.refused_requests: dict[str, int] = {}  # forwarding requests refused, by kind
        self.workload: Workload | None = None  # set once authorised
        self.refusal: access.AccessRefused | None = None
        self._upstream: asyncssh.SSHClientConnection | None = None
        self.vm_address: str | None = None  # where _upstream leads, once open
        self._upstream_lock = asyncio.Lock()
        self.sessions: set[ProxySession] = set()
        self.agent_relayed = False  # the VM connection forwards the operator's agent
        self.tunnels: set[asyncio.StreamWriter] = set()  # both ends of open port forwards
        self.closing = False
        self.counted_unauthenticated = False  # counted in proxy.unauthenticated until authenticated

    # -- connection and authentication ---------------------------------------------------------

    def connection_made(self, conn) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("?",)
        self.source = str(peer[0])
        self.proxy.connections.add(self)
        refused = self.proxy.unauthenticated.admit(self.source)
        if refused is None:
            self.counted_unauthenticated = True
            return
        self.proxy.metrics.auth_failures.labels("too_many_connections").inc()
        pending = self.proxy.unauthenticated
        count = pending.refusals.to_log(self.source, time.monotonic())
        if count:
            log.warning("SSH access proxy refused a connection from %s: %d not yet authenticated from its source, "
                        "%d in all (limits %d, %d); %d refused since the last line", self.source,
                        pending.held(self.source), pending.count(), pending.per_source,
                        pending.total, count)
        message = ("too many connections from your address are not yet logged in; try again shortly"
                   if refused == "source" else "the SSH access proxy has too many connections not yet "
                   "logged in; try again shortly")
        # After asyncssh has sent its version line (it does once this returns).
        asyncio.get_running_loop().call_soon(conn.disconnect, asyncssh.DISC_TOO_MANY_CONNECTIONS, message)

    def _count_out(self) -> None:
        if self.counted_unauthenticated:
            self.counted_unauthenticated = False
            self.proxy.unauthenticated.release(self.source)

    def connection_lost(self, exc) -> None:
        self.proxy.connections.discard(self)
        self._count_out()
        if sum(self.refused_requests.values()) > MAX_LOGGED_REFUSALS:
            self.proxy.record("admin_requests_refused_summary", operator=self.operator_name,
                              workload=self.workload_name, source=self.source,
                              requests=dict(self.refused_requests),
                              unlogged=sum(self.refused_requests.values()) - MAX_LOGGED_REFUSALS)
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

    def revocation(self) -> str | None:
        """Why the policy now in force no longer allows this connection, or None if it does.
        Connections still authenticating are judged by the new policy when they finish."""
        ssh = self.proxy.policy.admin_ssh
        if ssh is None:
            return "SSH access was removed from the policy"
        if self.operator is None or self.workload is None or self.login is None:
            return None  # not past authentication and authorisation yet: the new policy applies
        operator = access.find_operator(ssh, self.operator.name)
        key = self.proxy.operator_keys.get(self.operator.name)
        if operator is None or key is None or keys.fingerprint(key) != self.key_fingerprint:
            return "access revoked by a policy change"
        try:
            workload = access.authorize(self.proxy.policy, operator, self.login)
            address = access.workload_address(workload)
        except access.AccessRefused:
            return "access revoked by a policy change"
        if self.vm_address is not None and address != self.vm_address:
            # The connection leads to the machine at the old address, which may now be another
            # workload's (of a zone this operator may not reach).
            return f"the address of {workload.name} was changed by a policy change; connect again"
        self.workload = workload  # new sessions dial, record and judge content under the new policy
        if self.agent_relayed and not ssh.agent_forwarding:
            return "agent forwarding was turned off by a policy change"
        return None

    def close_tunnels(self) -> None:
        """End every open port forward (port forwarding was turned off)."""
        for writer in list(self.tunnels):
            writer.close()
        self.tunnels.clear()

    def session_closed(self, session: ProxySession) -> None:
        self.sessions.discard(session)
        if self.closing and not self.sessions:
            self.close_now()

    def _auth_failed(self, reason: str) -> None:
        self.proxy.metrics.auth_failures.labels(reason).inc()
        self.proxy.record("admin_auth_failure", source=self.source, reason=reason,
                          user=(self.login.operator if self.login else None))
        log.warning("SSH login failed from %s (%s)", self.source, reason)
        if self.proxy.limiter.failure(self.source):
            # `blocks`: every address the block covers (its source: the address, or its IPv6 /64).
            blocks = source_of(self.source)
            self.proxy.record("admin_source_blocked", source=self.source, blocks=blocks,
                              seconds=self.proxy.config.block_for)
            log.warning("blocking SSH logins from %s for %ss after repeated failures", blocks,
                        self.proxy.config.block_for)

    def begin_auth(self, username: str) -> bool:
        if self.proxy.limiter.is_blocked(self.source):
            # The block itself is in the signed log (admin_source_blocked); its refusals go to the
            # metric and, summarised, the host's log: a blocked address must not grow the signed log.
            self.proxy.metrics.auth_failures.labels("rate_limited").inc()
            count = self.proxy.blocked_refusals.to_log(self.source, time.monotonic())
            if count:
                log.warning("SSH access proxy refused %d login(s) from %s since the last line: it is "
                            "blocked after repeated failures", count, source_of(self.source))
            self.conn.disconnect(asyncssh.DISC_HOST_NOT_ALLOWED_TO_CONNECT,
                                 "too many failed logins from your address (or its network); try again later")
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
        # Called for each key offered and again for each signature: a bad signature on a policy
        # key (public, in the policy) passes here and fails after, unseen, so every call counts.
        self.key_checks += 1
        if self.key_checks > 2 * self.proxy.config.max_keys_per_connection:
            self.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "too many authentication attempts")
            return False
        # Parse the name of this very request: SSH lets a client change it between attempts.
        try:
            login = access.parse_login(username)
        except BadInput:
            login = None
        ssh = self.proxy.policy.admin_ssh  # None once admin.ssh left the policy: nobody gets in
        operator = access.find_operator(ssh, login.operator) if login and ssh else None
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
        self._count_out()
        self.proxy.limiter.success(self.source)
        operator, login = self.operator, self.login
        if operator is None or login is None:
            return  # not reached: asyncssh completes only after validate_public_key set both
        try:
            self.workload = access.authorize(self.proxy.policy, operator, login)
        except access.AccessRefused as refused:
            # Told to the operator when they open a session (an SSH login has no place for text).
            self.refusal = refused
            self.proxy.record("admin_access_refused", operator=operator.name,
                              key_fingerprint=self.key_fingerprint, source=self.source,
                              workload=login.workload, reason=refused.reason)

    @property
    def operator_name(self) -> str:
        return self.operator.name if self.operator is not None else "?"

    @property
    def workload_name(self) -> str | None:
        return self.workload.name if self.workload is not None else None

    # -- the VM side ------------------------------------------------------------------------------

    async def upstream(self) -> asyncssh.SSHClientConnection:
        """skyguard's own connection to the VM, opened on first use and shared by the channels."""
        async with self._upstream_lock:
            if self._upstream is not None:
                return self._upstream
            workload = self.workload
            if workload is None:
                raise access.AccessRefused("no_target", "skyguard: no VM selected for this connection")
            address = access.workload_address(workload)
            cfg = self.proxy.config
            pins = self.proxy.vm_host_keys
            try:
                client = VmClient(workload.name, await asyncio.to_thread(pins.pinned, workload.name))
            except AdminError as e:
                raise access.AccessRefused("vm_host_keys_unreadable", f"skyguard: {e}") from None
            # Relay the VM's agent requests to the operator's agent only when policy allows it
            # and the operator forwarded one.
            ssh = self.proxy.policy.admin_ssh
            agent = self.conn.get_agent_path() if ssh is not None and ssh.agent_forwarding else None
            try:
                conn, _ = await within(asyncssh.create_connection(
                    lambda: client, address, cfg.vm_port, username=cfg.vm_user,
                    client_keys=[self.proxy.vm_key], known_hosts=([], [], []),
                    server_host_key_algs="default", agent_path=agent,
                    agent_forwarding=agent is not None, encoding=None,
                    preferred_auth="publickey", connect_timeout=cfg.connect_timeout,
                    **OWN_SETTINGS_ONLY,
                ), cfg.connect_timeout)
            except TimeoutError:
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
                        f"the VM was reinstalled, remove its entry from {pins.path}") from None
                errno = getattr(e, "errno", None)
                reason = (os.strerror(errno) if errno else None) or getattr(e, "reason", None) or type(e).__name__
                raise access.AccessRefused("vm_unreachable",
                    f"skyguard: cannot reach {workload.name} ({address}:{cfg.vm_port}): {reason}; "
                    "is the VM up and its sshd running?") from None
            if client.first_key is not None:  # trust on first use: pinned before the connection is used
                try:
                    pinned = await asyncio.to_thread(pins.check, workload.name, client.first_key)
                except (AdminError, OSError) as e:
                    conn.close()
                    raise access.AccessRefused("vm_host_keys_unreadable",
                        f"skyguard: cannot pin the host key of {workload.name} in {pins.path}: "
                        f"{getattr(e, 'strerror', None) or e}") from None
                if not pinned:  # another connection pinned another key meanwhile
                    conn.close()
                    raise access.AccessRefused("vm_host_key_changed",
                        f"skyguard: the host key of {workload.name} changed since it was pinned; if "
                        f"the VM was reinstalled, remove its entry from {pins.path}")
            if self.workload is None or access.workload_address(self.workload) != address:
                conn.close()  # a policy change moved the workload while its old address was dialled
                raise access.AccessRefused("revoked", f"skyguard: the address of {workload.name} was "
                                           "changed by a policy change; connect again")
            self._upstream, self.vm_address = conn, address
            self.agent_relayed = agent is not None
            return conn

    # -- channels -----------------------------------------------------------------------------------

    def session_requested(self):
        return session_channel(self.conn), ProxySession(self)

    def _note_refused(self, request: str, **details) -> None:
        """Count a refused forwarding request; the first MAX_LOGGED_REFUSALS of the connection go
        to the signed log one by one, the rest in one summary when it closes (a client can send
        them without end)."""
        self.proxy.metrics.refusals.labels(request).inc()
        self.refused_requests[request] = self.refused_requests.get(request, 0) + 1
        if sum(self.refused_requests.values()) <= MAX_LOGGED_REFUSALS:
            self.proxy.record("admin_request_refused", request=request,
                              operator=self.operator.name if self.operator else None,
                              workload=self.workload.name if self.workload else None,
                              source=self.source, **details)

    def _refuse(self, request: str, message: str, **details) -> NoReturn:
        self._note_refused(request, **details)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, message)

    def connection_requested(self, dest_host, dest_port, orig_host, orig_port):
        if self.workload is None:
            self._refuse("port_forward", "skyguard: no VM selected for this connection",
                         dest=f"{dest_host}:{dest_port}")
        if self.closing:
            self._refuse("port_forward", "skyguard: this connection is being closed", dest=f"{dest_host}:{dest_port}")
        ssh = self.proxy.policy.admin_ssh
        if ssh is None or not ssh.port_forwarding:
            self._refuse("port_forward", "port forwarding is disabled by skyguard policy "
                         "(admin.ssh.port_forwarding)", dest=f"{dest_host}:{dest_port}")
        try:  # fail closed: no forward opens without its entry (record_or_report would only say so)
            queued = self.proxy.decision_log.record("admin_port_forward", operator=self.operator_name,
                                                    workload=self.workload_name, dest=f"{dest_host}:{dest_port}")
        except (LogError, OSError) as e:  # the signed log refuses entries (or the fallback log cannot write)
            log.error("a port forward of %s to %s:%s is refused: its entry cannot be logged: %s",
                      self.operator_name, dest_host, dest_port, e)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, FORWARD_LOG_REFUSED) from None

        async def bridge(reader, writer):
            try:  # nothing reaches the VM until the forward is on record (durable)
                await entries_durable([queued], self.proxy.decision_log)
            except LogError as e:
                log.error("a port forward of %s to %s:%s is closed before it reached the VM: its entry was not "
                          "written: %s", self.operator_name, dest_host, dest_port, e)
                writer.close()
                return
            try:
                upstream = await self.upstream()
                vm_reader, vm_writer = await upstream.open_connection(dest_host, dest_port)
            except (access.AccessRefused, asyncssh.Error, OSError):
                writer.close()
                return
            ssh = self.proxy.policy.admin_ssh
            if self.closing or ssh is None or not ssh.port_forwarding:  # revoked or turned off meanwhile
                writer.close()
                vm_writer.close()
                return
            self.tunnels.update((writer, vm_writer))

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
            self.tunnels.difference_update((writer, vm_writer))

        return bridge

    def server_requested(self, listen_host, listen_port):
        self._note_refused("remote_forward", listen=f"{listen_host}:{listen_port}")
        return False

    def tun_requested(self, unit):
        self._refuse("tunnel", "skyguard: IP tunnels (ssh -w) are not allowed", unit=unit)

    def tap_requested(self, unit):
        self._refuse("tunnel", "skyguard: Ethernet tunnels (ssh -w, Tunnel=ethernet) are not allowed", unit=unit)

    def unix_connection_requested(self, dest_path):
        self._refuse("unix_forward", "UNIX socket forwarding is not allowed by skyguard")

    def unix_server_requested(self, listen_path):
        return False

