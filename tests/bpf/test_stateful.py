"""Stateful behaviour of the real programs through BPF_PROG_RUN: conntrack replies, fragments,
ICMP errors of allowed flows, policy swaps re-checking established flows, and DNS learning.
Each test starts from an empty conntrack table and the base policy (fixture `h`).
"""

from __future__ import annotations

import socket
import time

import pytest
from bpf_support import make_policy
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment
from scapy.packet import Raw
from test_verdicts import ALLOW, DROP, IN, OUT, e_from, e_to, v4, v6

from skyguard.errors import BadInput
from skyguard.policy.model import Destination, PortRange, Rule


def test_tcp_reply_passes_only_for_the_allowed_flow(h):
    syn = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=41000, dport=5432, flags="S")
    synack_at_db = e_from("d1") / IP(src=v4("d1"), dst=v4("w1")) / TCP(sport=5432, dport=41000, flags="SA")
    synack_at_web = e_to("w1") / IP(src=v4("d1"), dst=v4("w1")) / TCP(sport=5432, dport=41000, flags="SA")
    # before the flow exists the reply is a new flow db -> web: denied at both ends
    assert h.run(bytes(synack_at_db), "d1", OUT) == DROP("no_rule")
    assert h.run(bytes(synack_at_web), "w1", IN) == DROP("no_rule")
    assert h.run(bytes(syn), "w1", OUT) == ALLOW
    assert h.run(bytes(e_to("d1") / syn[IP]), "d1", IN) == ALLOW
    assert h.run(bytes(synack_at_db), "d1", OUT) == ALLOW
    assert h.run(bytes(synack_at_web), "w1", IN) == ALLOW
    # another source port is another flow
    other = e_to("w1") / IP(src=v4("d1"), dst=v4("w1")) / TCP(sport=5432, dport=41001, flags="SA")
    assert h.run(bytes(other), "w1", IN) == DROP("no_rule")
    # one interface's approval is not another's: w2 never opened it
    w2 = e_to("w2") / IP(src=v4("d1"), dst=v4("w2")) / TCP(sport=5432, dport=41000, flags="SA")
    assert h.run(bytes(w2), "w2", IN) == DROP("no_rule")
    flows = h.worker.call(h.dp.flows)
    states = {(f["src"], f["dport"], f["direction"]): f["state"] for f in flows}
    assert states[(v4("w1"), 5432, "egress")] == "established"


def test_spoofed_source_cannot_ride_an_established_flow(h):
    syn = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=41500, dport=5432, flags="S")
    assert h.run(bytes(syn), "w1", OUT) == ALLOW
    spoofed = e_from("w1") / IP(src=v4("w2"), dst=v4("d1")) / TCP(sport=41500, dport=5432, flags="A")
    assert h.run(bytes(spoofed), "w1", OUT) == DROP("spoof_ip")
    # nor another interface's flow: w2's interface never approved w1's tuple
    theirs = e_from("w2") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=41500, dport=5432, flags="A")
    assert h.run(bytes(e_from("w2", src=None) / theirs[IP]), "w2", OUT) == DROP("spoof_ip")


def test_udp_and_icmp_echo_replies(h):
    req = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / UDP(sport=5555, dport=5000)
    rep = e_to("w1") / IP(src=v4("d1"), dst=v4("w1")) / UDP(sport=5000, dport=5555)
    assert h.run(bytes(rep), "w1", IN) == DROP("no_rule")
    assert h.run(bytes(req), "w1", OUT) == ALLOW
    assert h.run(bytes(rep), "w1", IN) == ALLOW
    ping = e_from("w1") / IPv6(src=v6("w1"), dst=v6("d1")) / ICMPv6EchoRequest(id=99)
    pong = e_to("w1") / IPv6(src=v6("d1"), dst=v6("w1")) / ICMPv6EchoReply(id=99)
    pong_other = e_to("w1") / IPv6(src=v6("d1"), dst=v6("w1")) / ICMPv6EchoReply(id=100)
    assert h.run(bytes(ping), "w1", OUT) == ALLOW
    assert h.run(bytes(pong), "w1", IN) == ALLOW
    assert h.run(bytes(pong_other), "w1", IN) == DROP("no_rule")
    # the remote's own echo request with the same identifier is not a reply
    their_ping = e_to("w1") / IPv6(src=v6("d1"), dst=v6("w1")) / ICMPv6EchoRequest(id=99)
    assert h.run(bytes(their_ping), "w1", IN) == DROP("no_rule")


