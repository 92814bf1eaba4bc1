"""What the DNS proxy has taught the datapath, kept so a daemon restart loses nothing.

Entries are (workload, zone, rule, name, ip, expiry). The file is JSON in the state dir, written
atomically (temporary file, fsync, rename, fsync of the directory) so a crash leaves either the
old or the new file. On start the proxy calls `relearn(learner, now, policy)`, which hands every
unexpired entry back to the Learner with its remaining TTL.

State outlives a policy: the file may name rules, zones or workloads the policy in force does not
have (the operator edited it between two runs, or hot-swapped it). Such entries are dropped and
counted per reason (`Relearned.dropped`, `forget_stale`), never fatal: a restart after a policy
edit must just work.

Bounds. MAX_IPS_PER_NAME addresses per (workload, zone, rule, name), most recently answered
first: it bounds what one answer can open. MAX_LEARNED_PER_WORKLOAD (name, address) pairs per
workload, the least recently answered evicted first: one VM asking for endless names cannot grow
this state (or, through `take_evicted`, the datapath's) without limit. Not thread-safe: one event
loop owns it; write() alone runs on the state writer's thread.

Holds. An answer whose log entry is still queued (dns/learning.py) adds under a hold: until
`confirm(hold)` (the entry is durable) it can be taken back with `release(hold)` (the log refused
it), which gives each entry back the expiry the other holds on it give, and removes an entry no
other hold keeps (queued for take_evicted, like a cap's eviction). Only entries with a hold
unsettled are tracked. The file holds only answers on record: an entry is saved with the expiry
its settled holds give it, and not at all while it has none (a daemon killed before the log wrote
the answer's entry must not open it again when it restarts); `confirm` marks it to be saved
(`urgent` for a new one: the server saves at once).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import json
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import NamedTuple

from skyguard import fsutil
from skyguard.errors import DnsError
from skyguard.policy.fqdn import pattern_matches

MAX_IPS_PER_NAME = 16  # like a #define: per (workload, zone, rule, name); a CDN answer rarely holds > 8
MAX_LEARNED_PER_WORKLOAD = 4096  # (rule, name, address) entries one VM keeps; a browsing desktop
# resolves a few hundred names an hour, a server VM a handful. Raise it for VMs that crawl.
FILE_NAME = "dns-learned.json"
FORMAT_VERSION = 1  # "workload" was added later; files without it load with workload ""

Key = tuple  # (workload, zone, rule, name)


class Relearned(NamedTuple):
    """What relearn() did: addresses handed to the learner, and entries dropped per reason
    (rule-gone, zone-gone, workload-gone, zone-not-in-rule, name-not-in-rule, name-denied,
    refused)."""

    relearned: int
    dropped: dict


class LearnedStore:
    def __init__(self, path: Path | None):
        self.path = path
        self._entries: dict[Key, OrderedDict[str, float]] = {}  # ip -> expiry, oldest first
        self._keys_by_name: dict[str, set[Key]] = {}  # for answered()
        self._order: dict[str, OrderedDict[tuple[Key, str], None]] = {}  # per workload, LRU
        self._held: Counter = Counter()  # (zone, rule, ip) -> entries holding it
        self._evicted: list[tuple[str, str, str]] = []  # (zone, rule, ip) no entry holds any more
        # (zone, rule, ip) that lost an entry or part of one's expiry (a refused hold, a policy swap)
        # while other entries still hold it: the datapath must come back to their expiry.
        self._shortened: set[tuple[str, str, str]] = set()
        # Unsettled holds (see the module's docstring): hold -> the entries it added or refreshed;
        # per such entry, the expiry its settled holds give (None: none, the entry is new) and
        # each unsettled hold's.
        self._holds: dict[int, list[tuple[Key, str]]] = {}
        self._unsettled: dict[tuple[Key, str], tuple[float | None, dict[int, float]]] = {}
        self.evictions = 0  # entries evicted by a cap since start (for metrics)
        self.dirty = False
        self.urgent = False  # an address we never saw: persist before the next answer if possible

    # ---- the tables ------------------------------------------------------------------------

    def add(self, zone: str, rule: str, name: str, ips: list[str], expiry: float,
            workload: str = "", hold: int | None = None) -> bool:
        """Remember ips (under `hold`, if given: see the module's docstring); returns True if an
        address is new (callers persist at once then)."""
        key = (workload, zone, rule, name)
        table = self._entries.get(key)
        if table is None:
            table = self._entries[key] = OrderedDict()
            self._keys_by_name.setdefault(name, set()).add(key)
        order = self._order.setdefault(workload, OrderedDict())
        new = False
        for ip in ips:
            if ip not in table:
                new = True
                self._held[(zone, rule, ip)] += 1
            if hold is not None:
                _settled, unsettled = self._unsettled.setdefault((key, ip), (table.get(ip), {}))
                unsettled[hold] = max(expiry, unsettled.get(hold, 0.0))
                self._holds.setdefault(hold, []).append((key, ip))
            table[ip] = max(expiry, table.get(ip, 0.0))
            table.move_to_end(ip)
            order[(key, ip)] = None
            order.move_to_end((key, ip))
        while len(table) > MAX_IPS_PER_NAME:
            self._remove(key, next(iter(table)), evicted=True)
        while len(order) > MAX_LEARNED_PER_WORKLOAD:
            old_key, old_ip = next(iter(order))
            self._remove(old_key, old_ip, evicted=True)
        self.dirty = True
        self.urgent = self.urgent or (new and hold is None)  # a held one: once confirmed
        return new

    def _remove(self, key: Key, ip: str, evicted: bool = False, released: bool = False) -> None:
        workload, zone, rule, name = key
        table = self._entries[key]
        del table[ip]
        if not table:
            del self._entries[key]
            keys = self._keys_by_name[name]
            keys.discard(key)
            if not keys:
                del self._keys_by_name[name]
        self._unsettled.pop((key, ip), None)  # a hold settled later finds nothing to do
        order = self._order[workload]
        order.pop((key, ip), None)
        if not order:
            del self._order[workload]
        held = (zone, rule, ip)
        self._held[held] -= 1
        if self._held[held] <= 0:
            del self._held[held]
            if evicted or released:
                self._evicted.append(held)
        elif released:  # a cap's eviction (evicted) leaves the others' hold as the datapath has it
            self._shortened.add(held)
        if evicted:
            self.evictions += 1
        self.dirty = True

    def confirm(self, hold: int) -> None:
        """The log holds the decision `hold` stood for: its entries stay as any other, and are
        saved with what it gave them (at once if it added them: `urgent`)."""
        for entry in self._holds.pop(hold, ()):
            tracked = self._unsettled.get(entry)
            if tracked is not None and hold in tracked[1]:
                self.dirty = True
                self.urgent = self.urgent or tracked[0] is None
                expiry = tracked[1].pop(hold)
                settled = max(expiry, tracked[0] or 0.0)
                if tracked[1]:
                    self._unsettled[entry] = (settled, tracked[1])
                else:
                    del self._unsettled[entry]

    def release(self, hold: int) -> list[tuple[str, str, str]]:
        """The log refused the decision `hold` stood for: take back what it added. Returns the
        (zone, rule, ip) it touched that other entries or holds still keep (the datapath must
        get their expiry back: `held_until`, take_shortened()); the ones nothing keeps go to
        take_evicted()."""
        kept = []
        for key, ip in self._holds.pop(hold, ()):
            tracked = self._unsettled.get((key, ip))
            if tracked is None or hold not in tracked[1]:
                continue  # removed meanwhile (a cap, a policy swap), or released already
            settled, unsettled = tracked
            del unsettled[hold]
            if not unsettled:
                del self._unsettled[(key, ip)]
            expiry = max([settled or 0.0, *unsettled.values()])
            if settled is None and not unsettled:
                self._remove(key, ip, released=True)
            else:
                self._entries[key][ip] = expiry
                self.dirty = True
            if (key[1], key[2], ip) in self._held:
                kept.append((key[1], key[2], ip))
        self._shortened.update(kept)
        return kept

    def held_until(self, zone: str, rule: str, ips) -> dict[str, float]:
        """ip -> the latest expiry any entry gives it under (zone, rule), for ips with one.
        O(entries): for the rare release(), not the path of an answer."""
        wanted = set(ips)
        out: dict[str, float] = {}
        for (_workload, z, r, _name), table in self._entries.items():
            if z == zone and r == rule:
                for ip in wanted.intersection(table):
                    out[ip] = max(out.get(ip, 0.0), table[ip])
        return out

    def take_evicted(self) -> list[tuple[str, str, str]]:
        """(zone, rule, ip) that a cap evicted or forget_stale() dropped and that no entry holds
        any more, since the last call: what the datapath must forget before its TTL."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def take_shortened(self) -> list[tuple[str, str, str]]:
        """(zone, rule, ip) that a refused hold or forget_stale() took an entry or some expiry from
        while other entries still hold them, since the last call: the datapath must give them
        the expiry those give (held_until), which may be shorter than the one it has."""
        shortened, self._shortened = sorted(self._shortened), set()
        return shortened

    def count(self, workload: str | None = None) -> int:
        if workload is not None:
            return len(self._order.get(workload, ()))
        return sum(len(order) for order in self._order.values())

    def entries(self, now: float):
        for (workload, zone, rule, name), table in self._entries.items():
            for ip, expiry in table.items():
                if expiry > now:
                    yield workload, zone, rule, name, ip, expiry

    def answered(self, name: str, ip: str, now: float) -> bool:
        """Was `ip` answered to a VM for `name` (any zone, any rule) and is it unexpired? Asked
        by the credential proxy on every swap, so it looks at this name's entries only."""
        return any(self._entries[key].get(ip, 0.0) > now for key in self._keys_by_name.get(name, ()))

    def prune(self, now: float) -> None:
        """Forget expired entries (O(entries): the server runs it once a minute, not per save)."""
        for key, table in list(self._entries.items()):
            for ip in [ip for ip, expiry in table.items() if expiry <= now]:
                self._remove(key, ip)

    def forget_stale(self, policy) -> dict[str, int]:
        """Drop entries the policy no longer backs (among them names a deny rule of the zone now
        names); returns {reason: entries dropped}. Called with the policy in force at start and
        on every hot swap. What no entry holds any more is queued for take_evicted(): the
        datapath must close it now, not at its TTL."""
        rules = {r.name: r for r in policy.rules if r.action == "allow" and r.to.fqdns}
        denies = [r for r in policy.rules if r.action == "deny" and r.to.fqdns]
        workloads = {w.name: w.zone for w in policy.workloads()}
        dropped: Counter = Counter()
        for key in list(self._entries):
            reason = _stale_reason(key, rules, policy.zones, workloads, denies)
            if reason:
                for ip in list(self._entries[key]):
                    self._remove(key, ip, released=True)
                    dropped[reason] += 1
        return dict(dropped)

    # ---- the file --------------------------------------------------------------------------

    def snapshot(self, now: float) -> list[tuple]:
        """A copy of the unexpired entries on record (see the module's docstring: an unsettled
        hold's expiry is left out), for encode() and write() on another thread (on the event loop
        this is the only part of a save: ~1 us per entry). What it holds is no longer dirty."""
        self.dirty = self.urgent = False
        if not self._unsettled:
            return list(self.entries(now))
        out = []
        for key, table in self._entries.items():
            for ip, expiry in table.items():
                tracked = self._unsettled.get((key, ip))
                if tracked is not None:
                    expiry = tracked[0] or 0.0  # what the log holds of it
                if expiry > now:
                    out.append((*key, ip, expiry))
        return out

    @staticmethod
    def encode(entries: list[tuple]) -> bytes:
        """The file's contents for a snapshot (any thread)."""
        document = {"version": FORMAT_VERSION,
                    "entries": [{"workload": w, "zone": z, "rule": r, "name": n, "ip": ip,
                                 "expiry": e} for w, z, r, n, ip, e in entries]}
        # json.dumps, not json.dump: one pass of the C encoder, ~4x faster than the streaming one.
        return json.dumps(document, separators=(",", ":")).encode()

    def write(self, data: bytes) -> None:
        """Put a snapshot on disk, atomically and durably (any thread, one write at a time)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fsutil.write_private(self.path, data)

    def save(self, now: float) -> None:
        """snapshot(), encode() and write() at once (start, stop, tools); the DNS server writes
        from a thread of its own instead (StateWriter, below)."""
        self.prune(now)
        self.write(self.encode(self.snapshot(now)))

    def load(self) -> None:
        """Read the file if there is one. A corrupt file is an error the operator must see: we
        do not silently start empty (the datapath pins still hold the entries meanwhile)."""
        if self.path is None or not self.path.exists():
            return
        try:
            document = json.loads(fsutil.read_regular_file(self.path))  # a FIFO there must not hang the start
            if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
                version = document.get("version") if isinstance(document, dict) else None
                raise ValueError(f"unknown version {version!r}")
            for item in document["entries"]:
                ipaddress.ip_address(item["ip"])
                self.add(str(item["zone"]), str(item["rule"]), str(item["name"]),
                         [item["ip"]], float(item["expiry"]), workload=str(item.get("workload", "")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DnsError(f"learned DNS state {self.path} is unreadable ({e}); move it aside to "
                           "start with no learned names (pinned datapath entries remain)") from e
        self.dirty = self.urgent = False

    def relearn(self, learner, now: float, policy=None) -> Relearned:
        """Hand every unexpired entry back to the learner, grouped per (zone, rule, remaining
        TTL). With a policy, entries it no longer backs are dropped first; a group the learner
        refuses anyway is dropped too (counted as "refused"), never raised."""
        dropped: Counter = Counter(self.forget_stale(policy) if policy is not None else {})
        groups: dict[tuple[str, str, int], list] = {}
        for workload, zone, rule, name, ip, expiry in self.entries(now):
            ttl = max(1, int(expiry - now))
            groups.setdefault((zone, rule, ttl), []).append(((workload, zone, rule, name), ip))
        relearned = 0
        for (zone, rule, ttl), members in groups.items():
            ips = list(dict.fromkeys(ipaddress.ip_address(ip) for _, ip in members))
            try:
                learner.learn(zone, rule, ips, ttl)
            except Exception:  # noqa: BLE001 - stale state must never stop a start
                for key, ip in members:
                    self._remove(key, ip)
                    dropped["refused"] += 1
                continue
            relearned += len(ips)
        return Relearned(relearned, dict(dropped))


def _stale_reason(key: Key, rules: dict, zones: dict, workloads: dict[str, str], denies=()) -> str:
    workload, zone, rule_name, name = key
    if zone not in zones:
        return "zone-gone"
    if workload and workloads.get(workload) != zone:
        return "workload-gone"
    rule = rules.get(rule_name)
    if rule is None:
        return "rule-gone"
    if zone not in rule.from_zones:
        return "zone-not-in-rule"
    if not any(pattern_matches(p, name) for p in rule.to.fqdns):
        return "name-not-in-rule"
    if any(zone in r.from_zones and any(pattern_matches(p, name) for p in r.to.fqdns) for r in denies):
        return "name-denied"
    return ""


class StateWriter:
    """Writes the learned state (skyguard.dns.learned) from a thread of its own, one write at a
    time. On the event loop only a copy of the live entries is taken (~1 us each); encoding, the
    file write and its fsync happen on the thread, so a slow disk holds back only the answers
    waiting for their address to be on disk, not every query (nor the credential and SSH proxies
    sharing the loop). Saves asked while a write is in flight are coalesced into the next one:
    a burst of new addresses costs two writes, not one copy and one fsync per address."""

    def __init__(self, store, metrics):
        self.store = store
        self.metrics = metrics
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sg-dns-state")
        self._next: asyncio.Future | None = None  # the write that will cover what is added now
        self._turn: asyncio.Lock | None = None  # one write at a time, in order
        self._tasks: set[asyncio.Task] = set()

    async def save(self) -> None:
        """Return once everything added before this call is on disk (or its write failed,
        which is counted and retried by the next save)."""
        loop = asyncio.get_running_loop()
        if self._next is None:
            self._next = loop.create_future()
            task = loop.create_task(self._write(self._next))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.shield(self._next)

    async def _write(self, done: asyncio.Future) -> None:
        if self._turn is None:
            self._turn = asyncio.Lock()
        async with self._turn:
            if self._next is done:
                self._next = None  # what is added from now on needs the next write
            entries = self.store.snapshot(time.time())
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self._thread, self._encode_and_write, entries)
            except Exception:  # noqa: BLE001 - a failed write must not lose later ones
                self.store.dirty = self.store.urgent = True  # the next save tries again
                self.metrics.upstream_errors.labels("state-save").inc()
            finally:
                if not done.done():
                    done.set_result(None)

    def _encode_and_write(self, entries) -> None:
        self.store.write(self.store.encode(entries))

    def close(self) -> None:
        self._thread.shutdown(wait=True)
