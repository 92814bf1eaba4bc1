"""The skyguard daemon: the one place that wires the parts together, starts them in order and
shuts them down in reverse order.

Fail closed: the eBPF programs and their pinned maps outlive this process. If it dies, the last
policy keeps being enforced; the next `skyguard up` re-opens the pinned maps and replaces the
programs in place (no window). Only `skyguard down` detaches.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import threading
import time
from pathlib import Path

from skyguard import config
from skyguard.control import ControlServer
from skyguard.datapath import guard
from skyguard.errors import BadInput
from skyguard.metrics.views import flows_handler, workload_names

log = logging.getLogger("skyguard.daemon")

WATCHDOG_PERIOD_S = 1.0  # how stale "programs attached to every workload interface" may get
DNS_PROXY_PORT = 5353  # where steered VM queries land in the host namespace


def _host_addresses() -> list[str]:
    """This namespace's own addresses (not loopback): the datapath's `host` identity."""
    import ipaddress

    from skyguard.dns.server import local_addresses

    return [a for a in local_addresses() if not ipaddress.ip_address(a).is_loopback]


def _canonical(value):
    """Log entries are canonical JSON without floats: floats become fixed-point strings."""
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


class Daemon:
    def __init__(self, policy_path: Path, state_dir: Path | None = None, metrics_addr: str | None = None,
                 upstream_ca: str | None = None):
        self.policy_path = Path(policy_path)
        self.upstream_ca = upstream_ca  # CA bundle for the credential proxy's upstream TLS (default: system)
        self.state_dir = Path(state_dir or config.STATE_DIR)
        self.metrics_addr = metrics_addr
        self.stop_event = threading.Event()
        self.detach_on_exit = False
        self.started_at = time.time()
        self.policy = None
        self.policy_text = ""
        self.datapath = None
        self.control = None
        self.tlog = None
        self.flowlog = None
        self._lock = threading.RLock()  # policy swaps, attach and the watchdog serialise here
        self._threads: list[threading.Thread] = []
        self._known: set[str] = set()  # interfaces this daemon has attached to
        self.loop = None
        self.dns = None
        self.credentials = None
        self.admin = None
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()  # every part's metrics; the exporter serves it
        self.tamper_events = 0
        self.metrics = None  # the Prometheus exporter (skyguard.metrics), when --metrics is on

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        from skyguard.datapath.datapath import Datapath
        from skyguard.policy.parse import parse_policy

        try:
            text = self.policy_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"cannot read policy {self.policy_path}: {e}") from None
        policy = parse_policy(text, source=str(self.policy_path))  # bad policy: nothing changes
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self._open_log()
        self.record("daemon_start", pid=os.getpid(), version=_version())
        self.datapath = Datapath(pin_dir=config.PIN_DIR)
        self._remember_saved_dns_answers()
        # Order matters: maps first; then the DNS proxy (re-learns saved answers into the maps,
        # installs the steering); only then are programs attached to VM interfaces.
        self.datapath.apply_policy(policy, host_addresses=_host_addresses())
        self.policy, self.policy_text = policy, text
        guard.install([w.interface for w in policy.workloads()])  # unattached interfaces stay dark
        self._start_async_parts(policy)
        self.record("policy_load", name=policy.name, sha256=policy.sha256, source=str(policy.source))
        self._start_flowlog()  # before attaching: the first flows on new interfaces are logged too
        self._reconcile()
        self.control = ControlServer(self._handlers())
        self.control.start()
        self._start_metrics()
        self._spawn(self._watch_netlink, "sg-netlink")
        self._spawn(self._watchdog, "sg-watchdog")
        log.info("skyguard up: policy %s (%s), %d interfaces attached", policy.name,
                 policy.sha256[:12], len(self.datapath.attached()))

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        self.start()
        try:
            while not self.stop_event.wait(0.5):
                pass
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.stop_event.set()
        if self.control:
            self.control.stop()
        self._stop_async_parts()
        if self.metrics:
            self.metrics.stop()
        for t in self._threads:
            t.join(timeout=5)
        if self.flowlog:
            self._safely(self.flowlog.stop)
        if self.datapath:
            if self.detach_on_exit:
                guard.remove()
                for ifname in self.datapath.detach_all():
                    self.record("detach", interface=ifname, why="skyguard down")
                self.datapath.close()
                self.datapath.remove_pins(self.datapath.pin_dir)
            else:
                self.datapath.close()
        self.record("daemon_stop", pid=os.getpid(), detached=self.detach_on_exit)
        if self.tlog:
            self.tlog.close()  # writes the final checkpoint

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # ---- the signed log --------------------------------------------------------------------

    def _open_log(self) -> None:
        from skyguard.tlog import LogWriter, host_signer

        self.tlog = LogWriter(self.state_dir / "log", host_signer(self.state_dir))

    def record_nowait(self, kind: str, /, **fields) -> None:
        """Queue one entry for the next group commit without waiting (hot paths: DNS answers
        must not wait for an fsync). A log failure is still raised by the writer to later calls."""
        from skyguard.tlog import entry

        if self.tlog is not None:
            self.tlog.submit([entry(kind, **_canonical(fields))])

    def record(self, kind: str, /, **fields) -> None:
        """Append one entry and wait until it is durable (decisions are acknowledged only then)."""
        from skyguard.tlog import entry

        if self.tlog is not None:
            self.tlog.append(entry(kind, **_canonical(fields)))

    # ---- parts that run on the asyncio loop (DNS proxy) --------------------------------------

    def _start_async_parts(self, policy) -> None:
        from skyguard.dns.service import DnsProxy, new_event_loop

        self.loop = new_event_loop()
        self._spawn(self.loop.run_forever, "sg-asyncio")
        daemon = self

        class _DnsLog:  # the DNS proxy's DecisionLog: every decision into the signed log
            @staticmethod
            def record(entry: dict) -> None:
                fields = dict(entry)
                fields.pop("kind", None)  # the log entry's own type says it
                fields["qtype"] = fields.pop("type", None)  # `type` names the log entry's kind
                daemon.record_nowait("dns", **fields)

        self.dns = DnsProxy(policy, learner=self.datapath, log=_DnsLog(), registry=self.registry,
                            state_dir=self.state_dir, port=DNS_PROXY_PORT)
        self._on_loop(self.dns.start())
        log.info("DNS proxy on port %d; VM queries to any address on port 53 are steered to it", DNS_PROXY_PORT)
        self._start_credentials(policy)
        self._start_admin(policy)

    def _start_admin(self, policy) -> None:
        """The SSH access proxy, when the policy has admin.ssh: the one way operators reach a VM's
        sshd (the datapath lets only this host's addresses in to tcp/22, and only for zones some
        operator may access). Sessions go to the signed log."""
        if policy.admin_ssh is None:
            return
        from skyguard.admin.proxy import AdminSshProxy
        from skyguard.custody.store import SecretStore

        daemon = self

        class _AdminLog:
            @staticmethod
            def record(entry: dict) -> None:
                fields = dict(entry)
                daemon.record_nowait(str(fields.pop("type", "admin_session")), **fields)

        self.admin = AdminSshProxy(policy, SecretStore(self.state_dir / "secrets"), self.state_dir,
                                   _AdminLog(), registry=self.registry)
        host, port = self._on_loop(self.admin.start())
        log.info("SSH access proxy listening on %s:%s", host, port)

    def _start_credentials(self, policy) -> None:
        """The credential-swap proxy and TLS termination. If they cannot start (a secret or key
        missing from the store), the daemon runs on without them, says so loudly, and logs it:
        traffic that needs them is not steered and so stays under the datapath's default deny."""
        if not policy.credentials and not policy.tls_termination:
            return
        from skyguard.credproxy.service import CredentialService
        from skyguard.custody.store import SecretStore
        from skyguard.errors import SkyguardError

        daemon = self

        class _CredLog:  # the credential proxy's DecisionLog: swaps, blocks, terminations
            @staticmethod
            def record(entry: dict) -> None:
                fields = dict(entry)
                kind = fields.pop("event", "credential")
                daemon.record_nowait(kind, **fields)

        service = CredentialService(policy, SecretStore(self.state_dir / "secrets"), state_dir=self.state_dir,
                                    decision_log=_CredLog(), registry=self.registry,
                                    address_matches=self._dns_learned, upstream_ca_file=self.upstream_ca)
        try:
            self._on_loop(service.start())
        except SkyguardError as e:
            log.error("credential proxy and TLS termination NOT running: %s", e)
            self.record("part_failed", part="credentials", error=str(e))
            return
        self.credentials = service
        log.info("credential proxy running for %d credentials", len(policy.credentials))

    def _dns_learned(self, name: str, address: str) -> bool:
        """Did DNS answer `address` for `name` to a VM (and has it not expired)? The credential
        proxy swaps only toward such an address."""
        from skyguard.dns.names import normalise

        return self.dns.store.answered(normalise(name), address, time.time())

    def _remember_saved_dns_answers(self) -> None:
        from skyguard.dns.learned import FILE_NAME, LearnedStore

        class _Remember:  # a Learner that only fills the datapath's memory (see Datapath.remember)
            learn = staticmethod(self.datapath.remember)

        saved = LearnedStore(self.state_dir / FILE_NAME)
        saved.load()
        saved.relearn(_Remember(), time.time())

    def _stop_async_parts(self) -> None:
        if self.loop is None:
            return
        if self.admin is not None:
            self._safely(lambda: self._on_loop(self.admin.close()))
        if self.credentials is not None:
            self._safely(lambda: self._on_loop(self.credentials.stop()))
        if self.dns is not None:
            # Steering stays unless skyguard goes down for good: VM queries then go unanswered
            # (fail closed) instead of reaching another resolver.
            self._safely(lambda: self._on_loop(self.dns.stop(remove_steering=self.detach_on_exit)))
        self.loop.call_soon_threadsafe(self.loop.stop)

    def _on_loop(self, coro, timeout: float = 30.0):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _start_flowlog(self) -> None:
        from skyguard.datapath.flowlog import FlowLogger

        self.flowlog = FlowLogger(self.datapath, self.tlog).start()

    # ---- policy and interfaces -------------------------------------------------------------

    def _apply(self, policy, text: str) -> None:
        """Hot swap: the datapath's atomic generation flip, then the DNS proxy's rules."""
        with self._lock:
            self.datapath.apply_policy(policy, host_addresses=_host_addresses())
            guard.install([w.interface for w in policy.workloads()])
            self.dns.set_policy(policy)
            if self.admin is not None and policy.admin_ssh is not None:
                self.admin.update_policy(policy)  # revokes sessions the new policy no longer allows
            self.policy, self.policy_text = policy, text
            self.record("policy_load", name=policy.name, sha256=policy.sha256, source=str(policy.source))
            self._reconcile()

    def _reconcile(self) -> None:
        """Attach to every workload interface that exists and does not carry our programs; forget
        interfaces that went away. Our programs found missing or replaced on an interface we had
        already attached are a tamper event."""
        with self._lock:
            for ifname, problem in sorted(self.datapath.verify().items()):
                info = self.datapath.attach(ifname)
                guard.mark_attached(ifname)
                if ifname not in self._known:
                    self.record("attach", interface=ifname, programs=_prog_summary(info))
                    log.info("attached to %s", ifname)
                else:
                    self.record("tamper", interface=ifname, problem=problem, action="reattached",
                                programs=_prog_summary(info))
                    self.tamper_events += 1
                    log.warning("tamper on %s: %s; re-attached", ifname, problem)
                self._known.add(ifname)
            present = {name for _, name in socket.if_nameindex()}
            for ifname in sorted(self._known - present):
                self._known.discard(ifname)
                self.record("detach", interface=ifname, why="interface removed")
                log.info("%s went away", ifname)

    def _watch_netlink(self) -> None:
        """New and removed links are noticed within a second through netlink events."""
        from pyroute2 import IPRoute

        ipr = IPRoute()
        ipr.bind()
        try:
            while not self.stop_event.is_set():
                ready, _, _ = select.select([ipr.fileno()], [], [], 0.5)
                if not ready:
                    continue
                messages = ipr.get()
                if any(m.get("event") in ("RTM_NEWLINK", "RTM_DELLINK") for m in messages):
                    self._safely(self._reconcile)
        finally:
            ipr.close()

    def _watchdog(self) -> None:
        while not self.stop_event.wait(WATCHDOG_PERIOD_S):
            self._safely(self._reconcile)
            self._safely(self.datapath.expire_learned)  # expired DNS answers stop opening new flows

    def _safely(self, fn) -> None:
        try:
            fn()
        except Exception:  # a watcher must keep watching; the error is logged for the operator
            log.exception("%s failed", getattr(fn, "__name__", fn))

    # ---- metrics (from the metrics branch) -------------------------------------------------

    def _start_metrics(self) -> None:
        """Serve Prometheus text on --metrics; the collectors read the datapath, the policy and the
        signed log at scrape time (no polling loop)."""
        if not self.metrics_addr:
            return
        from skyguard.metrics import MetricsExporter, daemon_sources

        self.metrics = MetricsExporter(self.registry, daemon_sources(self), self.metrics_addr).start()

    # ---- control operations ----------------------------------------------------------------

    def _handlers(self):
        return {
            "status": lambda args: self.status(),
            "policy.load": self._op_policy_load,
            "policy.get": lambda args: {"text": self.policy_text, "source": str(self.policy.source),
                                        "sha256": self.policy.sha256},
            "down": self._op_down,
            "conntrack": lambda args: {"flows": self.datapath.flows()},
            "flows": self._op_flows,
            "attest": self._op_attest,
            # skyguard top: active conntrack flows named by workload, bounded (skyguard/metrics/views.py)
            "flows.active": flows_handler(self),
        }

    def _op_policy_load(self, args: dict) -> dict:
        from skyguard.policy.parse import parse_policy

        text, source = args.get("text"), args.get("source", "<control>")
        if not isinstance(text, str):
            raise BadInput("policy.load needs the policy text")
        policy = parse_policy(text, source=source)  # any error: nothing changes
        old = self.policy
        self._apply(policy, text)
        return {"name": policy.name, "sha256": policy.sha256, "previous": old.sha256 if old else None}

    def _op_flows(self, args: dict) -> dict:
        from skyguard.datapath.flowlog import query_args

        query, sync = query_args(args)
        if query["zone"] is not None and query["zone"] not in self.policy.zones:
            raise BadInput(f"no zone {query['zone']!r} in policy {self.policy.name!r}; its zones are "
                           f"{', '.join(sorted(self.policy.zones))}")
        if sync:
            self.flowlog.sync()
        return self.flowlog.recent(**query)

    def _op_attest(self, args: dict) -> dict:
        from skyguard import attest

        with self._lock:
            return attest.attest(self.datapath, self.policy, self.tlog, nonce=args.get("nonce"))

    def _op_down(self, args: dict) -> dict:
        self.detach_on_exit = True
        self.stop_event.set()
        return {"stopping": True}

    def status(self) -> dict:
        with self._lock:
            return {
                "pid": os.getpid(),
                "uptime_s": int(time.time() - self.started_at),
                "policy": {"name": self.policy.name, "sha256": self.policy.sha256, "source": str(self.policy.source)},
                "interfaces": self.datapath.attached(),
                "tamper_events": self.tamper_events,
                "workloads": workload_names(self.policy),
                "maps": self.datapath.occupancy(),
                "counters": self.datapath.counters(),
                "log": self.tlog.head() if self.tlog else None,
                "flowlog": self.flowlog.stats() if self.flowlog else None,
            }


def _prog_summary(info: dict) -> dict:
    """hook -> "name id tag", the part of an attachment worth logging."""
    return {hook: f"{p.get('name')} id={p.get('id')} tag={p.get('tag')}" for hook, p in info.items()}


def _version() -> str:
    from skyguard import __version__

    return __version__
