"""A VM's share of the connection table and closed TCP connections (issue 24): a closed flow
(FIN or RST seen) that has been quiet for SG_CT_CLOSED_QUIET_S gives its slot to a new flow of
the same share, so a VM opening and closing connections fast is not capped at SG_CT_SHARE /
SG_CT_TCP_CLOSE_S new connections per second (bench/run conn-rate hit CT_FULL at 4,096). A closed
flow that just spoke, and any open flow however quiet, keep their slots. Run on the small build
of test_channels.py (shares of 2 x 64 flows) through BPF_PROG_RUN.
"""

from __future__ import annotations

import socket
import time

import pytest
from bpf_support import IFACES, Harness, make_policy
from scapy.layers.inet import IP, TCP
from test_channels import SMALL
from test_verdicts import ALLOW, DROP, IN, OUT, e_from, e_to, v4

SHARE = SMALL["SG_CT_SHARE"]
CLOSE_S = 10  # SG_CT_TCP_CLOSE_S
NS = 1_000_000_000


@pytest.fixture(scope="module")
def hs(worker, pin_dir, datapath):
    from skyguard.datapath.datapath import Datapath

    dp = worker.call(Datapath, pin_dir.with_name(pin_dir.name + "-reclaim"), "tc", SMALL)
    h = Harness(dp, worker)
    h.ifindex = {wl: worker.call(socket.if_nametoindex, ifname) for wl, ifname in IFACES.items()}
    yield h
    dp.close()


@pytest.fixture
def share(hs):
    hs.dp.map("sg_ct").clear()
    hs.apply(make_policy())
    return hs


def fill(h, flags_after_syn: str | None, base: int):
    """w1 opens SHARE connections to d1 (tcp/5432, allowed), each then sending `flags_after_syn`.
    Each test uses its own ports: the share's slots still name the tuples of earlier tests."""
    for n in range(SHARE):
        seg = IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=base + n, dport=5432, flags="S")
        assert h.run_raw_verdict(bytes(e_from("w1") / seg), "w1")
        back = IP(src=v4("d1"), dst=v4("w1")) / TCP(sport=5432, dport=base + n, flags="SA")
        assert h.run_raw_verdict(bytes(e_to("w1") / back), "w1", IN)
        if flags_after_syn:
            seg[TCP].flags = flags_after_syn
            assert h.run_raw_verdict(bytes(e_from("w1") / seg), "w1")


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


def test_a_just_closed_flow_keeps_its_slot(share):
    fill(share, "R", 31000)
    age(share, 0)  # every one closed just now (filling the share takes a while on a loaded machine)
    assert new_flow(share, 41000) == DROP("ct_full")
    # and its late packets still pass as the flow's
    late = IP(src=v4("d1"), dst=v4("w1")) / TCP(sport=5432, dport=31000, flags="A")
    assert share.run(bytes(e_to("w1") / late), "w1", IN) == ALLOW


def test_open_flows_keep_their_slots_however_quiet(share):
    fill(share, "A", 32000)
    age(share, 3)
    assert new_flow(share, 42000) == DROP("ct_full")
