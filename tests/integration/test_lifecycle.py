"""Lifecycle property test (issue 14): any valid policy, any operator action, and the daemon never
dies and never refuses what `policy validate` accepts. A lab is built for a generated topology,
`skyguard up` runs in its host namespace, and an operator's actions are played with the real CLI,
with checks after every action. This tier runs a bounded, derandomized sample; the fuzz tier runs
the same machinery long (tests/fuzz/test_lifecycle_long.py imports it from here).

A Scenario is what hypothesis draws: the lab VMs, a few generated policies (YAML text; the first
is the one `up` starts with), which sealed-store names exist before `up`, and a list of actions.
run_scenario() plays it and raises AssertionError at the first broken promise, with the daemon's
stderr. The checks after every action: the daemon is alive (unless the action stopped it) and its
stderr holds no traceback or crash; every answer parses (JSON where --json); `status --json`
names the policy in force; probe packets between lab VMs and to the lab internet get the verdict
of the reference model (tests/support/refmodel.py) for the policy in force; `log verify` passes.

The operator's way is used throughout: `up --state-dir X`, then `--state-dir X` on every command
that reads state or talks to the daemon (SPEC.md section 4). SKYGUARD_STATE_DIR points at an empty decoy folder, so a
command that ignored the flag would read the decoy and fail here instead of passing by luck.
SKYGUARD_RUN_DIR and SKYGUARD_PIN_DIR isolate the run (they have no flags).

LIFECYCLE_WORKAROUNDS (comma-separated, for exploring while a known bug is being fixed; empty in
CI): `state-env` sets SKYGUARD_STATE_DIR to the real state dir and passes no --state-dir but to `up`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: policygen

import policygen  # noqa: E402
from daemon_support import PROBE, PY, stop_process  # noqa: E402

from skyguard import config  # noqa: E402
from skyguard.lab import Lab  # noqa: E402
from skyguard.policy.parse import parse_policy  # noqa: E402
from support.client_waits import ANSWER_WAIT_S, wait_s  # noqa: E402
from support.refmodel import EGRESS, INGRESS, PROTOCOLS, Packet, decide  # noqa: E402

WORKAROUNDS = set(filter(None, os.environ.get("LIFECYCLE_WORKAROUNDS", "").split(",")))
READY_TIMEOUT = 90.0  # seconds for `up` to answer status (bcc compiles); a bound against hangs
CLI_TIMEOUT = 60.0
METRICS_PORT = 9464
CRASH_MARKS = ("Traceback (most recent call last)", "Fatal Python error", "Segmentation fault",
               "malloc(): ", "free(): ", "double free", "corrupted")


# ---- what hypothesis draws -------------------------------------------------------------------

@dataclass
class Scenario:
    topology: list                 # policygen.Vm, the lab VMs
    policies: list[str]            # YAML texts; policies[0] is the first `up`
    secrets: tuple[str, ...]       # sealed-store names set before the first `up`
    actions: list[tuple]           # see ACTIONS
    seed: int = 0                  # probe choices

    def __repr__(self) -> str:     # what hypothesis prints for a failing example: replayable
        lines = ["Scenario(", f"  topology={self.topology!r},", "  policies=["]
        lines += [f"    {text!r}," for text in self.policies]
        lines += ["  ],", f"  secrets={self.secrets!r},", f"  actions={self.actions!r},",
                  f"  seed={self.seed!r})"]
        return "\n".join(lines)


# The operator actions, as Run.act() plays them; WITH_POLICY ones name a policy by index.
ACTIONS = ("status", "status-json", "flows", "flows-json", "metrics", "attest", "admin-sessions",
           "log-verify", "diff", "load", "restart", "kill-up", "down-up", "secret-set", "secret-rm",
           "dns", "mutant")
WITH_POLICY = {"diff", "load", "restart", "kill-up", "down-up"}


@st.composite
def scenarios(draw, *, max_vms: int = 3, max_policies: int = 3, min_actions: int = 3,
              max_actions: int = 10, mutants: bool = True):
    topology = draw(policygen.topologies(max_vms=max_vms))
    docs = [draw(policygen.policies(topology)) for _ in range(draw(st.integers(1, max_policies)))]
    texts = [policygen.to_yaml(d) for d in docs]
    secrets = tuple(draw(st.sets(st.sampled_from(policygen.SECRET_NAMES + policygen.CERT_NAMES))))
    names = sorted(set(policygen.SECRET_NAMES + policygen.CERT_NAMES))
    kinds = [a for a in ACTIONS if mutants or a != "mutant"]
    actions = []
    for _ in range(draw(st.integers(min_actions, max_actions))):
        kind = draw(st.sampled_from(kinds))
        if kind in WITH_POLICY:
            actions.append((kind, draw(st.integers(0, len(texts) - 1))))
        elif kind in ("secret-set", "secret-rm"):
            actions.append((kind, draw(st.sampled_from(names))))
        elif kind == "dns":
            actions.append((kind, draw(st.integers(0, len(topology) - 1)), draw(st.integers(0, 20))))
        elif kind == "mutant":
            mutation, text = draw(policygen.mutants(draw(st.sampled_from(docs))))
            actions.append((kind, mutation, text))
        else:
            actions.append((kind,))
    return Scenario(topology, texts, secrets, actions, draw(st.integers(0, 2**32 - 1)))


# ---- values the sealed store holds ---------------------------------------------------------------

_PEM: bytes | None = None


def _certificate_bundle() -> bytes:
    """A self-signed certificate and its key, as one PEM bundle (what tls_termination names)."""
    global _PEM
    if _PEM is None:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vm.test")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("vm.test")]), critical=False)
                .sign(key, hashes.SHA256()))
        _PEM = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return _PEM


def secret_value(name: str) -> bytes:
    return _certificate_bundle() if name in policygen.CERT_NAMES else f"token-for-{name}-0123456789".encode()


# ---- the daemon, as an operator runs it --------------------------------------------------------

class Operator:
    """One lab, one state dir, one daemon process at a time; every command through the CLI."""

    def __init__(self, lab: Lab, work: Path, rnd: random.Random):
        self.lab, self.work = lab, work
        self.state_dir = work / "state"
        self.decoy = work / "decoy-state"  # what SKYGUARD_STATE_DIR names: must never be needed
        self.decoy.mkdir(parents=True, exist_ok=True)
        self.pin_dir = Path("/sys/fs/bpf") / f"{lab.prefix}skyguard"
        self.env = dict(os.environ, SKYGUARD_RUN_DIR=str(work / "run"), SKYGUARD_PIN_DIR=str(self.pin_dir),
                        SKYGUARD_STATE_DIR=str(self.state_dir if "state-env" in WORKAROUNDS else self.decoy),
                        PYTHONPATH=str(config.REPO_ROOT))
        self.env.pop("SKYGUARD_FROM_VM_HOOK", None)
        # glibc's heap checks and a crash dump in the daemon: a corruption fails, never passes by luck.
        self.daemon_env = dict(self.env, MALLOC_CHECK_="3", MALLOC_PERTURB_=str(rnd.randint(1, 254)),
                               PYTHONFAULTHANDLER="1")
        debug_malloc = sorted(Path("/lib").glob("*-linux-gnu/libc_malloc_debug.so.0"))
        if debug_malloc:  # glibc >= 2.34 honours MALLOC_CHECK_ only with it preloaded
            self.daemon_env["LD_PRELOAD"] = str(debug_malloc[0])
        self.proc: subprocess.Popen | None = None
        self.log_path = work / "daemon.log"
        self.log_seen = 0  # bytes of the daemon log already checked for crash marks
        self.policy_files: list[Path] = []

    def in_host(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net={self.lab.netns_path('host')}", "--"] + argv

    def cli(self, *args: str, stdin: bytes | None = None, timeout: float = CLI_TIMEOUT,
            state: bool = False) -> subprocess.CompletedProcess:
        """`skyguard ARGS` in the lab host, with `--state-dir` when the command reads state."""
        if "state-env" in WORKAROUNDS:
            state = False  # the environment names it (see the module docstring)
        argv = [PY, "-m", "skyguard.cli.main", *args] + (["--state-dir", str(self.state_dir)] if state else [])
        return subprocess.run(self.in_host(argv), input=stdin, capture_output=True, timeout=timeout,
                              env=self.env, cwd="/")

    # -- up and down -------------------------------------------------------------------------

    def up(self, policy: Path) -> None:
        """`skyguard up` and wait until it answers status (its agreement with validate: it must)."""
        self.work.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== up --policy {policy.name}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.in_host([PY, "-m", "skyguard.cli.main", "up", "--policy", str(policy), "--state-dir",
                              str(self.state_dir), "--metrics", f"127.0.0.1:{METRICS_PORT}"]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.daemon_env, cwd="/")
        deadline = time.monotonic() + READY_TIMEOUT
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"`skyguard up --policy {policy.name}` exited with {self.proc.returncode}, "
                                     f"but `policy validate` accepts that policy")
            last = self.cli("status", "--json", state=True)
            if last.returncode == 0:
                return
            time.sleep(0.3)
        raise AssertionError(f"`skyguard up` did not answer status within {READY_TIMEOUT:.0f}s; status said "
                             f"(exit {last.returncode}): {_text(last.stderr)[-1500:]}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, how: str) -> int:
        """End the daemon: 'term' (SIGTERM, a systemd restart), 'kill' (SIGKILL), 'down' (the CLI)."""
        if how == "down":
            out = self.cli("down", state=True)
            assert out.returncode == 0, f"`skyguard down` exited {out.returncode}: {_text(out.stderr)}"
        else:
            self.proc.send_signal(signal.SIGTERM if how == "term" else signal.SIGKILL)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.proc = None

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no daemon log)"

    def new_log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_seen)
                data = f.read()
        except OSError:
            return ""
        self.log_seen += len(data)
        return data.decode(errors="replace")

    def cleanup(self) -> None:
        if self.alive():
            self.cli("down", state=True)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.pin_dir.exists():
            self.cli("down", state=True)  # a killed daemon's programs and pins
        subprocess.run(["rm", "-rf", str(self.pin_dir)], check=False)


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else str(data)


# ---- probes ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Probe:
    vm: str
    kind: str  # tcp, udp, icmp
    dst: str
    port: int
    src: str


def expected(policy, probe: Probe, vm_of: dict[str, str]) -> bool:
    """The reference model's verdict for a probe: it leaves its VM, and enters the other VM when
    the destination is one (the lab internet answers whatever arrives)."""
    src, dst = ipaddress.ip_address(probe.src), ipaddress.ip_address(probe.dst)
    proto = PROTOCOLS[probe.kind] if probe.kind != "icmp" else PROTOCOLS["icmp" if src.version == 4 else "icmpv6"]
    port = probe.port if probe.kind != "icmp" else 0
    if not decide(policy, Packet(probe.vm, EGRESS, src, dst, proto, port)).allowed:
        return False
    peer = vm_of.get(probe.dst)
    return peer is None or decide(policy, Packet(peer, INGRESS, src, dst, proto, port)).allowed


def choose_probes(rnd: random.Random, topology, per_vm: int = 3) -> list[Probe]:
    out = []
    for vm in topology:
        for _ in range(per_vm):
            src = rnd.choice(vm.addresses)
            v6 = ":" in src
            others = [a for o in topology if o.name != vm.name for a in o.addresses if (":" in a) == v6]
            internet = list(policygen.INTERNET_PROBE_V6 if v6 else policygen.INTERNET_PROBE_V4)
            dst = rnd.choice(others) if others and rnd.random() < 0.6 else rnd.choice(internet)
            kind = rnd.choice(("tcp", "tcp", "udp", "icmp"))
            out.append(Probe(vm.name, kind, dst, rnd.choice(policygen.PROBE_PORTS) if kind != "icmp" else 0, src))
    return out


def run_probes(lab: Lab, probes: list[Probe], want: list[bool]) -> list[bool]:
    """Every VM's probes at once (one process per VM); True = the echo came back. A probe the
    model allows waits ANSWER_WAIT_S for its echo, one it drops SILENCE_WAIT_S (support.client_waits)."""
    by_vm: dict[str, list[int]] = {}
    for i, p in enumerate(probes):
        by_vm.setdefault(p.vm, []).append(i)
    procs = {}
    for vm, idx in by_vm.items():
        items = [[probes[i].kind, probes[i].dst, probes[i].port, probes[i].src, wait_s(want[i])] for i in idx]
        procs[vm] = lab.popen(vm, [PY, "-c", PROBE, json.dumps(items)], lab_resolver=False,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got: list[bool] = [False] * len(probes)
    for vm, proc in procs.items():
        out, err = proc.communicate(timeout=60 + ANSWER_WAIT_S)
        assert proc.returncode == 0, f"probe process in {vm} failed: {err}"
        for i, value in zip(by_vm[vm], json.loads(out)):
            got[i] = bool(value)
    return got


# TCP and UDP echo on each of the VM's own addresses (argv[1], comma-separated) and ports (argv[2]).
# Bound per address, not to the wildcard: a wildcard UDP socket answers from the route's preferred
# source, which for a VM with several addresses may not be the one the probe was sent to, and then
# the reply is a new flow rather than a reply (as it would be for any such server on a real VM).
LISTENER = r"""
import socket, sys, threading
addrs = sys.argv[1].split(","); ports = [int(p) for p in sys.argv[2].split(",")]
def echo(c):
    try:
        while True:
            d = c.recv(65536)
            if not d: break
            c.sendall(d)
    except OSError: pass
    finally: c.close()
