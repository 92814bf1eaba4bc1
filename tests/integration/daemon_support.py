"""Helpers for the daemon integration tests (tests/integration/test_daemon*.py): run the real
`skyguard up` inside a lab's host namespace with private state, run the CLI against it, and
drive real traffic inside lab VMs (listeners, batched probes, a long-lived TCP stream whose
receiver reports bytes as they arrive, a continuous prober).

Everything here is a real process and a real socket; nothing is mocked. Not a place for
assertions about skyguard's behaviour: the tests make those.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from skyguard import config
from skyguard.lab import addressing as plan
from support.client_waits import ANSWER_WAIT_S, wait_s

PY = sys.executable
READY_TIMEOUT = 90.0  # seconds for `skyguard up` to answer status (bcc compiles the programs)
CLI_TIMEOUT = 60.0


# ---- the daemon ------------------------------------------------------------------------------

class RunningDaemon:
    """`skyguard up` in `lab`'s host namespace, with state, run and pin dirs of its own: the one
    "daemon in the lab" of the integration tests.

    start() waits until `status` answers (and, with wait_attached, until every workload of the
    policy has its programs); kill() is SIGKILL (programs stay, fail closed); stop() is `skyguard
    down`; cleanup() leaves no process, program or pin behind. metrics: `up --metrics` (an
    address serves Prometheus' exposition there). preload: a module of tests/ (support.map_faults)
    the daemon imports before it runs `up`: a fault injected where the kernel cannot be made to fail.
    """

    def __init__(self, lab, work_dir: Path, policy_path: Path | None = None, metrics: str = "off",
                 wait_attached: bool = False, ready_timeout: float = READY_TIMEOUT, preload: str | None = None):
        self.lab = lab
        self.preload = preload
        self.metrics = metrics
        self.wait_attached = wait_attached
        self.ready_timeout = ready_timeout  # a bound against hangs, not a timing
        self.policy_path = Path(policy_path or lab.policy_path)
        self.work_dir = Path(work_dir)
        self.state_dir = self.work_dir / "state"
        self.run_dir = self.work_dir / "run"
        # One pin dir per lab: a bpffs path, so it must be unique machine-wide.
        self.pin_dir = Path("/sys/fs/bpf") / f"{lab.prefix}skyguard"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.work_dir / "daemon.log"
        self.env = dict(os.environ, SKYGUARD_STATE_DIR=str(self.state_dir),
                        SKYGUARD_RUN_DIR=str(self.run_dir), SKYGUARD_PIN_DIR=str(self.pin_dir),
                        PYTHONPATH=str(config.REPO_ROOT))
        self.env.pop("SKYGUARD_FROM_VM_HOOK", None)

    @property
    def host_netns(self) -> str:
        return str(self.lab.netns_path("host"))

    def _in_host(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net={self.host_netns}", "--"] + argv

    def start(self) -> dict:
        self.launch()
        return self.wait_ready()

    def launch(self) -> None:
        """`skyguard up`, not waiting for it to answer."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        argv = self.command("up", "--policy", str(self.policy_path), "--metrics", self.metrics)
        env = self.env
        if self.preload:
            run = f"import {self.preload}, runpy; runpy.run_module('skyguard.cli.main', run_name='__main__')"
            argv = [PY, "-c", run, *argv[3:]]
            env = dict(env, PYTHONPATH=os.pathsep.join((env["PYTHONPATH"], str(config.REPO_ROOT / "tests"))))
        self.proc = subprocess.Popen(
            self._in_host(argv),
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd="/")
        log.close()

    def wait_ready(self) -> dict:
        """`status --json` once the daemon answers on its control socket (and, with wait_attached,
        has every workload's programs attached), within ready_timeout seconds."""
        from skyguard.errors import DaemonError

        deadline = time.monotonic() + self.ready_timeout
        wanted = len(self.lab_workloads()) if self.wait_attached else 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"skyguard up exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status = self.request("status")  # the socket, not a CLI process every 0.2 s
            except (DaemonError, TimeoutError):
                status = None  # not answering yet (or too busy starting to answer within 15 s)
            if status is not None and len(status.get("interfaces") or {}) >= wanted:
                status.pop("ok", None)  # as `status --json` prints it
                return status
            time.sleep(0.2)
        raise AssertionError(f"skyguard up did not answer status (with every workload attached: {self.wait_attached}) "
                             f"within {self.ready_timeout:.0f}s:\n{self.log_tail()}")

    def lab_workloads(self) -> list:
        from skyguard.policy.parse import load_policy

        return load_policy(self.policy_path).workloads()

    def command(self, *args: str) -> list[str]:
        """argv of `skyguard ARGS` (run it with self.env: the control socket is a file, any netns reaches it)."""
        return [PY, "-m", "skyguard.cli.main", *args]

    def request(self, op: str, **args) -> dict:
        """One control request to this daemon, on its own socket."""
        from skyguard import control

        return control.request(op, timeout=15, socket_file=self.run_dir / "control.sock", **args)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_running(self) -> dict:
        return self.status() if self.running() else self.start()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no daemon log)"

    def cli(self, *args: str, user: str | None = None, caps: str | None = None,
            timeout: float = CLI_TIMEOUT, check: bool = False, input: str | None = None) -> subprocess.CompletedProcess:
        """Run `skyguard ARGS` in the host namespace with this daemon's environment (input: its stdin). With user,
        as that user (setpriv), optionally keeping capabilities `caps` (e.g. "+dac_override").
        With check, a non-zero exit fails the test with the command's stderr."""
        argv = self.command(*args)
        if user:
            drop = ["setpriv", f"--reuid={user}", f"--regid={user if user != 'nobody' else 'nogroup'}",
                    "--clear-groups"]
            if caps:
                drop += [f"--inh-caps={caps}", f"--ambient-caps={caps}"]
            argv = drop + ["--"] + argv
        proc = subprocess.Popen(self._in_host(argv), stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, cwd="/")
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            # Killed, not waited for: a process the kernel holds in a write to a disk that does
            # not answer ends only once that write returns (subprocess.run would wait for it).
            proc.kill()
            raise AssertionError(f"skyguard {' '.join(args)} did not exit within {timeout:.0f}s") from None
        out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        if check and out.returncode != 0:
            raise AssertionError(f"skyguard {' '.join(args)} exited {out.returncode}: {out.stderr}")
        return out

    def status(self) -> dict:
        out = self.cli("status", "--json", check=False)
        assert out.returncode == 0, f"status failed: {out.stderr}\n{self.log_tail()}"
        return json.loads(out.stdout)

    def log_entries(self, kind: str | None = None) -> list[dict]:
        args = ["log", "show", "--json"] + (["--type", kind] if kind else [])
        out = self.cli(*args, check=False)
        assert out.returncode == 0, out.stderr
        return [json.loads(line)["entry"] for line in out.stdout.splitlines() if line.strip()]

    def kill(self) -> None:
        """SIGKILL: no cleanup runs in the daemon."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> subprocess.CompletedProcess:
        out = self.cli("down", check=False)
        if self.proc is not None:
            self.proc.wait(timeout=30)
        return out

    def cleanup(self) -> None:
        if self.running():
            self.cli("down", check=False)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.pin_dir.exists():
            # A killed daemon's programs: `down` without a daemon detaches them and removes pins.
            self.cli("down", check=False)
        subprocess.run(["rm", "-rf", str(self.pin_dir)], check=False)


def attached_programs(status: dict) -> dict[str, tuple]:
    """interface -> (from_vm program id, to_vm program id) from `status --json`."""
    return {ifname: ((hooks.get("tc_ingress") or hooks.get("xdp") or {}).get("id"),
                     (hooks.get("tc_egress") or {}).get("id"))
            for ifname, hooks in status["interfaces"].items()}


def drop_count(status: dict, zone: str, reason: str) -> int:
    return sum(r["packets"] for r in status["counters"]["drops"] if r["zone"] == zone and r["reason"] == reason)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll until predicate() is truthy (returns it); fail naming `what`. The timeout is a
    generous bound against hangs, not an assertion about speed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# ---- lab plumbing ----------------------------------------------------------------------------

def recreate_vm_link(lab, vm: str) -> None:
    """Delete VM `vm`'s veth pair and build it again exactly as the lab does (same names, MAC,
    addresses, routes): what a VM restart looks like to the host."""
    info = next(v for v in lab.status()["vms"] if v["name"] == vm)
    host, ns, ifname = lab.host_ns, info["netns"], info["interface"]
    subprocess.run(["ip", "-n", host, "link", "del", ifname], check=True)
    host_cmds = [f"link add {ifname} type veth peer name {plan.VM_INTERFACE} address {info['mac']} netns {ns}",
                 f"link set {ifname} up",
                 f"addr add {plan.GATEWAY_V4}/32 dev {ifname}",
                 f"addr add {plan.GATEWAY_V6}/64 dev {ifname} nodad"]
    vm_cmds = [f"link set {plan.VM_INTERFACE} up"]
    for addr in info["addresses"]:
        six = ":" in addr
        vm_cmds.append(f"addr add {addr}/{128 if six else 32} dev {plan.VM_INTERFACE}" + (" nodad" if six else ""))
        host_cmds.append(f"route add {addr}/{128 if six else 32} dev {ifname}")
    vm_cmds += [f"route add {plan.GATEWAY_V4}/32 dev {plan.VM_INTERFACE} scope link",
                f"route add default via {plan.GATEWAY_V4} dev {plan.VM_INTERFACE} onlink",
                f"route add ::/0 via {plan.GATEWAY_V6} dev {plan.VM_INTERFACE}"]
    for ns_name, cmds in ((host, host_cmds), (ns, vm_cmds)):
        subprocess.run(["ip", "-n", ns_name, "-batch", "-"], input="\n".join(cmds) + "\n", text=True,
                       check=True, capture_output=True)


# ---- traffic ---------------------------------------------------------------------------------

LISTENER = r"""
import socket, sys, threading
tcp_ports = [int(p) for p in sys.argv[1].split(",") if p]
udp_ports = [int(p) for p in sys.argv[2].split(",") if p]
def serve_tcp(s):
    while True:
        c, _ = s.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
