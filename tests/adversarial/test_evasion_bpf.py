"""Evasion corpus through BPF_PROG_RUN: crafted frames a red team sends to slip a denied flow past
a packet filter, each with its expected verdict, run through both from-VM hooks (TC ingress, the
default, and generic XDP) and, where the frame enters a VM, sg_to_vm. Extends (does not repeat)
tests/bpf/test_verdicts.py: that table holds the plain VLAN, QinQ, record-route option, lone
non-first fragment, extension chain length and truncation-at-every-length cases.

Policy: zone web (w0 on avx-if0, 10.1.0.2) may reach zone db (w1 on avx-if1, 10.2.0.2) on
tcp/5432, udp/5000 and icmp; a rule to ::/0 allows tcp/443 (it must not open IPv4).
"""

from __future__ import annotations

import ipaddress

import pytest
from adv_support import GW_MAC, IFACES, MACS
from scapy.layers.inet import IP, TCP, UDP, IPOption_LSRR, IPOption_Router_Alert, IPOption_SSRR
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    IPv6ExtHdrSegmentRouting,
)
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from skyguard.policy.model import Destination, Policy, PortRange, Rule, Workload, Zone
from support.refmodel import EGRESS, INGRESS

W0, W1 = ("10.1.0.2", "fd00:1::2"), ("10.2.0.2", "fd00:2::2")


def evasion_policy() -> Policy:
    ip = ipaddress.ip_address
    web = Workload("w0", "web", IFACES[0], MACS[0], (ip(W0[0]), ip(W0[1])))
    db = Workload("w1", "db", IFACES[1], MACS[1], (ip(W1[0]), ip(W1[1])))
    rules = (
        Rule("web-to-db", "allow", ("web",), Destination(zones=("db",)),
             (PortRange("tcp", 5432, 5432), PortRange("udp", 5000, 5000), PortRange("icmp"))),
        Rule("v6-internet", "allow", ("web",), Destination(cidrs=(ipaddress.ip_network("::/0"),)),
             (PortRange("tcp", 443, 443),)),
    )
    return Policy("evasion", {"web": Zone("web", (web,)), "db": Zone("db", (db,))}, {}, rules, sha256="evasion")


def out4(**kw):
    return Ether(src=MACS[0], dst=GW_MAC) / IP(**{"src": W0[0], "dst": W1[0], **kw})


def out6(**kw):
    return Ether(src=MACS[0], dst=GW_MAC) / IPv6(**{"src": W0[1], "dst": W1[1], **kw})


def in4(**kw):
    return Ether(src=GW_MAC, dst=MACS[1]) / IP(src=W0[0], dst=W1[0], **kw)


DENIED_PORT = 22
ALLOW = (True, None)


def DROP(reason):
    return (False, reason)


