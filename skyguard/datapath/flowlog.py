"""Flow logging: the datapath's ring buffer and conntrack turned into signed-log entries.

FlowLogger is one thread that consumes `sg_events` with a callback (bcc open_ring_buffer +
ring_buffer_poll) and writes, in group commits through LogWriter.submit:
  flow_start  one per new allowed flow per interface (zones, workloads, 5-tuple, rule, reason)
  deny        denied traffic as counts per (flow, reason) per interval; the kernel already
              aggregates per flow (sg_deny_agg), userspace sums what arrives in an interval and,
              past MAX_DENY_FLOWS_PER_INTERVAL distinct flows, per (interface, direction, reason),
              so a flood of any shape is a bounded number of entries, never one per packet
  flow_end    from periodic conntrack scans: entries that expired, closed (TCP FIN/RST and no
              packet for one scan), or vanished (LRU eviction, policy revocation), with counts
  ring_loss   whenever the kernel's per-CPU `sg_ev_lost` grew: no loss is silent
It also keeps a bounded ring of recent records for `skyguard flows` (recent(), with a cursor).

Backpressure is deliberate: when more than `max_inflight` entries wait for durability the
consumer stops reading the ring, the ring fills and the kernel counts what it cannot take; those
are then logged as ring_loss. Memory stays bounded and every loss is on record.

Not here: the decisions themselves (bpf/), the log's format and durability (skyguard.tlog), the
daemon's wiring (daemon.py). Thread safety: start/stop/flush/recent/stats may be called from any
thread; everything else runs in the logger's own thread.
"""

from __future__ import annotations

import collections
import ctypes as ct
import json
import logging
import queue
import socket
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from skyguard.datapath import abi, libbpf
from skyguard.datapath.reasons import reason_name
from skyguard.errors import DatapathError, SkyguardError

log = logging.getLogger("skyguard.flowlog")

DEFAULT_DENY_INTERVAL_S = 1.0  # userspace deny aggregation window (and kernel-side flush period)
DEFAULT_CT_SCAN_INTERVAL_S = 2.0  # how late a flow_end may be, and how often conntrack is read
DEFAULT_RECENT = 20_000  # records kept in memory for `skyguard flows`
DEFAULT_MAX_INFLIGHT = 200_000  # entries waiting for fsync before the consumer stops reading
MAX_DENY_FLOWS_PER_INTERVAL = 1_000  # distinct denied flows logged one by one per interval
KERNEL_DENY_INTERVAL_NS = abi.DENY_EVENT_INTERVAL_NS
POLL_TIMEOUT_MS = 100
PROTO_NAMES = abi.PROTO_NAMES
CT_CLOSING = abi.CT_CLOSING
BPF_NOEXIST = 1

_EVENT = abi.EVENT  # struct sg_event, with the two network-order ports read raw


# The same bytes as skyguard.tlog.entries.canonical (sorted keys, no spaces, UTF-8), without its
# per-value type walk: every record here is built from str, int and None only, and at 50k flows/s
# the walk cost more than the encoding. tests/bpf/test_flowlog.py checks both agree.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_entry(kind: str, record: dict) -> bytes:
    """A canonical log entry of type `kind` from a record of str/int/None values with a `time`."""
    return _CANONICAL.encode({"type": kind, **record}).encode("utf-8")


# Values no real port or time takes, marking where they go in a flow_start template.
_SENTINEL_SPORT, _SENTINEL_DPORT, _SENTINEL_TIME = 7_000_000_001, 7_000_000_002, 7_000_000_003


