"""Per-VM shares of the credential proxy's resources: open connections and certificate
minting. Keys are workload names (None: every client that is no workload of the policy, as one
share), so one VM exhausting its share never touches another's. TLS termination (termination.py)
and the crypto proxy count clients the same way, by source where a client is not a VM
(conncap.source_of: an IPv4 address, an IPv6 /64). Loop-owned, no locking.
"""

from __future__ import annotations


class Slots:
    """At most `cap` concurrent holders per key."""

    def __init__(self, cap: int):
        self.cap = cap
        self._held: dict[str | None, int] = {}

    def acquire(self, key: str | None) -> bool:
        held = self._held.get(key, 0)
        if held >= self.cap:
            return False
        self._held[key] = held + 1
        return True

    def release(self, key: str | None) -> None:
        held = self._held.get(key, 0) - 1
        if held > 0:
            self._held[key] = held
        else:
            self._held.pop(key, None)

    def held(self, key: str | None) -> int:
        return self._held.get(key, 0)


class TokenBuckets:
    """A token bucket per key: `rate` tokens a second, at most `burst` saved. Times are the
    caller's monotonic clock (the event loop's)."""

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str | None, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str | None, now: float) -> bool:
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True
