"""The control traffic that passes without a rule, and the state a VM can make the datapath keep,
attacked through BPF_PROG_RUN (issue 15, "Datapath"; the same attacks with real packets through
veths: tests/adversarial/test_channels_veth.py):

- ICMP errors are related to a flow only as that flow seen from the VM, sent to (or from) its
  peer, and never to steered DNS; other errors go through the policy (icmp_err_no_flow).
- ND and MLD pass without a rule only when they cannot leave the link (hop limit, destination,
  source); every SLLA/TLLA option is checked; the rest goes through the policy (nd_not_local).
- Steered DNS keeps no state: replies pass only with the steering's mark.
- Each VM has its own share of conntrack and fragment state, per direction (a small build: 4
  shares of 2 x 64 flows and 2 x 8 datagrams).
"""

from __future__ import annotations

import socket

import pytest
from bpf_support import IFACES, MAC, Harness, make_policy
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6MLQuery,
    ICMPv6MLReport,
    ICMPv6MLReport2,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_Redirect,
    ICMPv6NDOptSrcLLAddr,
    ICMPv6NDOptUnknown,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrHopByHop,
    RouterAlert,
)
from scapy.packet import Raw
from test_verdicts import ALLOW, DROP, IN, OUT, e_from, e_to, v4, v6

from skyguard.datapath import abi

LL_W1 = "fe80::ff:fe00:102"  # w1's EUI-64 link-local
LLA = ICMPv6NDOptSrcLLAddr(lladdr=MAC["w1"])


def opt(n: int = 1):
    return ICMPv6NDOptUnknown(type=200, len=1, data=b"\0" * 6) if n == 1 else opt() / opt(n - 1)


# ---- ICMP errors -----------------------------------------------------------------------------

def test_icmp_error_is_related_only_as_the_flow_seen_from_the_vm(h):
    syn = IP(src=v4("w1"), dst="198.51.100.9") / TCP(sport=42000, dport=443, flags="S")
    synack = IP(src="198.51.100.9", dst=v4("w1")) / TCP(sport=443, dport=42000, flags="SA")
    assert h.run(bytes(e_from("w1") / syn), "w1", OUT) == ALLOW
    cases = [
        # toward the VM, about what it sent (a router on the path may send it)
        ("router's error about the VM's packet", e_to("w1") / IP(src="192.0.2.1", dst=v4("w1")) / ICMP(type=11) / syn,
         IN, ALLOW),
        ("error toward the VM quoting the peer's packet", e_to("w1") / IP(src="198.51.100.9", dst=v4("w1")) /
         ICMP(type=3, code=3) / synack, IN, DROP("icmp_err_no_flow")),
        # from the VM, about what it received, to the peer
        ("VM's error to the peer about its packet", e_from("w1") / IP(src=v4("w1"), dst="198.51.100.9") /
         ICMP(type=3, code=3) / synack / Raw(b"x" * 1000), OUT, ALLOW),
        ("the same error to another host", e_from("w1") / IP(src=v4("w1"), dst="198.51.100.77") /
         ICMP(type=3, code=3) / synack / Raw(b"x" * 1000), OUT, DROP("icmp_err_no_flow")),
        ("VM's error quoting its own packet", e_from("w1") / IP(src=v4("w1"), dst="198.51.100.9") /
         ICMP(type=3, code=3) / syn, OUT, DROP("icmp_err_no_flow")),
        ("VM's error to a denied address", e_from("w1") / IP(src=v4("w1"), dst="198.51.100.66") /
         ICMP(type=12) / synack, OUT, DROP("policy_deny")),
    ]
    for description, frame, direction, expected in cases:
        assert h.run(bytes(frame), "w1", direction) == expected, description


