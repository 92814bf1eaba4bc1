"""The lab as a Python object: build, inspect, use and tear down the namespaces that stand in for
VMs, the lab `host` and the sealed `internet` (SPEC.md section 5).

    lab = Lab(policy_path="policies/keysystems.yaml", prefix=config.LAB_PREFIX)
    lab.up()                                   # idempotent; cleans leftovers of a killed run
    lab.exec("radius1", ["ping", "-c1", "10.10.2.2"])
    lab.down()                                 # removes everything it made; fine when nothing is up

Topology (routed, no bridge): each VM namespace has `eth0` (the workload's MAC and addresses, /32
and /128) whose peer in the host namespace carries the workload's `interface` name, the gateway
addresses 169.254.1.1 and fe80::1, and /32 and /128 routes back to the VM. The host's only other
link is `lab-uplink` to the internet namespace, which owns the documentation ranges through local
routes and has no default route: the lab cannot reach anything else. Namespaces are driven with
the `ip` command (batch mode) and `nsenter --net=` (never `ip netns exec`, which hides bpffs).

With `up(vms="qemu")` (or `qemu=NAME,...`), workloads boot as real QEMU guests instead: a tap
with the same name, gateway addresses and routes in the host namespace, the workload's MAC and
addresses inside the guest (guests.py, qemu.py); exec() then runs commands through the guest's
agent. Everything else (host, uplink, internet) is the same for both kinds.

This is not skyguard's datapath: it builds the plumbing skyguard attaches to, nothing more.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import skyguard
from skyguard import config
from skyguard.errors import BadInput, LabError, PrivilegeError
from skyguard.lab import addressing as plan
from skyguard.lab import guests, procs
from skyguard.lab.internet import READY_FILE, REQUESTS_LOG
from skyguard.lab.topology import read_workloads
from skyguard.policy.model import Workload

NETNS_DIR = Path("/run/netns")
HOST = "host"
INTERNET = "internet"
SERVER_MODULE = "skyguard.lab.serve"
SERVER_START_TIMEOUT = 20.0  # seconds; the server binds sockets and mints one certificate
_PREFIX = re.compile(r"^[a-z0-9_-]{0,16}$")
STATE_VERSION = 1


def _stderr_progress(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold cyan]lab[/]  {message}")


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): "
                       f"{(proc.stderr or proc.stdout).strip()}")
    return proc


class Lab:
    """One lab, identified by its prefix. Safe to construct without root; acting needs root."""

    def __init__(self, policy_path=None, prefix: str | None = None, lab_dir=None, progress=None):
        self.policy_path = Path(policy_path) if policy_path else config.DEFAULT_POLICY
        self.prefix = config.LAB_PREFIX if prefix is None else prefix
        if not _PREFIX.match(self.prefix):
            raise BadInput(f"lab prefix {self.prefix!r} is not usable: at most 16 lower-case "
                           f"letters, digits, '-' or '_' (set SKYGUARD_LAB_PREFIX accordingly)")
        self.lab_dir = Path(lab_dir) if lab_dir else config.LAB_DIR / (self.prefix or "default")
        self.progress = progress or _stderr_progress
        self.state_file = self.lab_dir / "state.json"
        self.requests_log = self.lab_dir / REQUESTS_LOG
        self.ca_cert = self.lab_dir / "ca" / "ca.pem"
        self.server_log = self.lab_dir / "internet.log"
        self.host_ns = self.prefix + HOST
        self.internet_ns = self.prefix + INTERNET

    # ---- names ---------------------------------------------------------------------------------
    def ns_name(self, name: str) -> str:
        """Namespace of a lab member: a workload name, 'host' or 'internet'."""
        if name in (HOST, INTERNET):
            return self.prefix + name
        state = self._read_state()
        members = {vm["name"] for vm in state.get("vms", [])} if state else set()
        if self._guest(name, state):
            raise BadInput(f"lab member {name!r} is a QEMU guest: it has no namespace "
                           f"(use `lab exec {name} -- CMD`)")
        if not members:
            members = {w.name for w in self._workloads_or_empty()}
        if name not in members:
            known = ", ".join(sorted(members) + [HOST, INTERNET])
            raise BadInput(f"no lab member named {name!r}; choose one of: {known}")
        return self.prefix + name

    def _guest(self, name: str, state: dict | None = None) -> dict | None:
        """The state entry of QEMU guest `name`, or None (a namespace member or no such VM)."""
        state = self._read_state() if state is None else state
        return next((vm for vm in (state or {}).get("vms", [])
                     if vm["name"] == name and guests.is_guest(vm)), None)

    def netns_path(self, name: str) -> Path:
        return NETNS_DIR / self.ns_name(name)

    def _workloads_or_empty(self) -> list[Workload]:
        try:
            return read_workloads(self.policy_path)
        except BadInput:
            return []

    # ---- state ---------------------------------------------------------------------------------
    def _read_state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    def _write_state(self, state: dict) -> None:
        self.lab_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        os.replace(tmp, self.state_file)

    @staticmethod
    def _fingerprint(workloads: list[Workload], qemu_names: Collection[str] = frozenset()) -> str:
        shape = [[w.name, w.zone, w.interface, w.mac, [str(a) for a in w.addresses]]
                 + (["qemu"] if w.name in qemu_names else []) for w in workloads]
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()

    def _server_pid(self, state: dict | None) -> int | None:
        pid = (state or {}).get("server_pid")
        if pid and self._is_our_server(pid):
            return pid
        return None

    def _is_our_server(self, pid: int) -> bool:
        cmd = procs.cmdline(pid)
        return SERVER_MODULE in cmd and str(self.lab_dir) in cmd and procs.alive(pid)

    def _stray_servers(self) -> list[int]:
        """Our internet server processes, found by command line (a killed `lab up` may have lost
        its state file after starting one)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and self._is_our_server(int(entry.name)):
                found.append(int(entry.name))
        return found

    def _healthy(self, state: dict) -> bool:
        names = state.get("namespaces", [])
        return (state.get("complete") and state.get("version") == STATE_VERSION
                and all((NETNS_DIR / n).exists() for n in names)
                and all(guests.running(self.lab_dir, vm) for vm in state.get("vms", [])
                        if guests.is_guest(vm))
                and self._server_pid(state) is not None
                and (self.lab_dir / READY_FILE).exists())

    # ---- up ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _exclusive(self):
        """One `up` or `down` of this lab at a time (a second waits). The lock file sits beside the
        lab folder because `down` removes the folder."""
        self.lab_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lab_dir.parent / f".{self.lab_dir.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def up(self, vms: str = "netns") -> dict:
        """Build the lab (or confirm it is already built). Returns status(). Bad policy: nothing made.
        vms: `netns`, `qemu` (every workload a QEMU guest) or `qemu=NAME,NAME`."""
        workloads = read_workloads(self.policy_path)  # raises PolicyError before anything exists
        qemu_names = guests.parse_vms(vms, workloads)
        _require_root()
        with self._exclusive():
            return self._up(workloads, qemu_names)

    def _up(self, workloads: list[Workload], qemu_names: Collection[str] = frozenset()) -> dict:
        fingerprint = self._fingerprint(workloads, qemu_names)
        state = self._read_state()
        if state and state.get("fingerprint") == fingerprint and self._healthy(state):
            self.progress(f"lab {self.prefix or 'default'} is already up for {self.policy_path}; "
                          f"nothing changed")
            return self.status()
        planned = [self.host_ns, self.internet_ns] + [self.prefix + w.name for w in workloads
                                                      if w.name not in qemu_names]
        leftovers = [n for n in planned if (NETNS_DIR / n).exists()]
        if state or leftovers or self._stray_servers() or guests.qemu.lab_qemus(self.lab_dir):
            why = ("its topology changed" if state and state.get("complete")
                   and state.get("fingerprint") != fingerprint
                   else "a previous run left it incomplete or it was damaged")
            self.progress(f"cleaning the existing lab first ({why})")
            self._teardown(extra_namespaces=planned)
        self._write_state({"version": STATE_VERSION, "complete": False, "prefix": self.prefix,
                           "policy": str(self.policy_path), "fingerprint": fingerprint,
                           "namespaces": planned, "vms": [], "server_pid": None})
        try:
            self._build(workloads, planned, fingerprint, qemu_names)
        except BaseException:
            # Leave nothing half-made behind: a failed or interrupted up cleans after itself.
            self.progress("lab up failed; removing what it made")
            self._teardown(extra_namespaces=planned)
            raise
        return self.status()

    def _build(self, workloads: list[Workload], planned: list[str], fingerprint: str,
               qemu_names: Collection[str]) -> None:
        self.progress(f"creating {len(planned)} namespaces: {', '.join(planned)}")
        for ns in planned:
            _run(["ip", "netns", "add", ns])
        self.progress("setting forwarding and neighbour options")
        for ns in planned:
            self._sysctls(ns, self._sysctls_for(ns))

        self.progress(f"linking {self.host_ns} to {self.internet_ns} ({plan.UPLINK_HOST})")
        host_cmds = [
            "link set lo up",
            f"link add {plan.UPLINK_HOST} type veth peer name {plan.UPLINK_INTERNET} netns {self.internet_ns}",
            f"link set {plan.UPLINK_HOST} up",
            f"addr add {plan.UPLINK_V4_HOST} dev {plan.UPLINK_HOST}",
            f"addr add {plan.UPLINK_V6_HOST} dev {plan.UPLINK_HOST} nodad",
            f"route add default via {plan.UPLINK_V4_INTERNET.ip} dev {plan.UPLINK_HOST}",
            f"route add ::/0 via {plan.UPLINK_V6_INTERNET.ip} dev {plan.UPLINK_HOST}",
        ]
        internet_cmds = [
            "link set lo up",
            f"link set {plan.UPLINK_INTERNET} up",
            f"addr add {plan.UPLINK_V4_INTERNET} dev {plan.UPLINK_INTERNET}",
            f"addr add {plan.UPLINK_V6_INTERNET} dev {plan.UPLINK_INTERNET} nodad",
        ]
        for net in plan.INTERNET_RANGES:
            internet_cmds.append(f"route add local {net} dev lo")
        for addr in (plan.DNS_SERVER_V4, plan.DNS_SERVER_V6, plan.SYSLOG_COLLECTOR_V4,
                     plan.SYSLOG_COLLECTOR_V6):
            internet_cmds.append(f"addr add {addr}/{addr.max_prefixlen} dev lo"
                                 + (" nodad" if addr.version == 6 else ""))

        vm_batches: dict[str, list[str]] = {}
        for w in workloads:
            for addr in w.addresses:
                via = plan.UPLINK_V6_HOST.ip if addr.version == 6 else plan.UPLINK_V4_HOST.ip
                internet_cmds.append(f"route add {addr}/{addr.max_prefixlen} "
                                     f"via {via} dev {plan.UPLINK_INTERNET}")
            if w.name in qemu_names:
                continue  # its tap, gateway addresses and routes come with its QEMU (qemu.write_ifup)
            ns = self.prefix + w.name
            host_cmds += [
                f"link add {w.interface} type veth peer name {plan.VM_INTERFACE} "
                f"address {w.mac} netns {ns}",
                f"link set {w.interface} up",
                f"addr add {plan.GATEWAY_V4}/32 dev {w.interface}",
                f"addr add {plan.GATEWAY_V6}/64 dev {w.interface} nodad",
            ]
            vm = ["link set lo up", f"link set {plan.VM_INTERFACE} up",
                  f"route add {plan.GATEWAY_V4}/32 dev {plan.VM_INTERFACE} scope link",
                  f"route add default via {plan.GATEWAY_V4} dev {plan.VM_INTERFACE} onlink",
                  f"route add ::/0 via {plan.GATEWAY_V6} dev {plan.VM_INTERFACE}"]
            for addr in w.addresses:
                six = addr.version == 6
                vm.insert(2, f"addr add {addr}/{addr.max_prefixlen} dev {plan.VM_INTERFACE}"
                             + (" nodad" if six else ""))
                host_cmds.append(f"route add {addr}/{addr.max_prefixlen} "
                                 f"dev {w.interface}")
            vm_batches[ns] = vm

        self.progress(f"creating {len(vm_batches)} routed veth pairs in {self.host_ns}")
        self._ip_batch(self.host_ns, host_cmds)
        self.progress(f"configuring {self.internet_ns}: local documentation ranges, routes back")
        self._ip_batch(self.internet_ns, internet_cmds)
        self.progress("configuring the lab VMs: MAC, addresses, default routes via the host")
        for ns, cmds in vm_batches.items():
            self._ip_batch(ns, cmds)

        self.progress("starting the internet servers (DNS, HTTP/HTTPS echo, TCP/UDP echo)")
        pid = self._start_server()
        vms = [{"name": w.name, "zone": w.zone, "kind": "netns", "netns": self.prefix + w.name,
                "interface": w.interface, "vm_interface": plan.VM_INTERFACE, "mac": w.mac,
                "addresses": [str(a) for a in w.addresses]} for w in workloads
               if w.name not in qemu_names]
        if qemu_names:
            # Recorded first, so a failed boot is torn down by pid (and by command line).
            self._write_state({"version": STATE_VERSION, "complete": False, "prefix": self.prefix,
                               "policy": str(self.policy_path), "fingerprint": fingerprint,
                               "namespaces": planned, "vms": vms, "server_pid": pid})
            vms += guests.boot(self, [w for w in workloads if w.name in qemu_names])
        self._write_state({"version": STATE_VERSION, "complete": True, "prefix": self.prefix,
                           "policy": str(self.policy_path), "fingerprint": fingerprint,
                           "namespaces": planned, "vms": vms, "server_pid": pid,
                           "created": time.time()})
        self.progress(f"lab up: {len(workloads)} VMs, CA {self.ca_cert}, requests log "
                      f"{self.requests_log}")

    def _sysctls_for(self, ns: str) -> dict[str, str]:
        values = {
            # Same fe80::1 on every host-side veth and static VM addresses: no DAD delays.
            "net/ipv6/conf/all/accept_dad": "0",
            "net/ipv6/conf/default/accept_dad": "0",
        }
        if ns in (self.host_ns, self.internet_ns):
            values.update({
                "net/ipv4/ip_forward": "1",
                "net/ipv6/conf/all/forwarding": "1",
                "net/ipv4/conf/all/rp_filter": "0",
                "net/ipv4/conf/default/rp_filter": "0",
            })
        if ns == self.internet_ns:
            # Every unreachable destination answers with an ICMP error at once, never rate-limited:
            # the sealed-lab proof relies on seeing "unreachable".
            values.update({"net/ipv4/icmp_ratelimit": "0", "net/ipv6/icmp/ratelimit": "0"})
        return values

    def _sysctls(self, ns: str, values: dict[str, str]) -> None:
        # /proc/sys/net belongs to the network namespace of whoever opens it.
        script = "".join(f"echo {v} > /proc/sys/{k}\n" for k, v in values.items())
        _run(["nsenter", f"--net={NETNS_DIR / ns}", "--", "sh", "-e", "-c", script])

    @staticmethod
    def _ip_batch(ns: str, commands: list[str]) -> None:
        # Batch lines take no global options (no -6): families are inferred from the addresses.
        _run(["ip", "-n", ns, "-batch", "-"], stdin="\n".join(commands) + "\n")

    def _start_server(self) -> int:
        self.lab_dir.mkdir(parents=True, exist_ok=True)
        (self.lab_dir / READY_FILE).unlink(missing_ok=True)
        self.requests_log.touch()
        env = dict(os.environ)
        package_root = str(Path(skyguard.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(self.server_log, "ab") as log:
            proc = subprocess.Popen(
                ["nsenter", f"--net={NETNS_DIR / self.internet_ns}", "--",
                 sys.executable, "-m", SERVER_MODULE, "--lab-dir", str(self.lab_dir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                start_new_session=True, cwd="/")
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if (self.lab_dir / READY_FILE).exists():
                return proc.pid
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        tail = self.server_log.read_text(errors="replace")[-2000:]
        raise LabError(f"the internet servers did not start (log {self.server_log}):\n{tail}")

    def restart_guest(self, name: str) -> dict:
        """Boot QEMU guest `name` again (stopped, killed or running): the same tap name, MAC and
        addresses, a new QEMU. Returns its new state entry."""
        _require_root()
        with self._exclusive():
            state = self._read_state()
            if not self._guest(name, state):
                raise BadInput(f"{name!r} is not a QEMU guest of lab {self.prefix or 'default'}")
            old = self._guest(name, state)
            if guests.running(self.lab_dir, old):
                procs.stop([old["pid"]])
            workload = next(w for w in read_workloads(state["policy"]) if w.name == name)
            entry = guests.boot(self, [workload])[0]
            state["vms"] = [entry if vm["name"] == name else vm for vm in state["vms"]]
            self._write_state(state)
            return entry

    # ---- down ----------------------------------------------------------------------------------
    def down(self) -> None:
        """Remove everything this lab made. Nothing up: nothing to do, no error."""
        _require_root()
        with self._exclusive():
            self._down()

    def _down(self) -> None:
        state = self._read_state()
        present = [n for n in self._namespaces_of(state) if (NETNS_DIR / n).exists()]
        if state is None and not present and not self._stray_servers():
            self.progress(f"lab {self.prefix or 'default'} is not up; nothing to remove")
            return
        self._teardown()
        self.progress(f"lab {self.prefix or 'default'} removed")

    def _namespaces_of(self, state: dict | None) -> list[str]:
        names = [self.host_ns, self.internet_ns]
        for n in (state or {}).get("namespaces", []):
            if n not in names:
                names.append(n)
        return names

    def _teardown(self, extra_namespaces: Sequence[str] = ()) -> None:
        state = self._read_state()
        stopped = guests.stop(self.lab_dir, state)
        if stopped:
            self.progress(f"stopped QEMU guests (pid {', '.join(map(str, stopped))})")
        servers = set(self._stray_servers())
        pid = self._server_pid(state)
        if pid:
            servers.add(pid)
        if servers:
            self.progress(f"stopping the internet servers (pid {', '.join(map(str, sorted(servers)))})")
            procs.stop(sorted(servers))
        names = self._namespaces_of(state)
        names += [n for n in extra_namespaces if n not in names]
        present = [n for n in names if (NETNS_DIR / n).exists()]
        # Processes still inside lab namespaces would keep them (and their veths) alive.
        inside = []
        for ns in present:
            out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            inside += [int(p) for p in out.stdout.split() if p.isdigit() and int(p) != os.getpid()]
        if inside:
            self.progress(f"stopping {len(inside)} processes still running in lab namespaces")
            procs.stop(inside)
        if present:
            self.progress(f"deleting namespaces: {', '.join(present)}")
        for ns in present:
            proc = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if proc.returncode != 0 and (NETNS_DIR / ns).exists():
                raise LabError(f"cannot delete namespace {ns}: {proc.stderr.strip()}; "
                               f"remove it with `ip netns del {ns}`")
        if self.lab_dir.exists():
            shutil.rmtree(self.lab_dir)

    # ---- status and use ------------------------------------------------------------------------
    def status(self, probe: bool = False) -> dict:
        """What exists. With probe, also ask the servers (one DNS query, HTTP and HTTPS connects
        from inside the internet namespace) and report `healthy` (None when not probed)."""
        state = self._read_state() or {}
        pid = self._server_pid(state)
        namespaces = {n: (NETNS_DIR / n).exists() for n in self._namespaces_of(state)}
        vms = [guests.describe(self.lab_dir, vm, probe) if guests.is_guest(vm) else vm
               for vm in state.get("vms", [])]
        up = (bool(state.get("complete")) and all(namespaces.values()) and pid is not None
              and all(vm.get("state", "running") == "running" for vm in vms))
        healthy = self._probe() if probe and up else (False if probe else None)
        return {
            "up": up,
            "prefix": self.prefix,
            "lab_dir": str(self.lab_dir),
            "policy": state.get("policy"),
            "namespaces": namespaces,
            "host": {
                "netns": self.host_ns,
                "uplink": plan.UPLINK_HOST,
                "addresses": [str(plan.UPLINK_V4_HOST), str(plan.UPLINK_V6_HOST)],
                "vm_gateway": [str(plan.GATEWAY_V4), str(plan.GATEWAY_V6)],
            },
            "vms": vms,
            "internet": {
                "netns": self.internet_ns,
                "owns": [str(n) for n in plan.INTERNET_RANGES],
                "addresses": [str(plan.UPLINK_V4_INTERNET), str(plan.UPLINK_V6_INTERNET)],
                "dns": [str(plan.DNS_SERVER_V4), str(plan.DNS_SERVER_V6)],
                "syslog_collector": [str(plan.SYSLOG_COLLECTOR_V4), str(plan.SYSLOG_COLLECTOR_V6)],
                "names": f"*.{plan.TEST_DOMAIN} -> {plan.NAME_RANGE_V4}, {plan.NAME_RANGE_V6}",
                "servers": {
                    "pid": pid,
                    "running": pid is not None,
                    "ready": (self.lab_dir / READY_FILE).exists(),
                    "healthy": healthy,
                    "log": str(self.server_log),
                    "tcp_ports": [53, 80, 443, 7, 514, 5001, 6514],
                    "udp_ports": [53, 7, 514, 5001, 6514],
                },
            },
            "ca_cert": str(self.ca_cert),
            "requests_log": str(self.requests_log),
        }

    def _probe(self) -> bool:
        try:
            out = self.exec(INTERNET, [sys.executable, "-m", "skyguard.vmtools.lab_health", str(plan.DNS_SERVER_V4)],
                            lab_resolver=False, capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return out.returncode == 0

    def command(self, name: str, argv: list[str], lab_resolver: bool = True) -> list[str]:
        """The argv that runs `argv` inside lab member `name`.

        With lab_resolver, the command sees an /etc/resolv.conf naming the lab DNS server (a bind
        mount in a private mount namespace, like a VM configured by DHCP); bpffs stays visible.
        """
        path = self.netns_path(name)
        if not path.exists():
            raise LabError(f"lab member {name!r} does not exist (namespace {path.name}); "
                           f"run `skyguard lab up` first")
        if not argv:
            raise BadInput("no command given; write it after `--`, e.g. `lab exec radius1 -- ip addr`")
        cmd = ["nsenter", f"--net={path}", "--"]
        if lab_resolver:
            resolv = self.lab_dir / "resolv.conf"
            if not resolv.exists():
                resolv.write_text(f"nameserver {plan.DNS_SERVER_V4}\nnameserver {plan.DNS_SERVER_V6}\n")
            cmd += ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                    'mount --bind "$0" /etc/resolv.conf 2>/dev/null; exec "$@"', str(resolv)]
        return cmd + list(argv)

    def exec(self, name: str, argv: list[str], lab_resolver: bool = True,
             **kwargs) -> subprocess.CompletedProcess:
        """Run argv inside lab member `name` (a workload, 'host' or 'internet') and wait for it.
        In a QEMU guest it goes through the guest's agent (its resolver is always the lab's)."""
        guest = self._guest(name) if name not in (HOST, INTERNET) else None
        if guest:
            return guests.run(guest, argv, **kwargs)
        return subprocess.run(self.command(name, argv, lab_resolver), **kwargs)

    def popen(self, name: str, argv: list[str], lab_resolver: bool = True, **kwargs) -> subprocess.Popen:
        """Start argv inside lab member `name`; the caller owns the process."""
        return subprocess.Popen(self.command(name, argv, lab_resolver), **kwargs)

    def __repr__(self) -> str:
        return f"Lab(prefix={self.prefix!r}, policy={str(self.policy_path)!r})"


def _require_root() -> None:
    if os.geteuid() != 0:
        raise PrivilegeError("the lab needs root (it creates network namespaces); run it with sudo")