def test_only_an_icmp_reply_rides_the_vms_icmp_flow(h):
    """ICMP carries no ports: an echo request with identifier 0 and every type without an
    identifier are tuples with both "ports" 0, the same either way round. Such a packet the VM
    sent (web -> db ICMP is allowed, db -> web is not) let db send it anything as a "reply": its
    own echo requests with identifier 0, other types, and ICMP errors about no flow of the VM.
    Only an echo (or timestamp) reply is a reply; anything else db sends is decided as its own."""
    ping0 = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / ICMP(type=8, id=0, seq=1)
    pong0 = e_to("w1") / IP(src=v4("d1"), dst=v4("w1")) / ICMP(type=0, id=0, seq=1)
    their_ping0 = e_to("w1") / IP(src=v4("d1"), dst=v4("w1")) / ICMP(type=8, id=0, seq=7)
    their_tstamp = e_to("w1") / IP(src=v4("d1"), dst=v4("w1")) / ICMP(type=13, id=0)
    stray_error = e_to("w1") / IP(src=v4("d1"), dst=v4("w1")) / ICMP(type=3, code=3) / \
        IP(src=v4("w1"), dst="203.0.113.5") / UDP(sport=9999, dport=53)
    assert h.run(bytes(ping0), "w1", OUT) == ALLOW
    assert h.run(bytes(pong0), "w1", IN) == ALLOW
    assert h.run(bytes(their_ping0), "w1", IN) == DROP("no_rule")
    assert h.run(bytes(their_tstamp), "w1", IN) == DROP("no_rule")
    assert h.run(bytes(stray_error), "w1", IN) == DROP("icmp_err_no_flow")
    # a type without identifier the VM sends (here a source quench) opens nothing either
    quench = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / ICMP(type=4) / IP(src=v4("d1"), dst=v4("w1")) / UDP()
    assert h.run(bytes(quench), "w1", OUT) == ALLOW
    assert h.run(bytes(e_to("w1") / IP(src=v4("d1"), dst=v4("w1")) / ICMP(type=4) /
                       IP(src=v4("w1"), dst=v4("d1")) / UDP()), "w1", IN) == DROP("no_rule")
    # IPv6: the same
    ping6 = e_from("w1") / IPv6(src=v6("w1"), dst=v6("d1")) / ICMPv6EchoRequest(id=0)
    assert h.run(bytes(ping6), "w1", OUT) == ALLOW
    assert h.run(bytes(e_to("w1") / IPv6(src=v6("d1"), dst=v6("w1")) / ICMPv6EchoReply(id=0)), "w1", IN) == ALLOW
    assert h.run(bytes(e_to("w1") / IPv6(src=v6("d1"), dst=v6("w1")) / ICMPv6EchoRequest(id=0)), "w1", IN) == \
        DROP("no_rule")
    # the timestamp exchange (which carries an identifier like echo) still works
    tstamp = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / ICMP(type=13, id=5)
    assert h.run(bytes(tstamp), "w1", OUT) == ALLOW
    assert h.run(bytes(e_to("w1") / IP(src=v4("d1"), dst=v4("w1")) / ICMP(type=14, id=5)), "w1", IN) == ALLOW