def test_icmp_errors_never_ride_steered_dns(h):
    for ip, err, resolver in ((IP, ICMP(type=3, code=3), "8.8.8.8"), (IPv6, ICMPv6PacketTooBig(), "2001:4860::8888")):
        own = v4("w1") if ip is IP else v6("w1")
        query = ip(src=own, dst=resolver) / UDP(sport=40053, dport=53)
        answer = ip(src=resolver, dst=own) / UDP(sport=53, dport=40053)
        assert h.run(bytes(e_from("w1") / query), "w1", OUT) == ALLOW
        for inner in (query, answer):
            for dst in (resolver, "198.51.100.77" if ip is IP else "2001:db8::99"):
                frame = e_from("w1") / ip(src=own, dst=dst) / err / inner / Raw(b"exfil" * 200)
                assert h.run(bytes(frame), "w1", OUT) == DROP("icmp_err_no_flow"), (inner.summary(), dst)
        back = e_to("w1") / ip(src=resolver, dst=own) / err / query
        assert h.run(bytes(back), "w1", IN) == DROP("icmp_err_no_flow")


def test_an_icmp_error_a_rule_allows_passes_as_icmp(h):
    # web-to-db allows icmp: an error to d1 that belongs to no flow is ordinary allowed ICMP
    err = IP(src=v4("w1"), dst=v4("d1")) / ICMP(type=3, code=1) / IP(src=v4("d1"), dst=v4("w1")) / UDP(sport=1, dport=2)
    assert h.run(bytes(e_from("w1") / err), "w1", OUT) == ALLOW
    assert h.run(bytes(e_to("d1") / err), "d1", IN) == ALLOW


# ---- ND and MLD ------------------------------------------------------------------------------

