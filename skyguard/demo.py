"""`skyguard demo`: the main job on the embedded default policy, for a person watching.

Builds the lab, starts the daemon in the lab's host namespace with throwaway state, plays a short
scenario from inside lab VMs (allowed and denied flows, spoofing, DNS allow and deny, a credential
swap, an attempted exfiltration), shows what the datapath decided and why (read back from its
counters and conntrack, not assumed), verifies the signed log, and tears everything down.
Not a test harness: the tests in tests/integration assert the same behaviour on their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from skyguard import config
from skyguard.errors import SkyguardError

# A tiny client run inside a lab VM: connect (tcp) or send-and-await-echo (udp) or ping; prints
# "ok" or the error. Exit status 0 means the traffic got through.
_PROBE = r"""
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
src = sys.argv[4] if len(sys.argv) > 4 else None
family = socket.AF_INET6 if ":" in host else socket.AF_INET
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
s = socket.socket(family, kind); s.settimeout(1.5)
try:
    if src: s.bind((src, 0))
    if proto == "tcp":
        s.connect((host, port)); s.sendall(b"demo"); s.recv(16)
    else:
        s.sendto(b"demo", (host, port)); s.recvfrom(16)
    print("ok")
except OSError as e:
    print(type(e).__name__); sys.exit(1)
"""

# TCP echo servers a scenario needs inside lab VMs: (vm, port).
_LISTENERS = [("dc1", 389), ("vfw1", 830)]
_LISTEN = r"""
import socket, sys, threading
def serve(conn):
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)
l = socket.socket(socket.AF_INET6); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); l.bind(("::", int(sys.argv[1]))); l.listen(64)
while True:
    threading.Thread(target=serve, args=(l.accept()[0],), daemon=True).start()
