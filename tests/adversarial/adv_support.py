"""Shared pieces of the adversarial and fuzz tiers: a fast raw frame builder (scapy is too slow
for a million packets), the random policy and packet generators of the differential test, and
DatapathRunner, which runs one frame through the real programs with BPF_PROG_RUN and reads the
verdict and the drop reason back from the kernel's counters.

Not here: fixtures (conftest.py) or the lab kill chain (skyguard/attack.py).
"""

from __future__ import annotations

import ipaddress
import random
import struct

from skyguard.datapath import abi, libbpf, progrun
from skyguard.datapath.reasons import reason_name
from skyguard.policy.model import Destination, Policy, PortRange, Rule, Workload, Zone
from support.refmodel import EGRESS, FLOW, ICMP_ERROR, INGRESS, ND, PROTOCOLS, Packet

# The interfaces the BPF-tier namespace of this tier holds (veth pairs; names <= 15 characters).
IFACES = [f"avx-if{i}" for i in range(6)]
MACS = [f"02:00:00:aa:00:{i + 1:02x}" for i in range(len(IFACES))]
GW_MAC = "02:00:00:00:00:01"
GRE = 47


# ---- frames ----------------------------------------------------------------------------------

def _mac(m: str) -> bytes:
    return bytes.fromhex(m.replace(":", ""))


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def l4_bytes(proto: int, sport: int, dport: int, v6: bool, ident: int = 0, flags: int = 0x02) -> bytes:
    if proto == 6:
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 64240, 0, 0)
    if proto == 17:
        return struct.pack("!HHHH", sport, dport, 8 + 4, 0) + b"ping"
    if proto in (1, 58):
        kind = 128 if v6 else 8  # echo request
        return struct.pack("!BBHHH", kind, 0, 0, ident, 1) + b"ping"
    return b"\0" * 8  # GRE or anything else: an opaque payload


def ip_packet(src, dst, proto: int, l4: bytes, ttl: int = 64) -> bytes:
    """One IPv4 or IPv6 packet (no options, no extension headers)."""
    src, dst = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if src.version == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, ttl, proto, 0, src.packed, dst.packed)
        return hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:] + l4
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, ttl, src.packed, dst.packed) + l4


def frame(src_mac: str, dst_mac: str, src, dst, proto: int, l4: bytes, ttl: int = 64) -> bytes:
    """An Ethernet frame carrying one IPv4 or IPv6 packet (no options, no extension headers)."""
    ethertype = b"\x08\x00" if ipaddress.ip_address(src).version == 4 else b"\x86\xdd"
    return _mac(dst_mac) + _mac(src_mac) + ethertype + ip_packet(src, dst, proto, l4, ttl)


def control_l4(p: Packet) -> bytes:
    """ICMP_ERROR: a destination-unreachable about a UDP packet from the outer destination to the
    outer source (the shape of a related error; no flow has its ports). ND: a neighbour
    solicitation for the VM's own address, hop limit 64 (set by the caller's frame)."""
    v6 = p.src.version == 6
    if p.kind == ICMP_ERROR:
        inner = ip_packet(p.dst, p.src, 17, struct.pack("!HHHH", 1, 2, 8, 0))
        return struct.pack("!BBHI", 1 if v6 else 3, 3, 0, 0) + inner
    own = p.src if p.direction == EGRESS else p.dst
    return struct.pack("!BBHI", 135, 0, 0, 0) + own.packed


def packet_frame(p: Packet, mac: str, sport: int, ident: int) -> bytes:
    """The frame that carries refmodel Packet p across its workload's interface."""
    v6 = p.src.version == 6
    l4 = l4_bytes(p.proto, sport, p.port, v6, ident) if p.kind == FLOW else control_l4(p)
    if p.direction == EGRESS:
        return frame(mac, GW_MAC, p.src, p.dst, p.proto, l4)
    return frame(GW_MAC, mac, p.src, p.dst, p.proto, l4)


