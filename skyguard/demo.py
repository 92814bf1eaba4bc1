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
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from skyguard import config
from skyguard.errors import SkyguardError
from skyguard.lab.addressing import addresses_for_name

if TYPE_CHECKING:
    from skyguard.lab.lab import Lab

# TCP echo servers a scenario needs inside lab VMs: (vm, port).
_LISTENERS = [("dc1", 389), ("vfw1", 830)]


def vmtool(name: str, *args: str) -> list[str]:
    """The argv that runs skyguard/vmtools/<name>.py with `args` (inside a lab VM: lab.exec/popen)."""
    return [sys.executable, "-m", f"skyguard.vmtools.{name}", *args]


def echo_server(port: int) -> list[str]:
    return vmtool("echo", str(port))


@dataclass
class Step:
    title: str
    vm: str
    argv: list[str]
    expect: str  # "allowed" or "denied"
    why: str = ""  # filled in from what the datapath reports
    got: str = ""
    setup: list[list[str]] = field(default_factory=list)  # commands run in the VM first
    dns: bool = False  # the decision is the DNS proxy's (read from the log), not the datapath's
    credential: bool = False  # the decision is the credential proxy's (read from the log)


def probe(proto: str, host: str, port: int, src: str | None = None) -> list[str]:
    return vmtool("probe", proto, host, str(port), *([src] if src else []))


PLACEHOLDER = "sg-placeholder-github-7f3a"  # policies/keysystems.yaml: all the VM ever holds


def curl_with_placeholder(host: str) -> list[str]:
    # {ca} is filled in by Demo: the skyguard CA the VM trusts for intercepted HTTPS.
    return ["curl", "-sS", "-m", "5", "--fail", "--cacert", "{ca}", "-H",
            f"Authorization: Bearer {PLACEHOLDER}", f"https://{host}/"]


def dns_query(*names: str) -> list[str]:
    return vmtool("dns_query", *names)


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
        Step("SDN controller resolves api.github.test (allowed by name)", "sdnctl1",
             dns_query("api.github.test"), "allowed", dns=True),
        Step("SDN controller calls the learned address over HTTPS", "sdnctl1",
             probe("tcp", str(addresses_for_name("api.github.test")[0]), 443), "allowed"),
        Step("sandboxed agent resolves a name no rule gives it", "agent1",
             dns_query("c2.evil.test"), "denied", dns=True),
        Step("sandboxed agent tunnels data out in DNS names under an allowed domain", "agent1",
             dns_query("--tunnel", "files.pythonhosted.test"), "denied", dns=True),
        Step("SDN controller calls GitHub with its placeholder token (credential swap)", "sdnctl1",
             curl_with_placeholder("api.github.test"), "allowed", credential=True),
        Step("the placeholder sent to another allowed host (exfiltration attempt)", "sdnctl1",
             curl_with_placeholder("deb.debian.test"), "denied", credential=True),
        Step("sandboxed agent spoofs the directory's address", "agent1",
             probe("udp", "192.0.2.10", 514, src="10.10.2.2"), "denied",
             setup=[["ip", "addr", "add", "10.10.2.2/32", "dev", "eth0"]]),
    ]


