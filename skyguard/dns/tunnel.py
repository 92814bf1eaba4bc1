"""Per-VM DNS tunnelling and exfiltration detection: a score made of named parts.

Tunnels (iodine, dnscat2, DNSExfiltrator, plain `base32(secret).evil.test` loops) have to put
their payload in query names and read it from answers, so they show long labels, encoded
(random-looking, hex or base32) labels, letters in pairs English does not write (alphabet.py:
this needs no digits, so a 16-letter alphabet is caught too), many never-repeated subdomains
under one base domain, and record types that carry bytes (NULL, TXT, ANY). Each signal is a part
of the score; a query whose score reaches THRESHOLD is a detection, and a detected base domain
stays flagged for that VM for FLAG_SECONDS so the rest of the stream is stopped too while other
names keep working.

Quiet tunnels (short labels, few names a minute, spread over several base domains) are bounded
by a budget per VM across all base domains: each never-seen name costs its estimated
information (alphabet.bits of the subdomain, plus choice_bits for the type and header flags it
is asked with, in bytes) over BUDGET_WINDOW_SECONDS, the first
CHEAP_PER_BASE names of a base at CHEAP_WEIGHT (real traffic touches a few names of many sites;
a tunnel needs many names of the few bases it controls). Past VM_BUDGET_BYTES a new costly name
is a detection, and past NAMES_CAP_BYTES of their full information (the cheap names of many bases
too) any new name is. bench/dns_tunnel.py measures what each encoder gets out under it.

Every other query that reaches the upstream (a name seen already, asked again once its cached
answer expired, or with another type or flags) carries the VM's choice among what it knows, so
it is charged too, to a second budget per VM (REASK_BUDGET_BYTES): the length of a code for that
choice, log2 of the names and bases the VM has shown in the window plus a short code for the
type and header flags (common choices cost a bit, rare ones more; no strategy carries more than
it pays). Past it the resolver answers from the VM's expired cache entry instead (serve-stale,
RFC 8767), or with no records if there is none, so a busy VM keeps working on answers a few
minutes old while nothing more leaves.

Sans-io: the caller passes the current time. It does not decide what to do with a detection
(block, alert): the resolver does, from policy.dns.tunnel_detection.action.
"""

from __future__ import annotations

import math
import re
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from skyguard.dns import alphabet, wire
from skyguard.dns.names import base_domain

THRESHOLD = 1.0  # a score at or above this is a detection
LONG_LABEL = 30  # labels longer than this start to count; real hostnames rarely exceed 20
MAX_LABEL = 63  # the longest a label can be: full score for the long-label part
LONG_SUBDOMAIN = 40  # subdomain octets (labels left of the base) that start to count; tools
# that split payload into several medium labels (dnscat2) show up here, not in LONG_LABEL
ENCODED_MIN_LEN = 16  # shorter runs of hex/base32 are ordinary (CDN ids such as d1a2b3c4e5f6)
ENTROPY_MIN_LEN = 20  # Shannon entropy of shorter strings says little
ENTROPY_BITS = 4.0  # bits/char above which a subdomain looks random (English names ~2.5-3.5)
WINDOW_SECONDS = 60.0  # sliding window for unique-subdomain counting
UNIQUE_SOFT = 20  # unique subdomains per base domain per window that start to count
UNIQUE_HARD = 40  # ... and that score a full detection on their own
FLAG_SECONDS = 300.0  # how long a detected (VM, base domain) stays blocked
MAX_BASES_PER_VM = 1024  # tracked base domains per VM (LRU): memory stays bounded
MAX_VMS = 4096
LONG_ANSWER_OCTETS = 300  # TXT/NULL rdata per answer above which it counts as bulky (the
# download channel of a tunnel); one DKIM or SPF record can be this long, so only repetition
# under one base domain scores
BULKY_ANSWERS_HARD = 10  # bulky answers per base per window for a full score
NAME_CACHE_SIZE = 65536  # names whose per-name score is remembered
ALPHABET_MIN_CHARS = 16  # letters and digits in the subdomain before letter pairs count
ALPHABET_BPC_SOFT = 5.0  # bits per character (alphabet.py) where the part starts; real names
# with 16+ characters stay below 5.6, uniform letters cost 6-7.5
ALPHABET_BPC_HARD = 6.5  # ... and where it is full (times a length factor that is full at 24)
BUDGET_WINDOW_SECONDS = 600.0  # the per-VM information budget's window
VM_BUDGET_BYTES = 400.0  # estimated bytes of never-seen names per VM per window. The trade-off
# (bench/dns_tunnel.py): real names at 0.2 never-seen names a second (120 per 10 minutes, every
# 10 minutes) stay under it; at 0.5 a second they do not. A tunnel gets out at most ~0.6 KB.
CHEAP_PER_BASE = 2  # the first names of a base in the window cost CHEAP_WEIGHT of their bytes
CHEAP_WEIGHT = 0.5  # lower lets real browsing through faster, and a tunnel over many bases too
BUDGET_MIN_BITS = 32  # when over budget, cheaper names (www, api, ...) of a new base still pass
NAMES_CAP_BYTES = 640.0  # ... until the never-seen names that left carry this many bytes at full
# weight: the first names of many bases (cheap, and passing past the budget) carried ~1.7 KB in 10
# minutes over 256 bases, 5.8 KB over 1,024 (bench/dns_tunnel.py); with the re-asks' budget < 1 KB
MAX_BUDGET_NAMES = 4096  # names remembered per VM for the budget (the oldest leave first)
REASK_BUDGET_BYTES = 320.0  # bits of choice per VM per window in the queries that reach the
# upstream without a never-seen name (re-asks): with the names' own budget it stays under 1 KB
REASK_QTYPE_BITS = {wire.QTYPE_A: 1.0, wire.QTYPE_AAAA: 2.0}  # a prefix code: any other
REASK_OTHER_QTYPE_BITS = 2.0 + math.log2(len(wire.SERVED_QTYPES))  # served type costs this
REASK_HEADER_BITS = {True: 2.0, False: 4.0}  # RD set and CD clear (what stubs send), or not;
# one of the bits is EDNS or none

