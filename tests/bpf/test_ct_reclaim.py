"""A VM's share of the connection table and closed TCP connections (issue 24): a closed flow gives
its slot to a new flow of the same share once it has been quiet for a while, so a VM opening and
closing connections fast is not capped at SG_CT_SHARE / SG_CT_TCP_CLOSE_S new connections per
second (bench/run conn-rate hit CT_FULL at 4,096). Closed both ways (a FIN from each side, or an
RST): quiet SG_CT_CLOSED_QUIET_MS, or at once when a burst finds the share otherwise full;
closed one way (the other side may still be sending): quiet SG_CT_HALF_CLOSED_QUIET_S. A flow
closed one way that spoke lately, and any open flow however quiet, keep their slots. Run on the
small build of test_channels.py (shares of 2 x 64 flows) through BPF_PROG_RUN.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
from bpf_support import IFACES, Harness, make_policy
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.packet import Raw
from test_channels import SMALL
from test_verdicts import ALLOW, DROP, IN, OUT, e_from, e_to, v4, v6

from skyguard.datapath import abi

SHARE = SMALL["SG_CT_SHARE"]
CLOSE_S = 10  # SG_CT_TCP_CLOSE_S
NS = 1_000_000_000


@pytest.fixture(scope="module")
def hs(worker, pin_dir, datapath):
    from skyguard.datapath.datapath import Datapath

    pins = pin_dir.with_name(pin_dir.name + "-reclaim")
    dp = worker.call(Datapath, pins, "tc", SMALL)
    h = Harness(dp, worker)
    h.ifindex = {wl: worker.call(socket.if_nametoindex, ifname) for wl, ifname in IFACES.items()}
    yield h
    dp.close()
    dp.remove_pins(pins)


@pytest.fixture
def share(hs):
    hs.dp.map("sg_ct").clear()
    hs.apply(make_policy())
    return hs


def fill(h, flags_after_syn: str | None, base: int, reply_flags: str | None = None):
    """w1 opens SHARE connections to d1 (tcp/5432, allowed), each then sending `flags_after_syn`
    and d1 answering `reply_flags`. Each test uses its own ports: the share's slots still name the
    tuples of earlier tests."""
    for n in range(SHARE):
        seg = IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=base + n, dport=5432, flags="S")
        assert h.run_raw_verdict(bytes(e_from("w1") / seg), "w1")
        back = IP(src=v4("d1"), dst=v4("w1")) / TCP(sport=5432, dport=base + n, flags="SA")
        assert h.run_raw_verdict(bytes(e_to("w1") / back), "w1", IN)
        if flags_after_syn:
            seg[TCP].flags = flags_after_syn
            assert h.run_raw_verdict(bytes(e_from("w1") / seg), "w1")
        if reply_flags:
            back[TCP].flags = reply_flags
            assert h.run_raw_verdict(bytes(e_to("w1") / back), "w1", IN)


def age(h, seconds: float):
    """Make every conntrack entry look as if its last packet was `seconds` ago (expiries are
    CLOCK_MONOTONIC, the datapath's clock)."""
    table = h.dp.map("sg_ct")
    now = time.monotonic_ns()
    for k, v in list(table.items()):
        last = now - int(seconds * NS)
        v.expires_ns = last + (CLOSE_S * NS if v.state == 2 else 21600 * NS)
        table[k] = v


def new_flow(h, port):
    return h.run(bytes(e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=port, dport=5432, flags="S")),
                 "w1", OUT)


def test_closed_quiet_flows_give_their_slots_to_new_ones(share):
    fill(share, "FA", 30000)
    age(share, 3)
    for n in range(SHARE):  # once round the share: every new flow takes a closed one's slot
        assert new_flow(share, 40000 + n) == ALLOW, n
    # the share now holds the new (open) flows: the next one has no room
    assert new_flow(share, 40999) == DROP("ct_full")


