"""FlowLogger against the real programs: frames run through BPF_PROG_RUN produce ring buffer
events and conntrack entries in the kernel; the logger turns them into entries of a real signed
log (LogWriter in a temporary directory) that must verify afterwards.

This module compiles its own Datapath with a one-page ring buffer (about 50 events, so losses
are easy to cause and count) and 1 s UDP conntrack timeouts, inside its own network namespace
(flx-*). Not here: the daemon wiring and the CLI (tests/integration/test_flows*.py).
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from bpf_support import IFACES, make_policy
from scapy.layers.inet import IP, TCP, UDP
from test_verdicts import e_from, e_to, v4

from skyguard.datapath import abi, libbpf, progrun
from skyguard.datapath.flowlog import FlowLogger, FlowNames
from skyguard.tlog import LogReader, LogWriter, Signer
from skyguard.tlog.entries import canonical
from skyguard.tlog.verify import verify_log

DEFINES = {"SG_EVENTS_PAGES": 1, "SG_CT_UDP_S": 1}


@pytest.fixture(scope="module")
def fl_dp(worker):
    """A datapath of its own build (DEFINES) in the tier's namespace (conftest.py's worker)."""
    from skyguard.datapath.datapath import Datapath

    pin = Path(f"/sys/fs/bpf/flx-test-{os.getpid()}")
    dp = worker.call(Datapath, pin, "tc", DEFINES)
    worker.call(dp.apply_policy, make_policy())
    try:
        yield dp
    finally:
        dp.close()
        subprocess.run(["rm", "-rf", str(pin)])


class Lab:
    """The kernel side of one test: run frames, know the ifindexes."""

    def __init__(self, dp, worker):
        self.dp, self.worker = dp, worker
        self.ifindex = {wl: worker.call(socket.if_nametoindex, name) for wl, name in IFACES.items()}

    def run(self, frame, wl, direction, repeat=1):
        prog = self.dp._loaded.from_vm_tc if direction == "egress" else self.dp._loaded.to_vm
        res = self.worker.call(progrun.run, prog.fd, bytes(frame), kind="tc", ifindex=self.ifindex[wl],
                               repeat=repeat)
        return res.retval == progrun.TC_ACT_OK

    def names(self):
        def ifindex_of(name):
            try:
                return self.worker.call(socket.if_nametoindex, name)
            except OSError:
                return 0
        return FlowNames(self.dp, ifindex_of=ifindex_of)


@pytest.fixture
def kernel(fl_dp, worker):
    for name in ("sg_ct", "sg_frag", "sg_deny_agg"):
        fl_dp.map(name).clear()
    return Lab(fl_dp, worker)


@pytest.fixture
def logged(kernel, tmp_path):
    """A running FlowLogger writing to a fresh signed log; yields (logger, reader function)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    signer = Signer("flx.test/log", Ed25519PrivateKey.generate())
    writer = LogWriter(tmp_path / "log", signer)
    logger = FlowLogger(kernel.dp, writer, names=kernel.names(), ct_scan_interval=3600, deny_interval=3600)
    logger.start()

    def entries(kind=None):
        out = [json.loads(p) for _, p in LogReader(tmp_path / "log").entries()]
        return [e for e in out if kind is None or e["type"] == kind]

    try:
        yield logger, entries
    finally:
        logger.stop()
        writer.close()
        report = verify_log(tmp_path / "log", signer.verifier)
        assert report.ok, report.as_dict()
        # every entry, however it was encoded (templates for flow_start), is in canonical form
        for _, payload in LogReader(tmp_path / "log").entries():
            assert canonical(json.loads(payload)) == payload


def test_allowed_tcp_flow_logs_start_and_closed_end_with_counts(kernel, logged):
    logger, entries = logged
    syn = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=41000, dport=5432, flags="S")
    synack = e_to("w1") / IP(src=v4("d1"), dst=v4("w1")) / TCP(sport=5432, dport=41000, flags="SA")
    ack = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=41000, dport=5432, flags="A") / (b"x" * 100)
    fin = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=41000, dport=5432, flags="FA")
    for frame, direction in ((syn, "egress"), (synack, "ingress"), (ack, "egress"), (fin, "egress")):
        assert kernel.run(frame, "w1", direction)
    logger.sync()
    [start] = entries("flow_start")
    assert start["verdict"] == "allow" and start["rule"] == "web-to-db" and start["reason"] == "rule"
    assert (start["src"], start["sport"], start["dst"], start["dport"], start["proto"]) == \
        (v4("w1"), 41000, v4("d1"), 5432, "tcp")
    assert (start["src_zone"], start["src_workload"], start["dst_zone"], start["dst_workload"]) == \
        ("web", "w1", "db", "d1")
    assert start["interface"] == IFACES["w1"] and start["direction"] == "egress"
    assert entries("flow_end") == []  # closing, but it may still carry packets
    logger.sync()  # a scan later with no new packet: closed
    [end] = entries("flow_end")
    assert end["reason"] == "closed" and end["packets"] == 4
    assert end["bytes"] == sum(len(bytes(f)) for f in (syn, synack, ack, fin))
    # gone from conntrack, so the next scan does not log it again
    logger.sync()
    assert len(entries("flow_end")) == 1
    recs = logger.recent(verdict="allow")["records"]
    assert [r["type"] for r in recs] == ["flow_start", "flow_end"]


