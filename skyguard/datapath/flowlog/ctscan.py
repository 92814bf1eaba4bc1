"""Conntrack scans: flow_end entries for flows that expired, closed (TCP FIN/RST seen and no packet
since the previous scan) or vanished (its slot given to a new flow once closed, LRU eviction,
policy revocation), with their counts.

classify() is the decision, pure: given this scan's entries and the previous scan's, which flows
live on and which ended and why. ConntrackScanner reads sg_ct, deletes what ended (keeping a
flow a packet revived between the read and the delete) and makes the entries. Not thread-safe:
the consumer thread owns it.
"""

from __future__ import annotations

import collections
import ctypes as ct
import socket
import time
from collections.abc import Iterable
from typing import NamedTuple

from skyguard.datapath import abi, libbpf
from skyguard.datapath.flowlog.names import FlowTemplates

BPF_NOEXIST = 1


class CtEntry(NamedTuple):
    """struct sg_ct_val (abi.CT_VAL), as a scan reads it."""

    expires_ns: int
    packets: int
    bytes: int
    gen: int
    rule_id: int
    zone: int
    direction: int
    state: int
    fins: int
    seq_seen: int = 0
    seq_end_0: int = 0  # the creator's (TCP)
    seq_end_1: int = 0  # the other side's


def classify(rows: Iterable[tuple[bytes, CtEntry]], prev: dict[bytes, CtEntry],
             now_ns: int) -> tuple[dict[bytes, CtEntry], list[tuple[bytes, CtEntry, str]]]:
    """(live entries by key, [(key, entry, "expired" | "closed")]) of one scan at `now_ns`
    (CLOCK_MONOTONIC). Closed: closing now and at the previous scan, with no packet between."""
    seen: dict[bytes, CtEntry] = {}
    ended: list[tuple[bytes, CtEntry, str]] = []
    for k, val in rows:
        if val.expires_ns <= now_ns:
            ended.append((k, val, "expired"))
            continue
        before = prev.get(k)
        if (val.state == abi.CT_CLOSING and before is not None and before.state == abi.CT_CLOSING
                and before.packets == val.packets):
            ended.append((k, val, "closed"))
            continue
        seen[k] = val
    return seen, ended


def vanished(prev: dict[bytes, CtEntry], seen: dict[bytes, CtEntry], ended: list) -> list[tuple[bytes, str]]:
    """(key, why) of the flows present at the previous scan and gone now without this scan ending
    them: "closed" when they were closing then (the datapath gave the slot of a closed, quiet flow
    to a new one), else "removed" (evicted, or revoked by a policy change)."""
    gone = prev.keys() - seen.keys() - {k for k, _, _ in ended}
    return [(k, "closed" if prev[k].state == abi.CT_CLOSING else "removed") for k in gone]


def ct_values(key: bytes, val: CtEntry, why: str, when: int) -> tuple[tuple, tuple]:
    """(flow shape, END_VALUES) of a conntrack entry that ended `why` at `when`: a flow_end
    through names.FlowTemplates."""
    ifindex, proto, saddr, daddr, sport, dport = abi.CT_KEY.unpack(key)
    flow = (ifindex, val.zone, val.direction, proto, saddr, daddr, val.rule_id, why)
    return flow, (val.bytes, socket.ntohs(dport), val.packets, socket.ntohs(sport), when)


class ConntrackScanner:
    def __init__(self, stats: collections.Counter):
        self.stats = stats
        self.prev: dict[bytes, CtEntry] = {}
        self.reported_vanished: set[bytes] = set()  # by the last scan

    def claim_end(self, key: bytes) -> bool:
        """The datapath removed this flow's entry itself and reported it (a FLOW_END event: its
        slot went to a new flow, or a SYN reopened its tuple). True when its flow_end is the
        event's to log; False when the last scan already logged it as vanished."""
        if key in self.reported_vanished:
            self.reported_vanished.discard(key)
            return False
        self.prev.pop(key, None)  # the next scan must not find it vanished
        return True

    def scan(self, table, templates: FlowTemplates) -> list[bytes]:
        """The flow_end entries of the flows that ended since the last scan; `table` is sg_ct
        (bcc)."""
        started = time.monotonic()
        now = time.monotonic_ns()
        offset = time.time_ns() - now
        rows = ((k, CtEntry._make(val)) for k, val in libbpf.dump(table, abi.CT_KEY.size, abi.CT_VAL_PADDED))
        seen, ended = classify(rows, self.prev, now)
        out: list[bytes] = []
        shapes, make = templates.current(), templates.make

        def emit(key: bytes, val: CtEntry, why: str) -> None:
            flow, values = ct_values(key, val, why, offset + now)
            out.append((shapes.get(flow) or make(flow)) % values)

        fd = table.map_fd
        raw_val = (ct.c_uint8 * ct.sizeof(abi.CtVal))()
        lookup_and_delete, unpack = libbpf.lib().bpf_map_lookup_and_delete_elem, abi.CT_VAL.unpack_from
        for k, val, why in ended:
            if lookup_and_delete(fd, k, raw_val) == 0:  # the kernel only reads the key
                current = CtEntry._make(unpack(raw_val))
                revived = current.expires_ns > now if why == "expired" else current.packets != val.packets
                if revived:
                    # A packet came between the read and the delete: the flow lives on.
                    libbpf.lib().bpf_map_update_elem(fd, k, raw_val, ct.c_uint64(BPF_NOEXIST))
                    seen[k] = current
                    continue
                val = current
            emit(k, val, why)
        gone = vanished(self.prev, seen, ended)
        self.reported_vanished = {k for k, _ in gone}
        for k, why in gone:
            emit(k, self.prev[k], why)  # its counts are those of the last scan
        self.prev = seen
        self.stats["flow_end"] += len(out)
        took_ms = int((time.monotonic() - started) * 1000)
        self.stats["ct_scan_last_ms"] = took_ms
        self.stats["ct_scan_max_ms"] = max(self.stats["ct_scan_max_ms"], took_ms)
        self.stats["ct_tracked"] = len(seen)
        return out