def probes(h) -> int:
    """Slots tried so far by new flows that VMs opened, over every share (the hands' positions)."""
    return sum(hand.ct[0] for hand in h.dp.map("sg_share_hands").values())


BOTH_WAYS = pytest.mark.parametrize("mine, theirs, base", [("FA", "FA", 33000), ("R", None, 34000), ("A", "R", 35000)],
                                    ids=["fin-both-ways", "rst-sent", "rst-received"])


@BOTH_WAYS
def test_flows_closed_both_ways_give_their_slots_up_sooner(share, mine, theirs, base):
    fill(share, mine, base, theirs)
    age(share, 0.5)  # past SG_CT_CLOSED_QUIET_MS, short of SG_CT_HALF_CLOSED_QUIET_S
    before = probes(share)
    for n in range(SHARE):
        assert new_flow(share, base + 500 + n) == ALLOW, n
    assert probes(share) - before == SHARE  # each took the first slot it tried: quiet enough


@BOTH_WAYS
def test_a_burst_takes_flows_just_closed_both_ways(share, mine, theirs, base):
    fill(share, mine, base + 100, theirs)
    age(share, 0)  # closed just now: not quiet, but nothing but a last ACK can follow
    before = probes(share)
    for n in range(SHARE):
        assert new_flow(share, base + 600 + n) == ALLOW, n
    assert probes(share) - before > SHARE  # slots were passed over (none was quiet), yet each found one
    assert new_flow(share, base + 999) == DROP("ct_full")  # open flows never give way


def test_a_flow_closed_one_way_keeps_its_slot(share):
    fill(share, "FA", 36000)  # w1 is done sending; d1 may still be answering
    age(share, 0.5)
    assert new_flow(share, 36500) == DROP("ct_full")
    late = IP(src=v4("d1"), dst=v4("w1")) / TCP(sport=5432, dport=36000, flags="A") / (b"x" * 100)
    assert share.run(bytes(e_to("w1") / late), "w1", IN) == ALLOW


def test_open_flows_keep_their_slots_however_quiet(share):
    fill(share, "A", 32000)
    age(share, 3)
    assert new_flow(share, 42000) == DROP("ct_full")


def open_and_close(h, sport: int, dst: str | None = None, dport: int = 5432) -> None:
    """w1:sport -> dst:dport (d1:5432 unless given): handshake, then a FIN each way and the last ACK."""
    dst = dst or v4("d1")
    out = IP(src=v4("w1"), dst=dst) / TCP(sport=sport, dport=dport)
    back = IP(src=dst, dst=v4("w1")) / TCP(sport=dport, dport=sport)
    for mine, theirs in (("S", "SA"), ("FA", "FA")):
        out[TCP].flags, back[TCP].flags = mine, theirs
        assert h.run(bytes(e_from("w1") / out), "w1", OUT) == ALLOW
        assert h.run(bytes(e_to("w1") / back), "w1", IN) == ALLOW
    out[TCP].flags = "A"
    assert h.run(bytes(e_from("w1") / out), "w1", OUT) == ALLOW


def entry_of(h, sport: int):
    """The conntrack entry of w1:sport -> d1:5432 at w1's interface, or None."""
    for key, val in h.dp.map("sg_ct").items():
        if key.ifindex == h.ifindex["w1"] and socket.ntohs(key.sport) == sport and socket.ntohs(key.dport) == 5432:
            return val
    return None


def test_a_syn_on_a_closed_flows_tuple_is_a_new_flow(share):
    open_and_close(share, 38000)
    assert entry_of(share, 38000).fins == abi.FIN_BOTH
    # the port is reused at once: the SYN is decided by the policy and gets an entry of its own,
    # which no longer reads as closed (so its slot is not given away while it lives)
    again = IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=38000, dport=5432, flags="S")
    assert share.run(bytes(e_from("w1") / again), "w1", OUT) == ALLOW
    entry = entry_of(share, 38000)
    assert (entry.state, entry.fins, entry.packets) == (abi.CT_NEW, 0, 1)