def serve_tcp(s):
    while True:
        c, _ = s.accept(); threading.Thread(target=echo, args=(c,), daemon=True).start()
def serve_udp(s):
    while True:
        d, a = s.recvfrom(2048); s.sendto(d, a)
for addr in addrs:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    for p in ports:
        t = socket.socket(fam, socket.SOCK_STREAM); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind((addr, p)); t.listen(64); threading.Thread(target=serve_tcp, args=(t,), daemon=True).start()
        u = socket.socket(fam, socket.SOCK_DGRAM); u.bind((addr, p))
        threading.Thread(target=serve_udp, args=(u,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


def start_listener(lab: Lab, vm) -> subprocess.Popen:
    proc = lab.popen(vm.name, [PY, "-c", LISTENER, ",".join(vm.addresses), ",".join(map(str, policygen.PROBE_PORTS))],
                     lab_resolver=False, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"listener in {vm.name} did not start: {line!r}")
    return proc


DNS_QUERY = r"""
import socket, sys
from dnslib import DNSRecord, QTYPE
name, server, source, wait = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
q = DNSRecord.question(name, "AAAA" if ":" in server else "A")
s = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(wait); s.bind((source, 0))
try:
    s.sendto(q.pack(), (server, 53)); reply = DNSRecord.parse(s.recv(4096)); print(reply.header.rcode)
except OSError:
    print("none")
"""


# ---- playing a scenario ----------------------------------------------------------------------

@dataclass
class Run:
    """A scenario being played: what is in force, and what was done (for the failure message)."""

    scenario: Scenario
    op: Operator
    rnd: random.Random
    files: list[Path]
    in_force: object = None        # the parsed Policy the datapath enforces
    in_force_index: int = 0
    secrets: set = field(default_factory=set)          # names in the sealed store now
    secrets_applied: set = field(default_factory=set)  # ... when the policy in force was applied
    done: list = field(default_factory=list)
    stats: dict = field(default_factory=lambda: {"actions": 0, "probes": 0, "policies_up": 0,
                                                 "loads": 0, "mutants": 0, "dns": 0})

    @property
    def vm_of(self) -> dict[str, str]:
        return {a: vm.name for vm in self.scenario.topology for a in vm.addresses}

    # -- checks ------------------------------------------------------------------------------

    def check_daemon(self) -> None:
        log = self.op.new_log()
        marks = [m for m in CRASH_MARKS if m in log]
        assert not marks, f"the daemon's stderr shows {marks}"
        assert self.op.alive(), f"the daemon died (exit {self.op.proc.returncode if self.op.proc else None})"
        out = self.op.cli("status", "--json", state=True)
        assert out.returncode == 0, f"status --json exited {out.returncode}: {_text(out.stderr)}"
        status = json.loads(out.stdout)
        assert status["policy"]["sha256"] == self.in_force.sha256, \
            f"status says policy {status['policy']['sha256'][:12]}, but {self.in_force.sha256[:12]} is in force"
        self.check_parts(status)

    def check_parts(self, status: dict) -> None:
        """The parts the daemon hosts follow the policy in force (and the sealed store at the time
        the policy was applied); status names the store's names the policy needs and lacks."""
        policy = self.in_force
        needed = {c.secret for c in policy.credentials} | {t.certificate for t in policy.tls_termination}
        parts = status.get("parts")
        if parts is not None:
            wanted = {"dns": True, "credentials": bool(needed), "admin": policy.admin_ssh is not None}
            for name, want in wanted.items():
                state = parts.get(name)
                if not want:
                    assert state == "not needed", f"part {name} is {state!r}; the policy in force needs none"
                elif name != "credentials" or needed <= self.secrets_applied:
                    assert state == "running", f"part {name} is {state!r}; the policy needs it and has all it needs"
                elif not (needed <= self.secrets):
                    assert state in ("degraded", "failed"), \
                        f"part {name} is {state!r} though {sorted(needed - self.secrets)} are not in the store"
        secrets = status.get("secrets")
        if secrets is not None:
            ours = set(policygen.SECRET_NAMES + policygen.CERT_NAMES)
            missing = sorted(n for n in secrets.get("missing", []) if n in ours)
            assert missing == sorted(needed - self.secrets), f"status names missing secrets {missing}"
            unused = {n for n in secrets.get("unused", []) if n in ours}
            assert unused == self.secrets - needed, f"status names unused secrets {sorted(unused)}"

    def check_probes(self, policy=None) -> None:
        policy = policy or self.in_force
        probes = choose_probes(self.rnd, self.scenario.topology)
        want = [expected(policy, p, self.vm_of) for p in probes]
        got = run_probes(self.op.lab, probes, want)
        self.stats["probes"] += len(probes)
        wrong = [f"{p.vm} {p.kind} {p.src} -> {p.dst}:{p.port}: model says {'pass' if w else 'drop'}, "
                 f"got {'pass' if g else 'drop'}" for p, w, g in zip(probes, want, got) if w != g]
        assert not wrong, "probes disagree with the reference model:\n" + "\n".join(wrong)

    def check_log(self) -> None:
        out = self.op.cli("log", "verify", "--json", state=True)
        assert out.returncode == 0, f"log verify exited {out.returncode}: {_text(out.stdout)} {_text(out.stderr)}"
        json.loads(out.stdout)

    def check_ssh_listener(self) -> None:
        """The SSH access proxy listens exactly when the policy in force has admin.ssh."""
        ssh = self.in_force.admin_ssh
        listen = ssh.listen if ssh else None
        # Where it would listen: the policy's address, or the last one that was in force.
        if listen:
            self.last_listen = listen
        target = listen or getattr(self, "last_listen", None)
        if target is None:
            return
        host, _, port = target.rpartition(":")
        host = {"0.0.0.0": "127.0.0.1", "[::]": "::1"}.get(host, host.strip("[]"))
        # nothing listening there refuses at once: the connection is waited for as an answer
        code = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))"
                ".close(); print('open')\nexcept OSError: print('closed')")
        out = self.op.lab.exec("host", [PY, "-c", code, host, port, str(ANSWER_WAIT_S)], lab_resolver=False,
                               capture_output=True, text=True, timeout=ANSWER_WAIT_S + 30)
        state = out.stdout.strip()
        want = "open" if listen else "closed"
        assert state == want, (f"the SSH access proxy's {target} is {state}, but the policy in force "
                               f"{'has' if listen else 'has no'} admin.ssh")

    def check_all(self) -> None:
        self.check_daemon()
        self.check_ssh_listener()
        self.check_probes()
        self.check_log()

    # -- actions -----------------------------------------------------------------------------

    def start(self, index: int) -> None:
        self.validate_accepts(index)
        self.op.up(self.files[index])
        self.in_force, self.in_force_index = parse_policy(self.scenario.policies[index]), index
        self.in_force = _with_sha(self.in_force, self.files[index])
        self.secrets_applied = set(self.secrets)
        self.stats["policies_up"] += 1

    def validate_accepts(self, index: int) -> None:
        out = self.op.cli("policy", "validate", "--json", str(self.files[index]))
        assert out.returncode == 0, f"policy validate refuses a generated policy: {_text(out.stdout)}"
        assert json.loads(out.stdout)["valid"] is True

    def json_of(self, *args, state: bool = False):
        out = self.op.cli(*args, state=state)
        assert out.returncode == 0, f"skyguard {' '.join(args)} exited {out.returncode}: {_text(out.stderr)}"
        text = _text(out.stdout)
        try:
            return json.loads(text) if text.strip() else None
        except ValueError:
            return [json.loads(line) for line in text.splitlines() if line.strip()]  # JSON lines

    def plain(self, *args, state: bool = False) -> str:
        out = self.op.cli(*args, state=state)
        assert out.returncode == 0, f"skyguard {' '.join(args)} exited {out.returncode}: {_text(out.stderr)}"
        assert "Traceback" not in _text(out.stderr)
        return _text(out.stdout)

    def act(self, action: tuple) -> None:
        kind = action[0]
        self.done.append(action)
        self.stats["actions"] += 1
        if kind == "status":
            self.plain("status", state=True)
        elif kind == "status-json":
            self.json_of("status", "--json", state=True)
        elif kind == "flows":
            self.plain("flows", state=True)
        elif kind == "flows-json":
            self.json_of("flows", "--json", state=True)
        elif kind == "metrics":
            self.scrape()
        elif kind == "attest":
            att = self.json_of("attest", "--json", state=True)
            assert self.in_force.sha256 in json.dumps(att), "attest does not name the policy in force"
        elif kind == "admin-sessions":
            self.json_of("admin", "sessions", "--json", state=True)
        elif kind == "log-verify":
            self.check_log()
        elif kind == "diff":
            diff = self.json_of("policy", "diff", str(self.files[action[1]]), "--json", state=True)
            same = self.files[action[1]].read_bytes() == self.files[self.in_force_index].read_bytes()
            if same:
                assert not diff.get("changes"), f"diff of the running policy with itself: {diff}"
        elif kind == "load":
            self.validate_accepts(action[1])
            out = self.json_of("policy", "load", str(self.files[action[1]]), "--json", state=True)
            assert out["sha256"] == _sha(self.files[action[1]]), out
            self.in_force, self.in_force_index = _with_sha(parse_policy(self.scenario.policies[action[1]]),
                                                           self.files[action[1]]), action[1]
            self.secrets_applied = set(self.secrets)
            self.stats["loads"] += 1
        elif kind == "restart":
            code = self.op.stop("term")
            assert code == 0, f"the daemon exited {code} on SIGTERM"
            self.start(action[1])
        elif kind == "kill-up":
            self.op.stop("kill")
            self.check_probes()  # the programs outlive the daemon: the last policy still holds
            self.start(action[1])
        elif kind == "down-up":
            code = self.op.stop("down")
            assert code == 0, f"the daemon exited {code} after `skyguard down`"
            out = self.op.cli("status", state=True)
            assert out.returncode == 1 and "Traceback" not in _text(out.stderr), \
                f"status without a daemon: exit {out.returncode}, {_text(out.stderr)}"
            self.start(action[1])
        elif kind == "secret-set":
            out = self.op.cli("secret", "set", action[1], stdin=secret_value(action[1]), state=True)
            assert out.returncode == 0, f"secret set exited {out.returncode}: {_text(out.stderr)}"
            listed = self.json_of("secret", "list", "--json", state=True)
            assert action[1] in json.dumps(listed)
            self.secrets.add(action[1])
            assert secret_value(action[1]).decode(errors="replace")[:24] not in _text(out.stdout + out.stderr)
        elif kind == "secret-rm":
            out = self.op.cli("secret", "rm", action[1], state=True)
            want = {0} if action[1] in self.secrets else {1, 2}  # no such secret: an error, named
            assert out.returncode in want and "Traceback" not in _text(out.stderr), \
                f"secret rm {action[1]} exited {out.returncode}: {_text(out.stderr)}"
            self.secrets.discard(action[1])
        elif kind == "dns":
            self.dns_query(action[1], action[2])
        elif kind == "mutant":
            self.mutant(action[1], action[2])
        else:
            raise ValueError(f"unknown action {action!r}")

    def scrape(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        code = ("import urllib.request,sys; sys.stdout.write(urllib.request.urlopen("
                f"'http://127.0.0.1:{METRICS_PORT}/metrics', timeout=30).read().decode())")
        out = self.op.lab.exec("host", [PY, "-c", code], lab_resolver=False, capture_output=True, text=True,
                               timeout=60)
        assert out.returncode == 0, f"metrics scrape failed: {out.stderr[-2000:]}"
        families = {f.name for f in text_string_to_metric_families(out.stdout)}
        assert any(name.startswith("skyguard_") for name in families), sorted(families)[:20]

    def dns_query(self, vm_index: int, name_index: int) -> None:
        from skyguard.policy.fqdn import FqdnMatcher

        vm = self.scenario.topology[vm_index % len(self.scenario.topology)]
        names = policygen.dns_names(_doc_of(self.scenario.policies[self.in_force_index]))
        name = names[name_index % len(names)]
        source = vm.addresses[0]
        server = "2001:db8::53" if ":" in source else "192.0.2.53"
        for _ in range(2):  # an unanswered query is asked once more (a busy machine, a lost datagram)
            out = self.op.lab.exec(vm.name, [PY, "-c", DNS_QUERY, name, server, source, str(ANSWER_WAIT_S)],
                                   lab_resolver=False, capture_output=True, text=True, timeout=ANSWER_WAIT_S + 30)
            assert out.returncode == 0, out.stderr
            if out.stdout.strip() != "none":
                break
        policy = self.in_force
        zone = policy.workload(vm.name).zone
        answer = FqdnMatcher(policy).match(zone, name)
        refuse = 3 if policy.dns.refuse_with == "nxdomain" else 5
        want = 0 if answer.allowed and policy.dns.upstreams else refuse
        got = out.stdout.strip()
        self.stats["dns"] += 1
        assert got == str(want), f"DNS {name} from {vm.name} (zone {zone}): want rcode {want}, got {got}"

    def mutant(self, mutation: str, text: str) -> None:
        """`policy validate` and `skyguard up` (in a scratch namespace and state) must agree."""
        self.stats["mutants"] += 1
        path = self.op.work / f"mutant-{len(self.done)}.yaml"
        path.write_text(text)
        val = self.op.cli("policy", "validate", "--json", str(path))
        assert val.returncode in (0, 2) and "Traceback" not in _text(val.stderr), _text(val.stderr)
        valid = val.returncode == 0
        accepted, detail = scratch_up(self.op, path)
        assert accepted == valid, (f"mutation {mutation}: validate {'accepts' if valid else 'refuses'} it, "
                                   f"up {'accepts' if accepted else 'refuses'} it: {detail}")


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _with_sha(policy, path: Path):
    import dataclasses

    return dataclasses.replace(policy, sha256=_sha(path))


def _doc_of(text: str) -> dict:
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def scratch_up(op: Operator, path: Path) -> tuple[bool, str]:
    """`skyguard up --policy path` in a namespace of its own (no VM interfaces to take over) with
    its own state, run and pin dirs: (did it come up, its output)."""
    scratch = op.work / "scratch"
    subprocess.run(["rm", "-rf", str(scratch)], check=False)
    scratch.mkdir(parents=True)
    pins = Path("/sys/fs/bpf") / f"{op.lab.prefix}scratch"
    env = dict(op.daemon_env, SKYGUARD_RUN_DIR=str(scratch / "run"), SKYGUARD_PIN_DIR=str(pins))
    log_path = scratch / "up.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["unshare", "--net", "--", PY, "-m", "skyguard.cli.main", "up", "--policy",
                                 str(path), "--state-dir", str(scratch / "state"), "--metrics", "off"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd="/")
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False, f"exit {proc.returncode}: {log_path.read_text(errors='replace')[-1500:]}"
            state = ["--state-dir", str(scratch / "state")]
            status = subprocess.run([PY, "-m", "skyguard.cli.main", "status", "--json", *state], env=env,
                                    capture_output=True, timeout=CLI_TIMEOUT, cwd="/")
            if status.returncode == 0:
                subprocess.run([PY, "-m", "skyguard.cli.main", "down", *state], env=env, capture_output=True,
                               timeout=CLI_TIMEOUT, cwd="/")
                return True, "it answered status"
            time.sleep(0.3)
        return True, f"still running after {READY_TIMEOUT:.0f}s without answering status"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        subprocess.run(["rm", "-rf", str(pins)], check=False)