# ---- random policies and packets -------------------------------------------------------------

def _interesting_ports(rnd: random.Random) -> PortRange:
    proto = rnd.choice(("tcp", "tcp", "udp", "icmp", "icmpv6"))
    if proto in ("icmp", "icmpv6"):
        return PortRange(proto)
    lo = rnd.choice((1, 22, 53, 80, 135, 389, 443, 445, 1024, 8000, 49152, rnd.randrange(1, 65536)))
    hi = min(65535, lo + rnd.choice((0, 0, 0, 1, 7, 100, 1000, 30000)))
    return PortRange(proto, lo, hi)


def random_policy(rnd: random.Random, n_workloads: int = len(IFACES)) -> Policy:
    """Zones, workloads (on this tier's interfaces), networks, CIDRs and rules drawn at random,
    with overlapping prefixes and deny rules on purpose."""
    n_zones = rnd.randint(1, 4)
    zone_names = [f"z{i}" for i in range(n_zones)]
    members: dict[str, list[Workload]] = {z: [] for z in zone_names}
    for i in range(n_workloads):
        zone = zone_names[i % n_zones] if i < n_zones else rnd.choice(zone_names)
        net = rnd.choice((10, 10, 172))
        addrs = (ipaddress.ip_address(f"{net}.{rnd.randrange(4)}.{rnd.randrange(4)}.{10 + i}"),
                 ipaddress.ip_address(f"fd00:{rnd.randrange(4):x}::{10 + i:x}"))
        members[zone].append(Workload(f"w{i}", zone, IFACES[i], MACS[i], addrs))
    zones = {z: Zone(z, tuple(ws)) for z, ws in members.items()}
    cidr_pool = ["10.0.0.0/8", "10.1.0.0/16", "10.0.0.0/24", "172.16.0.0/12", "0.0.0.0/0",
                 "198.51.100.0/24", "198.51.100.66/32", "203.0.113.0/25", "fd00::/8", "fd00:1::/32",
                 "::/0", "2001:db8::/32", "2001:db8:1::/48"]
    for w in (w for ws in members.values() for w in ws):
        if rnd.random() < 0.3:
            cidr_pool.append(f"{w.addresses[0]}/32")
    nets = lambda k: tuple(ipaddress.ip_network(c) for c in rnd.sample(cidr_pool, k))  # noqa: E731
    networks = {"n0": nets(rnd.randint(1, 3)), "n1": nets(1)}
    rules = []
    for r in range(rnd.randint(1, 12)):
        from_zones = tuple(zone_names) if rnd.random() < 0.2 else tuple(sorted(
            rnd.sample(zone_names, rnd.randint(1, n_zones))))
        dest = {}
        if rnd.random() < 0.6:
            dest["zones"] = tuple(sorted(rnd.sample(zone_names, rnd.randint(1, n_zones))))
        if rnd.random() < 0.4 or not dest:
            dest["cidrs"] = nets(rnd.randint(1, 2))
        if rnd.random() < 0.2:
            dest["networks"] = (rnd.choice(("n0", "n1")),)
        ports = () if rnd.random() < 0.15 else tuple(_interesting_ports(rnd) for _ in range(rnd.randint(1, 4)))
        action = "deny" if rnd.random() < 0.25 else "allow"
        rules.append(Rule(f"r{r}", action, from_zones, Destination(**dest), ports))
    return Policy("differential", zones, networks, tuple(rules), sha256="differential")


def _remote_candidates(policy: Policy) -> list:
    out = [a for w in policy.workloads() for a in w.addresses]
    for rule in policy.rules:
        cidrs = list(rule.to.cidrs) + [c for n in rule.to.networks for c in policy.networks[n]]
        for c in cidrs:
            out += [c.network_address, c.broadcast_address]
            if c.num_addresses > 2:
                out.append(c.network_address + 1)
    out += [ipaddress.ip_address(x) for x in ("198.51.100.7", "203.0.113.200", "8.8.8.8", "169.254.169.254",
                                                "2001:db8::7", "2001:db8:1::9", "fd00:2::99",
                                                "::ffff:198.51.100.7", "::ffff:10.0.0.1")]
    return out


