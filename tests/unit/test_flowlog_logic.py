"""The flow log's decisions without a kernel: which conntrack entries ended and why (ctscan), how
denied packets become a bounded number of entries (denies), the records `skyguard flows` returns
after a cursor (recent), the checks of its arguments, and how a read takes the ring's records
(ring). The whole path against the real programs is tests/bpf/test_flowlog.py."""

from __future__ import annotations

import collections
import ctypes
import ipaddress
import json
import socket
import struct

import pytest

from skyguard.datapath import abi
from skyguard.datapath.flowlog.ctscan import CtEntry, classify, ct_values, vanished
from skyguard.datapath.flowlog.denies import DenyAggregator
from skyguard.datapath.flowlog.names import AddressText, FlowTemplates, encode_entry
from skyguard.datapath.flowlog.recent import RecentRecords, query_args
from skyguard.datapath.flowlog.ring import BUSY, DISCARD, record_size, take_records
from skyguard.errors import BadInput

VM = abi.addr16(ipaddress.ip_address("10.1.0.2"))
OUT = abi.addr16(ipaddress.ip_address("198.51.100.7"))
PEER = abi.addr16(ipaddress.ip_address("10.2.0.2"))
TCP = abi.IPPROTO["tcp"]


class Names:
    """The two workloads of these tests, as FlowNames would name them."""

    version = 1

    def refresh(self):
        return self.version

    def interface(self, ifindex):
        return {7: ("sg-web1", "web1")}.get(ifindex, (f"ifindex-{ifindex}", None))

    def zone(self, zone_id):
        return {1: "web", 2: "db"}.get(zone_id, str(zone_id))

    def rule(self, rule_id):
        return {1: "web-to-db"}.get(rule_id, str(rule_id))

    def peer(self, address):
        return {"10.2.0.2": ("db", "db1")}.get(address, (None, None))


def entry(expires=10_000, packets=1, state=abi.CT_ESTABLISHED, rule_id=1, zone=1, direction=abi.DIR_EGRESS):
    return CtEntry(expires, packets, packets * 100, 1, rule_id, zone, direction, state, 0)


# ---- conntrack: what ended, and why ----------------------------------------------------------

@pytest.mark.parametrize("desc, before, now, ended_as", [
    ("live and busy", entry(state=abi.CT_ESTABLISHED), entry(packets=2), None),
    ("expired", None, entry(expires=999), "expired"),
    ("expiry exactly now", None, entry(expires=1000), "expired"),
    ("closing, first seen so", None, entry(state=abi.CT_CLOSING), None),
    ("closing twice, no packet between", entry(state=abi.CT_CLOSING), entry(state=abi.CT_CLOSING), "closed"),
    ("closing twice, packets between", entry(state=abi.CT_CLOSING), entry(packets=3, state=abi.CT_CLOSING), None),
    ("closing after established", entry(), entry(state=abi.CT_CLOSING), None),
])
def test_classify_ends_flows_that_expired_or_closed(desc, before, now, ended_as):
    prev = {b"k": before} if before else {}
    seen, ended = classify([(b"k", now)], prev, now_ns=1000)
    if ended_as is None:
        assert seen == {b"k": now} and ended == [], desc
    else:
        assert seen == {} and ended == [(b"k", now, ended_as)], desc


def test_flows_gone_without_the_scan_are_removed_or_closed():
    prev = {b"evicted": entry(), b"expired": entry(), b"live": entry(), b"reused": entry(state=abi.CT_CLOSING)}
    seen, ended = classify([(b"expired", entry(expires=1)), (b"live", entry())], prev, now_ns=1000)
    # "reused": closing at the last scan, its slot since given to a new flow (bpf/lib/conntrack.h)
    assert sorted(vanished(prev, seen, ended)) == [(b"evicted", "removed"), (b"reused", "closed")]


