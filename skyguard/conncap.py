"""Connections not yet authenticated, counted per source, and the refusals of a flood
summarised for the host's log: the one brake the SSH access proxy, the web console and the apps
proxy share against a client (or many) holding the daemon's file descriptors before anyone
signed in; and the brake on refusals a part records in the signed log (RefusalBrake), so that
a client refused at request rate does not grow it at that rate. Sans-io: the clock is passed in,
nothing here touches a socket.

A source is what one client owns (source_of): an IPv4 address (an IPv4-mapped IPv6 address is
that IPv4 address), or an IPv6 /64 (one host typically owns its whole /64: SLAAC, privacy
addresses; counted per address, it would get a fresh share from each).

Not here: what a proxy answers a refused connection (admin/connection.py, console/web.py,
apps/proxy.py).
"""

from __future__ import annotations

import functools
import ipaddress

SOURCE_BITS_V6 = 64  # an IPv6 source is its /64


@functools.lru_cache(maxsize=4096)
def source_of(address: str) -> str:
    """The source an address counts against: an IPv4 address as it is (an IPv4-mapped IPv6
    address as its IPv4 address), an IPv6 address as its /64 ("2001:db8::/64"); anything that
    is no address (a Unix socket's "", "?") as itself."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        host_bits = 128 - SOURCE_BITS_V6
        return str(ipaddress.IPv6Network(((int(ip) >> host_bits) << host_bits, SOURCE_BITS_V6)))
    return str(ip)


class UnauthenticatedConnections:
    """Connections not yet authenticated, by source (source_of: an IPv4 address, an IPv6 /64;
    like OpenSSH's MaxStartups): admit() counts one in or says why not, release() counts it out,
    both given the client's address. A client that connects and says nothing holds a file
    descriptor until the login timeout; past `per_source` such connections from one source, or
    `total` in all, the next is refused at once. Refusals are summarised for the host's log
    (RefusalSummary), never one entry each in the signed log, which a flood would grow."""

    def __init__(self, per_source: int, total: int):
        self.per_source, self.total = per_source, total
        self.by_source: dict[str, int] = {}
        self.refusals = RefusalSummary()

    def count(self) -> int:
        return sum(self.by_source.values())

    def held(self, address: str) -> int:
        """Connections counted against the source of `address`."""
        return self.by_source.get(source_of(address), 0)

    def admit(self, address: str) -> str | None:
        """None: counted in; else why not ('source': this address's source has too many, 'total')."""
        source = source_of(address)
        if self.by_source.get(source, 0) >= self.per_source:
            return "source"
        if self.count() >= self.total:
            return "total"
        self.by_source[source] = self.by_source.get(source, 0) + 1
        return None

    def release(self, address: str) -> None:
        source = source_of(address)
        left = self.by_source.get(source, 0) - 1
        if left > 0:
            self.by_source[source] = left
        else:
            self.by_source.pop(source, None)


class RefusalSummary:
    """Refusals of a flood, summarised for the host's log: a line a second per source at most
    (source_of: the addresses of one IPv6 /64 share their line), with how many refusals it
    stands for (never an entry each in the signed log)."""

    def __init__(self):
        self.refused: dict[str, int] = {}  # refusals per source not yet in a log line
        self.logged_at: dict[str, float] = {}

    def to_log(self, address: str, now: float) -> int:
        """Count one refusal; how many refusals the log line to write now stands for (0: a line
        for this address's source was written in the last second; this one goes in the next
        line's count)."""
        source = source_of(address)
        self.refused[source] = self.refused.get(source, 0) + 1
        if now - self.logged_at.get(source, float("-inf")) < 1.0:
            return 0
        if len(self.logged_at) > 4096:  # sources come and go: keep the tables bounded
            self.logged_at = {s: t for s, t in self.logged_at.items() if now - t < 1.0}
            self.refused = {s: n for s, n in self.refused.items() if s in self.logged_at or s == source}
        self.logged_at[source] = now
        return self.refused.pop(source)


class RefusalBrake:
    """The brake on refusals a part records in the signed log (fsync'd, append-only: a client
    refused at request rate must not grow it, nor the disk, at that rate). Per source
    (source_of) and kind of refusal (`words`: a tuple of bounded words, e.g. app and reason), the
    first `burst` refusals are entries of their own, then about `per_second` entries a second:
    a refusal with no entry left to spend is held, and the held ones go in one summary entry
    with their count when the next is due (the caller asks held() after wait() seconds). A
    burst a person makes keeps its detail; a flood costs the log a bounded number of entries.
    Metrics count every refusal (the caller's). Sans-io: the clock is passed in."""

    def __init__(self, burst: int = 10, per_second: float = 1.0, max_tracked: int = 4096):
        self.burst, self.per_second, self.max_tracked = burst, per_second, max_tracked
        self.kinds: dict[tuple, list] = {}  # (source, *words) -> [entries left, when counted, held]

    def _kind(self, address: str, words: tuple, now: float) -> list:
        key = (source_of(address), *words)
        state = self.kinds.get(key)
        if state is None:
            if len(self.kinds) >= self.max_tracked:  # sources come and go: keep the table bounded
                self.kinds = {k: s for k, s in self.kinds.items() if s[2] or self._left(s, now) < self.burst}
                if len(self.kinds) >= self.max_tracked:  # a fresh burst for those forgotten, no count lost
                    self.kinds = {k: s for k, s in self.kinds.items() if s[2]}
            state = self.kinds[key] = [float(self.burst), now, 0]
        state[0], state[1] = self._left(state, now), now
        return state

    def _left(self, state: list, now: float) -> float:
        return min(float(self.burst), state[0] + (now - state[1]) * self.per_second)

    def refused(self, address: str, words: tuple, now: float) -> bool:
        """Count one refusal from `address` of kind `words`. True: record it as an entry of its
        own now; False: it is held (see held())."""
        state = self._kind(address, words, now)
        if not state[2] and state[0] >= 1.0:
            state[0] -= 1.0
            return True
        state[2] += 1
        return False

    def wait(self, address: str, words: tuple, now: float) -> float:
        """Seconds until the summary of this kind's held refusals is due."""
        return max(0.0, (1.0 - self._kind(address, words, now)[0]) / self.per_second)

    def held(self, address: str, words: tuple, now: float) -> int:
        """How many refusals of this kind the summary entry to make now stands for (0: none
        held), taken as recorded."""
        state = self._kind(address, words, now)
        count, state[2] = state[2], 0
        if count:
            state[0] -= 1.0  # may go below zero when forced early (a part stopping): later ones wait longer
        return count