QTYPE_WEIGHT = {wire.QTYPE_NULL: 1.0, wire.QTYPE_ANY: 0.5, wire.QTYPE_TXT: 0.3}

_HEX = re.compile(rb"[0-9a-f]{%d,}" % ENCODED_MIN_LEN)
_B32 = re.compile(rb"[a-z2-7]{%d,}" % ENCODED_MIN_LEN)
_DIGIT = re.compile(rb"[0-9]")
_VOWELS = frozenset(b"aeiou")


@dataclass
class Verdict:
    score: float
    parts: dict[str, float]
    base: str
    detected: bool
    flagged: bool = False  # blocked because the base was flagged by an earlier detection
    new_name: bool = False  # charged to the VM's budget as a never-seen name
    sub: bytes = b""  # the subdomain part of the name (left of base)


def shannon_bits(data: bytes) -> float:
    if not data:
        return 0.0
    n = len(data)
    return -sum(c / n * math.log2(c / n) for c in Counter(data).values())


def choice_bits(qtype: int, common_header: bool) -> float:
    """The length of the code for a query's type and header flags (what a query carries besides
    its name): charged with every query that reaches the upstream, new name or re-ask."""
    return REASK_QTYPE_BITS.get(qtype, REASK_OTHER_QTYPE_BITS) + REASK_HEADER_BITS[common_header]


def _encoded_score(sub: bytes) -> float:
    """Hex and base32 have low entropy per char (4 and 5 bits max, ~3.5-4.5 on short strings)
    so entropy misses them; they are caught by shape: long runs of the alphabet, with digits,
    and few vowels (words have ~40% vowels; random base32 ~16%, hex ~8%)."""
    compact = sub.replace(b".", b"")
    best = 0.0
    for pattern, alphabet_score in ((_HEX, 0.8), (_B32, 0.7)):
        for match in pattern.finditer(compact):
            run = match.group()
            if not _DIGIT.search(run):
                continue
            vowels = sum(1 for b in run if b in _VOWELS) / len(run)
            if vowels > 0.3:
                continue
            best = max(best, alphabet_score * min(1.0, len(run) / 32))
    return best


def score_name(labels: list[bytes], qtype: int) -> tuple[dict[str, float], bytes]:
    """The per-query parts of the score (no history), and the subdomain part of the name."""
    lowered = [label.lower() for label in labels]
    sub = b".".join(lowered[:-2]) if len(lowered) > 2 else b""
    parts: dict[str, float] = {}
    longest = max((len(label) for label in lowered), default=0)
    if longest > LONG_LABEL:
        parts["long_label"] = round(0.6 * (longest - LONG_LABEL) / (MAX_LABEL - LONG_LABEL) + 0.2, 3)
    if len(sub) > LONG_SUBDOMAIN:
        parts["long_name"] = round(min(0.8, 0.2 + 0.6 * (len(sub) - LONG_SUBDOMAIN) / 110), 3)
    if len(sub) >= ENTROPY_MIN_LEN:
        bits = shannon_bits(sub.replace(b".", b""))
        if bits > ENTROPY_BITS:
            parts["entropy"] = round(min(1.0, (bits - ENTROPY_BITS) * 1.5 + 0.4), 3)
    encoded = _encoded_score(sub)
    if encoded:
        parts["encoded"] = round(encoded, 3)
    alnum = len(sub) - sum(sub.count(c) for c in b".-_")
    if alnum >= ALPHABET_MIN_CHARS:
        bpc = alphabet.bits_per_char(sub)
        if bpc > ALPHABET_BPC_SOFT:
            part = min(1.0, (bpc - ALPHABET_BPC_SOFT) / (ALPHABET_BPC_HARD - ALPHABET_BPC_SOFT))
            parts["alphabet"] = round(part * min(1.0, alnum / 24), 3)
    if qtype in QTYPE_WEIGHT:
        parts["qtype"] = QTYPE_WEIGHT[qtype]
    return parts, sub