class FlowNames:
    """Turns the datapath's numbers into names: zone and rule ids, ifindex -> workload, address
    -> workload. Rebuilt whenever the datapath holds another compiled policy.
    `ifindex_of(interface)` resolves names; the default resolves in the calling thread's netns."""

    def __init__(self, datapath, ifindex_of: Callable[[str], int] | None = None):
        self.datapath = datapath
        self.ifindex_of = ifindex_of or _if_nametoindex
        self._compiled = object()  # never a Datapath's: the first lookup builds the tables
        self._last_miss = 0.0
        self.version = 0  # grows whenever the tables are rebuilt (callers cache by it)

    def refresh(self) -> int:
        """Rebuild if the datapath holds another policy; returns the tables' version."""
        self._refresh()
        return self.version

    def _refresh(self, force: bool = False) -> None:
        compiled = self.datapath.compiled
        if compiled is self._compiled and not force:
            return
        self._compiled = compiled
        self.version += 1
        self.zones = {0: "unknown"}
        self.rules = {0: "dns"}
        self.by_ifindex: dict[int, tuple[str, str]] = {}
        self.by_address: dict[str, tuple[str, str]] = {}
        if compiled is None:
            return
        self.zones.update({i: z for z, i in compiled.zone_ids.items()})
        self.rules.update({i: r for r, i in compiled.rule_ids.items()})
        for w in self.datapath.policy.workloads():
            ifindex = self.ifindex_of(w.interface)
            if ifindex:
                self.by_ifindex[ifindex] = (w.interface, w.name)
            for a in w.addresses:
                self.by_address[str(a)] = (w.zone, w.name)

    def zone(self, zone_id: int) -> str:
        self._refresh()
        return self.zones.get(zone_id, str(zone_id))

    def rule(self, rule_id: int) -> str:
        self._refresh()
        return self.rules.get(rule_id, str(rule_id))

    def interface(self, ifindex: int) -> tuple[str, str | None]:
        """(interface name, workload name) of an ifindex; re-resolves at most once a second
        when an interface appeared after the policy was loaded."""
        self._refresh()
        hit = self.by_ifindex.get(ifindex)
        if hit is None and time.monotonic() - self._last_miss > 1.0:
            self._last_miss = time.monotonic()
            self._refresh(force=True)
            hit = self.by_ifindex.get(ifindex)
        return hit if hit else (f"ifindex-{ifindex}", None)

    def peer(self, address: str) -> tuple[str | None, str | None]:
        """(zone, workload) when the address is a workload's, else (None, None): outside."""
        self._refresh()
        return self.by_address.get(address, (None, None))