def test_icmp_error_for_an_allowed_flow(h):
    syn = e_from("w1") / IP(src=v4("w1"), dst="198.51.100.9") / TCP(sport=42000, dport=443, flags="S")
    err = e_to("w1") / IP(src="198.51.100.1", dst=v4("w1")) / ICMP(type=3, code=1) / syn[IP]
    assert h.run(bytes(err), "w1", IN) == DROP("icmp_err_no_flow")
    assert h.run(bytes(syn), "w1", OUT) == ALLOW
    assert h.run(bytes(err), "w1", IN) == ALLOW
    syn6 = e_from("w1") / IPv6(src=v6("w1"), dst="2001:db8:100::9") / TCP(sport=42000, dport=443, flags="S")
    err6 = e_to("w1") / IPv6(src="2001:db8:100::1", dst=v6("w1")) / ICMPv6DestUnreach() / syn6[IPv6]
    assert h.run(bytes(err6), "w1", IN) == DROP("icmp_err_no_flow")
    assert h.run(bytes(syn6), "w1", OUT) == ALLOW
    assert h.run(bytes(err6), "w1", IN) == ALLOW


def test_fragments_follow_an_allowed_first_fragment(h):
    first = e_from("w1") / IP(src=v4("w1"), dst=v4("d1"), flags="MF", id=777) / UDP(sport=1, dport=5000) / Raw(b"a" * 24)
    later = e_from("w1") / IP(src=v4("w1"), dst=v4("d1"), proto=17, frag=4, id=777) / Raw(b"b" * 16)
    stranger = e_from("w1") / IP(src=v4("w1"), dst=v4("d1"), proto=17, frag=4, id=778) / Raw(b"b" * 16)
    assert h.run(bytes(later), "w1", OUT) == DROP("frag_no_flow")
    assert h.run(bytes(first), "w1", OUT) == ALLOW
    assert h.run(bytes(later), "w1", OUT) == ALLOW
    assert h.run(bytes(stranger), "w1", OUT) == DROP("frag_no_flow")
    first6 = e_from("w1") / IPv6(src=v6("w1"), dst=v6("d1")) / IPv6ExtHdrFragment(nh=17, m=1, id=4242) / \
        UDP(sport=1, dport=5000) / Raw(b"a" * 24)
    later6 = e_from("w1") / IPv6(src=v6("w1"), dst=v6("d1")) / IPv6ExtHdrFragment(nh=17, offset=4, id=4242) / \
        Raw(b"b" * 16)
    assert h.run(bytes(later6), "w1", OUT) == DROP("frag_no_flow")
    assert h.run(bytes(first6), "w1", OUT) == ALLOW
    assert h.run(bytes(later6), "w1", OUT) == ALLOW
    # a denied first fragment opens nothing
    denied_first = e_from("w1") / IP(src=v4("w1"), dst=v4("d1"), flags="MF", id=779) / TCP(dport=22)
    denied_later = e_from("w1") / IP(src=v4("w1"), dst=v4("d1"), proto=6, frag=4, id=779) / Raw(b"b" * 16)
    assert h.run(bytes(denied_first), "w1", OUT) == DROP("no_rule")
    assert h.run(bytes(denied_later), "w1", OUT) == DROP("frag_no_flow")


def test_policy_swap_rechecks_established_flows(h):
    kept = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=43000, dport=8000, flags="S")
    cut = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=43001, dport=5432, flags="S")
    cut_reply = e_to("w1") / IP(src=v4("d1"), dst=v4("w1")) / TCP(sport=5432, dport=43001, flags="A")
    assert h.run(bytes(kept), "w1", OUT) == ALLOW
    assert h.run(bytes(cut), "w1", OUT) == ALLOW
    gen_before = h.worker.call(lambda: h.dp.gen)
    # the new policy keeps tcp/8000-8100 but no longer tcp/5432
    narrowed = Rule("web-to-db", "allow", ("web",), Destination(zones=("db",)), (PortRange("tcp", 8000, 8100),))
    h.apply(make_policy(extra_rules=(narrowed,), drop_rules=("web-to-db",)))
    assert h.worker.call(lambda: h.dp.gen) == gen_before + 1
    ack_kept = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=43000, dport=8000, flags="A")
    assert h.run(bytes(ack_kept), "w1", OUT) == ALLOW
    # the reply of the revoked flow is re-decided as its originator and dropped, entry deleted
    assert h.run(bytes(cut_reply), "w1", IN) == DROP("policy_revoked")
    assert h.run(bytes(cut_reply), "w1", IN) == DROP("no_rule")
    assert h.run(bytes(cut), "w1", OUT) == DROP("no_rule")
    # no entry of the old generation is left in the policy maps
    for name in ("sg_policy", "sg_policy_exact", "sg_ipcache", "sg_ipcache_host", "sg_srcip"):
        gens = {k.gen for k in h.worker.call(lambda name=name: list(h.dp.map(name).keys()))}
        assert gens == {gen_before + 1}, name