_LAB_SERIAL = [0]


def run_scenario(scenario: Scenario, work: Path, stats: dict | None = None) -> dict:
    """Build the lab for the scenario's VMs, start the daemon with its first policy, play every
    action with the checks after each, take everything down. Returns counts of what was done."""
    _LAB_SERIAL[0] += 1
    prefix = f"t{os.getpid() % 1000000}l{_LAB_SERIAL[0] % 100}-"
    work = Path(work) / prefix.rstrip("-")
    subprocess.run(["rm", "-rf", str(work)], check=False)
    work.mkdir(parents=True)
    files = []
    for i, text in enumerate(scenario.policies):
        files.append(work / f"policy-{i}.yaml")
        files[-1].write_text(text)
    # The lab holds exactly the scenario's VMs: built from a policy of them alone.
    lab_policy = work / "lab.yaml"
    lab_policy.write_text(policygen.to_yaml({"apiVersion": "skyguard/v1", "kind": "Policy",
                                             "metadata": {"name": "lab"},
                                             "zones": {"lab": {"workloads": [vm.workload() for vm in scenario.topology]}}}))
    lab = Lab(policy_path=lab_policy, prefix=prefix, lab_dir=work / "lab", progress=lambda m: None)
    rnd = random.Random(scenario.seed)
    op = Operator(lab, work, rnd)
    run = Run(scenario, op, rnd, files)
    listeners = []
    try:
        lab.up()
        listeners = [start_listener(lab, vm) for vm in scenario.topology]
        for name in scenario.secrets:
            out = op.cli("secret", "set", name, stdin=secret_value(name), state=True)
            assert out.returncode == 0, f"secret set {name}: {_text(out.stderr)}"
            run.secrets.add(name)
        run.done.append(("up", 0))
        run.start(0)
        run.check_all()
        for action in scenario.actions:
            run.act(action)
            run.check_all()
        return run.stats
    except AssertionError as e:
        raise AssertionError(f"{e}\n-- after actions {run.done}\n-- policy in force (#{run.in_force_index}):\n"
                             f"{scenario.policies[run.in_force_index]}\n-- daemon stderr (tail):\n"
                             f"{op.log_tail()}") from None
    finally:
        if stats is not None:
            for k, v in run.stats.items():
                stats[k] = stats.get(k, 0) + v
            stats["scenarios"] = stats.get("scenarios", 0) + 1
            stats["policies_generated"] = stats.get("policies_generated", 0) + len(scenario.policies)
        op.cleanup()
        for proc in listeners:
            stop_process(proc)
        lab.down()