def test_a_closed_flow_lets_no_connection_in_the_other_way(share):
    open_and_close(share, 38100)
    # d1 may not open connections to web, however recently a flow of this tuple closed
    reverse = IP(src=v4("d1"), dst=v4("w1")) / TCP(sport=5432, dport=38100, flags="S")
    assert share.run(bytes(e_to("w1") / reverse), "w1", IN) == DROP("no_rule")


def test_a_reopened_tuple_to_an_expired_dns_answer_is_refused(share):
    """Reopening a closed flow's tuple is a new flow, so it is decided now: an address learned from
    a DNS answer whose TTL has run out opens no new flow, whichever port the VM reuses."""
    ip = "203.0.113.81"
    share.worker.call(share.dp.learn, "web", "web-updates", [ip], 1.0)
    open_and_close(share, 38200, ip, 443)
    time.sleep(1.1)
    again = IP(src=v4("w1"), dst=ip) / TCP(sport=38200, dport=443, flags="S")
    assert share.run(bytes(e_from("w1") / again), "w1", OUT) == DROP("no_rule")
    other_port = IP(src=v4("w1"), dst=ip) / TCP(sport=38201, dport=443, flags="S")
    assert share.run(bytes(e_from("w1") / other_port), "w1", OUT) == DROP("no_rule")