def echo(c):
    try:
        while True:
            d = c.recv(65536)
            if not d: break
            c.sendall(d)
    except OSError: pass
    finally: c.close()
def serve_udp(s):
    while True:
        d, a = s.recvfrom(2048); s.sendto(d, a)
for fam, any_addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    for p in tcp_ports:
        s = socket.socket(fam, socket.SOCK_STREAM); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6: s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((any_addr, p)); s.listen(64)
        threading.Thread(target=serve_tcp, args=(s,), daemon=True).start()
    for p in udp_ports:
        s = socket.socket(fam, socket.SOCK_DGRAM)
        if fam == socket.AF_INET6: s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((any_addr, p))
        threading.Thread(target=serve_udp, args=(s,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

# argv[1]: JSON list of [kind, host, port, source-or-null, seconds to wait]; prints a JSON list of
# booleans: did the echo (TCP, UDP) or the echo reply (ICMP) come back.
PROBE = r"""
import json, socket, subprocess, sys, threading
probes = json.loads(sys.argv[1]); out = [None] * len(probes)
def one(i, kind, host, port, source, timeout):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        if kind == "icmp":
            cmd = ["ping", "-n", "-c1", "-W", str(max(1, int(timeout)))] + (["-I", source] if source else []) + [host]
            out[i] = subprocess.run(cmd, capture_output=True).returncode == 0; return
        s = socket.socket(fam, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
        s.settimeout(timeout)
        if source: s.bind((source, 0))
        if kind == "tcp":
            s.connect((host, port)); s.sendall(b"probe"); out[i] = s.recv(16) == b"probe"
        else:
            s.sendto(b"probe", (host, port)); out[i] = s.recvfrom(16)[0] == b"probe"
        s.close()
    except OSError:
        out[i] = False
threads = [threading.Thread(target=one, args=(i, *p)) for i, p in enumerate(probes)]
[t.start() for t in threads]; [t.join() for t in threads]
print(json.dumps(out))
"""


def start_listener(lab, vm: str, tcp_ports=(), udp_ports=()) -> subprocess.Popen:
    """TCP and UDP echo on every v4 and v6 address of `vm`; the caller stops it (stop_process)."""
    proc = lab.popen(vm, [PY, "-c", LISTENER, ",".join(map(str, tcp_ports)), ",".join(map(str, udp_ports))],
                     lab_resolver=False, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"listener in {vm} did not start: {line!r}")
    return proc


def stop_process(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def probe(lab, vm: str, probes, expect) -> list[bool]:
    """Run every probe ((kind, host, port[, source])) from inside `vm` at once; True = answered.
    expect[i] says whether the test expects probe i answered: it is waited for ANSWER_WAIT_S
    then, for SILENCE_WAIT_S otherwise (support.client_waits)."""
    probes, expect = list(probes), list(expect)
    assert len(probes) == len(expect), (probes, expect)
    items = [(list(p) + [None] * (4 - len(p)))[:4] + [wait_s(want)] for p, want in zip(probes, expect)]
    out = lab.exec(vm, [PY, "-c", PROBE, json.dumps(items)], lab_resolver=False,
                   capture_output=True, text=True, timeout=30 + max([wait_s(w) for w in expect], default=0))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def expect_probes(lab, vm: str, probes, expect) -> None:
    """probe(), then fail naming every probe whose outcome is not the expected one."""
    probes = list(probes)
    got = probe(lab, vm, probes, expect)
    wrong = [f"{vm} -> {' '.join(str(x) for x in p if x is not None)}: expected {'pass' if want else 'drop'}, "
             f"got {'pass' if seen else 'drop'}" for p, want, seen in zip(probes, expect, got) if seen != want]
    assert not wrong, "\n".join(wrong)


def reaches(lab, vm: str, kind: str, host: str, port: int = 0, source: str | None = None) -> bool:
    """Is one probe from `vm` answered (waited for ANSWER_WAIT_S)?"""
    return probe(lab, vm, [(kind, host, port, source)], [True])[0]


def dropped(lab, vm: str, kind: str, host: str, port: int = 0, source: str | None = None) -> bool:
    """Does one probe from `vm` stay unanswered (listened for SILENCE_WAIT_S)?"""
    return not probe(lab, vm, [(kind, host, port, source)], [False])[0]


def connects(lab, vm: str, address: str, port: int, expected: bool) -> bool:
    """Does a TCP connection from vm to address:port open (the datapath passes its SYN)? Waited for
    as long as the test's expectation says (support.client_waits). Any server: nothing is sent."""
    out = lab.exec(vm, [PY, "-c", CONNECT, address, str(port), str(wait_s(expected))], lab_resolver=False,
                   capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "open"


CONNECT = """import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("open")
except OSError:
    print("closed")
"""


STREAM_SINK = r"""
import socket, sys, threading, time
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
total = 0
def report():
    while True:
        print(total, flush=True); time.sleep(0.1)
threading.Thread(target=report, daemon=True).start()
while True:
    d = c.recv(1 << 16)
    if not d: break
    total += len(d)
print(total, flush=True); print("closed", flush=True)
"""

STREAM_SOURCE = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[4]))
s.settimeout(None)
chunk = b"x" * 16384
rate = float(sys.argv[3])  # bytes per second, paced so the stream does not hog a shared CPU
print("connected", flush=True)
sent, start = 0, time.monotonic()
while True:
    s.sendall(chunk); sent += len(chunk)
    ahead = sent / rate - (time.monotonic() - start)
    if ahead > 0: time.sleep(ahead)
"""


class Stream:
    """A long-lived TCP connection from `src` to `dst_addr`:`port` in VM `dst`. The receiver
    reports its byte count every 0.1 s; flowing() says whether bytes keep arriving."""

    def __init__(self, lab, src: str, dst: str, dst_addr: str, port: int, rate: float = 4e6):
        self.sink = lab.popen(dst, [PY, "-c", STREAM_SINK, dst_addr, str(port)], lab_resolver=False,
                              stdout=subprocess.PIPE, text=True)
        if self.sink.stdout.readline().strip() != "ready":
            self.close()
            raise AssertionError(f"stream sink in {dst} did not start")
        self.total = 0
        self.closed = False
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        self.source = lab.popen(src, [PY, "-c", STREAM_SOURCE, dst_addr, str(port), str(rate), str(ANSWER_WAIT_S)],
                                lab_resolver=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.source.stdout.readline().strip()
        if line != "connected":
            err = self.source.stderr.read() if self.source.poll() is not None else ""
            self.close()
            raise AssertionError(f"stream {src} -> {dst_addr}:{port} did not connect: {line!r} {err}")

    def _read(self) -> None:
        for line in self.sink.stdout:
            line = line.strip()
            with self._lock:
                if line == "closed":
                    self.closed = True
                elif line.isdigit():
                    self.total = int(line)

    def received(self) -> int:
        with self._lock:
            return self.total

    def flowing(self, min_bytes: int = 64 * 1024, within: float = ANSWER_WAIT_S) -> bool:
        """Did at least min_bytes more arrive within `within` seconds (returns as soon as they did)?"""
        start = self.received()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.received() - start >= min_bytes:
                return True
            time.sleep(0.05)
        return False

    def stalled(self, quiet: float = 3.0, settle: float = 1.0) -> bool:
        """After `settle` seconds (in-flight data drains), did nothing arrive for `quiet` seconds?"""
        time.sleep(settle)
        start = self.received()
        time.sleep(quiet)
        return self.received() == start

    def close(self) -> None:
        stop_process(getattr(self, "source", None))
        stop_process(self.sink)


CONTINUOUS_PROBER = r"""
import json, socket, sys, time
allowed = (sys.argv[1], int(sys.argv[2])); denied = (sys.argv[3], int(sys.argv[4]))
counts = {"allowed_ok": 0, "allowed_lost": 0, "denied_ok": 0, "denied_lost": 0}
def udp(dst, timeout):
    s = socket.socket(socket.AF_INET6 if ":" in dst[0] else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(b"tick", dst); return s.recvfrom(16)[0] == b"tick"
    except OSError:
        return False
    finally:
        s.close()
import select
while not select.select([sys.stdin], [], [], 0)[0]:
    counts["allowed_ok" if udp(allowed, float(sys.argv[5])) else "allowed_lost"] += 1
    counts["denied_ok" if udp(denied, 0.2) else "denied_lost"] += 1
print(json.dumps(counts), flush=True)
"""


class ContinuousProber:
    """From VM `vm`, alternately a new allowed and a new denied UDP exchange (a fresh socket each,
    so each is a new flow), until stop(); stop() returns the counts. An allowed answer is waited
    for ANSWER_WAIT_S, a denied one listened for 0.2 s."""

    def __init__(self, lab, vm: str, allowed: tuple[str, int], denied: tuple[str, int]):
        self.proc = lab.popen(vm, [PY, "-c", CONTINUOUS_PROBER, allowed[0], str(allowed[1]), denied[0],
                                   str(denied[1]), str(ANSWER_WAIT_S)], lab_resolver=False, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def stop(self) -> dict:
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        out, _ = self.proc.communicate(timeout=ANSWER_WAIT_S + 10)  # the exchange under way ends first
        return json.loads(out.strip().splitlines()[-1])
