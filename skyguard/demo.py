"""`skyguard demo`: the main job on the embedded default policy, for a person watching.

Builds the lab, starts the daemon in the lab's host namespace with throwaway state, plays a short
scenario from inside lab VMs (allowed and denied flows, spoofing, DNS allow and deny, a credential
swap, an attempted exfiltration), shows what the datapath decided and why (read back from its
counters and conntrack, not assumed), verifies the signed log, and tears everything down.
Every address, name and placeholder a step uses is read from the policy the lab and the daemon get
(Cast, shared with the attack arena in skyguard/attack.py); the demo knows only the roles' names.
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
from skyguard.policy.model import Credential, Policy, Workload
from skyguard.policy.parse import load_policy

if TYPE_CHECKING:
    from skyguard.lab.lab import Lab

# The roles the demo's scenario (and the attack arena's kill chain, skyguard/attack.py) are written
# for, by workload name. Everything else about them (addresses, MACs, interfaces, zones, the
# placeholder the holder is given, the names it may reach) is read from the policy the lab and the
# daemon get (Cast), never copied here: a policy that readdresses them moves every step with it.
ATTACKER = "agent1"  # the sandboxed (in the attack arena: compromised) VM
DIRECTORY = "dc1"  # the crown jewel: the directory the authentication servers look users up in
RADIUS = "radius1"  # an authentication server; runs the legitimate LDAP session to the directory
HOLDER = "sdnctl1"  # holds a credential placeholder; manages the firewall
FIREWALL = "vfw1"  # the virtual firewall the SDN controller manages
SYSLOG_NETWORK = "logging"  # the policy's network of the site's syslog collector
# Outside any policy: the lab internet's addresses and names no rule gives anyone.
METADATA_V4 = "169.254.169.254"  # the cloud metadata service
UNLISTED_V4 = "203.0.113.66"  # an internet host no rule names
UNLISTED_NAME = "c2.evil.test"


@dataclass(frozen=True)
class Cast:
    """The workloads the demo and the attacks name, as the policy the lab and the daemon enforce
    defines them. A policy that drops one of the roles, or leaves it without what a step needs (an
    IPv4 or IPv6 address, a credential, a name to reach), fails here with the role and the policy
    file named, before any lab is built, instead of aiming steps at stale addresses."""

    policy: Policy
    needed_by: str = "skyguard demo"  # who needs the role, for the error message

    def _missing(self, what: str) -> SkyguardError:
        return SkyguardError(f"{self.needed_by} needs {what} in {self.policy.source}")

    def workload(self, name: str) -> Workload:
        found = self.policy.workload(name)
        if found is None:
            raise SkyguardError(f"{self.needed_by} needs a workload {name!r}; {self.policy.source} has none")
        return found

    def address(self, name: str, version: int) -> str:
        found = next((a for a in self.workload(name).addresses if a.version == version), None)
        if found is None:
            raise self._missing(f"an IPv{version} address for {name!r}")
        return str(found)

    def v4(self, name: str) -> str:
        return self.address(name, 4)

    def v6(self, name: str) -> str:
        return self.address(name, 6)

    @property
    def attacker(self) -> Workload:
        return self.workload(ATTACKER)

    def bystanders(self) -> list[str]:
        """Every workload but the attacker: where sniffers listen for what gets through."""
        return [w.name for w in self.policy.workloads() if w.name != ATTACKER]

    def zone_heads(self) -> list[str]:
        """The first workload of every zone but the attacker's: what a scan of the other zones hits."""
        return [z.workloads[0].name for z in self.policy.zones.values()
                if z.name != self.attacker.zone and z.workloads]

    @property
    def credential(self) -> Credential:
        """The credential the policy gives HOLDER's zone (its first destination is where it is swapped)."""
        zone = self.workload(HOLDER).zone
        found = next((c for c in self.policy.credentials if zone in c.zones and c.destinations), None)
        if found is None:
            raise self._missing(f"a credential with a destination for zone {zone!r} ({HOLDER})")
        return found

    @property
    def placeholder(self) -> str:
        """The placeholder of HOLDER's credential: all HOLDER ever knows of the secret."""
        return self.credential.placeholder

    def allowed_names(self, name: str) -> list[str]:
        """The name patterns allow rules let workload `name`'s zone reach, in policy order."""
        zone = self.workload(name).zone
        return [f for r in self.policy.rules if r.action == "allow" and zone in r.from_zones for f in r.to.fqdns]

    def other_allowed_host(self, name: str) -> str:
        """A host (no wildcard) `name` may reach that its credential is not for: where a leaked
        placeholder would go."""
        found = next((f for f in self.allowed_names(name)
                      if "*" not in f and f not in self.credential.destinations), None)
        if found is None:
            raise self._missing(f"an allowed host name for {name!r} other than its credential's")
        return found

    def allowed_domain(self, name: str) -> str:
        """The domain of the first wildcard name `name` may reach ("**.a.test" -> "a.test"): where
        names built from data would still match an allow rule."""
        found = next((f for f in self.allowed_names(name) if f.startswith("*")), None)
        if found is None:
            raise self._missing(f"a wildcard name (*.domain) allowed for {name!r}")
        return found.lstrip("*.")

    def syslog_collector(self) -> str:
        """The first IPv4 address of the policy's syslog network."""
        found = next((n.network_address for n in self.policy.networks.get(SYSLOG_NETWORK, ()) if n.version == 4), None)
        if found is None:
            raise self._missing(f"a network {SYSLOG_NETWORK!r} with an IPv4 address (the syslog collector)")
        return str(found)