def _ports_of_policy(policy: Policy) -> list[int]:
    ports = [22, 53, 80, 389, 443, 445, 135, 853]
    for rule in policy.rules:
        for pr in rule.ports:
            ports += [pr.lo, pr.hi, max(0, pr.lo - 1), min(65535, pr.hi + 1)]
    return [p for p in ports if 1 <= p < 60000]  # 60000+ are source ports: see random_packets


def random_packets(rnd: random.Random, policy: Policy, n: int) -> list[Packet]:
    """First packets of flows, aimed at the edges of the policy (its addresses, prefix edges,
    port range edges) and a few spoofed sources."""
    workloads = policy.workloads()
    remotes = _remote_candidates(policy)
    ports = _ports_of_policy(policy)
    out = []
    for _ in range(n):
        w = rnd.choice(workloads)
        version = rnd.choice((4, 6))
        own = next(a for a in w.addresses if a.version == version)
        remote = rnd.choice([a for a in remotes if a.version == version])
        proto = rnd.choice((6, 6, 17, 17, PROTOCOLS["icmp" if version == 4 else "icmpv6"], GRE))
        port = rnd.choice(ports) if proto in (6, 17) else 0
        direction = rnd.choice((EGRESS, INGRESS))
        if rnd.random() < 0.05:  # spoofed: an address not the workload's
            own = rnd.choice([a for a in remotes if a.version == version])
        src, dst = (own, remote) if direction == EGRESS else (remote, own)
        kind = rnd.choice((FLOW,) * 8 + (ICMP_ERROR, ND if version == 6 else ICMP_ERROR))
        if kind == ND and src.is_unspecified:  # DAD (from ::) is the table-driven BPF tests' case
            kind = ICMP_ERROR
        if kind != FLOW:  # control messages that are not free: ICMP to the policy
            proto, port = PROTOCOLS["icmp" if version == 4 else "icmpv6"], 0
        out.append(Packet(w.name, direction, src, dst, proto, port, kind))
    return out


# ---- the real programs ------------------------------------------------------------------------

class DatapathRunner:
    """Runs frames through sg_from_vm_tc / sg_to_vm of a loaded Datapath, from a thread inside the
    namespace that holds the interfaces. Returns (passed, drop reason or None), the reason read
    back from the per-zone drop counters (one batch syscall)."""

    def __init__(self, dp, worker, ifindex: dict[str, int]):
        self.dp, self.worker, self.ifindex = dp, worker, ifindex

    def drops(self) -> dict:
        counters = libbpf.nonzero_per_cpu_counters(self.dp.map("sg_drops"))
        return {abi.split_drop_index(idx): packets for idx, packets, _ in counters}

    def run_raw(self, frame_bytes: bytes, ifname: str, direction: str, kind: str = "tc") -> int:
        if direction == EGRESS:
            prog = self.dp._loaded.from_vm_xdp if kind == "xdp" else self.dp._loaded.from_vm_tc
        else:
            prog, kind = self.dp._loaded.to_vm, "tc"
        res = self.worker.call(progrun.run, prog.fd, frame_bytes, kind=kind, ifindex=self.ifindex[ifname])
        return res.retval in ((progrun.XDP_PASS,) if kind == "xdp" else (progrun.TC_ACT_OK,))

    def run(self, frame_bytes: bytes, ifname: str, direction: str, kind: str = "tc"):
        before = self.drops()
        passed = self.run_raw(frame_bytes, ifname, direction, kind)
        after = self.drops()
        grew = [k for k in after if after[k] > before.get(k, 0)]
        reason = reason_name(grew[0][2]) if grew else None
        return passed, reason

    def reset_flows(self) -> None:
        for name in ("sg_ct", "sg_frag"):
            self.dp.map(name).clear()