ND_CASES = [
    # from the VM
    ("NS to the solicited-node group", e_from("w1") / IPv6(src=v6("w1"), dst="ff02::1:ff00:1") /
     ICMPv6ND_NS(tgt="fd00:1::1") / LLA, OUT, ALLOW),
    ("NA to the host's own global address (NUD)", e_from("w1") / IPv6(src=v6("w1"), dst="fd00:1::1") /
     ICMPv6ND_NA(tgt=v6("w1"), S=1), OUT, ALLOW),
    ("NS to a global address the host forwards", e_from("w1") / IPv6(src=v6("w1"), dst="2001:db8::99") /
     ICMPv6ND_NS(tgt=v6("w1")) / LLA / Raw(b""), OUT, DROP("nd_not_local")),
    ("NA with data to a global address", e_from("w1") / IPv6(src=v6("w1"), dst="2001:db8::99") /
     ICMPv6ND_NA(tgt=v6("w1")) / ICMPv6NDOptUnknown(type=200, len=16, data=b"exfil" * 25 + b"\0" * 1),
     OUT, DROP("nd_not_local")),
    ("NS to another zone's VM (a rule allows icmpv6 there)", e_from("w1") / IPv6(src=v6("w1"), dst=v6("d1")) /
     ICMPv6ND_NS(tgt=v6("w1")), OUT, ALLOW),
    ("NS to another zone's VM that no rule allows", e_from("x1") / IPv6(src=v6("x1"), dst=v6("d1")) /
     ICMPv6ND_NS(tgt=v6("x1")) / ICMPv6NDOptSrcLLAddr(lladdr=MAC["x1"]), OUT, DROP("nd_not_local")),
    ("NS with hop limit 64 to a link-local address", e_from("w1") / IPv6(src=v6("w1"), dst="fe80::1", hlim=64) /
     ICMPv6ND_NS(tgt="fe80::1"), OUT, DROP("nd_not_local")),
    ("MLDv2 report from the link-local address", e_from("w1") / IPv6(src=LL_W1, dst="ff02::16", hlim=1) /
     IPv6ExtHdrHopByHop(options=[RouterAlert()]) / ICMPv6MLReport2(), OUT, ALLOW),
    ("MLDv1 report during DAD (::)", e_from("w1") / IPv6(src="::", dst="ff02::1:ff00:2", hlim=1) /
     ICMPv6MLReport(mladdr="ff02::1:ff00:2"), OUT, ALLOW),
    ("MLD report from a global source", e_from("w1") / IPv6(src=v6("w1"), dst="ff02::16", hlim=1) /
     ICMPv6MLReport2(), OUT, DROP("nd_not_local")),
    ("MLD report with hop limit 64", e_from("w1") / IPv6(src=LL_W1, dst="ff02::16", hlim=64) / ICMPv6MLReport2(),
     OUT, DROP("nd_not_local")),
    ("MLD report to a unicast address", e_from("w1") / IPv6(src=LL_W1, dst="2001:db8::99", hlim=1) /
     ICMPv6MLReport(mladdr="ff02::1:ff00:2") / Raw(b"exfil"), OUT, DROP("nd_not_local")),
    ("SLLA of another MAC behind three options", e_from("w1") / IPv6(src=v6("w1"), dst="ff02::1:ff00:1") /
     ICMPv6ND_NS(tgt="fd00:1::1") / LLA / opt(3) / ICMPv6NDOptSrcLLAddr(lladdr="02:66:66:66:66:66"),
     OUT, DROP("nd_spoof")),
    ("fifteen options: every one walked", e_from("w1") / IPv6(src=v6("w1"), dst="ff02::1:ff00:1") /
     ICMPv6ND_NS(tgt="fd00:1::1") / opt(14) / LLA, OUT, ALLOW),
    ("more options than SG_ND_MAX_OPTS", e_from("w1") / IPv6(src=v6("w1"), dst="ff02::1:ff00:1") /
     ICMPv6ND_NS(tgt="fd00:1::1") / opt(16) / LLA, OUT, DROP("malformed")),
    ("bytes after the last option", e_from("w1") / IPv6(src=v6("w1"), dst="ff02::1:ff00:1") /
     ICMPv6ND_NS(tgt="fd00:1::1") / LLA / Raw(b"exfil"), OUT, DROP("malformed")),
    ("an option running past the packet", e_from("w1") / IPv6(src=v6("w1"), dst="ff02::1:ff00:1") /
     ICMPv6ND_NS(tgt="fd00:1::1") / ICMPv6NDOptUnknown(type=200, len=4, data=b"\0" * 6), OUT, DROP("malformed")),
    ("redirect from a VM", e_from("w1") / IPv6(src=LL_W1, dst="fe80::1") / ICMPv6ND_Redirect(tgt="fe80::1",
     dst="2001:db8::1"), OUT, DROP("nd_forbidden")),
    # toward the VM
    ("RA from the host's link-local", e_to("w1") / IPv6(src="fe80::1", dst="ff02::1") / ICMPv6ND_RA(), IN, ALLOW),
    ("RA forwarded from elsewhere (hop limit 254)", e_to("w1") / IPv6(src="fe80::1", dst=v6("w1"), hlim=254) /
     ICMPv6ND_RA(), IN, DROP("nd_not_local")),
    ("RA from a global source", e_to("w1") / IPv6(src="2001:db8::1", dst=v6("w1")) / ICMPv6ND_RA(), IN,
     DROP("nd_not_local")),
    ("redirect from a global source", e_to("w1") / IPv6(src="2001:db8::1", dst=v6("w1")) /
     ICMPv6ND_Redirect(tgt="fe80::1", dst="2001:db8::2"), IN, DROP("nd_not_local")),
    ("NS from the host", e_to("w1") / IPv6(src="fd00:1::1", dst="ff02::1:ff00:2") / ICMPv6ND_NS(tgt=v6("w1")),
     IN, ALLOW),
    ("NS forwarded from the internet (hop limit 254)", e_to("w1") / IPv6(src="2001:db8::1", dst=v6("w1"), hlim=254) /
     ICMPv6ND_NS(tgt=v6("w1")) / Raw(b""), IN, DROP("nd_not_local")),
    ("MLD query from the host", e_to("w1") / IPv6(src="fe80::1", dst="ff02::1", hlim=1) / ICMPv6MLQuery(),
     IN, ALLOW),
]