def _if_nametoindex(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0


class FlowLogger:
    """FlowLogger(datapath, writer).start() ... .stop(). `names` turns ids into names (default:
    from the datapath's active policy, interfaces resolved in this process's netns); intervals
    in seconds; `recent` bounds the records kept for `skyguard flows`; `max_inflight` bounds
    the entries waiting for durability. `lost_total` and stats() are what metrics read."""

    def __init__(self, datapath, writer, *, names: FlowNames | None = None,
                 deny_interval: float = DEFAULT_DENY_INTERVAL_S,
                 ct_scan_interval: float = DEFAULT_CT_SCAN_INTERVAL_S,
                 recent: int = DEFAULT_RECENT, max_inflight: int = DEFAULT_MAX_INFLIGHT,
                 kernel_deny_interval_ns: int = KERNEL_DENY_INTERVAL_NS):
        self.datapath = datapath
        self.writer = writer
        self.names = names or FlowNames(datapath)
        self.deny_interval = deny_interval
        self.ct_scan_interval = ct_scan_interval
        self.max_inflight = max_inflight
        self.kernel_deny_interval_ns = kernel_deny_interval_ns
        self._stop = threading.Event()
        self._paused = threading.Event()  # tests and benchmarks: stop reading the ring
        self._thread: threading.Thread | None = None
        self._raw: list[bytes] = []
        self._addr_cache: dict[bytes, str] = {}
        self._denies: dict[tuple, list] = {}  # (flow..., reason) -> [packets, first_ns, last_ns, zone]
        self._deny_meta: collections.OrderedDict = collections.OrderedDict()  # kernel key -> (zone, dir)
        self._ct_prev: dict[bytes, tuple] = {}
        self._lock = threading.Lock()
        self._recent: collections.deque = collections.deque(maxlen=recent)
        self._seq = 0
        self._inflight = 0
        self._pending: set[Future] = set()
        self._idle = threading.Condition(self._lock)
        self.lost_total = 0  # events the kernel could not put in the ring, since start
        self._lost_baseline = 0
        self._lost_table: Any = None  # bcc per-CPU array, opened on first use
        self._templates: dict[tuple, tuple] = {}
        self._templates_version = -1
        self._stats: collections.Counter[str] = collections.Counter()
        self.failure: BaseException | None = None
        self._sync_requests: queue.SimpleQueue = queue.SimpleQueue()

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> FlowLogger:
        self._lost_baseline = self._kernel_lost()
        _open_ring(self.datapath, self._on_event)
        self.datapath.set_events(True)
        self._thread = threading.Thread(target=self._run, name="sg-flowlog", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop emission, drain the ring, log what is aggregated, wait until it is durable."""
        if self._thread is None:
            return
        self._stop.set()
        self._paused.clear()
        self._thread.join(timeout)
        self._thread = None
        self.flush(timeout)

    def pause(self) -> None:
        """Stop reading the ring (it fills; the kernel counts what does not fit)."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every entry submitted so far is durable (or failed)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DatapathError(f"flow log: {self._inflight} entries still not durable "
                                        f"after {timeout:.0f}s")
                self._idle.wait(left)

    def sync(self, timeout: float = 30.0) -> None:
        """Consume what the ring holds now, log every aggregate and scan conntrack once, then
        wait until it is durable (tests and `skyguard flows` freshness; the thread runs on)."""
        done = threading.Event()
        self._sync_requests.put(done)
        if not done.wait(timeout):
            raise DatapathError("flow log: the consumer did not answer a sync request")
        self.flush(timeout)

    # ---- the consumer thread ----------------------------------------------------------------
    def _on_event(self, _ctx, data, size):
        self._raw.append(ct.string_at(data, _EVENT.size))
        return 0

    def _run(self) -> None:
        bpf = self.datapath._bpf
        next_deny = time.monotonic() + self.deny_interval
        next_ct = time.monotonic() + self.ct_scan_interval
        while not self._stop.is_set():
            try:
                if self._paused.is_set() or self._inflight > self.max_inflight:
                    self._stats["backpressure_pauses" if not self._paused.is_set() else "paused_ticks"] += 1
                    time.sleep(POLL_TIMEOUT_MS / 1000)
                else:
                    bpf.ring_buffer_poll(POLL_TIMEOUT_MS)
                requests = []
                while not self._sync_requests.empty():
                    requests.append(self._sync_requests.get())
                if requests:
                    bpf.ring_buffer_consume()
                entries = self._take_events()
                now = time.monotonic()
                if now >= next_deny or requests:
                    entries += self._flush_kernel_denies(force=bool(requests))
                    entries += self._flush_denies()
                    next_deny = now + self.deny_interval
                if now >= next_ct or requests:
                    entries += self._scan_conntrack()
                    # A big table takes a while to read: never spend more than a fifth of the
                    # time scanning (flow_end is then later, never lost).
                    took = time.monotonic() - now
                    next_ct = time.monotonic() + max(self.ct_scan_interval, 4 * took)
                entries += self._check_losses()
                self._submit(entries)
                for r in requests:
                    r.set()
            except Exception:  # the consumer must keep consuming; the operator reads why
                self._stats["consumer_errors"] += 1
                log.exception("flow log consumer iteration failed")
                time.sleep(0.1)
        # Stopping: nothing new is emitted; what is in the ring and the aggregates is logged.
        try:
            self.datapath.set_events(False)
            bpf.ring_buffer_consume()
            entries = self._take_events()
            entries += self._flush_kernel_denies(force=True)
            entries += self._flush_denies()
            entries += self._check_losses()
            self._submit(entries)
        except Exception:
            log.exception("flow log: draining at stop failed")

    def _submit(self, entries: list[bytes]) -> None:
        if not entries:
            return
        try:
            future = self.writer.submit(entries)
        except SkyguardError as e:
            self._fail(e, len(entries))
            return
        n = len(entries)
        with self._lock:
            self._inflight += n
            self._pending.add(future)
        self._stats["entries_submitted"] += n

        def done(f: Future, n=n):
            with self._idle:
                self._inflight -= n
                self._pending.discard(f)
                if f.exception() is None:
                    self._stats["entries_durable"] += n
                else:
                    self._stats["entries_failed"] += n
                    self.failure = f.exception()
                self._idle.notify_all()
            if f.exception() is not None:
                log.critical("flow log: %d entries were not made durable: %s", n, f.exception())

        future.add_done_callback(done)

    def _fail(self, error: SkyguardError, n: int) -> None:
        self.failure = error
        self._stats["entries_failed"] += n
        log.critical("flow log: %d entries could not be submitted: %s", n, error)

    # ---- events -----------------------------------------------------------------------------
    def _addr(self, raw: bytes) -> str:
        s = self._addr_cache.get(raw)
        if s is None:
            if len(self._addr_cache) > 65536:
                self._addr_cache.clear()
            s = self._addr_cache[raw] = str(abi.addr_from16(raw))
        return s

    def _take_events(self) -> list[bytes]:
        raw, self._raw = self._raw, []
        if not raw:
            return []
        offset = time.time_ns() - time.monotonic_ns()  # ts_ns is CLOCK_MONOTONIC
        out = []
        records = []
        ntohs = socket.ntohs
        if self.names.refresh() != self._templates_version:
            self._templates.clear()
            self._templates_version = self.names.version
        templates = self._templates
        starts = 0
        for buf in raw:
            (ts, ifindex, rule_id, zone, etype, direction, reason, proto, saddr, daddr,
             sport, dport, length, count) = _EVENT.unpack(buf)
            self._stats["events"] += 1
            if etype == abi.EVENT_FLOW_START:
                tpl = templates.get((ifindex, zone, direction, proto, saddr, daddr, rule_id))
                if tpl is None:
                    tpl = self._flow_start_template(ifindex, zone, direction, proto, saddr, daddr, rule_id)
                sp, dp, when = ntohs(sport), ntohs(dport), ts + offset
                out.append((tpl[0] % (dp, sp, when)).encode("utf-8"))
                rec = dict(tpl[1])
                rec["sport"], rec["dport"], rec["time"] = sp, dp, when
                records.append(rec)
                starts += 1
            elif etype == abi.EVENT_DROP:
                key = (ifindex, direction, reason, proto, saddr, daddr, sport, dport)
                agg = self._denies.get(key)
                if agg is None:
                    self._denies[key] = [count, ts + offset, ts + offset, zone]
                else:
                    agg[0] += count
                    agg[2] = ts + offset
                self._remember_deny(ifindex, proto, saddr, daddr, sport, dport, reason, zone, direction)
                self._stats["deny_packets"] += count
            else:
                self._stats["unknown_events"] += 1
        self._stats["flow_start"] += starts
        self._remember(records)
        return out

    def _flow_start_template(self, ifindex, zone, direction, proto, saddr, daddr, rule_id) -> tuple:
        """(canonical entry text with %d for dport, sport and time, the record without them).
        At tens of thousands of new flows per second most share everything but ports and time:
        encoding those parts once per (interface, zone, direction, proto, addresses, rule) makes
        an entry one string format. tests/bpf/test_flowlog.py checks it is the canonical form."""
        base = self._flow_fields(ifindex, zone, direction, proto, saddr, daddr, _SENTINEL_SPORT,
                                 _SENTINEL_DPORT)
        base.update(time=_SENTINEL_TIME, verdict="allow", rule=self.names.rule(rule_id), reason="rule")
        text = encode_entry("flow_start", base).decode("utf-8").replace("%", "%%")
        # sorted keys put dport before sport before time: the order of the placeholders
        for name, sentinel in (("dport", _SENTINEL_DPORT), ("sport", _SENTINEL_SPORT), ("time", _SENTINEL_TIME)):
            marker = f'"{name}":{sentinel}'
            if text.count(marker) != 1:
                raise DatapathError(f"flow log: cannot build an entry template ({name})")
            text = text.replace(marker, f'"{name}":%d')
        for name in ("sport", "dport", "time"):
            del base[name]
        base["type"] = "flow_start"
        tpl = (text, base)
        if base["src_workload"] is None and base["dst_workload"] is None:
            return tpl  # an interface not resolved yet: do not remember a name that may change
        if len(self._templates) > 4096:  # e.g. a VM talking to many outside addresses
            self._templates.clear()
        self._templates[(ifindex, zone, direction, proto, saddr, daddr, rule_id)] = tpl
        return tpl

    def _flow_fields(self, ifindex, zone, direction, proto, saddr, daddr, sport, dport) -> dict:
        interface, workload = self.names.interface(ifindex)
        zone_name = self.names.zone(zone)
        src, dst = self._addr(saddr), self._addr(daddr)
        if direction == abi.DIR_EGRESS:  # the VM sent it: it is the source
            src_zone, src_wl = zone_name, workload
            dst_zone, dst_wl = self.names.peer(dst)
        else:
            dst_zone, dst_wl = zone_name, workload
            src_zone, src_wl = self.names.peer(src)
        return {"interface": interface, "direction": abi.DIRECTIONS.get(direction, str(direction)),
                "proto": PROTO_NAMES.get(proto, str(proto)), "src": src, "sport": sport, "dst": dst,
                "dport": dport, "src_zone": src_zone, "src_workload": src_wl, "dst_zone": dst_zone,
                "dst_workload": dst_wl}

    def _remember_deny(self, ifindex, proto, saddr, daddr, sport, dport, reason, zone, direction):
        k = (ifindex, proto, saddr, daddr, sport, dport, reason)
        meta = self._deny_meta
        if k in meta:
            meta.move_to_end(k)
        else:
            meta[k] = (zone, direction)
            if len(meta) > abi.DENY_AGG_MAX:  # the kernel keeps no more either
                meta.popitem(last=False)

    def _flush_kernel_denies(self, force: bool = False) -> list[bytes]:
        """Collect what the kernel suppressed for flows that went quiet (it would report those
        counts only with the flow's next packet, which may never come). lookup-and-delete is
        atomic in the map; a packet of that flow within the same instant may be counted in the
        next interval instead. Returns no entries itself: the counts join the aggregates."""
        table = self.datapath.map("sg_deny_agg")
        now = time.monotonic_ns()
        fd = table.map_fd
        val = table.Leaf()
        offset = time.time_ns() - now
        for kraw, vraw in libbpf.lookup_batch(fd):
            k, v = table.Key.from_buffer_copy(kraw), table.Leaf.from_buffer_copy(vraw)
            if not v.suppressed:
                continue
            if not force and now - v.last_ns < self.kernel_deny_interval_ns + 100_000_000:
                continue  # the flow's next packet after the interval will carry the count
            if libbpf.lib().bpf_map_lookup_and_delete_elem(fd, ct.byref(k), ct.byref(val)) != 0:
                continue  # gone already: the kernel evicted it or reported it itself
            if not val.suppressed:
                continue
            flow = k.flow
            saddr, daddr = bytes(flow.saddr), bytes(flow.daddr)
            zone, direction = self._deny_meta.get(
                (flow.ifindex, flow.proto, saddr, daddr, flow.sport, flow.dport, k.reason), (0, 255))
            key = (flow.ifindex, direction, k.reason, flow.proto, saddr, daddr, flow.sport, flow.dport)
            agg = self._denies.get(key)
            when = val.last_ns + offset
            if agg is None:
                self._denies[key] = [val.suppressed, when, now + offset, zone]
            else:
                agg[0] += val.suppressed
                agg[2] = max(agg[2], now + offset)
            self._stats["deny_packets"] += val.suppressed
            self._stats["kernel_deny_flushes"] += 1
        return []

    def _flush_denies(self) -> list[bytes]:
        if not self._denies:
            return []
        denies, self._denies = self._denies, {}
        out, records = [], []
        items = sorted(denies.items(), key=lambda kv: -kv[1][0])
        summary: dict[tuple, list] = {}
        for i, ((ifindex, direction, reason, proto, saddr, daddr, sport, dport), (count, first, last, zone)) \
                in enumerate(items):
            if i >= MAX_DENY_FLOWS_PER_INTERVAL:
                s = summary.setdefault((ifindex, direction, reason, zone), [0, 0, first, last])
                s[0] += count
                s[1] += 1
                s[2], s[3] = min(s[2], first), max(s[3], last)
                continue
            rec = self._flow_fields(ifindex, zone, direction, proto, saddr, daddr, socket.ntohs(sport),
                                    socket.ntohs(dport))
            if direction not in abi.DIRECTIONS:
                rec["direction"] = "unknown"
            rec.update(time=last, first_seen=first, verdict="deny", rule=None,
                       reason=reason_name(reason), packets=count)
            out.append(encode_entry("deny", rec))
            rec["type"] = "deny"
            records.append(rec)
        for (ifindex, direction, reason, zone), (count, flows, first, last) in summary.items():
            interface, workload = self.names.interface(ifindex)
            rec = {"interface": interface, "direction": abi.DIRECTIONS.get(direction, "unknown"),
                   "src_zone": self.names.zone(zone) if direction == abi.DIR_EGRESS else None,
                   "dst_zone": self.names.zone(zone) if direction == abi.DIR_INGRESS else None,
                   "workload": workload, "time": last, "first_seen": first, "verdict": "deny",
                   "rule": None, "reason": reason_name(reason), "packets": count, "flows": flows,
                   "summary": True}
            out.append(encode_entry("deny", rec))
            rec["type"] = "deny"
            records.append(rec)
        self._stats["deny_entries"] += len(out)
        self._remember(records)
        return out

    # ---- conntrack --------------------------------------------------------------------------
    def _scan_conntrack(self) -> list[bytes]:
        table = self.datapath.map("sg_ct")
        started = time.monotonic()
        now = time.monotonic_ns()
        offset = time.time_ns() - now
        seen: dict[bytes, tuple] = {}
        ended: list[tuple[bytes, tuple, str]] = []
        prev = self._ct_prev
        for k, val in libbpf.dump(table, abi.CT_KEY.size, abi.CT_VAL_PADDED):
            expires, packets, state = val[0], val[1], val[7]
            if expires <= now:
                ended.append((k, val, "expired"))
                continue
            before = prev.get(k)
            if state == CT_CLOSING and before is not None and before[7] == CT_CLOSING and before[1] == packets:
                ended.append((k, val, "closed"))
                continue
            seen[k] = val
        out, records = [], []
        fd = table.map_fd
        raw_val = (ct.c_uint8 * ct.sizeof(abi.CtVal))()
        for k, val, why in ended:
            kbuf = ct.create_string_buffer(k, len(k))
            if libbpf.lib().bpf_map_lookup_and_delete_elem(fd, kbuf, raw_val) == 0:
                current = abi.CT_VAL.unpack_from(bytes(raw_val))
                revived = current[0] > now if why == "expired" else current[1] != val[1]
                if revived:
                    # A packet came between the read and the delete: the flow lives on.
                    libbpf.lib().bpf_map_update_elem(fd, kbuf, raw_val, ct.c_uint64(BPF_NOEXIST))
                    seen[k] = current
                    continue
                val = current
            rec = self._ct_record(k, val, why, offset + now)
            out.append(encode_entry("flow_end", rec))
            rec["type"] = "flow_end"
            records.append(rec)
        for k in prev.keys() - seen.keys() - {k for k, _, _ in ended}:
            # Present at the last scan, gone now without us: evicted (LRU) or revoked by a policy
            # change. Its counts are those of the last scan.
            rec = self._ct_record(k, prev[k], "removed", offset + now)
            out.append(encode_entry("flow_end", rec))
            rec["type"] = "flow_end"
            records.append(rec)
        self._ct_prev = seen
        self._stats["flow_end"] += len(out)
        took_ms = int((time.monotonic() - started) * 1000)
        self._stats["ct_scan_last_ms"] = took_ms
        self._stats["ct_scan_max_ms"] = max(self._stats["ct_scan_max_ms"], took_ms)
        self._stats["ct_tracked"] = len(seen)
        self._remember(records)
        return out

    def _ct_record(self, k: bytes, val: tuple, why: str, when: int) -> dict:
        ifindex, proto, saddr, daddr, sport, dport = abi.CT_KEY.unpack(k)
        _exp, packets, nbytes, _gen, rule_id, zone, direction, _state = val
        rec = self._flow_fields(ifindex, zone, direction, proto, saddr, daddr, socket.ntohs(sport),
                                socket.ntohs(dport))
        rec.update(time=when, verdict="allow", rule=self.names.rule(rule_id), reason=why,
                   packets=packets, bytes=nbytes)
        return rec

    # ---- losses -----------------------------------------------------------------------------
    def _kernel_lost(self) -> int:
        if self._lost_table is None:
            self._lost_table = self.datapath.map("sg_ev_lost")
        return sum(int(v) for v in self._lost_table[ct.c_int(0)])

    def _check_losses(self) -> list[bytes]:
        total = self._kernel_lost() - self._lost_baseline
        if total <= self.lost_total:
            return []
        lost = total - self.lost_total
        self.lost_total = total
        log.warning("flow log: the ring buffer could not take %d events (%d in total)", lost, total)
        rec = {"lost": lost, "total": total, "time": time.time_ns()}
        self._remember([dict(rec, type="ring_loss", verdict="loss")])
        return [encode_entry("ring_loss", rec)]

    # ---- reading ----------------------------------------------------------------------------
    def _remember(self, records: list[dict]) -> None:
        if not records:
            return
        with self._lock:
            for rec in records:
                self._seq += 1
                rec["seq"] = self._seq
                self._recent.append(rec)

    def recent(self, since: int = 0, zone: str | None = None, verdict: str | None = None,
               limit: int = 100) -> dict:
        """Records after cursor `since` (oldest first, at most `limit`: the newest ones when
        there are more), filtered by zone (source or destination) and verdict. The returned
        cursor is the last record's seq, to pass as `since` next time."""
        with self._lock:
            cursor = self._seq
            oldest = self._recent[0]["seq"] if self._recent else cursor + 1
            picked: list[dict] = []
            cut = 0
            for rec in reversed(self._recent):
                if rec["seq"] <= since:
                    break
                if verdict and rec.get("verdict") != verdict:
                    continue
                if zone and zone not in (rec.get("src_zone"), rec.get("dst_zone")):
                    continue
                if len(picked) < limit:
                    picked.append(dict(rec))
                else:
                    cut += 1
        picked.reverse()
        evicted = max(0, oldest - since - 1) if since else 0
        # missed: records after the cursor that this reply cannot show (evicted from memory, or
        # past the limit); a follower learns it fell behind.
        return {"records": picked, "cursor": cursor, "missed": evicted + (cut if since else 0)}

    def stats(self) -> dict:
        with self._lock:
            out: dict = dict(self._stats)
            out["inflight"] = self._inflight
        out["ring_lost_total"] = self.lost_total
        out["failing"] = str(self.failure) if self.failure else None
        return out


VERDICT_FILTERS = ("allow", "deny", "loss")
MAX_QUERY_LIMIT = 10_000


def query_args(args: dict) -> tuple[dict, bool]:
    """Validate the control op "flows" arguments: (keyword arguments of recent(), sync?).
    Raises BadInput naming the bad argument."""
    from skyguard.errors import BadInput

    since = args.get("since", 0)
    limit = args.get("limit", 100)
    zone, verdict = args.get("zone"), args.get("verdict")
    if not isinstance(since, int) or isinstance(since, bool) or since < 0:
        raise BadInput(f"flows: since must be a cursor (an integer >= 0), not {since!r}")
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_QUERY_LIMIT:
        raise BadInput(f"flows: limit must be an integer from 1 to {MAX_QUERY_LIMIT}, not {limit!r}")
    if zone is not None and not isinstance(zone, str):
        raise BadInput("flows: zone must be a zone name")
    if verdict is not None and verdict not in VERDICT_FILTERS:
        raise BadInput(f"flows: verdict must be one of {', '.join(VERDICT_FILTERS)}, not {verdict!r}")
    return {"since": since, "zone": zone, "verdict": verdict, "limit": limit}, bool(args.get("sync"))


# ---- the ring: opened once per Datapath ------------------------------------------------------
# bcc cannot open the same ring buffer twice on one BPF object, so the callback it holds
# forwards to whichever logger consumes now (a restarted logger, tests with one Datapath).
_RING_SINKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _open_ring(datapath, sink) -> None:
    if datapath in _RING_SINKS:
        _RING_SINKS[datapath][0] = sink
        return
    holder = [sink]

    def forward(ctx, data, size, holder=holder):
        return holder[0](ctx, data, size)

    datapath.events().open_ring_buffer(forward)
    _RING_SINKS[datapath] = holder