def test_learn_opens_the_address_for_that_zone_and_rule_ports_until_ttl(h):
    ip = "203.0.113.80"
    https = e_from("w1") / IP(src=v4("w1"), dst=ip) / TCP(sport=44000, dport=443, flags="S")
    ssh = e_from("w1") / IP(src=v4("w1"), dst=ip) / TCP(sport=44001, dport=22, flags="S")
    from_other_zone = e_from("x1") / IP(src=v4("x1"), dst=ip) / TCP(sport=44002, dport=443, flags="S")
    assert h.run(bytes(https), "w1", OUT) == DROP("no_rule")
    h.worker.call(h.dp.learn, "web", "web-updates", [ip, "2001:db8:203::80"], 2.0)
    assert h.run(bytes(https), "w1", OUT) == ALLOW
    assert h.run(bytes(ssh), "w1", OUT) == DROP("no_rule")
    assert h.run(bytes(from_other_zone), "x1", OUT) == DROP("no_rule")
    v6_https = e_from("w1") / IPv6(src=v6("w1"), dst="2001:db8:203::80") / TCP(sport=44003, dport=80, flags="S")
    assert h.run(bytes(v6_https), "w1", OUT) == ALLOW
    # a learned address inside a CIDR keeps the CIDR's grants too
    h.worker.call(h.dp.learn, "web", "web-updates", ["198.51.100.80"], 60)
    assert h.run(bytes(e_from("w1") / IP(src=v4("w1"), dst="198.51.100.80") / TCP(dport=80)), "w1", OUT) == ALLOW
    assert h.run(bytes(e_from("w1") / IP(src=v4("w1"), dst="198.51.100.80") / TCP(dport=443)), "w1", OUT) == ALLOW
    # learned addresses survive a policy swap
    h.apply(make_policy())
    new_flow = e_from("w1") / IP(src=v4("w1"), dst=ip) / TCP(sport=44005, dport=443, flags="S")
    assert h.run(bytes(new_flow), "w1", OUT) == ALLOW
    time.sleep(2.1)  # past the TTL: new flows stop, the established one continues
    later_new = e_from("w1") / IP(src=v4("w1"), dst=ip) / TCP(sport=44006, dport=443, flags="S")
    assert h.run(bytes(later_new), "w1", OUT) == DROP("no_rule")
    established = e_from("w1") / IP(src=v4("w1"), dst=ip) / TCP(sport=44005, dport=443, flags="A")
    assert h.run(bytes(established), "w1", OUT) == ALLOW
    # the sweep forgets the two expired addresses and keeps the live one
    assert h.worker.call(h.dp.expire_learned) == 2
    assert h.run(bytes(later_new), "w1", OUT) == DROP("no_rule")


def test_an_address_keeps_the_longest_expiry_learned_until_it_is_held_shorter(h):
    ip = "203.0.113.81"

    def syn(port):
        return bytes(e_from("w1") / IP(src=v4("w1"), dst=ip) / TCP(sport=port, dport=443, flags="S"))

    h.worker.call(h.dp.learn, "web", "web-updates", [ip], 60)
    h.worker.call(h.dp.learn, "web", "web-updates", [ip], 0.5)  # another name, the same address, shorter
    time.sleep(0.6)  # past the shorter answer
    assert h.run(syn(44100), "w1", OUT) == ALLOW  # the 60 s answer holds it (it closed here before)
    h.worker.call(h.dp.hold, "web", "web-updates", [ip], 0.5)  # the 60 s one taken back
    time.sleep(0.6)
    assert h.run(syn(44101), "w1", OUT) == DROP("no_rule")