# description, frame, interface index, direction, expected (passed, reason)
STATELESS = [
    # TCP flag combinations on a denied port: the first packet of a flow is decided whatever its flags
    *[(f"tcp flags {name} to a denied port", out4() / TCP(dport=DENIED_PORT, flags=flags), 0, EGRESS, DROP("no_rule"))
      for name, flags in (("SYN+FIN", "SF"), ("null", ""), ("xmas", "FPU"), ("ACK only", "A"), ("RST", "R"),
                          ("SYN+RST", "SR"), ("all", "FSRPAUEC"))],
    *[(f"tcp flags {name} to a denied port, entering the VM", in4() / TCP(dport=DENIED_PORT, flags=flags), 1, INGRESS,
       DROP("no_rule")) for name, flags in (("null", ""), ("xmas", "FPU"), ("ACK only", "A"))],
    # bad checksums do not change the decision
    ("bad IPv4 header checksum, denied port", out4(chksum=0x1234) / TCP(dport=DENIED_PORT), 0, EGRESS, DROP("no_rule")),
    ("bad TCP checksum, denied port", out4() / TCP(dport=DENIED_PORT, chksum=0xdead), 0, EGRESS, DROP("no_rule")),
    ("bad UDP checksum, allowed port", out4() / UDP(dport=5000, chksum=0xbeef), 0, EGRESS, ALLOW),
    # IP options: source routing and router alert, even on an allowed port
    ("IPv4 loose source route", out4(options=[IPOption_LSRR(routers=["10.2.0.2"])]) / TCP(dport=5432), 0, EGRESS,
     DROP("ip_options")),
    ("IPv4 strict source route", out4(options=[IPOption_SSRR(routers=["10.2.0.2"])]) / TCP(dport=5432), 0, EGRESS,
     DROP("ip_options")),
    ("IPv4 router alert", out4(options=[IPOption_Router_Alert()]) / UDP(dport=5000), 0, EGRESS, DROP("ip_options")),
    ("IPv4 options entering the VM", in4(options=[IPOption_LSRR(routers=["10.1.0.2"])]) / TCP(dport=5432), 1, INGRESS,
     DROP("ip_options")),
    # VLAN variants
    ("802.1Q priority tag (VLAN 0)", Ether(src=MACS[0], dst=GW_MAC) / Dot1Q(vlan=0) / IP(src=W0[0], dst=W1[0]) /
     TCP(dport=5432), 0, EGRESS, DROP("vlan")),
    ("QinQ 802.1ad over 802.1ad", Ether(src=MACS[0], dst=GW_MAC) / Dot1AD(vlan=1) / Dot1AD(vlan=2) /
     IP(src=W0[0], dst=W1[0]) / TCP(dport=5432), 0, EGRESS, DROP("vlan")),
    ("old QinQ ethertype 0x9100", Ether(src=MACS[0], dst=GW_MAC, type=0x9100) / Dot1Q(vlan=2) /
     IP(src=W0[0], dst=W1[0]) / TCP(dport=5432), 0, EGRESS, DROP("vlan")),
    # IPv6 extension header chains
    ("IPv6 routing header type 0 after hop-by-hop", out6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(type=0) /
     TCP(dport=5432), 0, EGRESS, DROP("ipv6_exthdr")),
    ("IPv6 segment routing header", out6() / IPv6ExtHdrSegmentRouting() / TCP(dport=5432), 0, EGRESS,
     DROP("ipv6_exthdr")),
    ("IPv6 unknown header hidden after destination options", out6() / IPv6ExtHdrDestOpt(nh=143) / Raw(b"\0" * 16),
     0, EGRESS, DROP("ipv6_exthdr")),
    ("IPv6 chain of five (hop, dst, frag, dst, dst)", out6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() /
     IPv6ExtHdrFragment() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / TCP(dport=5432), 0, EGRESS,
     DROP("ipv6_exthdr_chain")),
    ("IPv6 atomic fragment of a denied flow", out6() / IPv6ExtHdrFragment(nh=6, offset=0, m=0, id=7) /
     TCP(dport=DENIED_PORT), 0, EGRESS, DROP("no_rule")),
    ("IPv6 first fragment of a denied flow", out6() / IPv6ExtHdrFragment(nh=6, offset=0, m=1, id=8) /
     TCP(dport=DENIED_PORT), 0, EGRESS, DROP("no_rule")),
    ("IPv6 extension chain hiding a denied port", out6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() /
     TCP(dport=DENIED_PORT), 0, EGRESS, DROP("no_rule")),
    # header lengths that lie
    ("IPv4 total length beyond the frame", out4(len=1400) / TCP(dport=5432), 0, EGRESS, DROP("malformed")),
    ("IPv6 payload length beyond the frame", out6(plen=1400) / TCP(dport=5432), 0, EGRESS, DROP("malformed")),
    ("IPv4 header length beyond the frame", out4(ihl=15) / Raw(b"\0" * 8), 0, EGRESS, DROP("ip_options")),
    ("tiny first fragment: 2 bytes of TCP", out4(flags="MF", id=21, proto=6) / Raw(b"\x9c\x40"), 0, EGRESS,
     DROP("malformed")),
    # addresses
    ("IPv6 to an IPv4-mapped address", out6(dst="::ffff:10.2.0.2") / TCP(dport=5432), 0, EGRESS, DROP("malformed")),
    ("IPv6 from an IPv4-mapped address", Ether(src=GW_MAC, dst=MACS[1]) / IPv6(src="::ffff:10.1.0.2", dst=W1[1]) /
     TCP(dport=5432), 1, INGRESS, DROP("malformed")),
    ("a ::/0 rule does not open IPv4", Ether(src=MACS[0], dst=GW_MAC) / IP(src=W0[0], dst="198.51.100.7") /
     TCP(dport=443), 0, EGRESS, DROP("no_rule")),
    ("a ::/0 rule opens IPv6", Ether(src=MACS[0], dst=GW_MAC) / IPv6(src=W0[1], dst="2001:db8::7") / TCP(dport=443),
     0, EGRESS, ALLOW),
    # big frames (GSO-sized super-packets reach TC as one skb; BPF_PROG_RUN takes up to a page)
    ("3000-byte frame of a denied flow", out4() / UDP(dport=DENIED_PORT) / Raw(b"x" * 2950), 0, EGRESS,
     DROP("no_rule")),
    ("3000-byte frame of an allowed flow", out4() / UDP(dport=5000) / Raw(b"x" * 2950), 0, EGRESS, ALLOW),
    ("3000-byte IPv6 frame of a denied flow", out6() / TCP(dport=DENIED_PORT) / Raw(b"x" * 2930), 0, EGRESS,
     DROP("no_rule")),
]