# ---- the tests -------------------------------------------------------------------------------

EXAMPLES = int(os.environ.get("SKYGUARD_LIFECYCLE_EXAMPLES", "2"))
# Shrinking replays whole labs and daemons (~30 s each): not in CI. A failing example is printed
# whole (Scenario's repr) and becomes a regression case below.
BOUNDED = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                   phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


# Regression scenario: what an operator did on day one when issue 14 was filed. A policy with DNS
# names, CIDRs and SSH access; a VM learns a name; the operator loads a policy without a `dns:`
# section, names or `admin` (the SSH listener must close, learned state of the gone rule must not
# matter), loads the first again (the listener opens), restarts with the second (learned state
# of a rule the new policy lacks once locked `up` out), and reads status, flows, metrics, attest
# and the log with --state-dir.
_VMS = [policygen.Vm("web1", "sg-web1", "02:00:00:00:0a:01", ("10.20.0.2", "fd00:20::2")),
        policygen.Vm("db1", "sg-db1", "02:00:00:00:0a:02", ("10.20.0.3",))]
_WORKLOADS = """
    workloads:
      - {name: web1, interface: sg-web1, mac: "02:00:00:00:0a:01", addresses: [10.20.0.2, "fd00:20::2"]}
  data:
    workloads:
      - {name: db1, interface: sg-db1, mac: "02:00:00:00:0a:02", addresses: [10.20.0.3]}
"""
DAY_ONE = Scenario(
    topology=_VMS,
    policies=[
        "apiVersion: skyguard/v1\nkind: Policy\nmetadata: {name: day-one}\nzones:\n  front:" + _WORKLOADS + """\
rules:
  - {name: web-to-db, from: front, to: {zones: [data]}, ports: [tcp/5001, udp/514, icmp]}
  - {name: api, from: front, to: {fqdns: ["**.api.test", "*.cdn.test"]}, ports: [tcp/6514]}
  - {name: syslog, from: "*", to: {cidrs: [198.51.100.0/24, "2001:db8::/32"]}, ports: [udp/514, tcp/7]}
  - {name: no-metadata, action: deny, from: "*", to: {cidrs: [169.254.169.254/32, 198.51.100.7/32]}}
dns: {upstreams: [192.0.2.53]}
admin:
  ssh:
    listen: 127.0.0.1:2222
    operators:
      - {name: alice, public_key: "%s", may_access: "*"}
""" % policygen.SSH_KEYS[0],  # noqa: UP031 (the YAML's braces would all need doubling)
        "apiVersion: skyguard/v1\nkind: Policy\nmetadata: {name: day-two}\nzones:\n  front:" + _WORKLOADS + """\
rules:
  - {name: db-to-web, from: data, to: {zones: [front]}, ports: ["tcp/1-6000", icmpv6]}
  - {name: out, from: front, to: {networks: [doc]}, ports: [udp/514]}
networks:
  doc: [192.0.2.0/24, 198.51.100.128/25]
""",
    ],
    secrets=(),
    actions=[("metrics",), ("dns", 0, 0), ("load", 1), ("dns", 0, 0), ("load", 0), ("restart", 1),
             ("flows-json",), ("attest",)],
    seed=14)