def test_learn_refuses_what_the_policy_does_not_say(h):
    with pytest.raises(BadInput):
        h.worker.call(h.dp.learn, "web", "web-to-db", ["203.0.113.1"], 30)  # not an FQDN rule
    with pytest.raises(BadInput):
        h.worker.call(h.dp.learn, "db", "web-updates", ["203.0.113.1"], 30)  # db is not a source
    with pytest.raises(BadInput):
        h.worker.call(h.dp.learn, "web", "nope", ["203.0.113.1"], 30)


def test_no_generation_drops_everything(h):
    import ctypes as ct

    from skyguard.datapath import abi

    cfg = h.dp.map("sg_config")
    saved = cfg[ct.c_uint32(0)]
    try:
        cfg[ct.c_uint32(0)] = abi.ConfigVal(gen=0, flags=0)
        frame = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(dport=5432)
        passed, reason = h.run(bytes(frame), "w1", OUT)
        assert (passed, reason) == (False, "no_config")
    finally:
        cfg[ct.c_uint32(0)] = abi.ConfigVal(gen=saved.gen, flags=saved.flags)


def test_counters_by_zone_direction_verdict_and_reason(h):
    before = h.worker.call(h.dp.counters)
    h.run(bytes(e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(dport=22)), "w1", OUT)
    after = h.worker.call(h.dp.counters)

    def drops(c):
        return sum(d["packets"] for d in c["drops"] if (d["zone"], d["direction"], d["reason"]) == ("web", "egress", "no_rule"))

    assert drops(after) == drops(before) + 1


def test_events_flow_start_and_drop_reach_the_ring_buffer(h):
    import ctypes as ct

    from skyguard.datapath import abi

    got = []

    def on_event(_ctx, data, size):
        got.append(abi.Event.from_buffer_copy(ct.string_at(data, ct.sizeof(abi.Event))))

    ring = h.dp.events()
    ring.open_ring_buffer(on_event)
    h.dp.set_events(True)
    try:
        h.run(bytes(e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=45000, dport=5432)), "w1", OUT)
        h.run(bytes(e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=45001, dport=22)), "w1", OUT)
        h.dp._bpf.ring_buffer_poll(100)
    finally:
        h.dp.set_events(False)
    kinds = [(e.type, e.reason, e.rule_id) for e in got]
    assert (abi.EVENT_FLOW_START, 0, 1) in kinds  # rule 1 = web-to-db
    from skyguard.datapath.reasons import code

    assert (abi.EVENT_DROP, code("NO_RULE"), 0) in kinds
    start = next(e for e in got if e.type == abi.EVENT_FLOW_START)
    assert str(abi.addr_from16(bytes(start.daddr))) == v4("d1") and socket.ntohs(start.dport) == 5432
    # a flood of one denied flow is one event per second, then one carrying the suppressed count
    got.clear()
    flood = bytes(e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=45003, dport=23))
    h.dp.set_events(True)
    try:
        for _ in range(5):
            h.run(flood, "w1", OUT)
        h.dp._bpf.ring_buffer_poll(100)
        assert [(e.type, e.count) for e in got] == [(abi.EVENT_DROP, 1)]
        time.sleep(1.05)
        h.run(flood, "w1", OUT)
        h.dp._bpf.ring_buffer_poll(100)
        assert [(e.type, e.count) for e in got] == [(abi.EVENT_DROP, 1), (abi.EVENT_DROP, 5)]
    finally:
        h.dp.set_events(False)
    # with events off nothing is emitted
    got.clear()
    h.run(bytes(e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=45002, dport=22)), "w1", OUT)
    h.dp._bpf.ring_buffer_poll(50)
    assert got == []


