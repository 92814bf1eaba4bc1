"""The DNS proxy's answer cache: one per VM, so a question repeated within its answer's TTL never
reaches the upstream.

Why: the tunnel detector (tunnel.py) charges a VM only for never-seen names, so without a cache a
VM picking among a few names it already resolved under a base it controls (a wildcard rule, an
authoritative server answering with TTL 0) got log2(names) bits out per query for free: 16 names
at 100 queries/s, ~30 KB per 10 minutes. With the cache, each (name, type, class, flags, EDNS)
reaches the upstream at most once per lifetime: the smallest TTL of the reply's records clamped
to [dns.min_ttl, dns.max_ttl] as the proxy releases them (the floor learning applies too), never
under MIN_LIFETIME, also for negative and SERVFAIL replies (RFC 2308, RFC 9520).

What it keeps is the upstream reply as received (our ID, our random letter case) with the
upstream query it answered. A hit is not released as such: the resolver replays it through
answer(), the path every upstream reply takes, under the policy in force now (a deny rule or a
removed rule applies at once, and a policy swap ends every entry's life: expire_all), with the
TTLs aged; so its addresses are learned again (the datapath holds every address the VM gets,
for as long as the released TTL says, plus the grace) and the hit is logged like any answer.

An expired entry stays up to STALE_SECONDS more for lookup_stale(): a VM whose re-asks have spent
their budget (tunnel.py) is answered from it, with TTLs of 0 (the resolver clamps them to
dns.min_ttl), instead of the question reaching the upstream.

Bounded: MAX_ENTRIES_PER_VM entries and MAX_BYTES_PER_VM octets per VM, least recently used
first out, so one VM cannot push another's answers out; MAX_VMS VMs (least recently active
first out) and MAX_BYTES in all. Only replies answer() matched to our query (source, port, ID,
0x20 case) are stored, under the question they matched: a spoof must pass the same checks as
before to get in, and a VM only ever reads its own entries. Sans-io (time is passed in); one
event loop owns it.
"""

from __future__ import annotations

import struct
from collections import OrderedDict

from skyguard.dns import wire

MAX_ENTRIES_PER_VM = 1024
MAX_BYTES_PER_VM = 1024 * 1024  # as counted (_Entry.size): room for MAX_ENTRIES_PER_VM small replies
MAX_VMS = 4096
MAX_BYTES = 64 * 1024 * 1024  # all VMs together (reached only with > 64 VMs at their cap)
MIN_LIFETIME = 1.0  # seconds, even under dns.min_ttl 0: a repeat in a tight loop stays here
STALE_SECONDS = 900.0  # an expired entry is kept this long for lookup_stale (RFC 8767's
# serve-stale, for a VM past its re-ask budget: tunnel.py), while the LRU bounds allow

_TTL = struct.Struct("!I")
_TTL_AT = struct.Struct("=II")  # a record's TTL: its offset in the reply, its value
ENTRY_OVERHEAD = 512  # octets an entry holds besides its reply, query and TTL table: the entry,
# its key (the question's name, the flags and OPT octets) and the table slot

Key = tuple  # (question key, qtype, qclass, upstream flags, upstream OPT)


class _Entry:
    __slots__ = ("reply", "query", "ttls", "stored", "expires", "size")

    def __init__(self, reply: bytes, query: bytes, ttls: bytes, stored: float, expires: float):
        self.reply, self.query, self.ttls = reply, query, ttls  # ttls: _TTL_AT packed, per record
        self.stored, self.expires = stored, expires
        # what it really holds: a record's TTL is 8 octets here (a tuple of two ints held ~110,
        # so hundreds of tiny records made the cache hold ~5x what its bounds said)
        self.size = len(reply) + len(query) + len(ttls) + ENTRY_OVERHEAD


