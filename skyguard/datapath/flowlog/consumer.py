"""The flow log's consumer: one thread that reads the datapath's ring buffer (ring.py: from its
memory map, a batch at a time) and writes, in group commits through LogWriter.submit,
flow_start entries (one per new allowed flow per interface), the deny aggregates (denies.py), the
flow_end entries of the conntrack scans (ctscan.py) and ring_loss entries whenever the kernel's
per-CPU sg_ev_lost grew. Records also go to the ring `skyguard flows` reads (recent.py).

Batches, for CPU: at most one read of the ring per `batch_interval` (events wait in the ring
meanwhile), so the per-read costs (the loss counter, a submit, the writer's fsyncs and signed
head) are shared by many entries, and each read is decoded with one struct.iter_unpack.

Backpressure is deliberate: when more than `max_inflight` entries wait for durability the
consumer stops reading the ring, the ring fills and the kernel counts what it cannot take; those
are then logged as ring_loss. Memory stays bounded and every loss is on record.

Thread safety: start/stop/flush/sync/recent/stats may be called from any thread; everything else
runs in the logger's own thread.
"""

from __future__ import annotations

import collections
import ctypes as ct
import logging
import queue
import socket
import struct
import threading
import time
from concurrent.futures import Future
from typing import Any

from skyguard.datapath import abi
from skyguard.datapath.flowlog.ctscan import ConntrackScanner
from skyguard.datapath.flowlog.denies import DenyAggregator, collect_kernel
from skyguard.datapath.flowlog.names import AddressText, FlowNames, FlowTemplates, encode_entry
from skyguard.datapath.flowlog.recent import RecentRecords
from skyguard.datapath.flowlog.ring import RingReader, record_size
from skyguard.errors import DatapathError, SkyguardError

log = logging.getLogger("skyguard.flowlog")

DEFAULT_DENY_INTERVAL_S = 1.0  # userspace deny aggregation window (and kernel-side flush period)
DEFAULT_CT_SCAN_INTERVAL_S = 2.0  # how late a flow_end may be, and how often conntrack is read
DEFAULT_RECENT = 20_000  # records kept in memory for `skyguard flows`
DEFAULT_MAX_INFLIGHT = 200_000  # entries waiting for fsync before the consumer stops reading
# At most one read of the ring per interval: at 100k events/s a batch is 2,000 events, under a
# twentieth of the 4 MiB ring; a lone event is read at once (no read in the interval before it).
DEFAULT_BATCH_INTERVAL_S = 0.02
KERNEL_DENY_INTERVAL_NS = abi.DENY_EVENT_INTERVAL_NS
POLL_TIMEOUT_MS = 100

_EVENT = abi.EVENT  # struct sg_event, with the two network-order ports read raw
_RECORD = struct.Struct("<8x" + _EVENT.format[1:])  # a ring record: its 8-byte header, the event
assert _RECORD.size == record_size(_EVENT.size)
_NTOHS = [socket.ntohs(port) for port in range(65536)]  # a list index is cheaper than a call