def test_a_policy_the_datapath_cannot_hold_loads_nothing(h):
    import dataclasses

    from skyguard.datapath import abi
    from skyguard.policy.model import Zone

    gen = h.worker.call(lambda: h.dp.gen)
    base = make_policy()
    zones = dict(base.zones)
    zones.update({f"z{i}": Zone(f"z{i}", ()) for i in range(abi.MAX_ZONES)})
    with pytest.raises(BadInput, match="zones"):
        h.apply(dataclasses.replace(base, zones=zones))
    assert h.worker.call(lambda: h.dp.gen) == gen
    assert h.dp.policy is not None and h.dp.policy.name == base.name
    ok = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=46000, dport=5432, flags="S")
    assert h.run(bytes(ok), "w1", OUT) == ALLOW


def test_conntrack_entries_age_out(worker, pin_dir, h):
    """A separately built datapath with a 1-second UDP timeout (limits are -D overridable): the
    reply of an idle flow is no longer a reply once its entry has aged out."""
    from bpf_support import Harness

    from skyguard.datapath.datapath import Datapath

    short = worker.call(Datapath, pin_dir.with_name(pin_dir.name + "-short"), "tc", {"SG_CT_UDP_S": 1})
    try:
        hs = Harness(short, worker)
        hs.ifindex = h.ifindex
        hs.apply(make_policy())
        req = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / UDP(sport=5556, dport=5000)
        rep = e_to("w1") / IP(src=v4("d1"), dst=v4("w1")) / UDP(sport=5000, dport=5556)
        assert hs.run(bytes(req), "w1", OUT) == ALLOW
        assert hs.run(bytes(rep), "w1", IN) == ALLOW
        time.sleep(1.2)  # the coarse clock ticks in jiffies: wait past the timeout
        assert hs.run(bytes(rep), "w1", IN) == DROP("no_rule")
    finally:
        short.close()
        Datapath.remove_pins(pin_dir.with_name(pin_dir.name + "-short"))


def _state(h, sport: int) -> str:
    [flow] = [f for f in h.worker.call(h.dp.flows) if f["sport"] == sport or f["dport"] == sport]
    return flow["state"]


def test_a_blind_rst_or_fin_does_not_close_a_flow(h):
    """An off-path host that spoofs the peer's address and guesses the ports sends RST or FIN with
    a sequence number far from where the peer is: the packet passes (the VM's kernel judges it,
    RFC 5961), but the entry stays established; otherwise one such packet closed the flow and gave
    its slot away, and the VM's next packet on it was refused. The peer's own RST closes it."""
    out = "198.51.100.7"  # web-out allows tcp/443 to it

    def from_peer(flags, seq, ack=1101, load=b""):
        segment = TCP(sport=443, dport=42100, flags=flags, seq=seq % (1 << 32), ack=ack)
        return bytes(e_to("w1") / IP(src=out, dst=v4("w1")) / segment / load)

    syn = e_from("w1") / IP(src=v4("w1"), dst=out) / TCP(sport=42100, dport=443, flags="S", seq=1000)
    assert h.run(bytes(syn), "w1", OUT) == ALLOW
    assert h.run(from_peer("SA", 5000, ack=1001), "w1", IN) == ALLOW
    data = e_from("w1") / IP(src=v4("w1"), dst=out) / TCP(sport=42100, dport=443, flags="PA", seq=1001, ack=5001) / (b"x" * 100)
    assert h.run(bytes(data), "w1", OUT) == ALLOW
    assert h.run(from_peer("PA", 5001, load=b"y" * 2000), "w1", IN) == ALLOW  # the peer is at 7001 now
    for flags in ("R", "RA", "F", "FA"):
        for seq in (7001 + (1 << 31), 7001 - (1 << 25), 7001 + (1 << 25)):
            assert h.run(from_peer(flags, seq), "w1", IN) == ALLOW
            assert _state(h, 42100) == "established", (flags, seq)
    # in the window: the peer's own reset, even a little behind where it is, closes the flow
    assert h.run(from_peer("R", 7001 - 1500), "w1", IN) == ALLOW
    assert _state(h, 42100) == "closing"


