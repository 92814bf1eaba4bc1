"""A reference model of skyguard's policy decision for one new flow, read straight off the Policy.

What it is for: the differential tests (tests/adversarial/test_differential.py, tests/fuzz) run
random policies and random packets through this model AND through the real eBPF programs with
BPF_PROG_RUN, and require the same verdict for every packet. It is written to be obviously right,
not fast: a linear scan over the rules with the semantics of SPEC.md section 3, and none of the
datapath's machinery (no identities, no port prefixes, no LPM, no compile step), so a bug in that
machinery shows up as a disagreement.

It also decides the two kinds of control message that are not free: an ICMP error that belongs
to no flow, and a neighbour discovery message that could leave the link (here: hop limit other
than 255). Both are ordinary ICMP to the policy, with their own drop reason when no rule allows
them (issue 15).

What it is not: the datapath. It decides the first packet of a flow (conntrack, replies,
fragments, related ICMP errors, link-local neighbour discovery and header parsing are the
datapath's and are tested by the table-driven BPF tests), and it knows nothing of FQDN rules
(learned addresses come from the DNS proxy at run time).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from skyguard.datapath import abi
from skyguard.policy.model import Policy, Rule

EGRESS = "egress"  # the VM sends (leaves the VM: sg_from_vm)
INGRESS = "ingress"  # the VM receives (enters the VM: sg_to_vm)
DNS_PORT = 53
# IP protocol numbers by the names rules use (the datapath's table); any other number is "other"
# (only a rule without `ports:` allows it).
PROTOCOLS = {name: number for name, number in abi.IPPROTO.items() if name != "other"}
FLOW = "flow"  # the first packet of a flow
ICMP_ERROR = "icmp_error"  # an ICMP(v6) error about no flow of the VM's
ND = "nd"  # an IPv6 neighbour solicitation that is not link-local control (hop limit 64)
# what a control message that no rule allows is counted as
NO_RULE_REASON = {FLOW: "no_rule", ICMP_ERROR: "icmp_err_no_flow", ND: "nd_not_local"}


@dataclass(frozen=True)
class Packet:
    """The first packet of a flow at one workload's interface. `port` is the destination port for
    TCP/UDP and ignored for ICMP (every ICMP type is one port range)."""

    workload: str
    direction: str  # EGRESS or INGRESS
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    proto: int  # IP protocol number
    port: int = 0
    kind: str = FLOW  # FLOW, ICMP_ERROR or ND (then proto is icmp / icmpv6 for the address family)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str | None = None  # drop reason name as the datapath counts it (lower case), None if allowed
    rule: str | None = None  # the allowing rule (the first in policy order), or the denying one


def link_local_of(mac: str) -> ipaddress.IPv6Address:
    """The modified EUI-64 link-local address of a MAC (RFC 4291 appendix A), written out here
    rather than imported so the model shares no code with the compiler."""
    octets = [int(x, 16) for x in mac.split(":")]
    iid = [octets[0] ^ 0x02, octets[1], octets[2], 0xFF, 0xFE, octets[3], octets[4], octets[5]]
    return ipaddress.IPv6Address(bytes([0xFE, 0x80] + [0] * 6 + iid))


def _own_addresses(policy: Policy, workload: str) -> set:
    w = policy.workload(workload)
    return set(w.addresses) | {link_local_of(w.mac)}


def _zones_holding(policy: Policy, address) -> set[str]:
    return {w.zone for w in policy.workloads() if address in w.addresses}


def _rule_holds_remote(policy: Policy, rule: Rule, remote) -> bool:
    """Whether `remote` is a destination of `rule` when leaving a VM."""
    if _zones_holding(policy, remote) & set(rule.to.zones):
        return True
    cidrs = list(rule.to.cidrs) + [c for name in rule.to.networks for c in policy.networks[name]]
    return any(remote.version == c.version and remote in c for c in cidrs)


def _rule_holds_port(rule: Rule, proto: int, port: int) -> bool:
    if not rule.ports:  # no `ports:` means every protocol and port
        return True
    for pr in rule.ports:
        if PROTOCOLS[pr.protocol] != proto:
            continue
        if pr.protocol in ("icmp", "icmpv6") or pr.lo <= port <= pr.hi:
            return True
    return False


def decide(policy: Policy, packet: Packet, dns_passthrough: bool = True) -> Decision:
    """The verdict the datapath must give the first packet of this flow.

    dns_passthrough: UDP/TCP port 53 leaving a VM goes to skyguard's DNS proxy whatever its
    address (SPEC.md section 3), before any rule is consulted.
    """
    wl = policy.workload(packet.workload)
    if wl is None:
        return Decision(False, "no_workload")
    if any(a.version == 6 and a.ipv4_mapped for a in (packet.src, packet.dst)):
        return Decision(False, "malformed")  # RFC 4291 2.5.5.2: never on the wire
    if packet.src.version == 6 and packet.proto not in (PROTOCOLS["tcp"], PROTOCOLS["udp"], PROTOCOLS["icmpv6"]):
        # After the IPv6 header, anything but TCP, UDP, ICMPv6 and the few extension headers
        # skyguard parses is an unknown extension header to a parser (SPEC.md: dropped).
        return Decision(False, "ipv6_exthdr")
    if packet.src.version == 4 and packet.proto == PROTOCOLS["icmpv6"]:
        return Decision(False, "unknown_l4")
    own = _own_addresses(policy, packet.workload)
    if packet.direction == EGRESS:
        if packet.src not in own:
            return Decision(False, "spoof_ip")
        remote = packet.dst
    elif packet.direction == INGRESS:
        if packet.dst not in own:
            return Decision(False, "dst_not_workload")
        remote = packet.src
    else:
        raise ValueError(f"direction must be {EGRESS!r} or {INGRESS!r}, not {packet.direction!r}")
    if (dns_passthrough and packet.kind == FLOW and packet.direction == EGRESS and packet.port == DNS_PORT
            and packet.proto in (PROTOCOLS["tcp"], PROTOCOLS["udp"])):
        return Decision(True, None, "dns")

    matching = []
    for rule in policy.rules:
        if not _rule_holds_port(rule, packet.proto, packet.port):
            continue
        if packet.direction == EGRESS:
            # A rule `from A to X` allows the flow where it leaves A.
            applies = wl.zone in rule.from_zones and _rule_holds_remote(policy, rule, remote)
        else:
            # ... and where it enters a workload of a zone in X: the remote must be a workload of A.
            applies = wl.zone in rule.to.zones and bool(_zones_holding(policy, remote) & set(rule.from_zones))
        if applies:
            matching.append(rule)
    denies = [r for r in matching if r.action == "deny"]
    if denies:  # deny beats allow, whatever the order
        return Decision(False, "policy_deny", denies[0].name)
    if matching:
        return Decision(True, None, matching[0].name)
    return Decision(False, NO_RULE_REASON[packet.kind])