def _self_signed_bundle(name: str) -> bytes:
    """A certificate and key (PEM, certificate first) for a VM service whose TLS skyguard terminates."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()))


class Demo:
    def __init__(self, console: Console | None = None, keep: bool = False):
        # Not a terminal (CI, a pipe): wide enough that reasons stay on one line.
        self.console = console or Console(width=None if sys.stdout.isatty() else 160)
        self.keep = keep
        self.workdir = Path(tempfile.mkdtemp(prefix="skyguard-demo-"))
        self.env = dict(os.environ,
                        SKYGUARD_STATE_DIR=str(self.workdir / "state"),
                        SKYGUARD_RUN_DIR=str(self.workdir / "run"),
                        SKYGUARD_PIN_DIR=str(config.PIN_DIR.parent / f"skyguard-demo-{os.getpid()}"),
                        PYTHONPATH=str(config.REPO_ROOT))
        self.lab: Lab | None = None
        self.daemon: subprocess.Popen | None = None
        self.helpers: list[subprocess.Popen] = []
        self.log_mark = 0  # log size before the current step
        self.upstream_mark = 0  # size of the lab echo server's request log before the current step
        self.ca_file = self.workdir / "skyguard-ca.pem"  # what the VMs trust for intercepted HTTPS
        self.real_token = ""

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

    def provision_secrets(self) -> None:
        """What an operator does once: the real GitHub token and sdnctl1's TLS key go into
        skyguard's sealed store; the VMs never see either."""
        import secrets as random

        self.real_token = "ghp_" + random.token_hex(16)
        stored = self.skyguard("secret", "set", "github", input=self.real_token)
        if stored.returncode != 0:
            raise SkyguardError(f"storing the demo secret failed: {stored.stderr.strip()}")
        bundle = self.workdir / "sdnctl1.pem"
        bundle.write_bytes(_self_signed_bundle("sdnctl1.test"))
        stored = self.skyguard("secret", "set", "sdnctl1", "--file", str(bundle))
        bundle.unlink()
        if stored.returncode != 0:
            raise SkyguardError(f"storing the demo TLS key failed: {stored.stderr.strip()}")
        self.say("   stored the real GitHub token and sdnctl1's TLS key in skyguard's sealed store")

    def start_daemon(self) -> None:
        self.provision_secrets()
        log_path = self.workdir / "daemon.log"
        self.daemon = self.lab.popen(
            "host", [sys.executable, "-m", "skyguard.cli.main", "up", "--policy",
                     str(config.DEFAULT_POLICY), "--metrics", "off", "--upstream-ca", str(self.lab.ca_cert)],
            env=self.env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise SkyguardError(f"the daemon exited at start; its log: {log_path}\n" + log_path.read_text()[-2000:])
            status = self.skyguard("status", "--json")
            if status.returncode == 0:
                attached = json.loads(status.stdout)["interfaces"]
                self.say(f"   daemon up; programs attached to {len(attached)} VM interfaces")
                ca = self.skyguard("ca", "export")
                self.ca_file.write_text(ca.stdout)
                return
            time.sleep(0.5)
        raise SkyguardError(f"the daemon did not answer within 120 s; its log: {log_path}")

    def play(self, steps: list[Step]) -> list[Step]:
        for vm, port in _LISTENERS:
            self.helpers.append(self.lab.popen(vm, echo_server(port),
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)
        for step in steps:
            for cmd in step.setup:
                self.lab.exec(step.vm, cmd, capture_output=True)
            before = self.control("status")["counters"]
            self.log_mark = self.log_size()
            self.upstream_mark = self.lab.requests_log.stat().st_size if self.lab.requests_log.exists() else 0
            argv = [str(self.ca_file) if a == "{ca}" else a for a in step.argv]
            done = self.lab.exec(step.vm, argv, capture_output=True, text=True)
            step.got = "allowed" if done.returncode == 0 else "denied"
            if step.credential and self.real_token in done.stdout + done.stderr:
                step.got = "LEAKED"  # the real secret must never come back to a VM
            step.why = self.explain(before, self.control("status")["counters"], step)
            mark = "[green]" if step.got == step.expect else "[bold red]"
            self.say(f"   {mark}{step.got:8}[/] {step.vm:8} {step.title}  [dim]({step.why})[/]")
        return steps

    def explain(self, before: dict, after: dict, step: Step) -> str:
        """Why, as skyguard reports it: the DNS proxy's last logged decision for the VM, new drop
        reasons in the datapath's counters, or the rule of the flow's conntrack entry."""
        if step.dns:
            return self.logged(step.vm, "dns", lambda rs: f"DNS {rs[-1]['verdict']}: {rs[-1]['reason']}")
        if step.credential:
            return self.logged(step.vm, "credential", lambda rs: "credential proxy: " + ", ".join(
                r["result"] if r["result"] in ("swapped", "scrubbed") else f"{r['result']} ({r.get('reason')})"
                for r in rs) + self.upstream_saw_secret())
        def drops(c):
            return {(d["zone"], d["direction"], d["reason"]): d["packets"] for d in c["drops"]}
        b, a = drops(before), drops(after)
        new = [f"{k[2]} at {k[1]} of {k[0]}" for k, v in a.items() if v > b.get(k, 0)]
        if step.got == "denied":
            return "dropped: " + ", ".join(new) if new else "no answer"
        host, port = step.argv[-2], int(step.argv[-1])
        rules = {f["rule"] for f in self.control("conntrack")["flows"] if f["dst"] == host and f["dport"] == port}
        return "rule " + ", ".join(sorted(rules)) if rules else "allowed"

    def upstream_saw_secret(self) -> str:
        """Did the lab's echo server (standing in for GitHub) receive the real token in this step?"""
        if not self.lab.requests_log.exists():
            return ""
        with open(self.lab.requests_log, "rb") as log:
            log.seek(self.upstream_mark)
            seen = self.real_token.encode() in log.read()
        return "; api.github.test received the real token" if seen else ""

    def logged(self, workload: str, kind: str, describe) -> str:
        """Describe the decisions of `kind` logged for `workload` during this step. They are
        logged in the next group commit, not before the answer: poll briefly."""
        from skyguard.tlog import LogReader
        from skyguard.tlog.entries import decode

        deadline = time.monotonic() + 3
        while True:
            reader = LogReader(Path(self.env["SKYGUARD_STATE_DIR"]) / "log")
            records = [r for r in map(decode, map(reader.entry, range(self.log_mark, reader.size)))
                       if r.get("type") == kind and r.get("workload") == workload]
            if records:
                return describe(records)
            if time.monotonic() > deadline:
                return f"no {kind} decision logged"
            time.sleep(0.1)

    def log_size(self) -> int:
        from skyguard.tlog import LogReader

        return LogReader(Path(self.env["SKYGUARD_STATE_DIR"]) / "log").size

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