@dataclass
class _BaseWindow:
    seen: deque = field(default_factory=deque)  # (time, subdomain) in arrival order
    counts: Counter = field(default_factory=Counter)
    flagged_until: float = 0.0
    bulky: deque = field(default_factory=deque)  # times of long TXT/NULL answers


def _lru_entry(table: OrderedDict, key, make, most: int = MAX_VMS):
    """table[key], made if missing; the most recently used key last, at most `most` of them."""
    entry = table.get(key)
    if entry is None:
        entry = table[key] = make()
        if len(table) > most:
            table.popitem(last=False)
    else:
        table.move_to_end(key)
    return entry


class _Reasks:
    """One VM's re-ask charges in the budget window: (time, bytes) in arrival order. Bounded:
    every charge costs at least 2 bits, so the budget holds at most REASK_BUDGET_BYTES * 4."""

    def __init__(self):
        self.charges: deque = deque()
        self.total = 0.0

    def spend(self, cost: float, now: float) -> bool:
        while self.charges and self.charges[0][0] < now - BUDGET_WINDOW_SECONDS:
            self.total -= self.charges.popleft()[1]
        if not self.charges:
            self.total = 0.0  # no float drift across windows
        if self.total + cost > REASK_BUDGET_BYTES:
            return False
        self.charges.append((now, cost))
        self.total += cost
        return True


class _Budget:
    """One VM's never-seen names in the budget window: (base, subdomain) -> (first seen, cost,
    bytes). `total`: their costs (cheap names at CHEAP_WEIGHT); `carried`: their full bytes."""

    def __init__(self):
        self.names: OrderedDict[tuple[str, bytes], tuple[float, float, float]] = OrderedDict()
        self.per_base: Counter = Counter()
        self.total = 0.0
        self.carried = 0.0

    def expire(self, now: float) -> None:
        while self.names:
            key, (seen, cost, carried) = next(iter(self.names.items()))
            if seen >= now - BUDGET_WINDOW_SECONDS and len(self.names) <= MAX_BUDGET_NAMES:
                break
            self.names.popitem(last=False)
            self._forget(key, cost, carried)
        if not self.names:
            self.total = self.carried = 0.0  # no float drift across windows

    def _forget(self, key: tuple[str, bytes], cost: float, carried: float) -> None:
        self.total -= cost
        self.carried -= carried
        self.per_base[key[0]] -= 1
        if self.per_base[key[0]] <= 0:
            del self.per_base[key[0]]

    def spend(self, base: str, sub: bytes, bits: float, now: float) -> float | None:
        """Charge a name; None if it was already seen in the window (it costs nothing), else
        the part it adds to the score: 1.0 when the VM is over budget and the name is costly."""
        self.expire(now)
        key = (base, sub)
        if key in self.names:
            return None
        rank = self.per_base[base] + 1
        cost = bits / 8 * (CHEAP_WEIGHT if rank <= CHEAP_PER_BASE else 1.0)
        self.names[key] = (now, cost, bits / 8)
        self.per_base[base] = rank
        self.total += cost
        self.carried += bits / 8
        if self.carried > NAMES_CAP_BYTES:  # whatever the name: a tunnel over many bases ends here
            return 1.0
        if self.total > VM_BUDGET_BYTES and (rank > CHEAP_PER_BASE or bits >= BUDGET_MIN_BITS):
            return 1.0
        return 0.0

    def refund(self, base: str, sub: bytes) -> None:
        """A name just charged was refused: nothing went out, so it is not seen either (else,
        asked again once its base's flag lapses, it would pass free)."""
        entry = self.names.pop((base, sub), None)
        if entry is not None:
            self._forget((base, sub), entry[1], entry[2])


