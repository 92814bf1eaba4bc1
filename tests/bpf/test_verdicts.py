"""Table-driven verdicts of the real programs through BPF_PROG_RUN: each case is a frame, the
workload whose interface it crosses, the direction, and the expected verdict + drop reason.
Stateless cases run on an empty conntrack table; stateful ones (replies, fragments, ICMP errors,
policy swaps) follow below the table.
"""

from __future__ import annotations

import pytest
from bpf_support import ADDR, GW_MAC, MAC, make_policy
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from skyguard.errors import DatapathError

OUT = "egress"  # the VM sends (sg_from_vm)
IN = "ingress"  # the VM receives (sg_to_vm)
ATTACKER_MAC = "02:66:66:66:66:66"


def e_from(wl, src=None):
    return Ether(src=src or MAC[wl], dst=GW_MAC)


def e_to(wl):
    return Ether(src=GW_MAC, dst=MAC[wl])


def v4(wl):
    return ADDR[wl][0]


def v6(wl):
    return ADDR[wl][1]


def tcp4(src_wl, dst, dport, sport=40000, flags="S", **kw):
    return e_from(src_wl) / IP(src=v4(src_wl), dst=dst, **kw) / TCP(sport=sport, dport=dport, flags=flags)


def tcp4_in(dst_wl, src, dport, sport=40000, flags="S"):
    return e_to(dst_wl) / IP(src=src, dst=v4(dst_wl)) / TCP(sport=sport, dport=dport, flags=flags)


def tcp6(src_wl, dst, dport, sport=40000):
    return e_from(src_wl) / IPv6(src=v6(src_wl), dst=dst) / TCP(sport=sport, dport=dport, flags="S")


ALLOW = (True, None)


def DROP(reason):
    return (False, reason)