def read_cast(policy_path: str | Path | None = None, needed_by: str = "skyguard demo") -> Cast:
    """The cast of the policy at `policy_path` (default: the policy `skyguard demo` and the lab use)."""
    return Cast(load_policy(config.DEFAULT_POLICY if policy_path is None else policy_path), needed_by)


def listeners() -> list[tuple[str, int]]:
    """TCP echo servers the scenario needs inside lab VMs: (vm, port)."""
    return [(DIRECTORY, 389), (FIREWALL, 830)]


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


def curl_with_placeholder(placeholder: str, host: str) -> list[str]:
    # {ca} is filled in by Demo: the skyguard CA the VM trusts for intercepted HTTPS.
    return ["curl", "-sS", "-m", "5", "--fail", "--cacert", "{ca}", "-H",
            f"Authorization: Bearer {placeholder}", f"https://{host}/"]


def dns_query(*names: str) -> list[str]:
    return vmtool("dns_query", *names)


def scenario(cast: Cast) -> list[Step]:
    """The demo's steps against the workloads of `cast` (read from the policy the demo runs)."""
    dc1_v4, dc1_v6 = cast.v4(DIRECTORY), cast.v6(DIRECTORY)
    syslog, github = cast.syslog_collector(), cast.credential.destinations[0]
    placeholder, other_host = cast.placeholder, cast.other_allowed_host(HOLDER)
    return [
        Step("RADIUS server looks a user up in the directory (LDAP)", RADIUS, probe("tcp", dc1_v4, 389), "allowed"),
        Step("same over IPv6", RADIUS, probe("tcp", dc1_v6, 389), "allowed"),
        Step("SDN controller pushes config to the firewall (NETCONF)", HOLDER,
             probe("tcp", cast.v4(FIREWALL), 830), "allowed"),
        Step("authentication server ships logs to the syslog collector", RADIUS, probe("udp", syslog, 514), "allowed"),
        Step("sandboxed agent tries LDAP on the directory (lateral movement)", ATTACKER,
             probe("tcp", dc1_v4, 389), "denied"),
        Step("firewall VM tries the directory (no rule)", FIREWALL, probe("tcp", dc1_v4, 389), "denied"),
        Step("sandboxed agent reaches for the cloud metadata service", ATTACKER,
             probe("tcp", METADATA_V4, 80), "denied"),
        Step("sandboxed agent posts to an unlisted internet host (exfiltration)", ATTACKER,
             probe("tcp", UNLISTED_V4, 443), "denied"),
        Step(f"SDN controller resolves {github} (allowed by name)", HOLDER, dns_query(github), "allowed", dns=True),
        Step("SDN controller calls the learned address over HTTPS", HOLDER,
             probe("tcp", str(addresses_for_name(github)[0]), 443), "allowed"),
        Step("sandboxed agent resolves a name no rule gives it", ATTACKER, dns_query(UNLISTED_NAME), "denied", dns=True),
        Step("sandboxed agent tunnels data out in DNS names under an allowed domain", ATTACKER,
             dns_query("--tunnel", "files." + cast.allowed_domain(ATTACKER)), "denied", dns=True),
        Step("SDN controller calls GitHub with its placeholder token (credential swap)", HOLDER,
             curl_with_placeholder(placeholder, github), "allowed", credential=True),
        Step("the placeholder sent to another allowed host (exfiltration attempt)", HOLDER,
             curl_with_placeholder(placeholder, other_host), "denied", credential=True),
        Step("sandboxed agent spoofs the directory's address", ATTACKER,
             probe("udp", syslog, 514, src=dc1_v4), "denied",
             setup=[["ip", "addr", "add", f"{dc1_v4}/32", "dev", "eth0"]]),
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


def tls_keys(cast: Cast) -> list[tuple[str, str]]:
    """(key store name, host name) of a self-signed key for every service the policy terminates TLS
    for: the demo provisions them, as an operator would, so the daemon can start."""
    return [(t.certificate, f"{t.workload}.test") for t in cast.policy.tls_termination]


class Demo:
    needed_by = "skyguard demo"  # who needs the cast's roles, in the error a policy without one gets

    def __init__(self, console: Console | None = None, keep: bool = False, policy_path: str | Path | None = None):
        # Not a terminal (CI, a pipe): wide enough that reasons stay on one line.
        self.console = console or Console(width=None if sys.stdout.isatty() else 160)
        self.keep = keep
        # One policy file for the lab, the daemon and the cast; a policy without the roles fails
        # here, before any lab or temporary folder exists.
        self.policy_path = Path(config.DEFAULT_POLICY if policy_path is None else policy_path)
        self.cast = read_cast(self.policy_path, self.needed_by)
        self.steps = self.script()
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

    def script(self) -> list:
        """What run() plays, built from the cast when the demo is set up (so before any lab)."""
        return scenario(self.cast)

    # ---- helpers --------------------------------------------------------------------------
    def say(self, text: str) -> None:
        self.console.print(text)

    def skyguard(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "skyguard.cli.main", *args], env=self.env,
                              capture_output=True, text=True, **kw)

    def control(self, op: str, **args) -> dict:
        """One request to the demo's daemon (its control socket lives in the demo's run dir)."""
        from skyguard import control

        return control.request(op, socket_file=Path(self.env["SKYGUARD_RUN_DIR"]) / "control.sock", **args)

    # ---- the show --------------------------------------------------------------------------
    def run(self) -> int:
        from skyguard.lab import Lab

        try:
            self.say("[bold]1. Building the lab[/] (one network namespace per workload of "
                     f"{self.policy_path.name}, a routed host, a sealed internet)")
            self.lab = Lab(policy_path=self.policy_path, prefix=config.LAB_PREFIX,
                           progress=lambda m: self.console.print(f"   [dim]{m}[/]"))
            self.lab.up()
            shown = (self.policy_path.relative_to(config.REPO_ROOT) if self.policy_path.is_relative_to(config.REPO_ROOT)
                     else self.policy_path)
            self.say(f"[bold]2. Starting skyguard[/] in the lab host with {shown}")
            self.start_daemon()
            self.say("[bold]3. Playing the scenario[/] from inside the lab VMs")
            steps = self.play(self.steps)
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
        """What an operator does once: the real secret of HOLDER's credential and the TLS keys of
        the policy's terminated services go into skyguard's sealed store; the VMs never see them."""
        import secrets as random

        self.real_token = "ghp_" + random.token_hex(16)
        stored = self.skyguard("secret", "set", self.cast.credential.secret, input=self.real_token)
        if stored.returncode != 0:
            raise SkyguardError(f"storing the demo secret failed: {stored.stderr.strip()}")
        for name, host in tls_keys(self.cast):
            bundle = self.workdir / f"{name}.pem"
            bundle.write_bytes(_self_signed_bundle(host))
            stored = self.skyguard("secret", "set", name, "--file", str(bundle))
            bundle.unlink()
            if stored.returncode != 0:
                raise SkyguardError(f"storing the demo TLS key {name!r} failed: {stored.stderr.strip()}")
        tls = ", ".join(t.workload for t in self.cast.policy.tls_termination)
        self.say(f"   stored the real {self.cast.credential.name} secret" + (f" and {tls}'s TLS key" if tls else "")
                 + " in skyguard's sealed store")

    def start_daemon(self) -> None:
        self.provision_secrets()
        log_path = self.workdir / "daemon.log"
        self.daemon = self.lab.popen(
            "host", [sys.executable, "-m", "skyguard.cli.main", "up", "--policy",
                     str(self.policy_path), "--metrics", "off", "--upstream-ca", str(self.lab.ca_cert)],
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
        for vm, port in listeners():
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
        """Did the lab's echo server (standing in for the credential's destination) receive the real token in this step?"""
        if not self.lab.requests_log.exists():
            return ""
        with open(self.lab.requests_log, "rb") as log:
            log.seek(self.upstream_mark)
            seen = self.real_token.encode() in log.read()
        return f"; {self.cast.credential.destinations[0]} received the real token" if seen else ""

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