def test_a_flow_end_from_a_scan_is_canonical_and_names_both_ends_and_the_rule():
    key = abi.CT_KEY.pack(7, TCP, VM, PEER, socket.htons(40000), socket.htons(5432))
    templates = FlowTemplates(Names(), AddressText())
    flow, values = ct_values(key, entry(packets=4), "closed", 123)
    template = templates.current().get(flow) or templates.make(flow)
    record = {"interface": "sg-web1", "direction": "egress", "proto": "tcp", "src": "10.1.0.2", "sport": 40000,
              "dst": "10.2.0.2", "dport": 5432, "src_zone": "web", "src_workload": "web1", "dst_zone": "db",
              "dst_workload": "db1", "time": 123, "verdict": "allow", "rule": "web-to-db", "reason": "closed",
              "packets": 4, "bytes": 400}
    assert template % values == encode_entry("flow_end", record)


def test_ct_entry_reads_the_mirrored_struct_fields():
    names = []  # an array field is one value per element: name_0, name_1, ...
    for name, ctype in abi.CtVal._fields_:
        names += [f"{name}_{i}" for i in range(ctype._length_)] if issubclass(ctype, ctypes.Array) else [name]
    assert CtEntry._fields == tuple(names)
    assert len(abi.CT_VAL.unpack(bytes(abi.CT_VAL.size))) == len(names)


# ---- denies: bounded entries -----------------------------------------------------------------

def deny(agg, sport, count=1, when=100, reason=abi.EVENT_DROP, ifindex=7):
    agg.add(ifindex, abi.DIR_EGRESS, 14, TCP, VM, OUT, socket.htons(sport), socket.htons(443), count, when, 1)


def test_events_of_one_flow_sum_into_one_entry():
    stats = collections.Counter()
    agg = DenyAggregator(stats)
    deny(agg, 40000, count=3, when=100)
    deny(agg, 40000, count=2, when=250)
    entries, records = agg.flush(Names(), AddressText())
    assert len(entries) == 1 and json.loads(entries[0])["type"] == "deny"
    (rec,) = records
    assert (rec["packets"], rec["first_seen"], rec["time"], rec["reason"], rec["rule"]) == (5, 100, 250, "no_rule", None)
    assert (rec["src_workload"], rec["dst"], rec["dport"]) == ("web1", "198.51.100.7", 443)
    assert stats["deny_packets"] == 5 and stats["deny_entries"] == 1
    assert agg.flush(Names(), AddressText()) == ([], []), "a flush starts the next interval empty"


def test_past_the_flow_limit_the_rest_is_one_summary_per_interface_and_reason():
    agg = DenyAggregator(collections.Counter(), max_flows=3)
    for i in range(10):
        deny(agg, 40000 + i, count=100 - i, when=1000 + i)  # the busiest first: 40000..40002
    _, records = agg.flush(Names(), AddressText())
    assert [r.get("sport") for r in records[:3]] == [40000, 40001, 40002]
    (summary,) = records[3:]
    assert summary["summary"] is True
    assert (summary["flows"], summary["packets"]) == (7, sum(100 - i for i in range(3, 10)))
    assert (summary["first_seen"], summary["time"], summary["src_zone"], summary["dst_zone"]) == (1003, 1009, "web", None)


def test_kernel_counts_join_the_flow_their_last_event_named():
    agg = DenyAggregator(collections.Counter())
    deny(agg, 40000, count=1, when=100)
    agg.add_kernel(7, TCP, VM, OUT, socket.htons(40000), socket.htons(443), 14, 9, 150, 300)
    agg.add_kernel(8, TCP, VM, OUT, 1, 2, 14, 4, 160, 300)  # never seen here: direction unknown
    _, records = agg.flush(Names(), AddressText())
    by_if = {r["interface"]: r for r in records}
    assert (by_if["sg-web1"]["packets"], by_if["sg-web1"]["time"]) == (10, 300)
    assert (by_if["ifindex-8"]["direction"], by_if["ifindex-8"]["packets"]) == ("unknown", 4)


# ---- recent records and the flows query ------------------------------------------------------

def test_recent_returns_what_follows_the_cursor_and_counts_what_it_missed():
    recent = RecentRecords(maxlen=5)
    recent.remember([{"verdict": "allow", "src_zone": "web"} for _ in range(3)])
    first = recent.query()
    assert [r["seq"] for r in first["records"]] == [1, 2, 3] and first["cursor"] == 3
    recent.remember([{"verdict": "deny", "dst_zone": "db"} for _ in range(6)])  # 4..9; 1..4 fall out
    after = recent.query(since=3)
    assert [r["seq"] for r in after["records"]] == [5, 6, 7, 8, 9] and after["missed"] == 1
    assert recent.query(since=3, limit=2) == {"records": after["records"][-2:], "cursor": 9, "missed": 4}
    assert [r["seq"] for r in recent.query(verdict="deny", zone="db")["records"]] == [5, 6, 7, 8, 9]
    assert recent.query(zone="web")["records"] == []


