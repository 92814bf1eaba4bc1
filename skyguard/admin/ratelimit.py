"""Brakes of the SSH access proxy (and the console's VNC door) before authentication, per source.

AuthFailureLimiter: after `max_failures` failed logins within `window` seconds from one source,
every address of that source is refused for `block_for` seconds before it can even try a key. A
source is conncap.source_of's: an IPv4 address, an IPv6 /64 (a host owns its /64: counted per
address, it got `max_failures` fresh guesses, and as many signed log entries, from each of its
addresses). Sans-io: the clock is injected, nothing here touches a socket. Memory is bounded: at
most `max_tracked` sources are remembered (oldest dropped first). How many connections not yet
authenticated a source may hold: skyguard/conncap.py (shared with the web console).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque

from skyguard.conncap import source_of


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
        """Whether the source of `address` is blocked now."""
        source = source_of(address)
        until = self._blocked_until.get(source)
        if until is None:
            return False
        if self._clock() >= until:
            del self._blocked_until[source]
            return False
        return True

    def failure(self, address: str) -> bool:
        """Count one failed login against the source of `address`; True when this failure makes
        that source blocked."""
        now = self._clock()
        source = source_of(address)
        times = self._failures.pop(source, None) or deque()
        times.append(now)
        while times and now - times[0] > self.window:
            times.popleft()
        self._failures[source] = times
        while len(self._failures) > self.max_tracked:
            self._failures.popitem(last=False)
        if len(times) >= self.max_failures and not self.is_blocked(source):
            self._blocked_until[source] = now + self.block_for
            if len(self._blocked_until) > self.max_tracked:
                self._blocked_until.pop(next(iter(self._blocked_until)))
            times.clear()
            return True
        return False

    def success(self, address: str) -> None:
        """A login from `address` succeeded: its source's failures are forgotten."""
        self._failures.pop(source_of(address), None)
