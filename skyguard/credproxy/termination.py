"""TLS termination: skyguard terminates TLS on workload:port with a certificate and key from the
store and forwards plaintext to the VM's `forward_to` port, so the VM never holds the private key.

Each tls_termination entry gets its own listener on the host (one port, IPv4 and IPv6); steering.py
redirects connections for the workload's addresses and port to it. After the handshake the streams are spliced as bytes
(no HTTP parsing: the VM's service may speak anything over TLS). A connection is on record before
a byte of it reaches the VM: its `tls_termination_start` entry (workload, client address and port,
the name it asked for (SNI), TLS version) is durable in the signed log, or the connection is
closed (fail closed, counted as result log_refused: the log refuses entries, its disk full or
stalled); its `tls_termination` entry, with the same `connection` id, gives its result.
set_policy() keeps the listeners of unchanged entries (same workload, ports, addresses and
certificate bytes), closes those of removed or changed ones (ending their connections) and opens
the new ones. Not here:
certificate issuance, the store itself (custody/store.py), outbound client certificates (the
proxy loads those).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import socket
import ssl
from dataclasses import dataclass, field
from secrets import token_hex

from skyguard.conncap import source_of
from skyguard.credproxy.ca import new_server_context
from skyguard.credproxy.fairness import Slots
from skyguard.credproxy.interfaces import CredentialMetrics, DecisionLog, SecretSource
from skyguard.credproxy.sockets import original_destination, start_servers
from skyguard.custody.pemload import load_cert_chain_from_memory, split_pem
from skyguard.errors import CredentialError, LogError
from skyguard.keys.tlskey import certificate_of, install_key
from skyguard.keys.types import KeyCustodyError
from skyguard.parts import entries_durable, record_or_report
from skyguard.policy.model import Policy, TlsTermination
from skyguard.timeouts import within

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0  # seconds for the client's TLS handshake
CONNECT_TIMEOUT = 5.0  # seconds to reach the VM's plaintext port
IDLE_TIMEOUT = 300.0  # seconds without a byte in either direction before both sides close
CHUNK = 65536
# Open connections per client source (an IPv4 address, an IPv6 /64: conncap.source_of), across
# all terminated services: each costs two sockets in the daemon, whose descriptors the credential
# proxy and DNS share, so one client must not be able to take them all (nor, from the addresses
# of its /64, a share per address).
MAX_CONNECTIONS_PER_CLIENT = 256
SNI_ATTRIBUTE = "skyguard_sni"  # where _keep_sni leaves a handshake's server name on its ssl.SSLObject
MAX_SNI_CHARS = 253  # a DNS name's length: the rest of a longer one is not logged
# Where the listeners listen (one port for all): steering redirects both families of a terminated
# workload's addresses to it, so an IPv4-only listener would reset every IPv6 client.
LISTEN = ["0.0.0.0", "::"]


@dataclass(frozen=True)
class TerminationListener:
    termination: TlsTermination
    zone: str
    vm_addresses: tuple[str, ...]
    listen_port: int


@dataclass
class _Running:
    listener: TerminationListener
    servers: list
    tasks: set = field(default_factory=set)


class TlsTerminator:
    """One listener per tls_termination entry of the policy. Use on the event loop."""

    def __init__(self, policy: Policy, secrets: SecretSource, *, decision_log: DecisionLog,
                 metrics: CredentialMetrics, idle_timeout: float = IDLE_TIMEOUT,
                 max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT,
                 listen: str | list[str] = LISTEN):
        self.policy = policy
        self.clients = Slots(max_connections_per_client)
        self.secrets = secrets
        self.decision_log = decision_log
        self.metrics = metrics
        self.idle_timeout = idle_timeout
        self.listeners: list[TerminationListener] = []
        self._host = listen if isinstance(listen, str) else list(listen)  # where set_policy() listens
        self._running: dict[tuple, _Running] = {}  # plan key -> what runs for it

    def __repr__(self) -> str:
        return f"TlsTerminator({[t.workload for t in self.policy.tls_termination]})"

    def _context(self, termination: TlsTermination, keys=None) -> tuple[ssl.SSLContext, str]:
        """The server context for one entry (keeping each handshake's SNI: _keep_sni), and a digest
        of its certificate bundle."""
        context, digest = self._context_of(termination, keys)
        context.sni_callback = _keep_sni
        return context, digest

    def _context_of(self, termination: TlsTermination, keys=None) -> tuple[ssl.SSLContext, str]:
        if keys is not None and certificate_of(self.secrets, termination.certificate) is not None:
            # A key in the policy's key backend (a token): it never leaves it (skyguard/keys/tlskey.py).
            context = new_server_context()
            try:
                chain = install_key(context, self.secrets, termination.certificate, keys)
            except KeyCustodyError as error:
                raise CredentialError(f"tls_termination {termination.workload}:{termination.port}: {error}") from None
            return context, hashlib.sha256(chain).hexdigest()
        try:
            bundle = bytes(self.secrets.get(termination.certificate))
        except CredentialError as error:  # the store's own words: missing, damaged, or shut (its key)
            raise CredentialError(f"certificate {termination.certificate!r} for {termination.workload}:"
                                  f"{termination.port}: {error}") from None
        except Exception:
            raise CredentialError(
                f"certificate {termination.certificate!r} for {termination.workload}:{termination.port} "
                f"is not in the store; add the PEM (certificate then key) with "
                f"`skyguard secret set {termination.certificate}`"
            ) from None
        certificate, key = split_pem(bundle)
        context = new_server_context()
        load_cert_chain_from_memory(context, certificate, key)
        return context, hashlib.sha256(bundle).hexdigest()

    def _plan(self, policy: Policy) -> tuple[list, list[str]]:
        """(key, termination, zone, addresses, context) per entry that can run, and the
        problems of those that cannot. Reads the store: call off the loop."""
        plans, problems = [], []
        for termination in policy.tls_termination:
            workload = policy.workload(termination.workload)
            if workload is None:
                problems.append(f"tls_termination names unknown workload {termination.workload!r}")
                continue
            if termination.forward_to == termination.port:
                # skyguard's own plaintext connection to the VM would be steered back to itself.
                problems.append(
                    f"tls_termination for {termination.workload}: forward_to ({termination.forward_to}) "
                    f"must differ from port ({termination.port}); let the VM serve plaintext on another port")
                continue
            try:
                context, digest = self._context(termination, policy.keys)
            except CredentialError as error:
                problems.append(str(error))
                continue
            addresses = tuple(str(a) for a in workload.addresses)
            plans.append(((termination, workload.zone, addresses, digest), termination, workload.zone, addresses, context))
        return plans, problems

    async def start(self, host: str | list[str] | None = None) -> list[TerminationListener]:
        """Listen (on `host`, else where the constructor said) for every entry that can run; raises
        CredentialError naming those that cannot (the others run)."""
        if host is not None:
            self._host = host
        return await self.set_policy(self.policy)

    async def set_policy(self, policy: Policy) -> list[TerminationListener]:
        """Run exactly the entries of `policy` (see the module note); returns the listeners.
        Raises CredentialError naming the entries that cannot run, after the rest is in place."""
        plans, problems = await asyncio.to_thread(self._plan, policy)
        self.policy = policy
        wanted = {plan[0] for plan in plans}
        for key in [k for k in self._running if k not in wanted]:
            await self._close(self._running.pop(key))
        for key, termination, zone, addresses, context in plans:
            if key in self._running:
                continue
            running = _Running(None, [])
            try:
                servers, port = await start_servers(
                    lambda r, w, t=termination, z=zone, a=addresses, run=running: self._accept(r, w, t, z, a, run),
                    self._host, 0, ssl=context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                )
            except OSError as error:
                problems.append(f"cannot listen for tls_termination {termination.workload}:{termination.port}: "
                                f"{error.strerror}")
                continue
            running.servers = servers
            running.listener = TerminationListener(termination, zone, addresses, port)
            self._running[key] = running
        self.listeners = [self._running[plan[0]].listener for plan in plans if plan[0] in self._running]
        if problems:
            raise CredentialError("; ".join(problems))
        return self.listeners

    async def stop(self) -> None:
        for running in list(self._running.values()):
            await self._close(running)
        self._running, self.listeners = {}, []

    @staticmethod
    async def _close(running: _Running) -> None:
        for server in running.servers:
            server.close()
        for task in list(running.tasks):
            task.cancel()
        await asyncio.gather(*running.tasks, return_exceptions=True)

    async def _accept(self, reader, writer, termination: TlsTermination, zone: str, addresses: tuple[str, ...],
                      running: _Running):
        task = asyncio.current_task()
        peer = writer.get_extra_info("peername")
        client = source_of(peer[0]) if peer else None  # what its share is counted against
        if not self.clients.acquire(client):
            writer.transport.abort()  # over this client's share: no log entry per refused connection
            self.metrics.terminations.labels(termination.workload, "refused_over_share").inc()
            return
        running.tasks.add(task)
        result = "terminated"
        tls = writer.get_extra_info("ssl_object")
        who = dict(connection=token_hex(8), credential=termination.certificate, zone=zone,
                   workload=termination.workload, destination=f"{termination.workload}:{termination.port}",
                   forward_to=termination.forward_to, client=peer[0] if peer else None)
        try:
            try:  # nothing reaches the VM before the connection is on record (durable)
                await entries_durable([self.decision_log.record(
                    "tls_termination_start", **who, client_port=peer[1] if peer else None,
                    sni=getattr(tls, SNI_ATTRIBUTE, None), tls_version=tls.version() if tls else None)], self.decision_log)
            except (LogError, OSError) as error:  # the signed log refuses (or the fallback log cannot write)
                result = "log_refused"
                log.error("a TLS connection from %s to %s:%s is refused: its entry cannot be logged: %s",
                          who["client"], termination.workload, termination.port, error)
                return
            target = _pick_address(writer.get_extra_info("socket"), addresses)
            try:
                vm_reader, vm_writer = await within(
                    asyncio.open_connection(target, termination.forward_to), CONNECT_TIMEOUT)
            except (TimeoutError, OSError):
                result = "vm_unreachable"
                return
            try:
                await _splice(reader, writer, vm_reader, vm_writer, self.idle_timeout)
            finally:
                vm_writer.close()
        except asyncio.CancelledError:
            result = "ended"  # its entry left the policy, or skyguard is stopping
            raise
        except Exception:
            result = "failed"
            log.exception("TLS termination connection failed")
        finally:
            running.tasks.discard(task)
            self.clients.release(client)
            writer.close()
            self.metrics.terminations.labels(termination.workload, result).inc()
            if result != "log_refused":  # the end of a connection on record: best effort (said when refused)
                record_or_report(self.decision_log, log, "tls_termination", **who, result=result)


def _keep_sni(tls: ssl.SSLObject, server_name: str | None, _context: ssl.SSLContext) -> None:
    """The name the client asked for (SNI), kept on its TLS object for the connection's entry:
    OpenSSL's own reading of the ClientHello, at most MAX_SNI_CHARS of it. Any name is served (the
    entry's certificate is the one there is); None without SNI."""
    setattr(tls, SNI_ATTRIBUTE, server_name[:MAX_SNI_CHARS] if server_name else None)


def _pick_address(sock: socket.socket, addresses: tuple[str, ...]) -> str:
    """The VM address the client meant (SO_ORIGINAL_DST), else the VM's first address of the
    listener's family."""
    original = original_destination(sock) if sock is not None else None
    if original and original[0] in addresses:
        return original[0]
    family = 4 if sock is None or sock.family == socket.AF_INET else 6
    same = [a for a in addresses if ipaddress.ip_address(a).version == family]
    return (same or list(addresses))[0]


async def _splice(client_reader, client_writer, vm_reader, vm_writer, idle_timeout: float) -> None:
    async def pump(reader, writer):
        try:
            while True:
                data = await within(reader.read(CHUNK), idle_timeout)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (TimeoutError, OSError, ssl.SSLError):
            pass
        finally:
            try:
                if writer.can_write_eof():
                    writer.write_eof()
                else:
                    writer.close()
            except (OSError, RuntimeError):
                pass

    await asyncio.gather(pump(client_reader, vm_writer), pump(vm_reader, client_writer))