def test_a_blind_rst_before_the_answer_does_not_close_a_flow(h):
    """Before the peer has sent anything, a RST from it must acknowledge the SYN (a closed port's
    answer does): a guess at the sequence the VM started from is a guess in 2^32 / 2^25."""
    out = "198.51.100.7"

    def from_peer(flags, ack):
        return bytes(e_to("w1") / IP(src=out, dst=v4("w1")) / TCP(sport=443, dport=42200, flags=flags, seq=0, ack=ack))

    syn = e_from("w1") / IP(src=v4("w1"), dst=out) / TCP(sport=42200, dport=443, flags="S", seq=3_000_000_000)
    assert h.run(bytes(syn), "w1", OUT) == ALLOW
    for flags, ack in (("R", 3_000_000_001), ("RA", 1), ("RA", 3_000_000_001 + (1 << 25))):
        assert h.run(from_peer(flags, ack), "w1", IN) == ALLOW
        assert _state(h, 42200) == "new", (flags, ack)
    assert h.run(from_peer("RA", 3_000_000_001), "w1", IN) == ALLOW
    assert _state(h, 42200) == "closing"


def test_a_spoofed_answer_does_not_establish_a_flow(h):
    """A SYN-ACK that does not acknowledge the SYN (an off-path host spoofing the peer) passes (the
    VM's kernel answers it with a reset) but leaves the flow new: established, a half-open
    connection to a peer that never answers would hold its slot for hours instead of a minute."""
    out = "198.51.100.7"

    def answer(ack):
        return bytes(e_to("w1") / IP(src=out, dst=v4("w1")) / TCP(sport=443, dport=42400, flags="SA", seq=9, ack=ack % (1 << 32)))

    syn = e_from("w1") / IP(src=v4("w1"), dst=out) / TCP(sport=42400, dport=443, flags="S", seq=1000)
    assert h.run(bytes(syn), "w1", OUT) == ALLOW
    for ack in (1001 + (1 << 25), 1001 - (1 << 25), 1001 + (1 << 31)):
        assert h.run(answer(ack), "w1", IN) == ALLOW
        assert _state(h, 42400) == "new", ack
    assert h.run(answer(1001), "w1", IN) == ALLOW
    assert _state(h, 42400) == "established"


def test_a_syn_from_the_peer_does_not_end_a_half_closed_flow(h):
    """The VM has sent its FIN; the peer is still sending. A SYN with the peer's address (no
    sequence number to guess) used to end the flow as a new connection on a closed tuple, and the
    peer's next data was refused. Only a flow closed both ways is reopened by a SYN."""
    out = "198.51.100.7"

    def from_peer(flags, seq, load=b""):
        segment = TCP(sport=443, dport=42500, flags=flags, seq=seq, ack=1002)
        return bytes(e_to("w1") / IP(src=out, dst=v4("w1")) / segment / load)

    syn = e_from("w1") / IP(src=v4("w1"), dst=out) / TCP(sport=42500, dport=443, flags="S", seq=1000)
    assert h.run(bytes(syn), "w1", OUT) == ALLOW
    assert h.run(from_peer("SA", 5000), "w1", IN) == ALLOW
    fin = e_from("w1") / IP(src=v4("w1"), dst=out) / TCP(sport=42500, dport=443, flags="FA", seq=1001, ack=5001)
    assert h.run(bytes(fin), "w1", OUT) == ALLOW
    assert h.run(from_peer("S", 123456), "w1", IN) == ALLOW  # rides the flow: the VM's kernel judges it
    assert _state(h, 42500) == "closing"
    assert h.run(from_peer("PA", 5001, b"z" * 100), "w1", IN) == ALLOW
    assert h.run(from_peer("FA", 5101), "w1", IN) == ALLOW  # now closed both ways
    assert h.run(from_peer("S", 123456), "w1", IN) != ALLOW  # a new inbound connection: no rule
    assert not [f for f in h.worker.call(h.dp.flows) if f["sport"] == 42500 or f["dport"] == 42500]