@pytest.mark.parametrize("description,frame,direction,expected", ND_CASES, ids=[c[0] for c in ND_CASES])
def test_nd_passes_without_a_rule_only_on_the_link(h, description, frame, direction, expected):
    workload = "x1" if frame.src == MAC["x1"] else "w1"
    for hook in (("tc", "xdp") if direction == OUT else ("tc",)):
        assert h.run(bytes(frame), workload, direction, hook=hook) == expected, (description, hook)
        h.dp.map("sg_ct").clear()


# ---- steered DNS -----------------------------------------------------------------------------

def test_steered_dns_keeps_no_state_and_only_marked_replies_pass(h):
    query = e_from("w1") / IP(src=v4("w1"), dst="8.8.8.8") / UDP(sport=40053, dport=53)
    answer = e_to("w1") / IP(src="8.8.8.8", dst=v4("w1")) / UDP(sport=53, dport=40053)
    tcp_query = e_from("w1") / IP(src=v4("w1"), dst="8.8.8.8") / TCP(sport=7777, dport=53, flags=0)
    from_53 = e_to("w1") / IP(src="8.8.8.8", dst=v4("w1")) / TCP(sport=53, dport=7777, flags="S")
    assert h.run(bytes(query), "w1", OUT) == ALLOW
    assert h.run(bytes(tcp_query), "w1", OUT) == ALLOW
    assert h.worker.call(h.dp.flows) == []  # no conntrack entry per destination
    # what the remote side sends is not related to the query: policy, no rule
    assert h.run(bytes(answer), "w1", IN) == DROP("no_rule")
    assert h.run(bytes(from_53), "w1", IN) == DROP("no_rule")
    # the proxy's answer carries the steering's mark
    assert h.run(bytes(answer), "w1", IN, mark=abi.MARK_DNS_REPLY) == ALLOW
    assert h.run(bytes(answer), "w1", IN, mark=abi.MARK_DNS_REPLY | 0x1) == ALLOW  # other bits are not ours
    # the mark is not a pass for anything else
    other = e_to("w1") / IP(src="8.8.8.8", dst=v4("w1")) / UDP(sport=54, dport=40053)
    assert h.run(bytes(other), "w1", IN, mark=abi.MARK_DNS_REPLY) == DROP("no_rule")
    not_own = e_to("w1") / IP(src="8.8.8.8", dst="10.1.0.99") / UDP(sport=53, dport=40053)
    assert h.run(bytes(not_own), "w1", IN, mark=abi.MARK_DNS_REPLY) == DROP("dst_not_workload")


# ---- shares of the connection and fragment tables ------------------------------------------------

# a small build: 4 shares of 2 x 64 flows and 2 x 8 datagrams; a 64 KiB event ring (~800 events)
# and 20 drop events per VM per second
SMALL = {"SG_CT_SHARES": 4, "SG_CT_SHARE": 64, "SG_FRAG_SHARE": 8, "SG_LRU_SLACK": 1024,
         "SG_EVENTS_PAGES": 16, "SG_DROP_EVENTS_PER_S": 20}


@pytest.fixture(scope="module")
def small(worker, pin_dir, datapath):
    from skyguard.datapath.datapath import Datapath

    dp = worker.call(Datapath, pin_dir.with_name(pin_dir.name + "-small"), "tc", SMALL)
    hs = Harness(dp, worker)
    hs.apply(make_policy())
    hs.ifindex = {wl: worker.call(socket.if_nametoindex, ifname) for wl, ifname in IFACES.items()}
    yield hs
    dp.close()
    dp.remove_pins(pin_dir.with_name(pin_dir.name + "-small"))