def test_udp_flow_expires_into_flow_end(kernel, logged):
    logger, entries = logged
    req = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / UDP(sport=5555, dport=5000)
    assert kernel.run(req, "w1", "egress", repeat=3)
    logger.sync()
    assert len(entries("flow_start")) == 1
    time.sleep(1.2)  # SG_CT_UDP_S=1 in this module's build
    logger.sync()
    [end] = entries("flow_end")
    assert end["reason"] == "expired" and end["packets"] == 3 and end["proto"] == "udp"
    assert len(list(kernel.dp.map("sg_ct").keys())) == 0


def test_denied_flood_is_a_handful_of_deny_entries_with_the_total_count(kernel, logged):
    logger, entries = logged
    flood = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=45003, dport=23)
    assert not kernel.run(flood, "w1", "egress", repeat=10_000)
    other = e_from("w1") / IP(src=v4("w1"), dst="198.51.100.66") / TCP(sport=45004, dport=443)
    assert not kernel.run(other, "w1", "egress", repeat=7)
    logger.sync()
    denies = entries("deny")
    assert len(denies) <= 4, denies
    by_port = {}
    for d in denies:
        by_port[d["dport"]] = by_port.get(d["dport"], 0) + d["packets"]
    assert by_port == {23: 10_000, 443: 7}
    flood_entry = next(d for d in denies if d["dport"] == 23)
    assert flood_entry["reason"] == "no_rule" and flood_entry["verdict"] == "deny"
    assert flood_entry["src_workload"] == "w1" and flood_entry["dst_zone"] == "db"
    assert next(d for d in denies if d["dport"] == 443)["reason"] == "policy_deny"
    assert {r["dport"] for r in logger.recent(verdict="deny", zone="web")["records"]} == {23, 443}


def test_many_denied_flows_in_one_interval_are_summarised(kernel, logged, monkeypatch):
    from skyguard.datapath.flowlog import denies as deny_aggregation

    logger, entries = logged
    monkeypatch.setattr(deny_aggregation, "MAX_DENY_FLOWS_PER_INTERVAL", 5)
    logger.pause()  # the ring holds ~50 events: stay below it
    for sport in range(40):
        frame = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=30000 + sport, dport=22)
        assert not kernel.run(frame, "w1", "egress")
    logger.resume()
    logger.sync()
    denies = entries("deny")
    assert len(denies) == 6  # five flows one by one, then one summary
    summary = next(d for d in denies if d.get("summary"))
    assert summary["flows"] == 35 and summary["packets"] == 35 and summary["reason"] == "no_rule"
    assert sum(d["packets"] for d in denies) == 40


def test_ring_loss_is_counted_and_logged_exactly(kernel, logged):
    logger, entries = logged
    def kernel_lost():
        return sum(int(v) for v in kernel.dp.map("sg_ev_lost")[ctypes.c_int(0)])

    before = kernel_lost()
    logger.pause()  # stop consuming: the one-page ring fills
    offered = 300
    for sport in range(offered):
        frame = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=20000 + sport, dport=5432, flags="S")
        assert kernel.run(frame, "w1", "egress")
    logger.resume()
    logger.sync()
    lost_in_kernel = kernel_lost() - before
    assert lost_in_kernel > 0
    losses = entries("ring_loss")
    assert losses and sum(e["lost"] for e in losses) == lost_in_kernel
    assert losses[-1]["total"] == logger.lost_total == lost_in_kernel
    # nothing unaccounted: every offered flow is either logged or counted lost
    assert len(entries("flow_start")) + lost_in_kernel == offered


def test_fast_encoding_is_the_logs_canonical_form():
    from skyguard.datapath.flowlog import encode_entry
    from skyguard.tlog import entry

    record = {"time": 1_700_000_000_123_456_789, "interface": "sg-dc1", "src": "fd00:10:1::2", "sport": 0,
              "dst_workload": None, "rule": "auth-to-directory", "reason": "no_rule", "summary": True,
              "src_zone": "zöne", "packets": 2**40}
    assert encode_entry("deny", record) == entry("deny", **record)


def test_a_flow_evicted_from_conntrack_still_gets_its_flow_end(kernel, logged):
    logger, entries = logged
    req = e_from("w2") / IP(src=v4("w2"), dst=v4("d1")) / UDP(sport=6000, dport=5000)
    assert kernel.run(req, "w2", "egress", repeat=2)
    logger.sync()  # the scan now knows the flow
    table = kernel.dp.map("sg_ct")
    [key] = list(table.keys())
    del table[key]  # what LRU eviction or a policy revocation does in the kernel
    logger.sync()
    [end] = entries("flow_end")
    assert end["reason"] == "removed" and end["packets"] == 2 and end["src_workload"] == "w2"