CASES = [
    # description, frame, workload, direction, expected
    ("v4 web->db allowed port leaves web", tcp4("w1", v4("d1"), 5432), "w1", OUT, ALLOW),
    ("v4 web->db allowed port enters db", tcp4_in("d1", v4("w1"), 5432), "d1", IN, ALLOW),
    ("v4 web->db other port", tcp4("w1", v4("d1"), 22), "w1", OUT, DROP("no_rule")),
    ("v4 db->web (no rule that way) leaves db", tcp4("d1", v4("w1"), 5432), "d1", OUT, DROP("no_rule")),
    ("v4 db->web (no rule that way) enters web", tcp4_in("w1", v4("d1"), 5432), "w1", IN, DROP("no_rule")),
    ("v4 other zone -> db enters db", tcp4_in("d1", v4("x1"), 5432), "d1", IN, DROP("no_rule")),
    ("v4 internet host -> web enters web", tcp4_in("w1", "198.51.100.7", 443), "w1", IN, DROP("no_rule")),
    ("toward the VM for an address not its own", e_to("d1") / IP(src=v4("w1"), dst="10.2.0.77") / TCP(dport=5432),
     "d1", IN, DROP("dst_not_workload")),
    ("v6 web->db allowed", tcp6("w1", v6("d1"), 5432), "w1", OUT, ALLOW),
    ("v6 web->db enters db", e_to("d1") / IPv6(src=v6("w1"), dst=v6("d1")) / TCP(dport=5432), "d1", IN, ALLOW),
    ("v6 web->db other port", tcp6("w1", v6("d1"), 5433), "w1", OUT, DROP("no_rule")),
    ("v6 web->internet cidr allowed", tcp6("w1", "2001:db8:100::5", 443), "w1", OUT, ALLOW),
    ("v6 web->internet outside cidr", tcp6("w1", "2001:db8:200::5", 443), "w1", OUT, DROP("no_rule")),
    # port range edges: tcp/8000-8100 allowed, tcp/8050 denied inside it
    ("range below", tcp4("w1", v4("d1"), 7999), "w1", OUT, DROP("no_rule")),
    ("range low edge", tcp4("w1", v4("d1"), 8000), "w1", OUT, ALLOW),
    ("range before hole", tcp4("w1", v4("d1"), 8049), "w1", OUT, ALLOW),
    ("deny hole inside allowed range", tcp4("w1", v4("d1"), 8050), "w1", OUT, DROP("policy_deny")),
    ("range after hole", tcp4("w1", v4("d1"), 8051), "w1", OUT, ALLOW),
    ("range high edge", tcp4("w1", v4("d1"), 8100), "w1", OUT, ALLOW),
    ("range above", tcp4("w1", v4("d1"), 8101), "w1", OUT, DROP("no_rule")),
    ("deny hole at ingress too", tcp4_in("d1", v4("w1"), 8050), "d1", IN, DROP("policy_deny")),
    ("udp allowed", e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / UDP(sport=1, dport=5000), "w1", OUT, ALLOW),
    ("tcp on a udp-only port", tcp4("w1", v4("d1"), 5000), "w1", OUT, DROP("no_rule")),
    # deny beats allow, whatever the order: 198.51.100.0/24 tcp/443 allowed, .66 denied
    ("cidr allowed", tcp4("w1", "198.51.100.7", 443), "w1", OUT, ALLOW),
    ("deny beats allow (more specific deny)", tcp4("w1", "198.51.100.66", 443), "w1", OUT, DROP("policy_deny")),
    ("network from every zone", e_from("x1") / IP(src=v4("x1"), dst="192.0.2.10") / UDP(dport=514), "x1", OUT, ALLOW),
    ("icmp echo allowed", e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / ICMP(type=8, id=7), "w1", OUT, ALLOW),
    ("icmpv6 echo allowed", e_from("w1") / IPv6(src=v6("w1"), dst=v6("d1")) / ICMPv6EchoRequest(id=7), "w1", OUT, ALLOW),
    ("icmp echo to internet denied", e_from("w1") / IP(src=v4("w1"), dst="198.51.100.7") / ICMP(), "w1", OUT,
     DROP("no_rule")),
    ("other IP protocol (GRE) denied", e_from("w1") / IP(src=v4("w1"), dst=v4("d1"), proto=47) / Raw(b"x" * 8),
     "w1", OUT, DROP("no_rule")),
    ("icmpv6 inside IPv4", e_from("w1") / IP(src=v4("w1"), dst=v4("d1"), proto=58) / Raw(b"\x80" + b"\0" * 7),
     "w1", OUT, DROP("unknown_l4")),
    # DNS to any address passes to the host (the DNS proxy)
    ("dns udp to anywhere", e_from("x1") / IP(src=v4("x1"), dst="8.8.8.8") / UDP(sport=5353, dport=53), "x1", OUT,
     ALLOW),
    ("dns tcp v6 to anywhere", tcp6("x1", "2001:4860::8888", 53), "x1", OUT, ALLOW),
    # anti-spoofing
    ("spoofed source MAC", e_from("w1", src=ATTACKER_MAC) / IP(src=v4("w1"), dst=v4("d1")) / TCP(dport=5432),
     "w1", OUT, DROP("spoof_mac")),
    ("another workload's MAC", e_from("w1", src=MAC["w2"]) / IP(src=v4("w1"), dst=v4("d1")) / TCP(dport=5432),
     "w1", OUT, DROP("spoof_mac")),
    ("spoofed source IPv4", e_from("w1") / IP(src=v4("w2"), dst=v4("d1")) / TCP(dport=5432), "w1", OUT,
     DROP("spoof_ip")),
    ("spoofed source IPv6", e_from("w1") / IPv6(src=v6("w2"), dst=v6("d1")) / TCP(dport=5432), "w1", OUT,
     DROP("spoof_ip")),
    ("arp request from own address", e_from("w1") / ARP(op=1, hwsrc=MAC["w1"], psrc=v4("w1"), pdst="10.1.0.1"),
     "w1", OUT, ALLOW),
    ("arp probe (0.0.0.0)", e_from("w1") / ARP(op=1, hwsrc=MAC["w1"], psrc="0.0.0.0", pdst=v4("w1")), "w1", OUT,
     ALLOW),
    ("arp claiming another IP", e_from("w1") / ARP(op=2, hwsrc=MAC["w1"], psrc=v4("d1"), pdst="10.1.0.1"),
     "w1", OUT, DROP("arp_spoof")),
    ("arp with another sender MAC", e_from("w1") / ARP(op=2, hwsrc=ATTACKER_MAC, psrc=v4("w1"), pdst="10.1.0.1"),
     "w1", OUT, DROP("arp_spoof")),
    ("arp to the VM", e_to("w1") / ARP(op=2, hwsrc=GW_MAC, psrc="10.1.0.1", pdst=v4("w1")), "w1", IN, ALLOW),
    ("nd NS for the gateway", e_from("w1") / IPv6(src=v6("w1"), dst="ff02::1:ff00:1") /
     ICMPv6ND_NS(tgt="fd00:1::1") / ICMPv6NDOptSrcLLAddr(lladdr=MAC["w1"]), "w1", OUT, ALLOW),
    ("nd NA for its own address", e_from("w1") / IPv6(src=v6("w1"), dst="fe80::1") /
     ICMPv6ND_NA(tgt=v6("w1")) / ICMPv6NDOptDstLLAddr(lladdr=MAC["w1"]), "w1", OUT, ALLOW),
    ("nd NA for another's address", e_from("w1") / IPv6(src=v6("w1"), dst="fe80::1") /
     ICMPv6ND_NA(tgt=v6("d1")) / ICMPv6NDOptDstLLAddr(lladdr=MAC["w1"]), "w1", OUT, DROP("nd_spoof")),
    ("nd NA with another link-layer address", e_from("w1") / IPv6(src=v6("w1"), dst="fe80::1") /
     ICMPv6ND_NA(tgt=v6("w1")) / ICMPv6NDOptDstLLAddr(lladdr=ATTACKER_MAC), "w1", OUT, DROP("nd_spoof")),
    ("nd NS with another source link-layer", e_from("w1") / IPv6(src=v6("w1"), dst="ff02::1:ff00:1") /
     ICMPv6ND_NS(tgt="fd00:1::1") / ICMPv6NDOptSrcLLAddr(lladdr=ATTACKER_MAC), "w1", OUT, DROP("nd_spoof")),
    ("nd DAD for its own address", e_from("w1") / IPv6(src="::", dst="ff02::1:ff00:2") / ICMPv6ND_NS(tgt=v6("w1")),
     "w1", OUT, ALLOW),
    ("nd DAD for another's address", e_from("w1") / IPv6(src="::", dst="ff02::1:ff00:2") /
     ICMPv6ND_NS(tgt=v6("d1")), "w1", OUT, DROP("nd_spoof")),
    ("nd from its EUI-64 link-local", e_from("w1") / IPv6(src="fe80::ff:fe00:102", dst="ff02::1:ff00:1") /
     ICMPv6ND_NS(tgt="fe80::1") / ICMPv6NDOptSrcLLAddr(lladdr=MAC["w1"]), "w1", OUT, ALLOW),
    ("nd from a foreign link-local", e_from("w1") / IPv6(src="fe80::bad", dst="ff02::1:ff00:1") /
     ICMPv6ND_NS(tgt="fe80::1"), "w1", OUT, DROP("spoof_ip")),
    ("router advertisement from a VM", e_from("w1") / IPv6(src="fe80::ff:fe00:102", dst="ff02::1") / ICMPv6ND_RA(),
     "w1", OUT, DROP("nd_forbidden")),
    ("nd to the VM", e_to("w1") / IPv6(src="fe80::1", dst=v6("w1")) / ICMPv6ND_NS(tgt=v6("w1")), "w1", IN, ALLOW),
    # framing and headers
    ("802.1Q tagged", e_from("w1") / Dot1Q(vlan=5) / IP(src=v4("w1"), dst=v4("d1")) / TCP(dport=5432), "w1", OUT,
     DROP("vlan")),
    ("QinQ tagged", e_from("w1") / Dot1AD(vlan=5) / Dot1Q(vlan=6) / IP(src=v4("w1"), dst=v4("d1")) / TCP(dport=5432),
     "w1", OUT, DROP("vlan")),
    ("tagged toward the VM", e_to("w1") / Dot1Q(vlan=5) / IP(src=v4("d1"), dst=v4("w1")) / TCP(), "w1", IN,
     DROP("vlan")),
    ("unknown ethertype", Ether(src=MAC["w1"], dst=GW_MAC, type=0x88B5) / Raw(b"x" * 46), "w1", OUT,
     DROP("unknown_ethertype")),
    ("IPv4 options", e_from("w1") / IP(src=v4("w1"), dst=v4("d1"), options=[IPOption_RR()]) / TCP(dport=5432),
     "w1", OUT, DROP("ip_options")),
    ("TCP data offset < 5", e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(dport=5432, dataofs=4), "w1", OUT,
     DROP("malformed")),
    ("IPv4 ihl < 5", e_from("w1") / IP(src=v4("w1"), dst=v4("d1"), ihl=4) / TCP(dport=5432), "w1", OUT,
     DROP("malformed")),
    ("IPv6 hop-by-hop + dest opts ok", e_from("w1") / IPv6(src=v6("w1"), dst=v6("d1")) / IPv6ExtHdrHopByHop() /
     IPv6ExtHdrDestOpt() / TCP(dport=5432), "w1", OUT, ALLOW),
    ("IPv6 four extension headers ok", e_from("w1") / IPv6(src=v6("w1"), dst=v6("d1")) / IPv6ExtHdrHopByHop() /
     IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / TCP(dport=5432), "w1", OUT, ALLOW),
    ("IPv6 chain too long", e_from("w1") / IPv6(src=v6("w1"), dst=v6("d1")) / IPv6ExtHdrHopByHop() /
     IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / TCP(dport=5432),
     "w1", OUT, DROP("ipv6_exthdr_chain")),
    ("IPv6 routing header", e_from("w1") / IPv6(src=v6("w1"), dst=v6("d1")) / IPv6ExtHdrRouting() / TCP(dport=5432),
     "w1", OUT, DROP("ipv6_exthdr")),
    ("IPv6 unknown next header", e_from("w1") / IPv6(src=v6("w1"), dst=v6("d1"), nh=253) / Raw(b"x" * 8), "w1", OUT,
     DROP("ipv6_exthdr")),
    # fragments
    ("v4 non-first fragment alone", e_from("w1") / IP(src=v4("w1"), dst=v4("d1"), proto=6, frag=100, id=9) /
     Raw(b"x" * 16), "w1", OUT, DROP("frag_no_flow")),
    ("v6 non-first fragment alone", e_from("w1") / IPv6(src=v6("w1"), dst=v6("d1")) /
     IPv6ExtHdrFragment(nh=6, offset=100, id=9) / Raw(b"x" * 16), "w1", OUT, DROP("frag_no_flow")),
    ("v4 first fragment of a denied flow", e_from("w1") / IP(src=v4("w1"), dst=v4("d1"), flags="MF", id=10) /
     TCP(dport=22), "w1", OUT, DROP("no_rule")),
    ("ICMP error for no flow", e_to("w1") / IP(src="198.51.100.1", dst=v4("w1")) / ICMP(type=3, code=1) /
     IP(src=v4("w1"), dst="198.51.100.9") / TCP(sport=40000, dport=443), "w1", IN, DROP("icmp_err_no_flow")),
]