@pytest.fixture
def flow_log(share, tmp_path):
    """A FlowLogger on the small datapath, writing a signed log; yields a reader of its entries.
    Scans only when synced: what ends between two syncs is the datapath's to report."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from skyguard.datapath.flowlog import FlowLogger, FlowNames
    from skyguard.tlog import LogReader, LogWriter, Signer
    from skyguard.tlog.entries import canonical
    from skyguard.tlog.verify import verify_log

    signer = Signer("ct.test/log", Ed25519PrivateKey.generate())
    writer = LogWriter(tmp_path / "log", signer)
    names = FlowNames(share.dp, ifindex_of=lambda name: share.worker.call(socket.if_nametoindex, name))
    logger = FlowLogger(share.dp, writer, names=names, ct_scan_interval=3600, deny_interval=3600).start()

    def entries(kind: str) -> list[dict]:
        logger.sync()
        return [e for e in (json.loads(p) for _, p in LogReader(tmp_path / "log").entries()) if e["type"] == kind]

    try:
        yield entries
    finally:
        logger.stop()
        writer.close()
        assert verify_log(tmp_path / "log", signer.verifier).ok
        for _, payload in LogReader(tmp_path / "log").entries():  # templated entries are canonical
            assert canonical(json.loads(payload)) == payload


def test_flows_whose_slots_go_to_new_ones_still_get_their_flow_end(share, flow_log):
    fill(share, "FA", 39000, "FA")  # closed both ways, never seen by a scan
    age(share, 0.5)
    for n in range(SHARE):
        assert new_flow(share, 39500 + n) == ALLOW, n
    ends = flow_log("flow_end")
    assert sorted(e["sport"] for e in ends) == list(range(39000, 39000 + SHARE))
    assert {(e["reason"], e["packets"], e["src_workload"], e["dst_workload"]) for e in ends} == {("closed", 4, "w1", "d1")}


def test_a_reopened_tuple_logs_the_closed_flows_end(share, flow_log):
    open_and_close(share, 38200)
    again = IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=38200, dport=5432, flags="S")
    assert share.run(bytes(e_from("w1") / again), "w1", OUT) == ALLOW
    [end] = flow_log("flow_end")
    assert (end["sport"], end["reason"], end["packets"]) == (38200, "closed", 5)
    assert [e["sport"] for e in flow_log("flow_start")] == [38200, 38200]  # the closed flow's and the new one's


def test_a_reopening_syn_cannot_hide_its_flags_in_a_later_fragment(share):
    """A first fragment that carries only the first 8 bytes of its TCP header (ports and sequence
    number) leaves the flags to the next fragment; bytes after the IP packet's end (a frame's
    Ethernet padding, which the VM writes) are not its header. Read from there (an ACK), the VM's
    SYN rode its closed flow's entry past the new decision: a connection to a DNS answer whose
    TTL had run out, reassembled by the receiver from the two fragments."""
    ip = "203.0.113.82"
    share.worker.call(share.dp.learn, "web", "web-updates", [ip], 1.0)
    open_and_close(share, 38300, ip, 443)
    time.sleep(1.1)
    syn = bytes(TCP(sport=38300, dport=443, flags="S", seq=1))
    fake_rest = bytes(TCP(flags="A"))[8:]  # ack, data offset, flags, window, ...: what the parser read
    first = IP(src=v4("w1"), dst=ip, proto=6, flags="MF", id=4711) / Raw(syn[:8])
    later = IP(src=v4("w1"), dst=ip, proto=6, frag=1, id=4711) / Raw(syn[8:])
    assert share.run(bytes(e_from("w1") / first) + fake_rest, "w1", OUT) == DROP("malformed")
    assert share.run(bytes(e_from("w1") / later), "w1", OUT) == DROP("frag_no_flow")
    # the same over IPv6, to an address a rule allows: still only whole transport headers
    syn6 = bytes(TCP(sport=38301, dport=443, flags="S", seq=1))
    first6 = IPv6(src=v6("w1"), dst="2001:db8:100::9") / IPv6ExtHdrFragment(nh=6, m=1, id=4712) / Raw(syn6[:8])
    assert share.run(bytes(e_from("w1") / first6) + fake_rest, "w1", OUT) == DROP("malformed")


def test_a_later_fragment_cannot_rewrite_a_tcp_header(share):
    """A later fragment at offset 8 or 16 overlaps the first fragment's TCP header (RFC 1858): a
    receiver that keeps the later bytes of an overlap reassembles the flags the datapath never
    saw (the first fragment said ACK, riding a closed flow's entry; the overlap says SYN)."""
    ip = "203.0.113.83"
    share.worker.call(share.dp.learn, "web", "web-updates", [ip], 1.0)
    open_and_close(share, 38400, ip, 443)
    time.sleep(1.1)
    ack = bytes(TCP(sport=38400, dport=443, flags="A", seq=1)) + b"\0" * 4
    syn = bytes(TCP(sport=38400, dport=443, flags="S", seq=1)) + b"\0" * 4
    first = IP(src=v4("w1"), dst=ip, proto=6, flags="MF", id=4713) / Raw(ack)
    assert share.run(bytes(e_from("w1") / first), "w1", OUT) == (True, None)  # an ACK of the closed flow
    for offset in (1, 2):
        overlap = IP(src=v4("w1"), dst=ip, proto=6, frag=offset, id=4713) / Raw(syn[offset * 8:])
        assert share.run(bytes(e_from("w1") / overlap), "w1", OUT) == DROP("malformed")
    first6 = IPv6(src=v6("w1"), dst="2001:db8:100::9") / IPv6ExtHdrFragment(nh=6, m=1, id=4714) / Raw(syn)
    overlap6 = IPv6(src=v6("w1"), dst="2001:db8:100::9") / IPv6ExtHdrFragment(nh=6, offset=1, id=4714) / Raw(syn[8:])
    assert share.run(bytes(e_from("w1") / first6), "w1", OUT) == ALLOW
    assert share.run(bytes(e_from("w1") / overlap6), "w1", OUT) == DROP("malformed")
    # the next fragment after a whole header passes
    after6 = IPv6(src=v6("w1"), dst="2001:db8:100::9") / IPv6ExtHdrFragment(nh=6, offset=3, id=4714) / Raw(b"x" * 8)
    assert share.run(bytes(e_from("w1") / after6), "w1", OUT) == (True, None)