def test_a_vm_filling_its_share_breaks_no_flow_of_another(small):
    hs = small
    req = e_from("w2") / IP(src=v4("w2"), dst=v4("d1")) / UDP(sport=5555, dport=5000)
    rep = e_to("w2") / IP(src=v4("d1"), dst=v4("w2")) / UDP(sport=5000, dport=5555)
    first = e_from("w2") / IP(src=v4("w2"), dst=v4("d1"), flags="MF", id=700) / UDP(sport=5555, dport=5000) / \
        Raw(b"a" * 24)
    later = e_from("w2") / IP(src=v4("w2"), dst=v4("d1"), proto=17, frag=4, id=700) / Raw(b"b" * 16)
    assert hs.run(bytes(req), "w2", OUT) == ALLOW
    assert hs.run(bytes(first), "w2", OUT) == ALLOW
    # w1 churns through many times its share of flows and of fragmented datagrams
    verdicts = []
    for n in range(3 * 4 * 64):
        flood = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / UDP(sport=10000 + n, dport=5000)
        verdicts.append(hs.run_raw_verdict(bytes(flood), "w1"))
    assert verdicts.count(True) == 64 and all(verdicts[:64])  # its share, then no more
    for n in range(10 * 8):
        frag = e_from("w1") / IP(src=v4("w1"), dst=v4("d1"), flags="MF", id=n) / UDP(sport=10000, dport=5000)
        verdicts.append(hs.run_raw_verdict(bytes(frag), "w1"))
    assert hs.run(bytes(e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / UDP(sport=9, dport=5000)), "w1", OUT) == \
        DROP("ct_full")
    assert hs.run(bytes(e_from("w1") / IP(src=v4("w1"), dst=v4("d1"), flags="MF", id=999) /
                        UDP(sport=10000, dport=5000)), "w1", OUT) == DROP("frag_full")
    # w2's flow and datagram are untouched
    assert hs.run(bytes(rep), "w2", IN) == ALLOW
    assert hs.run(bytes(later), "w2", OUT) == ALLOW
    # w1's own live flows still work; once they expire, its share takes new ones again
    assert hs.run(bytes(e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / UDP(sport=10000, dport=5000)), "w1", OUT) \
        == ALLOW
    # a peer filling d1's half for flows toward it leaves d1 room for its own
    for n in range(2 * 64):
        hs.run_raw_verdict(bytes(e_to("d1") / IP(src=v4("w1"), dst=v4("d1")) / UDP(sport=20000 + n, dport=5000)),
                           "d1", IN)
    assert hs.run(bytes(e_to("d1") / IP(src=v4("w1"), dst=v4("d1")) / UDP(sport=9, dport=5000)), "d1", IN) == \
        DROP("ct_full")
    assert hs.run(bytes(e_from("d1") / IP(src=v4("d1"), dst="192.0.2.10") / UDP(sport=9, dport=514)), "d1", OUT) \
        == ALLOW
    table = hs.dp.map("sg_ct")
    for k, v in list(table.items()):
        if v.zone == hs.dp.compiled.zone_ids["web"] and bytes(k.saddr)[-4:] == bytes([10, 1, 0, 2]):
            v.expires_ns = 1
            table[k] = v
    assert hs.run(bytes(e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / UDP(sport=9, dport=5000)), "w1", OUT) == ALLOW


def test_one_vm_cannot_crowd_the_others_out_of_the_event_ring(small):
    """2,000 distinct denied tuples from w1 (more than the small build's ring holds) while nobody
    reads it: x1's denied packet right after still gets its event (each VM may put
    SG_DROP_EVENTS_PER_S drop events in the ring per second; the rest count as events lost)."""
    import ctypes as ct

    hs = small
    got = []
    ring = hs.dp.events()
    ring.open_ring_buffer(lambda _ctx, data, size: got.append(
        abi.Event.from_buffer_copy(ct.string_at(data, ct.sizeof(abi.Event)))))
    hs.dp.set_events(True)
    try:
        for n in range(2000):
            hs.run_raw_verdict(bytes(e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=30000 + n, dport=22)),
                               "w1")
        assert hs.run(bytes(e_from("x1") / IP(src=v4("x1"), dst="192.0.2.99") / UDP(dport=514)), "x1", OUT) == \
            DROP("no_rule")
        while hs.dp._bpf.ring_buffer_poll(100):
            pass
    finally:
        hs.dp.set_events(False)
    assert [e.ifindex for e in got].count(hs.ifindex["x1"]) == 1
    assert len(got) < 2000  # w1's flood was held to its budget
