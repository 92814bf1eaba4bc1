"""Deny aggregation: denied traffic as counts per (flow, reason) per interval, never one entry per
packet. The kernel already aggregates per flow (sg_deny_agg: one event per denied flow per
SG_DENY_EVENT_INTERVAL_NS carrying the packets it stands for); this sums what arrives in an
interval and, past MAX_DENY_FLOWS_PER_INTERVAL distinct flows, per (interface, direction, reason,
zone), so a flood of any shape is a bounded number of entries. It also collects the counts the
kernel still holds for flows that went quiet (collect_kernel).

DenyAggregator is pure bookkeeping (no map, no thread): add() and add_kernel() take what the
consumer read, flush() makes the entries. Not thread-safe: the consumer thread owns it.
"""

from __future__ import annotations

import collections
import ctypes as ct
import socket
import time

from skyguard.datapath import abi, libbpf
from skyguard.datapath.flowlog.names import AddressText, encode_entry, flow_fields
from skyguard.datapath.reasons import reason_name

MAX_DENY_FLOWS_PER_INTERVAL = 1_000  # distinct denied flows logged one by one per interval
UNKNOWN_DIRECTION = 255  # a kernel count whose event this process never saw: direction unknown


class DenyAggregator:
    def __init__(self, stats: collections.Counter, max_flows: int | None = None):
        self.stats = stats
        self.max_flows = max_flows  # None: MAX_DENY_FLOWS_PER_INTERVAL as it is at each flush
        # (ifindex, direction, reason, proto, saddr, daddr, sport, dport) -> [packets, first, last, zone]
        self.pending: dict[tuple, list] = {}
        # kernel key (ifindex, proto, saddr, daddr, sport, dport, reason) -> (zone, direction), LRU
        self._meta: collections.OrderedDict = collections.OrderedDict()

    def add(self, ifindex, direction, reason, proto, saddr, daddr, sport, dport, count, when, zone) -> None:
        """One drop event: `count` packets of a denied flow, the last at `when` (ns, wall clock)."""
        key = (ifindex, direction, reason, proto, saddr, daddr, sport, dport)
        agg = self.pending.get(key)
        if agg is None:
            self.pending[key] = [count, when, when, zone]
        else:
            agg[0] += count
            agg[2] = when
        k = (ifindex, proto, saddr, daddr, sport, dport, reason)
        meta = self._meta
        if k in meta:
            meta.move_to_end(k)
        else:
            meta[k] = (zone, direction)
            if len(meta) > abi.DENY_AGG_MAX:  # the kernel keeps no more either
                meta.popitem(last=False)
        self.stats["deny_packets"] += count

    def add_kernel(self, ifindex, proto, saddr, daddr, sport, dport, reason, count, last_when, now_when) -> None:
        """Packets the kernel counted but did not report (a flow that went quiet). Its zone and
        direction are those of the flow's last event here, if any."""
        zone, direction = self._meta.get((ifindex, proto, saddr, daddr, sport, dport, reason), (0, UNKNOWN_DIRECTION))
        key = (ifindex, direction, reason, proto, saddr, daddr, sport, dport)
        agg = self.pending.get(key)
        if agg is None:
            self.pending[key] = [count, last_when, now_when, zone]
        else:
            agg[0] += count
            agg[2] = max(agg[2], now_when)
        self.stats["deny_packets"] += count
        self.stats["kernel_deny_flushes"] += 1

    def flush(self, names, addr: AddressText) -> tuple[list[bytes], list[dict]]:
        """(entries, records) of everything aggregated since the last flush: the busiest
        max_flows flows one by one, the rest as one summary per (interface, direction, reason, zone)."""
        if not self.pending:
            return [], []
        denies, self.pending = self.pending, {}
        limit = MAX_DENY_FLOWS_PER_INTERVAL if self.max_flows is None else self.max_flows
        out, records = [], []
        items = sorted(denies.items(), key=lambda kv: -kv[1][0])
        summary: dict[tuple, list] = {}
        for i, ((ifindex, direction, reason, proto, saddr, daddr, sport, dport), (count, first, last, zone)) \
                in enumerate(items):
            if i >= limit:
                s = summary.setdefault((ifindex, direction, reason, zone), [0, 0, first, last])
                s[0] += count
                s[1] += 1
                s[2], s[3] = min(s[2], first), max(s[3], last)
                continue
            rec = flow_fields(names, addr, ifindex, zone, direction, proto, saddr, daddr, socket.ntohs(sport),
                              socket.ntohs(dport))
            if direction not in abi.DIRECTIONS:
                rec["direction"] = "unknown"
            rec.update(time=last, first_seen=first, verdict="deny", rule=None,
                       reason=reason_name(reason), packets=count)
            out.append(encode_entry("deny", rec))
            rec["type"] = "deny"
            records.append(rec)
        for (ifindex, direction, reason, zone), (count, flows, first, last) in summary.items():
            interface, workload = names.interface(ifindex)
            rec = {"interface": interface, "direction": abi.DIRECTIONS.get(direction, "unknown"),
                   "src_zone": names.zone(zone) if direction == abi.DIR_EGRESS else None,
                   "dst_zone": names.zone(zone) if direction == abi.DIR_INGRESS else None,
                   "workload": workload, "time": last, "first_seen": first, "verdict": "deny",
                   "rule": None, "reason": reason_name(reason), "packets": count, "flows": flows,
                   "summary": True}
            out.append(encode_entry("deny", rec))
            rec["type"] = "deny"
            records.append(rec)
        self.stats["deny_entries"] += len(out)
        return out, records


def collect_kernel(table, aggregator: DenyAggregator, kernel_interval_ns: int, force: bool = False) -> None:
    """Move into `aggregator` what the kernel suppressed for flows that went quiet (it would report
    those counts only with the flow's next packet, which may never come). lookup-and-delete is
    atomic in the map; a packet of that flow within the same instant may be counted in the next
    interval instead. `table` is sg_deny_agg (bcc)."""
    now = time.monotonic_ns()
    fd = table.map_fd
    val = table.Leaf()
    offset = time.time_ns() - now
    for kraw, vraw in libbpf.lookup_batch(fd):
        k, v = table.Key.from_buffer_copy(kraw), table.Leaf.from_buffer_copy(vraw)
        if not v.suppressed:
            continue
        if not force and now - v.last_ns < kernel_interval_ns + 100_000_000:
            continue  # the flow's next packet after the interval will carry the count
        if libbpf.lib().bpf_map_lookup_and_delete_elem(fd, ct.byref(k), ct.byref(val)) != 0:
            continue  # gone already: the kernel evicted it or reported it itself
        if not val.suppressed:
            continue
        flow = k.flow
        aggregator.add_kernel(flow.ifindex, flow.proto, bytes(flow.saddr), bytes(flow.daddr), flow.sport,
                              flow.dport, k.reason, val.suppressed, val.last_ns + offset, now + offset)