@BOUNDED
@example(scenario=DAY_ONE)
@given(scenario=scenarios(max_vms=3, max_policies=2, min_actions=2, max_actions=5))
def test_any_policy_any_operator_action(root, tmp_path_factory, scenario):
    run_scenario(scenario, tmp_path_factory.mktemp("lifecycle"))


# Found by the long run: a VM's DNS query over IPv6 was decided and logged by the proxy, but the
# reply left from another address than the query was redirected to and was dropped by sg_to_vm
# (no_rule), so an IPv6-only VM resolved nothing (fixed in 4140ddd).
V6_DNS = Scenario(
    topology=[policygen.Vm("v6only", "sg-v6only", "02:00:00:00:0b:01", ("fd00:30::2",))],
    policies=["""apiVersion: skyguard/v1
kind: Policy
metadata: {name: v6-dns}
zones:
  z:
    workloads:
      - {name: v6only, interface: sg-v6only, mac: "02:00:00:00:0b:01", addresses: ["fd00:30::2"]}
rules:
  - {name: r, from: "*", to: {fqdns: ["**.x.test"]}, ports: [tcp/7]}
dns: {upstreams: ["2001:db8::53"]}
"""],
    secrets=(),
    actions=[("dns", 0, 0)],  # a.x.test, allowed: NOERROR expected
    seed=6)


def test_dns_over_ipv6_is_answered(root, tmp_path):
    run_scenario(V6_DNS, tmp_path)
