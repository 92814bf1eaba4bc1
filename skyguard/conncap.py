"""Connections not yet authenticated, counted per source address, and the refusals of a flood
summarised for the host's log: the one brake the SSH access proxy and the web console share
against a client (or many) holding the daemon's file descriptors before anyone signed in.
Sans-io: the clock is passed in, nothing here touches a socket.

Not here: what a proxy answers a refused connection (admin/connection.py, console/web.py).
"""

from __future__ import annotations


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