def test_flow_start_entries_from_templates_carry_each_flows_own_ports(kernel, logged):
    logger, entries = logged
    for sport in range(3):
        frame = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=42000 + sport, dport=8000 + sport, flags="S")
        assert kernel.run(frame, "w1", "egress")
    logger.sync()
    starts = entries("flow_start")
    assert sorted((e["sport"], e["dport"]) for e in starts) == [(42000, 8000), (42001, 8001), (42002, 8002)]
    assert len({e["time"] for e in starts}) == 3 and all(e["rule"] == "web-to-db" for e in starts)
    recs = logger.recent(verdict="allow")["records"]
    assert sorted(r["sport"] for r in recs) == [42000, 42001, 42002] and all("seq" in r for r in recs)


def test_scrape_counts_from_batch_reads_match_the_per_entry_walk(kernel):
    # What a metrics scrape reads (active flows by zone, map occupancy) comes from batch reads;
    # it must agree with flows(), which reads entry by entry, across several batches.
    for port in range(20000, 20000 + 2000):  # TCP SYNs from w1 and UDP from d1: two zones (w1's share holds 4096)
        assert kernel.run(e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=port, dport=5432, flags="S"),
                          "w1", "egress")
    for port in range(30000, 30000 + 50):
        kernel.run(e_from("d1") / IP(src=v4("d1"), dst=v4("w1")) / UDP(sport=port, dport=5000), "d1", "egress")
    dp = kernel.dp
    walked = {}
    for flow in kernel.worker.call(dp.flows):
        walked[flow["zone"]] = walked.get(flow["zone"], 0) + 1
    assert walked.get("web", 0) >= 2000
    assert kernel.worker.call(dp.active_flows_by_zone) == walked
    occupancy = kernel.worker.call(dp.occupancy)
    assert occupancy["sg_ct"] == len(list(dp.map("sg_ct").keys()))
    in_small_batches = libbpf.dump(dp.map("sg_ct"), abi.CT_KEY.size, abi.CT_VAL_PADDED, chunk=256)
    assert sum(1 for _ in in_small_batches) == occupancy["sg_ct"]  # a dozen batches, none lost or repeated
    assert occupancy["sg_policy"] == len(list(dp.map("sg_policy").keys())) > 0  # an LPM trie: no batch reads
    assert occupancy["sg_traffic"] == dp.map("sg_traffic").max_entries


def test_events_many_times_the_rings_size_arrive_complete_and_in_order(kernel, logged):
    # The one-page ring holds about 40 records: five rounds wrap it several times, and every
    # read takes what the programs committed, across the end of the ring, in order.
    logger, entries = logged
    sports = list(range(43000, 43150))
    for i in range(0, len(sports), 30):
        for sport in sports[i:i + 30]:
            frame = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=sport, dport=5432, flags="S")
            assert kernel.run(frame, "w1", "egress")
        logger.sync()
    assert [e["sport"] for e in entries("flow_start")] == sports
    assert logger.lost_total == 0 and logger.stats()["events"] == len(sports)


def test_a_long_batch_interval_delays_neither_sync_nor_stop(kernel, tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    writer = LogWriter(tmp_path / "log", Signer("flx.test/log", Ed25519PrivateKey.generate()))
    logger = FlowLogger(kernel.dp, writer, names=kernel.names(), ct_scan_interval=3600, deny_interval=3600,
                        batch_interval=3600).start()
    try:
        for sport in (44000, 44001):  # the second read falls inside the first one's interval
            frame = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=sport, dport=5432, flags="S")
            assert kernel.run(frame, "w1", "egress")
            logger.sync(timeout=10)
        frame = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=44002, dport=5432, flags="S")
        assert kernel.run(frame, "w1", "egress")
    finally:
        logger.stop(timeout=10)
        writer.close()
    starts = [json.loads(p) for _, p in LogReader(tmp_path / "log").entries()]
    assert [e["sport"] for e in starts if e["type"] == "flow_start"] == [44000, 44001, 44002]


def test_a_paused_logger_leaves_events_in_the_ring_until_resumed(kernel, logged):
    logger, entries = logged
    logger.pause()
    logger.sync()  # the loop has seen the pause: from here it holds
    before = logger.stats().get("events", 0)
    for sport in range(45000, 45005):
        frame = e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=sport, dport=5432, flags="S")
        assert kernel.run(frame, "w1", "egress")
    time.sleep(0.5)  # a few of the paused loop's ticks
    assert logger.stats().get("events", 0) == before and entries("flow_start") == []
    logger.resume()
    logger.sync()
    assert len(entries("flow_start")) == 5
