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
from typing import TYPE_CHECKING

from skyguard import __version__, config, fsutil
from skyguard.control import ControlServer, let_go
from skyguard.daemon_apply import apply_policy, part_states
from skyguard.datapath import guard
from skyguard.errors import BadInput, SkyguardError
from skyguard.keys.record import control_handler as key_record_handler
from skyguard.metrics.views import flows_handler, workload_names
from skyguard.parts import PartLog, make_part, raise_open_file_limit, stop_logged, stop_part
from skyguard.storenames import secrets_status
from skyguard.tlog.entries import entry, without_floats

if TYPE_CHECKING:  # the parts are imported where they start (a daemon without them never loads them)
    from concurrent.futures import Future

    from skyguard.datapath.datapath import Datapath
    from skyguard.datapath.flowlog import FlowLogger
    from skyguard.metrics.exporter import MetricsExporter
    from skyguard.parts import LoopThread
    from skyguard.policy.model import Policy
    from skyguard.tlog import LogWriter
    from skyguard.tpm.hook import DaemonTpm

log = logging.getLogger("skyguard.daemon")

WATCHDOG_PERIOD_S = 1.0  # how stale "programs attached to every workload interface" may get
DNS_PROXY_PORT = 5353  # where steered VM queries land in the host namespace


def _host_addresses() -> list[str]:
    """This namespace's own addresses (not loopback): the datapath's `host` identity."""
    import ipaddress

    from skyguard.dns.server import local_addresses

    return [a for a in local_addresses() if not ipaddress.ip_address(a).is_loopback]


