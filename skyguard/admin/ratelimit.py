"""Brakes of the SSH access proxy before authentication, per source address.

AuthFailureLimiter: after `max_failures` failed logins within `window` seconds, the address is
refused for `block_for` seconds before it can even try a key. UnauthenticatedConnections: how many
connections not yet authenticated an address (and everyone) may hold at once. Sans-io: the clock
is injected, nothing here touches a socket. Memory is bounded: at most `max_tracked` addresses are
remembered (oldest dropped first), and a counted connection is counted out when it ends.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque


class AuthFailureLimiter:
    def __init__(self, max_failures: int = 5, window: float = 60.0, block_for: float = 300.0,
                 max_tracked: int = 10_000, clock=time.monotonic):
        self.max_failures = max_failures
        self.window = window
        self.block_for = block_for
        self.max_tracked = max_tracked
        self._clock = clock
        self._failures: OrderedDict[str, deque] = OrderedDict()
        self._blocked_until: dict[str, float] = {}

    def is_blocked(self, address: str) -> bool:
        until = self._blocked_until.get(address)
        if until is None:
            return False
        if self._clock() >= until:
            del self._blocked_until[address]
            return False
        return True

    def failure(self, address: str) -> bool:
        """Count one failed login; True when this failure makes the address blocked."""
        now = self._clock()
        times = self._failures.pop(address, None) or deque()
        times.append(now)
        while times and now - times[0] > self.window:
            times.popleft()
        self._failures[address] = times
        while len(self._failures) > self.max_tracked:
            self._failures.popitem(last=False)
        if len(times) >= self.max_failures and not self.is_blocked(address):
            self._blocked_until[address] = now + self.block_for
            if len(self._blocked_until) > self.max_tracked:
                self._blocked_until.pop(next(iter(self._blocked_until)))
            times.clear()
            return True
        return False

    def success(self, address: str) -> None:
        self._failures.pop(address, None)


class UnauthenticatedConnections:
    """Connections not yet authenticated, by source address (like OpenSSH's MaxStartups): admit()
    counts one in or says why not, release() counts it out. A client that connects and says
    nothing holds a file descriptor until the login timeout; past `per_source` such connections
    from one address, or `total` in all, the next is refused at once. Refusals are summarised
    for the host's log (RefusalSummary), never one entry each in the signed log, which a flood
    would grow."""

    def __init__(self, per_source: int, total: int):
        self.per_source, self.total = per_source, total
        self.by_source: dict[str, int] = {}
        self.refusals = RefusalSummary()

    def count(self) -> int:
        return sum(self.by_source.values())

    def admit(self, source: str) -> str | None:
        """None: counted in; else why not ('source': this address has too many, 'total')."""
        if self.by_source.get(source, 0) >= self.per_source:
            return "source"
        if self.count() >= self.total:
            return "total"
        self.by_source[source] = self.by_source.get(source, 0) + 1
        return None

    def release(self, source: str) -> None:
        left = self.by_source.get(source, 0) - 1
        if left > 0:
            self.by_source[source] = left
        else:
            self.by_source.pop(source, None)


class RefusalSummary:
    """Refusals of a flood, summarised for the host's log: a line a second per source at most,
    with how many refusals it stands for (never an entry each in the signed log)."""

    def __init__(self):
        self.refused: dict[str, int] = {}  # refusals per source not yet in a log line
        self.logged_at: dict[str, float] = {}

    def to_log(self, source: str, now: float) -> int:
        """Count one refusal; how many refusals the log line to write now stands for (0: a line
        for this source was written in the last second; this one goes in the next line's count)."""
        self.refused[source] = self.refused.get(source, 0) + 1
        if now - self.logged_at.get(source, float("-inf")) < 1.0:
            return 0
        if len(self.logged_at) > 4096:  # sources come and go: keep the tables bounded
            self.logged_at = {s: t for s, t in self.logged_at.items() if now - t < 1.0}
            self.refused = {s: n for s, n in self.refused.items() if s in self.logged_at or s == source}
        self.logged_at[source] = now
        return self.refused.pop(source)