@pytest.mark.parametrize("description,frame,workload,direction,expected", CASES, ids=[c[0] for c in CASES])
def test_verdict(h, description, frame, workload, direction, expected):
    assert h.run(bytes(frame), workload, direction) == expected, description


def test_unknown_interface_drops_everything(h):
    # x1's interface keeps its ifindex, but a policy without zone "other" has no workload there.
    import dataclasses

    p = make_policy(drop_rules=("syslog",))
    p = dataclasses.replace(p, zones={k: v for k, v in p.zones.items() if k != "other"})
    h.apply(p)
    frame = e_from("x1") / IP(src=v4("x1"), dst="192.0.2.10") / UDP(dport=514)
    assert h.run(bytes(frame), "x1", OUT) == DROP("no_workload")


def test_truncated_at_every_length(h):
    """Every prefix of full frames, from 0 bytes, drops with a reason and never crashes. The
    kernel refuses test runs shorter than an Ethernet header (XDP) or than the IP header (TC),
    as no real frame that short reaches either hook: those lengths must be refused, and every
    other length is run through the XDP variant (the same sg_handle as TC) and, where the kernel
    accepts it, through TC."""
    full = [
        tcp4("w1", v4("d1"), 5432),
        tcp6("w1", v6("d1"), 5432),
        e_from("w1") / ARP(op=1, hwsrc=MAC["w1"], psrc=v4("w1"), pdst="10.1.0.1"),
        e_from("w1") / IPv6(src=v6("w1"), dst=v6("d1")) / IPv6ExtHdrHopByHop() / UDP(dport=5000),
        e_from("w1") / IPv6(src=v6("w1"), dst="ff02::1:ff00:1") / ICMPv6ND_NS(tgt="fd00:1::1") /
        ICMPv6NDOptSrcLLAddr(lladdr=MAC["w1"]),
        e_from("w1") / IP(src=v4("w1"), dst="198.51.100.9") / ICMP(type=3, code=3) /
        IP(src="198.51.100.9", dst=v4("w1")) / UDP(sport=53, dport=40000),
    ]
    for frame in full:
        raw = bytes(frame)
        for n in range(0, len(raw)):
            for hook in ("xdp", "tc"):
                try:
                    passed, reason = h.run(raw[:n], "w1", OUT, hook=hook)
                except DatapathError:
                    assert n < (14 if hook == "xdp" else 54), f"kernel refused a {n}-byte {hook} test run"
                    continue
                assert (passed, reason) == (False, "malformed"), f"{frame.summary()} cut to {n} bytes ({hook})"
        # and the whole frame is understood (not malformed)
        assert h.run(raw, "w1", OUT)[1] != "malformed"
