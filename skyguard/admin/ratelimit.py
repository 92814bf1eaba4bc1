"""Brakes of the SSH access proxy before authentication, per source address.

AuthFailureLimiter: after `max_failures` failed logins within `window` seconds, the address is
refused for `block_for` seconds before it can even try a key. Sans-io: the clock is injected,
nothing here touches a socket. Memory is bounded: at most `max_tracked` addresses are remembered
(oldest dropped first). How many connections not yet authenticated an address may hold:
skyguard/conncap.py (shared with the web console).
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