def test_entries_kept_for_flows_come_back_as_their_records():
    recent = RecentRecords(maxlen=4)
    record = {"type": "flow_start", "verdict": "allow", "src_zone": "web", "dst_zone": "db", "sport": 41000}
    recent.remember([{"verdict": "deny", "src_zone": "web"}])
    recent.remember([encode_entry("flow_start", dict(record, sport=41000 + i)) for i in range(4)])  # seq 2..5
    got = recent.query(since=1, zone="db")
    assert got["records"] == [dict(record, sport=41000 + i, seq=2 + i) for i in range(4)]
    assert got["cursor"] == 5 and got["missed"] == 0
    assert recent.query(verdict="deny")["records"] == []  # the first fell out


def _ring(records, size=512, data=64):
    """A ring's producer page (`data` bytes here) and data area mapped twice, holding `records`
    [(header, sample)] from position 0; returns (buffer, its u32 words, the producer position)."""
    area = bytearray(size)
    position = 0
    for header, sample in records:
        at = position % size
        record = struct.pack("<II", header, 0) + sample
        record += bytes(record_size(len(sample)) - len(record))
        for i, b in enumerate(record):
            area[(at + i) % size] = b
        position += record_size(header & ~(BUSY | DISCARD))
    buf = bytearray(data) + area + area
    return buf, memoryview(buf).cast("I"), position


def test_a_ring_read_takes_committed_records_in_order_and_stops_at_one_being_written():
    sample = [bytes([i]) * 12 for i in range(8)]  # 12-byte samples: 24-byte records
    records = [(12, sample[0]), (12, sample[1]), (12 | DISCARD, sample[2]), (12, sample[3]), (4, b"odd!"),
               (12, sample[5]), (12 | BUSY, sample[6]), (12, sample[7])]
    buf, words, producer = _ring(records)
    pieces, odd, position = take_records(buf, words, 64, 511, 0, producer, 12)
    got = b"".join(pieces)
    assert [got[i + 8:i + 20] for i in range(0, len(got), 24)] == [sample[0], sample[1], sample[3], sample[5]]
    assert odd == 1  # the 4-byte record; the discarded one is not counted
    assert position == 24 * 4 + 16 + 24  # up to the busy record, which the next read retries


def test_a_ring_read_takes_records_that_wrap_around_the_data_area():
    # Positions only grow; a record that crosses the end of the area is contiguous in the
    # second mapping, and the read comes back as if it had not wrapped.
    start = 512 - 24 * 3 - 8
    samples = [bytes([i]) * 16 for i in range(10)]
    buf, words, producer = _ring([(8, b"x" * 8)] * (start // 16) + [(16, s) for s in samples], size=512)
    pieces, odd, position = take_records(buf, words, 64, 511, start, producer, 16)
    got = b"".join(pieces)
    assert odd == 0 and position == producer
    assert [got[i + 8:i + 24] for i in range(0, len(got), 24)] == samples


def test_query_records_are_copies():
    recent = RecentRecords(maxlen=5)
    recent.remember([{"verdict": "allow"}])
    recent.query()["records"][0]["verdict"] = "changed"
    assert recent.query()["records"][0]["verdict"] == "allow"


@pytest.mark.parametrize("args, problem", [
    ({"since": -1}, "since must be a cursor"),
    ({"since": True}, "since must be a cursor"),
    ({"limit": 0}, "limit must be an integer from 1"),
    ({"limit": 10_001}, "limit must be an integer from 1"),
    ({"zone": 3}, "zone must be a zone name"),
    ({"verdict": "maybe"}, "verdict must be one of allow, deny, loss"),
])
def test_flows_query_arguments_are_checked(args, problem):
    with pytest.raises(BadInput, match=problem):
        query_args(args)


def test_flows_query_defaults():
    assert query_args({"sync": 1}) == ({"since": 0, "zone": None, "verdict": None, "limit": 100}, True)
