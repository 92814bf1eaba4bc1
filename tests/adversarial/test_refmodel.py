"""The reference model on its own, against the semantics of SPEC.md section 3 written out by hand
(so the differential test compares the datapath with something known to be right)."""

from __future__ import annotations

import ipaddress

import pytest

from skyguard.policy.model import Destination, Policy, PortRange, Rule, Workload, Zone
from support.refmodel import EGRESS, ICMP_ERROR, INGRESS, ND, Packet, decide, link_local_of

ip = ipaddress.ip_address
A = Workload("a1", "a", "sg-a1", "02:00:00:00:01:02", (ip("10.1.0.2"), ip("fd00:1::2")))
B = Workload("b1", "b", "sg-b1", "02:00:00:00:02:02", (ip("10.2.0.2"), ip("fd00:2::2")))
C = Workload("c1", "c", "sg-c1", "02:00:00:00:03:02", (ip("10.3.0.2"),))
POLICY = Policy("ref", {"a": Zone("a", (A,)), "b": Zone("b", (B,)), "c": Zone("c", (C,))},
                {"web": (ipaddress.ip_network("198.51.100.0/24"),)}, (
    Rule("a-to-b", "allow", ("a",), Destination(zones=("b",)), (PortRange("tcp", 8000, 8100), PortRange("icmp"))),
    Rule("no-8050", "deny", ("a", "c"), Destination(zones=("b",)), (PortRange("tcp", 8050, 8050),)),
    Rule("out", "allow", ("a", "b", "c"), Destination(networks=("web",)), (PortRange("tcp", 443, 443),)),
    Rule("no-bad", "deny", ("a",), Destination(cidrs=(ipaddress.ip_network("198.51.100.66/32"),)), ()),
    Rule("c-anything-to-a", "allow", ("c",), Destination(zones=("a",)), ()),
))


def pkt(wl, direction, src, dst, proto=6, port=0, kind="flow"):
    return Packet(wl, direction, ip(src), ip(dst), proto, port, kind)


@pytest.mark.parametrize("packet,expected", [
    (pkt("a1", EGRESS, "10.1.0.2", "10.2.0.2", port=8000), (True, None, "a-to-b")),
    (pkt("b1", INGRESS, "10.1.0.2", "10.2.0.2", port=8100), (True, None, "a-to-b")),
    (pkt("a1", EGRESS, "10.1.0.2", "10.2.0.2", port=8050), (False, "policy_deny", "no-8050")),
    (pkt("b1", INGRESS, "10.1.0.2", "10.2.0.2", port=8050), (False, "policy_deny", "no-8050")),
    (pkt("a1", EGRESS, "10.1.0.2", "10.2.0.2", port=8101), (False, "no_rule", None)),
    (pkt("b1", EGRESS, "10.2.0.2", "10.1.0.2", port=8000), (False, "no_rule", None)),   # direction matters
    (pkt("a1", INGRESS, "10.2.0.2", "10.1.0.2", port=8000), (False, "no_rule", None)),
    (pkt("a1", EGRESS, "10.1.0.2", "10.2.0.2", proto=1), (True, None, "a-to-b")),
    (pkt("a1", EGRESS, "fd00:1::2", "fd00:2::2", proto=58), (False, "no_rule", None)),  # icmp is not icmpv6
    (pkt("a1", EGRESS, "10.1.0.2", "198.51.100.7", port=443), (True, None, "out")),
    (pkt("a1", EGRESS, "10.1.0.2", "198.51.100.66", port=443), (False, "policy_deny", "no-bad")),
    (pkt("b1", EGRESS, "10.2.0.2", "198.51.100.66", port=443), (True, None, "out")),   # deny is a's only
    (pkt("b1", INGRESS, "198.51.100.7", "10.2.0.2", port=443), (False, "no_rule", None)),  # cidr rules: egress only
    (pkt("a1", INGRESS, "10.3.0.2", "10.1.0.2", proto=47), (True, None, "c-anything-to-a")),  # no ports: every protocol
    (pkt("a1", EGRESS, "10.2.0.2", "10.2.0.2", port=8000), (False, "spoof_ip", None)),
    (pkt("b1", INGRESS, "10.1.0.2", "10.2.0.99", port=8000), (False, "dst_not_workload", None)),
    (pkt("a1", EGRESS, str(link_local_of(A.mac)), "fd00:2::2", port=8000), (True, None, "a-to-b")),
    (pkt("a1", EGRESS, "10.1.0.2", "8.8.8.8", proto=17, port=53), (True, None, "dns")),
    (pkt("a1", EGRESS, "fd00:1::2", "::ffff:10.2.0.2", port=8000), (False, "malformed", None)),
    (pkt("a1", EGRESS, "fd00:1::2", "fd00:2::2", proto=47), (False, "ipv6_exthdr", None)),
    # control messages that are not free go through the policy, with their own reason
    (pkt("a1", EGRESS, "10.1.0.2", "10.2.0.2", proto=1, kind=ICMP_ERROR), (True, None, "a-to-b")),
    (pkt("a1", EGRESS, "10.1.0.2", "198.51.100.7", proto=1, kind=ICMP_ERROR), (False, "icmp_err_no_flow", None)),
    (pkt("a1", EGRESS, "10.1.0.2", "198.51.100.66", proto=1, kind=ICMP_ERROR), (False, "policy_deny", "no-bad")),
    (pkt("a1", INGRESS, "198.51.100.7", "10.1.0.2", proto=1, kind=ICMP_ERROR), (False, "icmp_err_no_flow", None)),
    (pkt("a1", EGRESS, "fd00:1::2", "fd00:2::2", proto=58, kind=ND), (False, "nd_not_local", None)),
    (pkt("a1", EGRESS, "10.1.0.2", "8.8.8.8", proto=1, kind=ICMP_ERROR), (False, "icmp_err_no_flow", None)),
])
def test_reference_decisions(packet, expected):
    d = decide(POLICY, packet)
    assert (d.allowed, d.reason, d.rule) == expected


def test_link_local_matches_the_compiler():
    from skyguard.datapath.compile import eui64_link_local

    assert link_local_of(A.mac) == eui64_link_local(A.mac) == ip("fe80::ff:fe00:102")