"""


@dataclass
class Step:
    title: str
    vm: str
    argv: list[str]
    expect: str  # "allowed" or "denied"
    why: str = ""  # filled in from what the datapath reports
    got: str = ""
    setup: list[list[str]] = field(default_factory=list)  # commands run in the VM first


def probe(proto: str, host: str, port: int, src: str | None = None) -> list[str]:
    return ["python3", "-c", _PROBE, proto, host, str(port)] + ([src] if src else [])


def scenario() -> list[Step]:
    return [
        Step("RADIUS server looks a user up in the directory (LDAP)", "radius1",
             probe("tcp", "10.10.2.2", 389), "allowed"),
        Step("same over IPv6", "radius1", probe("tcp", "fd00:10:2::2", 389), "allowed"),
        Step("SDN controller pushes config to the firewall (NETCONF)", "sdnctl1",
             probe("tcp", "10.10.4.2", 830), "allowed"),
        Step("authentication server ships logs to the syslog collector", "radius1",
             probe("udp", "192.0.2.10", 514), "allowed"),
        Step("sandboxed agent tries LDAP on the directory (lateral movement)", "agent1",
             probe("tcp", "10.10.2.2", 389), "denied"),
        Step("firewall VM tries the directory (no rule)", "vfw1", probe("tcp", "10.10.2.2", 389), "denied"),
        Step("sandboxed agent reaches for the cloud metadata service", "agent1",
             probe("tcp", "169.254.169.254", 80), "denied"),
        Step("sandboxed agent posts to an unlisted internet host (exfiltration)", "agent1",
             probe("tcp", "203.0.113.66", 443), "denied"),
        Step("sandboxed agent spoofs the directory's address", "agent1",
             probe("udp", "192.0.2.10", 514, src="10.10.2.2"), "denied",
             setup=[["ip", "addr", "add", "10.10.2.2/32", "dev", "eth0"]]),
    ]


class Demo:
    def __init__(self, console: Console | None = None, keep: bool = False):
        self.console = console or Console(stderr=False)
        self.keep = keep
        self.workdir = Path(tempfile.mkdtemp(prefix="skyguard-demo-"))
        self.env = dict(os.environ,
                        SKYGUARD_STATE_DIR=str(self.workdir / "state"),
                        SKYGUARD_RUN_DIR=str(self.workdir / "run"),
                        SKYGUARD_PIN_DIR=str(config.PIN_DIR.parent / f"skyguard-demo-{os.getpid()}"),
                        PYTHONPATH=str(config.REPO_ROOT))
        self.lab = None
        self.daemon = None
        self.helpers: list[subprocess.Popen] = []

    # ---- helpers --------------------------------------------------------------------------
    def say(self, text: str) -> None:
        self.console.print(text)

    def skyguard(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "skyguard.cli.main", *args], env=self.env,
                              capture_output=True, text=True, **kw)

    def control(self, op: str, **args) -> dict:
        """One request to the demo's daemon (its control socket lives in the demo's run dir)."""
        from skyguard import control

        saved, config.RUN_DIR = config.RUN_DIR, Path(self.env["SKYGUARD_RUN_DIR"])
        try:
            return control.request(op, **args)
        finally:
            config.RUN_DIR = saved

    # ---- the show --------------------------------------------------------------------------
    def run(self) -> int:
        from skyguard.lab import Lab

        try:
            self.say("[bold]1. Building the lab[/] (one network namespace per workload of "
                     f"{config.DEFAULT_POLICY.name}, a routed host, a sealed internet)")
            self.lab = Lab(policy_path=config.DEFAULT_POLICY, prefix=config.LAB_PREFIX,
                           progress=lambda m: self.console.print(f"   [dim]{m}[/]"))
            self.lab.up()
            self.say("[bold]2. Starting skyguard[/] in the lab host with policies/keysystems.yaml")
            self.start_daemon()
            self.say("[bold]3. Playing the scenario[/] from inside the lab VMs")
            steps = self.play(scenario())
            self.show(steps)
            self.say("[bold]4. Verifying the signed log[/]")
            verified = self.skyguard("log", "verify")
            self.say("   " + (verified.stdout.strip() or verified.stderr.strip()))
            failures = [s for s in steps if s.got != s.expect]
            if failures or verified.returncode != 0:
                self.say(f"[bold red]demo FAILED[/]: {len(failures)} step(s) not decided as expected")
                return 1
            self.say("[bold green]demo ok[/]: every step decided as the policy says, the log verifies")
            return 0
        finally:
            self.teardown()

    def start_daemon(self) -> None:
        log_path = self.workdir / "daemon.log"
        self.daemon = self.lab.popen(
            "host", [sys.executable, "-m", "skyguard.cli.main", "up", "--policy",
                     str(config.DEFAULT_POLICY), "--metrics", "off"],
            env=self.env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise SkyguardError(f"the daemon exited at start; its log: {log_path}\n" + log_path.read_text()[-2000:])
            status = self.skyguard("status", "--json")
            if status.returncode == 0:
                attached = json.loads(status.stdout)["interfaces"]
                self.say(f"   daemon up; programs attached to {len(attached)} VM interfaces")
                return
            time.sleep(0.5)
        raise SkyguardError(f"the daemon did not answer within 120 s; its log: {log_path}")

    def play(self, steps: list[Step]) -> list[Step]:
        for vm, port in _LISTENERS:
            self.helpers.append(self.lab.popen(vm, ["python3", "-c", _LISTEN, str(port)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)
        for step in steps:
            for cmd in step.setup:
                self.lab.exec(step.vm, cmd, capture_output=True)
            before = self.control("status")["counters"]
            done = self.lab.exec(step.vm, step.argv, capture_output=True, text=True)
            step.got = "allowed" if done.returncode == 0 else "denied"
            step.why = self.explain(before, self.control("status")["counters"], step)
            mark = "[green]" if step.got == step.expect else "[bold red]"
            self.say(f"   {mark}{step.got:8}[/] {step.vm:8} {step.title}  [dim]({step.why})[/]")
        return steps

    def explain(self, before: dict, after: dict, step: Step) -> str:
        """Why, as the datapath reports it: new drop reasons, or the rule of the flow's conntrack entry."""
        def drops(c):
            return {(d["zone"], d["direction"], d["reason"]): d["packets"] for d in c["drops"]}
        b, a = drops(before), drops(after)
        new = [f"{k[2]} at {k[1]} of {k[0]}" for k, v in a.items() if v > b.get(k, 0)]
        if step.got == "denied":
            return "dropped: " + ", ".join(new) if new else "no answer"
        host, port = step.argv[-2], int(step.argv[-1])
        rules = {f["rule"] for f in self.control("conntrack")["flows"] if f["dst"] == host and f["dport"] == port}
        return "rule " + ", ".join(sorted(rules)) if rules else "allowed"

    def show(self, steps: list[Step]) -> None:
        table = Table(title="What skyguard decided")
        for col in ("VM", "attempt", "expected", "decided", "why"):
            table.add_column(col)
        for s in steps:
            color = "green" if s.got == s.expect else "red"
            table.add_row(s.vm, s.title, s.expect, f"[{color}]{s.got}[/]", s.why)
        self.console.print(table)

    def teardown(self) -> None:
        for p in self.helpers:
            p.kill()
        if self.daemon is not None and self.daemon.poll() is None:
            self.say("[bold]5. Stopping skyguard[/] (detaching every program)")
            self.skyguard("down")
            try:
                self.daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
        if self.lab is not None and not self.keep:
            self.say("[bold]6. Tearing the lab down[/]")
            self.lab.down()