class TunnelDetector:
    """Keeps per-VM, per-base-domain history. Not thread-safe: one event loop owns it."""

    def __init__(self):
        self._vms: OrderedDict[str, OrderedDict[str, _BaseWindow]] = OrderedDict()
        self._budgets: OrderedDict[str, _Budget] = OrderedDict()
        self._reasks: OrderedDict[str, _Reasks] = OrderedDict()
        # per-name parts depend only on the name and type: cached, because most traffic is the
        # same few names again (bounded; cleared when full, tunnels churn it and pay full cost)
        self._name_cache: dict[tuple[bytes, int], tuple[dict, bytes, str, float]] = {}

    def _window(self, vm: str, base: str) -> _BaseWindow:
        return _lru_entry(_lru_entry(self._vms, vm, OrderedDict), base, _BaseWindow, MAX_BASES_PER_VM)

    def observe(self, vm: str, labels: list[bytes], qtype: int, now: float, blocking: bool = False,
                common_header: bool = True) -> Verdict:
        joined = b".".join(labels)
        cached = self._name_cache.get((joined, qtype))
        if cached is None:
            if len(self._name_cache) >= NAME_CACHE_SIZE:
                self._name_cache.clear()
            name_parts, sub = score_name(labels, qtype)
            cached = (name_parts, sub, base_domain(joined.decode("ascii", "replace")),
                      alphabet.bits(sub) if sub else 0.0)
            self._name_cache[(joined, qtype)] = cached
        name_parts, sub, base, bits = cached
        parts = dict(name_parts)
        charged = None
        if sub:
            # the name, and the type and header flags it is asked with: all of it reaches the upstream
            charged = self._budget(vm).spend(base, sub, bits + choice_bits(qtype, common_header), now)
            if charged:
                parts["vm_budget"] = charged
        window = self._window(vm, base)
        while window.seen and window.seen[0][0] < now - WINDOW_SECONDS:
            _, old = window.seen.popleft()
            window.counts[old] -= 1
            if window.counts[old] <= 0:
                del window.counts[old]
        if sub:
            # Bound the deque: beyond UNIQUE_HARD * 4 entries the score is already saturated.
            if len(window.seen) < UNIQUE_HARD * 4:
                window.seen.append((now, sub))
                window.counts[sub] += 1
        while window.bulky and window.bulky[0] < now - WINDOW_SECONDS:
            window.bulky.popleft()
        if window.bulky:
            parts["bulky_answers"] = round(min(1.0, len(window.bulky) / BULKY_ANSWERS_HARD), 3)
        unique = len(window.counts)
        if unique > UNIQUE_SOFT:
            parts["unique_subdomains"] = round(
                min(1.0, (unique - UNIQUE_SOFT) / (UNIQUE_HARD - UNIQUE_SOFT)), 3)
        score = round(sum(parts.values()), 3)
        detected = score >= THRESHOLD
        flagged = window.flagged_until > now
        if detected:
            window.flagged_until = now + FLAG_SECONDS
        if blocking and (detected or flagged) and charged is not None:
            self._budget(vm).refund(base, sub)
        return Verdict(score, parts, base, detected, flagged and not detected,
                       new_name=charged is not None, sub=sub)

    def refund(self, vm: str, verdict: Verdict | None) -> None:
        """The query observe() gave verdict was refused for another reason (the policy names no
        rule for it): nothing of it left, so its name is not charged (a stub walking its search
        domains asks several names no rule names before each real one)."""
        if verdict is not None and verdict.new_name:  # a second refund of a name is a no-op
            self._budget(vm).refund(verdict.base, verdict.sub)

    def charge_reask(self, vm: str, qtype: int, common_header: bool, now: float) -> bool:
        """A query that reaches the upstream without a never-seen name: charge the choice it
        carries. False when the VM's re-ask budget is spent (nothing is charged then)."""
        budget = self._budgets.get(vm)
        bases = self._vms.get(vm)
        known = (len(budget.names) if budget else 0) + (len(bases) if bases else 0)
        bits = math.log2(known + 1) + choice_bits(qtype, common_header)
        return _lru_entry(self._reasks, vm, _Reasks).spend(bits / 8, now)

    def _budget(self, vm: str) -> _Budget:
        return _lru_entry(self._budgets, vm, _Budget)

    def observe_answer(self, vm: str, base: str, payload_octets: int, now: float) -> None:
        """Count a TXT/NULL answer of payload_octets for vm under base (scored on the next
        query of that base)."""
        if payload_octets > LONG_ANSWER_OCTETS:
            window = self._window(vm, base)
            if len(window.bulky) < BULKY_ANSWERS_HARD * 2:
                window.bulky.append(now)