class Daemon:
    def __init__(self, policy_path: Path, state_dir: Path | None = None, metrics_addr: str | None = None,
                 upstream_ca: str | None = None, fleet: dict | None = None):
        self.policy_path = Path(policy_path)
        self.fleet = fleet  # {"etcd", "name", "admin_keys", "trust_first_use"} (skyguard/fleet/daemon_hook.py), or None
        self.upstream_ca = upstream_ca  # CA bundle for the credential proxy's upstream TLS (default: system)
        self.state_dir = Path(state_dir or config.STATE_DIR)
        self.metrics_addr = metrics_addr
        self.stop_event = threading.Event()
        self.detach_on_exit = False
        self.started_at = time.time()
        self.policy: Policy | None = None
        self.policy_text = ""
        self.datapath: Datapath | None = None
        self.control: ControlServer | None = None
        self.tlog: LogWriter | None = None
        self.flowlog: FlowLogger | None = None
        self._lock = threading.RLock()  # policy swaps, attach and the watchdog serialise here
        self._threads: list[threading.Thread] = []
        self._known: set[str] = set()  # interfaces this daemon has attached to
        self.loop = None
        self.loop_thread: LoopThread | None = None
        self.slots: list = []  # skyguard.parts.PartSlot, in start order
        self.parts_applying = None  # the last hot swap's reconcile of the parts, and the slot it is at:
        self.parts_busy = ""  # a load waits for them up to a bound, then they go on (skyguard/daemon_apply.py)
        self.session_archive = None  # the SSH and console proxies' one SessionArchive (_sessions())
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()  # every part's metrics; the exporter serves it
        self.tamper_events = 0
        self.metrics: MetricsExporter | None = None  # the Prometheus exporter (skyguard.metrics), when --metrics is on
        self.tpm: DaemonTpm | None = None  # skyguard.tpm.hook.DaemonTpm: measured launch and continuous attestation

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        from skyguard.control import claim_pin_dir, claim_run_dir
        from skyguard.datapath.datapath import Datapath
        from skyguard.policy.parse import parse_policy, read_policy_file

        self._locks = claim_run_dir(), claim_pin_dir(config.PIN_DIR)  # before anything: one daemon per run and pin dir
        # Read as validate and policy load read it, so the hash everywhere is the file's bytes'.
        data = read_policy_file(self.policy_path)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadInput(f"cannot read policy {self.policy_path}: {e}") from None
        source = str(self.policy_path)
        if self.fleet:  # a fleet host restarts on its last signed fleet policy, never an older file
            from skyguard.fleet.daemon_hook import kept_fleet_policy

            text, source = kept_fleet_policy(self.state_dir, self.fleet["admin_keys"]) or (text, source)
        policy = parse_policy(text, source=source)  # bad policy: nothing changes
        raise_open_file_limit()
        self._open_log()
        self.record("daemon_start", pid=os.getpid(), version=__version__)
        self._open_tpm()
        self.datapath = Datapath(pin_dir=config.PIN_DIR)
        self.tpm.measure_programs(self.datapath.program_infos())
        self._remember_saved_dns_answers(policy)
        # Order matters: maps first; then the DNS proxy (re-learns saved answers into the maps,
        # installs the steering); only then are programs attached to VM interfaces.
        self.datapath.apply_policy(policy, host_addresses=_host_addresses())
        self.policy, self.policy_text = policy, text
        guard.install([w.interface for w in policy.workloads()])  # unattached interfaces stay dark
        self.tpm.measure_policy(policy.name, policy.sha256)  # before the parts: the monitor quotes it
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
        try:
            self.start()
        except BaseException:  # the run and pin dirs let go now: a start that gave up on the log's disk
            let_go(getattr(self, "_locks", ()))  # may hold the process until it answers (tlog/opening.py)
            raise
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
                    self._record_at_stop("detach", interface=ifname, why="skyguard down")
                self.datapath.close()
                self.datapath.remove_pins(self.datapath.pin_dir)
            else:
                self.datapath.close()
        self._record_at_stop("daemon_stop", pid=os.getpid(), detached=self.detach_on_exit)
        if self.tlog:  # the final checkpoint; a writer stalled on its disk is left (tlog/store.py close)
            self._safely(self.tlog.close)
        let_go(getattr(self, "_locks", ()))  # now, not at exit: a stalled disk may hold the process (control.let_go)

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # ---- the TPM (skyguard/tpm/hook.py) ------------------------------------------------------

    def _open_tpm(self) -> None:
        """Measured launch. Never raises: without a TPM every measurement is a no-op; a TPM that
        fails is logged, recorded and reported by status and doctor (quotes then fail closed)."""
        from skyguard.tpm.hook import DaemonTpm

        self.tpm = DaemonTpm(self.state_dir, record=self.record)
        self.tpm.measure_launch(self.tlog.signer.verifier.vkey())

    # ---- the signed log --------------------------------------------------------------------

    def _open_log(self) -> None:
        """Within the log's stall bound: a disk that does not answer fails the start (tlog/opening.py)."""
        from skyguard.tlog import LogWriter, host_signer
        from skyguard.tlog.opening import open_log

        directory = self.state_dir / "log"
        self.tlog = open_log(directory, lambda: LogWriter(directory, host_signer(fsutil.private_dir(self.state_dir))))

    def record_nowait(self, kind: str, /, **fields) -> Future | None:
        """Queue one entry for the next group commit without waiting (DNS answers must not wait for an
        fsync); returns its Future, which fails if the writer refuses it after all. A failed log raises here."""
        return self.tlog.submit([entry(kind, **without_floats(fields))]) if self.tlog is not None else None

    def record(self, kind: str, /, **fields) -> None:
        """Append one entry and wait until it is durable (decisions are acknowledged only then);
        LogStalled once the log's disk has not answered for a bound (tlog/intake.py)."""
        if self.tlog is not None:
            self.tlog.append(entry(kind, **without_floats(fields)))

    def _record_at_stop(self, kind: str, /, **fields) -> None:
        """While stopping, best effort: a log that refuses (a stalled or full disk) must not stop `down`."""
        try:
            self.record(kind, **fields)
        except SkyguardError as e:
            what = f"{kind} of {fields['interface']}" if "interface" in fields else kind
            log.error("%s was not written to the signed log: %s", what, e)

    # ---- parts that run on the asyncio loop (skyguard/parts.py) ------------------------------

    def _slots(self) -> list:
        """Every kind of part this daemon may host, in start order (stopped in reverse)."""
        from skyguard.parts import PartRegistry, PartSlot

        def slot(name, wanted, make):
            metrics = PartRegistry(self.registry)
            return PartSlot(name, wanted, lambda policy: make(policy, metrics.fresh()))

        slots = [slot("dns", lambda policy: True, self._make_dns),
                 slot("credentials", lambda policy: bool(policy.credentials or policy.tls_termination
                                                         or policy.content.zones_for("http")),
                      self._make_credentials),
                 slot("admin", lambda policy: policy.admin_ssh is not None, self._make_admin),
                 slot("console", lambda policy: policy.admin_console is not None, self._make_console),
                 slot("apps", lambda policy: bool(policy.apps), self._make_apps)]
        slots.append(slot("keys", lambda policy: policy.keys is not None and bool(policy.keys.grants),
                          self._make_keys))
        if self.tpm is not None and self.tpm.wants_monitor():  # a TPM with an attestation key
            slots.append(slot("attestation", lambda policy: True, lambda policy, registry: self.tpm.monitor(registry)))
        if self.fleet:
            slots.append(slot("fleet", lambda policy: True, self._make_fleet))
        return slots

    def _make_dns(self, policy, registry):
        from skyguard.dns.service import DnsProxy

        return DnsProxy(policy, learner=self.datapath, log=PartLog(self.record_nowait), registry=registry,
                        state_dir=self.state_dir, port=DNS_PROXY_PORT)

    def _make_credentials(self, policy, registry):
        """The credential-swap proxy and TLS termination."""
        from skyguard.credproxy.service import CredentialService
        from skyguard.custody.store import SecretStore

        # credentials[].client_certificate: the service takes them from each policy it is given.
        return CredentialService(policy, SecretStore(self.state_dir / "secrets"), state_dir=self.state_dir,
                                 decision_log=PartLog(self.record_nowait), registry=registry,
                                 address_matches=self._dns_learned, upstream_ca_file=self._upstream_ca())

    def _make_admin(self, policy, registry):
        """The SSH access proxy: the one way operators reach a VM's sshd (the datapath lets only
        this host's addresses in to tcp/22, and only for zones some operator may access)."""
        from skyguard.admin.proxy import AdminSshProxy
        from skyguard.custody.store import SecretStore

        return AdminSshProxy(policy, SecretStore(self.state_dir / "secrets"), self.state_dir,
                             PartLog(self.record_nowait), registry=registry, archive=self._sessions())

    def _sessions(self):
        """One archive of recorded sessions for the SSH and console proxies, made once per daemon:
        with one each, either one's start took the other's live sessions for a dead proxy's and
        closed them "interrupted" (recovery runs once, at the first of their starts)."""
        from skyguard.admin.recording import SessionArchive

        if self.session_archive is None:
            self.session_archive = SessionArchive(self.state_dir / "admin" / "sessions", PartLog(self.record_nowait))
        return self.session_archive

    def _make_console(self, policy, registry):
        """The console proxy (VNC): operators open VM consoles with one-time tickets, recorded."""
        from skyguard.console.proxy import ConsoleProxy
        from skyguard.custody.store import SecretStore

        def identify(host, headers):  # who is signed in: the identity-aware proxy's session, if it runs
            apps = self._part("apps")
            return apps.identify(host, headers) if apps is not None else None

        refusal = lambda: self.tlog.refusal() if self.tlog is not None else None  # noqa: E731 - a login asks first
        return ConsoleProxy(policy, SecretStore(self.state_dir / "secrets"), self.state_dir,
                            PartLog(self.record_nowait, refusal), registry=registry, identify=identify,
                            archive=self._sessions())

    def _make_apps(self, policy, registry):
        """The identity-aware proxy for VM web apps (the datapath keeps each app's port for it)."""
        from skyguard.apps.service import AppsService
        from skyguard.custody.store import SecretStore

        return AppsService(policy, SecretStore(self.state_dir / "secrets"), decision_log=PartLog(self.record_nowait),
                           registry=registry, ca_file=self._upstream_ca())

    def _op_apps(self, args: dict) -> dict:
        from skyguard.apps.service import apps_op

        return apps_op(self, args)

    def _make_keys(self, policy, registry):
        """The crypto proxy: VMs sign, verify and decrypt with keys held in a token (skyguard/keys/)."""
        from skyguard.keys.proxy import CryptoProxy

        return CryptoProxy(policy, self.state_dir, PartLog(self.record_nowait), registry=registry,
                           durable=self.record)  # a signature leaves only once its entry is durable

    def _make_fleet(self, policy, registry):
        """The fleet agent: membership, signed policies applied through _apply, witnessing."""
        from skyguard.fleet.daemon_hook import make_fleet_agent

        return make_fleet_agent(self, registry, **self.fleet)

    def _upstream_ca(self) -> str | None:
        """--upstream-ca, else the CA of the lab whose host namespace this daemon runs in (so the
        lab works as documented without flags), else None: the system's trust store."""
        if self.upstream_ca:
            return self.upstream_ca
        from skyguard.lab.ca import running_lab_ca

        found = running_lab_ca()
        return str(found) if found else None

    @property
    def dns(self):
        return self._part("dns")

    def _part(self, name: str):
        return next((s.part for s in self.slots if s.name == name), None)

    def _start_async_parts(self, policy) -> None:
        from skyguard.parts import LoopThread

        self.loop_thread = LoopThread()
        self.loop = self.loop_thread.loop
        self.slots = self._slots()
        self.loop_thread.call(self._reconcile_parts(policy, starting=True), timeout=120)

    async def _reconcile_parts(self, policy, starting: bool = False) -> dict[str, dict]:
        """Bring every slot in line with `policy`, on the loop: start parts the policy now needs,
        hot-swap the ones it keeps, stop the ones it no longer needs. A part that cannot start or
        take the policy is stopped, logged and reported: traffic that needs it is not steered and
        so stays under the datapath's default deny (fail closed); the other parts go on. A part
        that runs without some of the policy (Degraded) is kept, logged and reported. Returns the
        parts with a problem: {name: {"state": "failed" | "degraded", "problem": why}}."""
        from skyguard.parts import Degraded

        for slot in self.slots:
            part, slot.problem, self.parts_busy = slot.part, "", slot.name
            try:
                if not slot.wanted(policy):
                    if slot.part is not None:
                        part, slot.part = slot.part, None
                        try:  # told first, so what it ends, it ends for the policy's reason
                            await part.set_policy(policy)
                        finally:
                            await stop_part(part)
                        self.record_nowait("part_stopped", part=slot.name, why="the policy no longer needs it")
                    continue
                if slot.part is None:
                    part = await make_part(slot, policy)
                    await part.start()
                    slot.part = part
                    if not starting:
                        self.record_nowait("part_started", part=slot.name)
                    log.info("%s started", slot.name)
                else:
                    await slot.part.set_policy(policy)
            except Degraded as e:  # it runs without some of what the policy asks (that stays off)
                if slot.part is None:
                    slot.part = part
                slot.problem = str(e)
                log.error("%s runs without part of the policy: %s", slot.name, e)
                self.record_nowait("part_degraded", part=slot.name, error=str(e))
            except Exception as e:  # one part's failure must not take the others (or the daemon) down
                slot.problem = str(e) if isinstance(e, SkyguardError) else f"{type(e).__name__}: {e}"
                log.error("%s NOT running: %s", slot.name, slot.problem, exc_info=not isinstance(e, SkyguardError))
                self.record_nowait("part_failed", part=slot.name, error=slot.problem)
                part, slot.part = slot.part, None
                await stop_logged(slot.name, part, log)
        return {slot.name: {"state": slot.state, "problem": slot.problem} for slot in self.slots if slot.problem}

    def _dns_learned(self, name: str, address: str) -> bool:
        """Did DNS answer `address` for `name` to a VM (and has it not expired)? The credential
        proxy swaps only toward such an address."""
        from skyguard.dns.names import normalise

        dns = self.dns
        return dns is not None and dns.store.answered(normalise(name), address, time.time())

    def _remember_saved_dns_answers(self, policy) -> None:
        from skyguard.dns.learned import FILE_NAME, LearnedStore

        class _Remember:  # a Learner that only fills the datapath's memory (see Datapath.remember)
            learn = staticmethod(self.datapath.remember)

        saved = LearnedStore(self.state_dir / FILE_NAME)
        saved.load()
        saved.relearn(_Remember(), time.time(), policy)

    async def _stop_parts(self) -> None:
        for slot in reversed(self.slots):
            part, slot.part = slot.part, None
            await stop_logged(slot.name, part, log)

    def _stop_async_parts(self) -> None:
        if self.loop_thread is None:
            return
        self._safely(lambda: self.loop_thread.call(self._stop_parts()))
        if self.detach_on_exit:
            # VM queries stay steered to the (stopped) proxy unless skyguard goes down for good:
            # unanswered (fail closed) rather than reaching another resolver.
            from skyguard.dns import steering

            self._safely(steering.remove)
        self.loop_thread.stop()

    def _start_flowlog(self) -> None:
        from skyguard.datapath.flowlog import FlowLogger

        self.flowlog = FlowLogger(self.datapath, self.tlog).start()

    # ---- policy and interfaces -------------------------------------------------------------

    def _apply(self, policy, text: str) -> dict:
        """Hot swap: the datapath's atomic generation flip, then every part, on the loop (see
        skyguard/daemon_apply.py). Returns the parts with a problem (see _reconcile_parts)."""
        return apply_policy(self, policy, text, _host_addresses())

    def _reconcile(self) -> None:
        """Attach to every workload interface that exists and does not carry our programs; forget
        interfaces that went away. Our programs found missing or replaced on an interface we had
        already attached are a tamper event."""
        with self._lock:
            for ifname, problem in sorted(self.datapath.verify().items()):
                ifindex, info = self.datapath.attach(ifname)
                guard.mark_attached(ifindex)
                # Known, counted and said before the entries: a log that refuses them (its disk
                # stalled or full) must not hide this tamper, nor make a later one look like a first attach.
                known, programs = ifname in self._known, _prog_summary(info)
                self._known.add(ifname)
                self.tpm.measure_attach(ifname, info)
                if not known:
                    log.info("attached to %s", ifname)
                    self.record("attach", interface=ifname, programs=programs)
                else:
                    self.tamper_events += 1
                    log.warning("tamper on %s: %s; re-attached", ifname, problem)
                    self.record("tamper", interface=ifname, problem=problem, action="reattached", programs=programs)
            present = {name for _, name in socket.if_nameindex()}
            for ifname in sorted(self._known - present):
                self._known.discard(ifname)
                log.info("%s went away", ifname)
                self.record("detach", interface=ifname, why="interface removed")

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
        except SkyguardError as e:  # says what is wrong itself
            log.error("%s failed: %s", getattr(fn, "__qualname__", fn), e)
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
        return {op: self._in_my_state_dir(handler) for op, handler in self._ops().items()}

    def _in_my_state_dir(self, handler):
        """Refuse a request that names another state dir (`--state-dir` of the CLI): its
        answer would describe a daemon the operator did not mean."""
        def checked(args: dict):
            wanted = args.pop("state_dir", None)
            if wanted is not None and os.path.realpath(wanted) != os.path.realpath(self.state_dir):
                raise BadInput(f"the running daemon keeps its state in {self.state_dir}, not {wanted}; "
                               f"give --state-dir {self.state_dir} (or stop it and start one with yours)")
            return handler(args)
        return checked

    def _ops(self):
        from skyguard.fleet.daemon_hook import record_handler as fleet_record_handler

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
            "key.record": key_record_handler(self.record),  # `skyguard key create/rm` (skyguard/keys/record.py)
            "fleet.record": fleet_record_handler(self),  # `skyguard fleet join` (skyguard/fleet/daemon_hook.py)
            "apps": self._op_apps,  # skyguard apps list/sessions/logout/jwks (skyguard/apps/service.py)
        }

    def _op_policy_load(self, args: dict) -> dict:
        from skyguard.policy.parse import parse_policy

        text, source = args.get("text"), args.get("source", "<control>")
        if not isinstance(text, str):
            raise BadInput("policy.load needs the policy text")
        policy = parse_policy(text, source=source)  # any error: nothing changes
        old = self.policy
        problems = self._apply(policy, text)
        return {"name": policy.name, "sha256": policy.sha256, "previous": old.sha256 if old else None,
                "part_problems": problems}

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
        self.stop_event.set()  # pid and log: `down` names this process if it is left waiting on its log's disk
        return {"stopping": True, "pid": os.getpid(), "log": str(self.tlog.directory) if self.tlog else None}

    def status(self) -> dict:
        # Not under self._lock: a policy swap holds it while its parts take the policy (up to
        # config.PARTS_WAIT_S), which is when an operator asks. Each field is read as it is now.
        policy = self.policy
        return {
            "pid": os.getpid(),
            "uptime_s": int(time.time() - self.started_at),
            "policy": {"name": policy.name, "sha256": policy.sha256, "source": str(policy.source)},
            "interfaces": self.datapath.attached(),
            "tamper_events": self.tamper_events,
            "workloads": workload_names(policy),
            "maps": self.datapath.occupancy(),
            "counters": self.datapath.counters(),
            "log": self.tlog.head() if self.tlog else None,
            "flowlog": self.flowlog.stats() if self.flowlog else None,
            "parts": part_states(self),
            "dns": self.dns.status() if self.dns is not None else None,
            "secrets": secrets_status(policy, self.state_dir / "secrets"),
            "tpm": self.tpm.status() if self.tpm else None,
        }


def _prog_summary(info: dict) -> dict:
    """hook -> "name id tag", the part of an attachment worth logging."""
    return {hook: f"{p.get('name')} id={p.get('id')} tag={p.get('tag')}" for hook, p in info.items()}