@pytest.fixture
def ev(bpf_runner):
    bpf_runner.worker.call(bpf_runner.dp.apply_policy, evasion_policy())
    bpf_runner.reset_flows()
    return bpf_runner


@pytest.mark.parametrize("description,frame,idx,direction,expected", STATELESS, ids=[c[0] for c in STATELESS])
def test_evasion_frame(ev, description, frame, idx, direction, expected):
    kinds = ("tc", "xdp") if direction == EGRESS else ("tc",)
    for kind in kinds:
        ev.reset_flows()
        assert ev.run(bytes(frame), IFACES[idx], direction, kind=kind) == expected, f"{description} ({kind})"


def test_overlapping_fragment_cannot_rewrite_the_port(ev):
    """An allowed first fragment (tcp/5432), then a second 'first' fragment with the same id and
    offset 0 whose TCP header says port 22: decided as its own flow, denied; later fragments of
    the allowed id pass (the receiver's reassembly discards overlaps)."""
    first = out4(flags="MF", id=77, frag=0) / TCP(sport=40001, dport=5432) / Raw(b"a" * 16)
    assert ev.run(bytes(first), IFACES[0], EGRESS) == ALLOW
    overlap = out4(flags="MF", id=77, frag=0) / TCP(sport=40001, dport=DENIED_PORT) / Raw(b"b" * 16)
    assert ev.run(bytes(overlap), IFACES[0], EGRESS) == DROP("no_rule")
    rest = out4(id=77, frag=5, proto=6) / Raw(b"c" * 16)
    assert ev.run(bytes(rest), IFACES[0], EGRESS) == ALLOW
    stray = out4(id=78, frag=5, proto=6) / Raw(b"c" * 16)
    assert ev.run(bytes(stray), IFACES[0], EGRESS) == DROP("frag_no_flow")


def test_fragments_of_a_denied_first_fragment_stay_denied(ev):
    first = out4(flags="MF", id=90, frag=0) / TCP(sport=40002, dport=DENIED_PORT) / Raw(b"a" * 16)
    assert ev.run(bytes(first), IFACES[0], EGRESS) == DROP("no_rule")
    for off in (1, 3, 5):
        later = out4(flags="MF", id=90, frag=off, proto=6) / Raw(b"b" * 16)
        assert ev.run(bytes(later), IFACES[0], EGRESS) == DROP("frag_no_flow")
    v6_first = out6() / IPv6ExtHdrFragment(nh=6, offset=0, m=1, id=91) / TCP(dport=DENIED_PORT)
    assert ev.run(bytes(v6_first), IFACES[0], EGRESS) == DROP("no_rule")
    v6_later = out6() / IPv6ExtHdrFragment(nh=6, offset=3, m=0, id=91) / Raw(b"x" * 16)
    assert ev.run(bytes(v6_later), IFACES[0], EGRESS) == DROP("frag_no_flow")


def test_established_flow_does_not_cover_a_mid_stream_port_change(ev):
    """An allowed established flow; a packet with the same addresses and source port but a denied
    destination port is a different flow and is decided on its own."""
    syn = out4() / TCP(sport=40003, dport=5432, flags="S")
    assert ev.run(bytes(syn), IFACES[0], EGRESS) == ALLOW
    assert ev.run(bytes(out4() / TCP(sport=40003, dport=5432, flags="A")), IFACES[0], EGRESS) == ALLOW
    assert ev.run(bytes(out4() / TCP(sport=40003, dport=DENIED_PORT, flags="A")), IFACES[0], EGRESS) == DROP("no_rule")