class AnswerCache:
    def __init__(self, metrics=None):
        self.metrics = metrics
        self._vms: OrderedDict[tuple[str, str], OrderedDict[Key, _Entry]] = OrderedDict()
        self._vm_bytes: dict[tuple[str, str], int] = {}
        self.bytes = 0

    @staticmethod
    def key(question: wire.Question, upstream_query: bytes) -> Key:
        """What makes two questions the same: the name in any case, type, class, the header
        flags we send (RD, CD) and the EDNS we send."""
        return (question.key, question.qtype, question.qclass, upstream_query[2:4],
                upstream_query[question.end:])

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._vms.values())

    def expire_all(self) -> None:
        """A policy swap: no entry answers as live any more (the new policy may name other
        upstreams), but each stays for lookup_stale until STALE_SECONDS after it was stored, so a
        VM past its re-ask budget is not refused every name it knew at the swap."""
        for entries in self._vms.values():
            for entry in entries.values():
                entry.expires = min(entry.expires, entry.stored)

    def clear(self) -> None:
        self._vms.clear()
        self._vm_bytes.clear()
        self.bytes = 0

    def lookup(self, vm: tuple[str, str], key: Key, now: float) -> tuple[bytes, bytes] | None:
        """(the upstream reply with its TTLs aged, the upstream query it answers), or None."""
        entries = self._vms.get(vm)
        entry = entries.get(key) if entries is not None else None
        if entry is not None and entry.expires <= now:
            if entry.expires + STALE_SECONDS <= now:
                self._drop(vm, entries, key)
            entry = None
        if entry is None:
            if self.metrics is not None:
                self.metrics.cache_misses.inc()
            return None
        entries.move_to_end(key)
        self._vms.move_to_end(vm)
        if self.metrics is not None:
            self.metrics.cache_hits.inc()
        age = int(now - entry.stored)
        if age <= 0:
            return entry.reply, entry.query
        out = bytearray(entry.reply)
        for offset, ttl in _TTL_AT.iter_unpack(entry.ttls):
            _TTL.pack_into(out, offset, max(0, ttl - age))
        return bytes(out), entry.query

    def lookup_stale(self, vm: tuple[str, str], key: Key, now: float) -> tuple[bytes, bytes] | None:
        """An expired entry's reply with every TTL 0, and its query, or None."""
        entries = self._vms.get(vm)
        entry = entries.get(key) if entries is not None else None
        if entry is None or entry.expires > now or entry.expires + STALE_SECONDS <= now:
            return None
        entries.move_to_end(key)
        out = bytearray(entry.reply)
        for offset, _ in _TTL_AT.iter_unpack(entry.ttls):
            _TTL.pack_into(out, offset, 0)
        return bytes(out), entry.query

    def store(self, vm: tuple[str, str], key: Key, reply: bytes, query: bytes,
              records: list[wire.Record], min_ttl: int, max_ttl: int, now: float) -> None:
        """Keep reply (matched to query) for vm until its smallest clamped TTL has passed."""
        ttls = [(r.ttl_offset, r.ttl) for r in records if r.rtype != wire.QTYPE_OPT]
        lifetime = min((min(max(ttl, min_ttl), max_ttl) for _, ttl in ttls), default=min_ttl)
        entry = _Entry(reply, query, b"".join(_TTL_AT.pack(*pair) for pair in ttls), now,
                       now + max(lifetime, MIN_LIFETIME))
        if entry.size > MAX_BYTES_PER_VM:
            return
        entries = self._vms.get(vm)
        if entries is None:
            entries = self._vms[vm] = OrderedDict()
            self._vm_bytes[vm] = 0
        else:
            self._vms.move_to_end(vm)
        old = entries.pop(key, None)
        if old is not None:  # a joined client's copy of the same reply, or a race: replaced
            self._vm_bytes[vm] -= old.size
            self.bytes -= old.size
        entries[key] = entry
        self._vm_bytes[vm] += entry.size
        self.bytes += entry.size
        while len(entries) > MAX_ENTRIES_PER_VM or self._vm_bytes[vm] > MAX_BYTES_PER_VM:
            self._drop(vm, entries, next(iter(entries)))
        while len(self._vms) > MAX_VMS or self.bytes > MAX_BYTES:
            oldest = next(iter(self._vms))
            self._drop(oldest, self._vms[oldest], next(iter(self._vms[oldest])))

    def _drop(self, vm: tuple[str, str], entries: OrderedDict, key: Key) -> None:
        entry = entries.pop(key)
        self._vm_bytes[vm] -= entry.size
        self.bytes -= entry.size
        if not entries:
            del self._vms[vm]
            del self._vm_bytes[vm]