class FlowLogger:
    """FlowLogger(datapath, writer).start() ... .stop(). `names` turns ids into names (default:
    from the datapath's active policy, interfaces resolved in this process's netns); intervals
    in seconds (`batch_interval`: at most one read of the ring per interval); `recent` bounds
    the records kept for `skyguard flows`; `max_inflight` bounds the entries waiting for
    durability. `lost_total` and stats() are what metrics read."""

    def __init__(self, datapath, writer, *, names: FlowNames | None = None,
                 deny_interval: float = DEFAULT_DENY_INTERVAL_S,
                 ct_scan_interval: float = DEFAULT_CT_SCAN_INTERVAL_S,
                 recent: int = DEFAULT_RECENT, max_inflight: int = DEFAULT_MAX_INFLIGHT,
                 kernel_deny_interval_ns: int = KERNEL_DENY_INTERVAL_NS,
                 batch_interval: float = DEFAULT_BATCH_INTERVAL_S):
        self.datapath = datapath
        self.writer = writer
        self.names = names or FlowNames(datapath)
        self.deny_interval = deny_interval
        self.ct_scan_interval = ct_scan_interval
        self.max_inflight = max_inflight
        self.kernel_deny_interval_ns = kernel_deny_interval_ns
        self.batch_interval = batch_interval
        self._stop = threading.Event()
        self._wake = threading.Event()  # cuts a batch's wait short (sync, stop)
        self._paused = threading.Event()  # tests and benchmarks: stop reading the ring
        self._thread: threading.Thread | None = None
        self._ring: RingReader | None = None
        self._addr = AddressText()
        self._lock = threading.Lock()
        self._recent = RecentRecords(recent)
        self._inflight = 0
        self._pending: set[Future] = set()
        self._idle = threading.Condition(self._lock)
        self.lost_total = 0  # events the kernel could not put in the ring, since start
        self._lost_baseline = 0
        self._lost_table: Any = None  # bcc per-CPU array, opened on first use
        self._templates = FlowTemplates(self.names, self._addr)
        self._stats: collections.Counter[str] = collections.Counter()
        self._denies = DenyAggregator(self._stats)
        self._conntrack = ConntrackScanner(self._stats)
        self.failure: BaseException | None = None
        self._sync_requests: queue.SimpleQueue = queue.SimpleQueue()

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> FlowLogger:
        self._lost_baseline = self._kernel_lost()
        self._ring = RingReader(self.datapath.events().map_fd, _EVENT.size)
        try:
            self.datapath.set_events(True)
        except BaseException:
            self._ring.close()
            self._ring = None
            raise
        self._thread = threading.Thread(target=self._run, name="sg-flowlog", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop emission, drain the ring, log what is aggregated, wait until it is durable."""
        if self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        self._paused.clear()
        thread, self._thread = self._thread, None
        thread.join(timeout)
        if self._ring is not None and not thread.is_alive():  # never unmapped under a reader
            self._ring.close()
            self._ring = None
        self.flush(timeout)

    def pause(self) -> None:
        """Stop reading the ring (it fills; the kernel counts what does not fit)."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every entry submitted so far is durable (or failed). DatapathError after
        `timeout`, or at once while the log's writer is stalled on its disk (LogWriter.stalled:
        they are written if it answers, and a `down` must not wait for that)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._inflight:
                left = deadline - time.monotonic()
                if left <= 0 or self.writer.stalled():
                    why = "the signed log's disk does not answer" if left > 0 else f"after {timeout:.0f}s"
                    raise DatapathError(f"flow log: {self._inflight} entries still not durable ({why})")
                self._idle.wait(min(left, 0.25))

    def sync(self, timeout: float = 30.0) -> None:
        """Consume what the ring holds now, log every aggregate and scan conntrack once, then
        wait until it is durable (tests and `skyguard flows` freshness; the thread runs on). With
        the log's writer stalled on its disk it returns once consumed: the flows are known, and
        their entries are written if the disk answers (status and the metrics say it does not)."""
        done = threading.Event()
        self._sync_requests.put(done)
        self._wake.set()
        if not done.wait(timeout):
            raise DatapathError("flow log: the consumer did not answer a sync request")
        try:
            self.flush(timeout)
        except DatapathError:
            if not self.writer.stalled():
                raise

    # ---- the consumer thread ----------------------------------------------------------------
    def _run(self) -> None:
        ring = self._ring
        assert ring is not None
        next_deny = time.monotonic() + self.deny_interval
        next_ct = time.monotonic() + self.ct_scan_interval
        last_read = 0.0
        while not self._stop.is_set():
            try:
                holding = self._paused.is_set() or self._inflight > self.max_inflight
                if holding:
                    self._stats["backpressure_pauses" if not self._paused.is_set() else "paused_ticks"] += 1
                    self._wake.wait(POLL_TIMEOUT_MS / 1000)
                elif self._wake.is_set() or ring.wait(POLL_TIMEOUT_MS / 1000):
                    # Let the batch build up: one read per batch_interval however fast events come.
                    wait = last_read + self.batch_interval - time.monotonic()
                    if wait > 0:
                        self._wake.wait(wait)
                self._wake.clear()
                requests = []
                while not self._sync_requests.empty():
                    requests.append(self._sync_requests.get())
                entries = []
                if requests or not holding:  # held: the ring fills (a sync still reads it)
                    last_read = time.monotonic()
                    entries = self._take_events(*ring.read())
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
            entries = self._take_events(*ring.read())
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
                    self.failure = None  # the log takes entries again (it had refused them for space)
                else:
                    self._stats["entries_failed"] += n
                    self.failure = f.exception()
                self._idle.notify_all()
            if f.exception() is not None:
                log.critical("flow log: %d entries were not made durable: %s", n, f.exception())

        future.add_done_callback(done)

    def _fail(self, error: SkyguardError, n: int) -> None:
        said, self.failure = self.failure, error
        self._stats["entries_failed"] += n
        if str(said) != str(error):  # once per cause, not every poll while the log refuses
            log.critical("flow log: entries could not be submitted (counted in entries_failed): %s", error)

    # ---- events -----------------------------------------------------------------------------
    def _take_events(self, raw: bytes, odd: int = 0) -> list[bytes]:
        """Entries of the ring records in `raw` (RingReader.read: _RECORD after _RECORD); `odd`
        records of another size were skipped by the reader (counted as unknown)."""
        if odd:
            self._stats["unknown_events"] += odd
        if not raw:
            return []
        offset = time.time_ns() - time.monotonic_ns()  # ts_ns is CLOCK_MONOTONIC
        out: list[bytes] = []
        emit = out.append
        ntohs = _NTOHS
        templates, make = self._templates.current(), self._templates.make
        starts = ends = 0
        flow_start, flow_end, drop = abi.EVENT_FLOW_START, abi.EVENT_FLOW_END, abi.EVENT_DROP
        claim_end, ct_key, closing = self._conntrack.claim_end, abi.CT_KEY.pack, abi.CT_CLOSING
        for (ts, ifindex, rule_id, zone, etype, direction, reason, proto, saddr, daddr,
             sport, dport, _length, count, packets, nbytes) in _RECORD.iter_unpack(raw):
            if etype == flow_start:
                flow = (ifindex, zone, direction, proto, saddr, daddr, rule_id, "rule")
                emit((templates.get(flow) or make(flow)) % (ntohs[dport], ntohs[sport], ts + offset))  # START_VALUES
                starts += 1
            elif etype == drop:
                self._denies.add(ifindex, direction, reason, proto, saddr, daddr, sport, dport, count,
                                 ts + offset, zone)
            elif etype == flow_end:
                # reason: the entry's conntrack state. Its key is what the event carries, as scans see it.
                if not claim_end(ct_key(ifindex, proto, saddr, daddr, sport, dport)):
                    continue  # the last scan already logged it (vanished)
                flow = (ifindex, zone, direction, proto, saddr, daddr, rule_id,
                        "closed" if reason == closing else "expired")
                emit((templates.get(flow) or make(flow)) % (nbytes, ntohs[dport], packets, ntohs[sport],
                                                            ts + offset))  # END_VALUES
                ends += 1
            else:
                self._stats["unknown_events"] += 1
        self._stats["events"] += len(raw) // _RECORD.size
        self._stats["flow_start"] += starts
        self._stats["flow_end"] += ends
        self._recent.remember(out)  # each entry's JSON is its record
        return out

    # ---- denies and conntrack (denies.py, ctscan.py) -------------------------------------------
    def _flush_kernel_denies(self, force: bool = False) -> list[bytes]:
        collect_kernel(self.datapath.map("sg_deny_agg"), self._denies, self.kernel_deny_interval_ns, force)
        return []  # the counts join the aggregates

    def _flush_denies(self) -> list[bytes]:
        out, records = self._denies.flush(self.names, self._addr)
        self._recent.remember(records)
        return out

    def _scan_conntrack(self) -> list[bytes]:
        out = self._conntrack.scan(self.datapath.map("sg_ct"), self._templates)
        self._recent.remember(out)
        return out

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
        self._recent.remember([dict(rec, type="ring_loss", verdict="loss")])
        return [encode_entry("ring_loss", rec)]

    # ---- reading ----------------------------------------------------------------------------
    def recent(self, since: int = 0, zone: str | None = None, verdict: str | None = None,
               limit: int = 100) -> dict:
        """Records after cursor `since` (recent.RecentRecords.query)."""
        return self._recent.query(since, zone, verdict, limit)

    def stats(self) -> dict:
        with self._lock:
            out: dict = dict(self._stats)
            out["inflight"] = self._inflight
        out["ring_lost_total"] = self.lost_total
        out["failing"] = str(self.failure) if self.failure else None
        return out
