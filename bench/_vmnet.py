"""What the datapath benchmarks (tcp-throughput, flood, conn-rate) share: private namespaces routed
like the lab (a host namespace; each VM namespace has eth0 with one /32 and one /128, its peer in
the host carries the gateway 169.254.1.1 / fe80::1 and routes back), a generated policy with N
rules, the same rules as an nftables ruleset of sets, skyguard's Datapath attached in the host
namespace, and iperf3 between VMs.

Namespaces are named dix-<pid><role> and removed on exit, as are pins and nftables tables. This
module measures nothing by itself and prints no result; each benchmark does.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skyguard.datapath import progrun  # noqa: E402
from skyguard.policy.model import Destination, Policy, PortRange, Rule, Workload, Zone  # noqa: E402

TAG = f"dix-{os.getpid() % 100000}"
GATEWAY_V4, GATEWAY_V6 = "169.254.1.1", "fe80::1"
NFT_TABLE = "dixbench"


def sh(*cmd, check=True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


class Vm:
    def __init__(self, name: str, index: int, tag: str):
        self.name = name
        self.ns = f"{tag}{name}"
        self.host_if = f"dixv{os.getpid() % 10000}{name}"[:15]
        self.mac = f"02:00:00:20:{index:02x}:02"
        self.v4 = f"10.20.{index}.2"
        self.v6 = f"fd00:20:{index}::2"

    def cmd(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.ns}", "--"] + argv


class VmNet:
    """Context manager: host namespace + VMs (names), torn down on exit whatever happened."""

    def __init__(self, names=("a", "b")):
        self.host_ns = f"{TAG}h"
        self.vms = {n: Vm(n, i + 1, TAG) for i, n in enumerate(names)}
        self.pin_dir = Path(f"/sys/fs/bpf/{TAG}")
        self.pass_all_pin = Path(f"/sys/fs/bpf/{TAG}-pass-all")
        self._pass_all = None  # the pass-all program's BPF object, once compiled
        self._worker = None
        self.datapath = None

    def __enter__(self):
        try:
            self._build()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _build(self) -> None:
        sh("ip", "netns", "add", self.host_ns)
        host = ["link set lo up"]
        for vm in self.vms.values():
            sh("ip", "netns", "add", vm.ns)
            host += [f"link add {vm.host_if} type veth peer name eth0 address {vm.mac} netns {vm.ns}",
                     f"link set {vm.host_if} up", f"addr add {GATEWAY_V4}/32 dev {vm.host_if}",
                     f"addr add {GATEWAY_V6}/64 dev {vm.host_if} nodad",
                     f"route add {vm.v4}/32 dev {vm.host_if}", f"route add {vm.v6}/128 dev {vm.host_if}"]
        for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0"):
            sh("nsenter", f"--net=/run/netns/{self.host_ns}", "sysctl", "-qw", key)
        sh("ip", "-n", self.host_ns, "-batch", "-", input="\n".join(host) + "\n")
        for vm in self.vms.values():
            sh("nsenter", f"--net=/run/netns/{vm.ns}", "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
            cmds = ["link set lo up", "link set eth0 up", f"addr add {vm.v4}/32 dev eth0",
                    f"addr add {vm.v6}/128 dev eth0 nodad",
                    f"route add {GATEWAY_V4}/32 dev eth0 scope link",
                    f"route add default via {GATEWAY_V4} dev eth0 onlink",
                    f"route add ::/0 via {GATEWAY_V6} dev eth0"]
            sh("ip", "-n", vm.ns, "-batch", "-", input="\n".join(cmds) + "\n")
        # first packets resolve neighbours; do it now so no measurement pays for it
        for vm in self.vms.values():
            sh(*vm.cmd(["ping", "-c1", "-W2", GATEWAY_V4]), check=False)

    def __exit__(self, *exc):
        self.skyguard_off()
        self.nft_off()
        if self._worker:
            self._worker.close()
        for ns in [self.host_ns] + [vm.ns for vm in self.vms.values()]:
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                sh("kill", "-9", pid, check=False)
            sh("ip", "netns", "del", ns, check=False)
        sh("rm", "-rf", str(self.pin_dir), str(self.pass_all_pin), check=False)

    def host(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.host_ns}", "--"] + argv

    def host_mac(self, vm: Vm) -> str:
        return json.loads(sh(*self.host(["ip", "-j", "link", "show", "dev", vm.host_if])).stdout)[0]["address"]

    def rx_packets(self, vm: Vm) -> int:
        """Packets the host side of `vm`'s veth received (what the VM sent), for offered rates."""
        link = json.loads(sh(*self.host(["ip", "-j", "-s", "link", "show", "dev", vm.host_if])).stdout)[0]
        return link["stats64"]["rx"]["packets"]

    # ---- skyguard ------------------------------------------------------------------------------
    def skyguard_on(self, policy: Policy) -> None:
        from skyguard.datapath.datapath import Datapath

        if self._worker is None:
            self._worker = progrun.NetnsThread(f"/run/netns/{self.host_ns}")
        if self.datapath is None:
            self.datapath = self._worker.call(Datapath, self.pin_dir)
        if self.datapath.policy is not policy:
            self._worker.call(self.datapath.apply_policy, policy)
        for vm in self.vms.values():
            self._worker.call(self.datapath.attach, vm.host_if)

    def flow_log_on(self, log_dir: Path) -> None:
        """The daemon's flow logging as deployed: FlowLogger reading the datapath's ring and
        writing flow_start/flow_end entries durably to a real signed log in `log_dir`. Started
        in the host namespace's thread, so its names resolve where the VMs' interfaces are."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from skyguard.datapath.flowlog import FlowLogger
        from skyguard.tlog import LogWriter, Signer

        self._flow_writer = LogWriter(log_dir, Signer("bench.skyguard.test/log", Ed25519PrivateKey.generate()))
        self._flow_logger = self._worker.call(lambda: FlowLogger(self.datapath, self._flow_writer).start())

    def flow_log_off(self) -> dict:
        """Stop the flow log once it caught up; what it wrote and what the kernel could not
        put in the ring (counted, never silently)."""
        logger, writer = self._flow_logger, self._flow_writer
        logger.sync(timeout=120)
        lost = logger.lost_total
        self._worker.call(logger.stop)
        entries = writer.size
        writer.close()
        return {"entries": entries, "ring_lost": lost}

    def skyguard_detach(self) -> None:
        """Detach the programs but keep the loaded Datapath (the next skyguard_on re-attaches
        without compiling again)."""
        if self.datapath is not None:
            self._worker.call(self.datapath.detach_all)

    def skyguard_off(self) -> None:
        if self.datapath is not None:
            self._worker.call(self.datapath.detach_all)
            self.datapath.close()
            self.datapath = None
            sh("rm", "-rf", str(self.pin_dir), check=False)

    def skyguard_counters(self) -> dict:
        return self._worker.call(self.datapath.counters)

    # ---- the floor of a TC datapath ---------------------------------------------------------------
    def pass_all_on(self) -> None:
        """A one-instruction TC program (return TC_ACT_OK) at the hooks skyguard uses (from the VM at
        TC ingress, to the VM at TC egress of each host-side veth): what any TC datapath costs
        before it does anything."""
        from bcc import BPF

        from skyguard.datapath import libbpf

        if self._pass_all is None:
            self._pass_all = BPF(text="int sg_pass_all(struct __sk_buff *skb) { return 0; /* TC_ACT_OK */ }")
        fn = self._pass_all.load_func(b"sg_pass_all", BPF.SCHED_CLS)
        pinned = self.pass_all_pin
        if not pinned.exists():
            libbpf.pin(fn.fd, pinned)
        for vm in self.vms.values():
            sh(*self.host(["tc", "qdisc", "replace", "dev", vm.host_if, "clsact"]))
            for where in ("ingress", "egress"):
                sh(*self.host(["tc", "filter", "replace", "dev", vm.host_if, where, "prio", "1", "handle", "1", "bpf",
                               "direct-action", "object-pinned", str(pinned)]))

    def pass_all_off(self) -> None:
        for vm in self.vms.values():
            for where in ("ingress", "egress"):
                sh(*self.host(["tc", "filter", "del", "dev", vm.host_if, where, "prio", "1"]), check=False)

    # ---- nftables ------------------------------------------------------------------------------
    def nft_on(self, ruleset: str) -> None:
        path = Path(f"/tmp/{TAG}-nft.conf")
        path.write_text(ruleset)
        try:
            sh(*self.host(["nft", "-f", str(path)]))
        finally:
            path.unlink()

    def nft_counters(self) -> list[int]:
        """Packets counted by the ruleset's counters, in order: allowed v4, allowed v6, dropped."""
        out = json.loads(sh(*self.host(["nft", "-j", "list", "chain", "inet", NFT_TABLE, "forward"])).stdout)
        return [item["rule"]["expr"][-2]["counter"]["packets"] for item in out["nftables"]
                if "rule" in item and any("counter" in e for e in item["rule"]["expr"])]

    def nft_off(self) -> None:
        sh(*self.host(["nft", "delete", "table", "inet", NFT_TABLE]), check=False)

    # ---- traffic -------------------------------------------------------------------------------
    def iperf(self, client: Vm, server: Vm, seconds: float, port: int = 5201, cpu: int | None = None) -> float:
        """Gbit/s received by `server` from one TCP stream of `client` (both pinned to `cpu` if given)."""
        pin = ["-A", str(cpu)] if cpu is not None else []
        srv = subprocess.Popen(server.cmd(["iperf3", "-s", "-1", "-p", str(port)] + pin), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        try:
            for _ in range(50):  # until the server listens
                if sh(*server.cmd(["ss", "-Htln", f"sport = :{port}"])).stdout.strip():
                    break
                time.sleep(0.05)
            out = sh(*client.cmd(["iperf3", "-c", server.v4, "-p", str(port), "-t", str(seconds), "-J"] + pin),
                     check=False)
            if out.returncode != 0:
                raise RuntimeError(f"iperf3 {client.name} -> {server.name} failed: {out.stdout[-500:]} {out.stderr}")
            return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
        finally:
            srv.kill()
            srv.wait()


# ---- the rule set, for skyguard and for nftables -----------------------------------------------

def generated_rules(n_rules: int, zones: list[str], seed: int = 7):
    """n rules from the given zones to distinct CIDRs (/32s in 100.64.0.0/10, /24s from 172.16.0.0,
    /64s in 2001:db8::/32) on single ports and ranges, every 10th a deny: the kind of rule set a site
    with many partners accumulates. Deterministic for a seed. Yields (name, action, zone,
    network, proto, lo, hi)."""
    rng = random.Random(seed)
    base24 = int(ipaddress.ip_address("172.16.0.0"))  # /24s, disjoint from the /32s below
    base32 = int(ipaddress.ip_address("100.64.0.0"))
    for i in range(n_rules):
        zone = zones[i % len(zones)]
        if i % 4 == 3:
            net = ipaddress.ip_network(f"2001:db8:{i // 65536:x}:{i % 65536:x}::/64")
        else:
            plen = (32, 32, 24)[i % 3]
            net = ipaddress.ip_network((base24 + (i << 8), 24) if plen == 24 else (base32 + i, 32))
        proto = "tcp" if i % 3 else "udp"
        lo = rng.randrange(1024, 60000)
        hi = lo if i % 2 else lo + rng.randrange(1, 500)
        yield f"r{i}", "deny" if i % 10 == 9 else "allow", zone, net, proto, lo, hi


def bench_policy(net: VmNet, n_rules: int, allow: list[tuple[str, str, str, int]]) -> Policy:
    """One zone per VM; `allow` lists (from vm, to vm, proto, port) that the benchmark uses, the
    rest is n_rules of generated_rules from every zone."""
    zones = {vm.name: Zone(vm.name, (Workload(vm.name, vm.name, vm.host_if, vm.mac,
                                                (ipaddress.ip_address(vm.v4), ipaddress.ip_address(vm.v6))),))
             for vm in net.vms.values()}
    rules = [Rule(f"bench-{src}-{dst}-{proto}{port}", "allow", (src,), Destination(zones=(dst,)),
                  (PortRange(proto, port, port),)) for src, dst, proto, port in allow]
    for name, action, zone, cidr, proto, lo, hi in generated_rules(n_rules, list(zones)):
        rules.append(Rule(name, action, (zone,), Destination(cidrs=(cidr,)), (PortRange(proto, lo, hi),)))
    return Policy(f"bench-{n_rules}", zones, {}, tuple(rules))


def nft_ruleset(net: VmNet, n_rules: int, allow: list[tuple[str, str, str, int]]) -> str:
    """The same rules for nftables in the host's forward path: one concatenated interval set per
    family and verdict (source . destination . protocol . port), conntrack for replies, default
    drop. The workload addresses of each zone become the sources."""
    sets = {("allow", 4): [], ("allow", 6): [], ("deny", 4): [], ("deny", 6): []}
    for src, dst, proto, port in allow:
        s, d = net.vms[src], net.vms[dst]
        sets[("allow", 4)].append(f"{s.v4} . {d.v4} . {proto} . {port}")
        sets[("allow", 6)].append(f"{s.v6} . {d.v6} . {proto} . {port}")
    for _, action, zone, cidr, proto, lo, hi in generated_rules(n_rules, list(net.vms)):
        vm = net.vms[zone]
        src = vm.v4 if cidr.version == 4 else vm.v6
        ports = str(lo) if lo == hi else f"{lo}-{hi}"
        sets[(action, cidr.version)].append(f"{src} . {cidr} . {proto} . {ports}")
    lines = [f"table inet {NFT_TABLE} {{"]
    for (action, fam), elems in sets.items():
        addr = "ipv4_addr" if fam == 4 else "ipv6_addr"
        lines.append(f"  set {action}{fam} {{ type {addr} . {addr} . inet_proto . inet_service; flags interval;")
        if elems:
            lines.append("    elements = { " + ",\n      ".join(elems) + " }")
        lines.append("  }")
    lines += [
        "  chain forward {",
        "    type filter hook forward priority 0; policy drop;",
        "    ct state established,related accept",
        "    ip saddr . ip daddr . meta l4proto . th dport @deny4 drop",
        "    ip6 saddr . ip6 daddr . meta l4proto . th dport @deny6 drop",
        "    ip saddr . ip daddr . meta l4proto . th dport @allow4 counter accept",
        "    ip6 saddr . ip6 daddr . meta l4proto . th dport @allow6 counter accept",
        "    counter drop",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
