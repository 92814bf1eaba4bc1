"""What the DNS proxy has taught the datapath, kept so a daemon restart loses nothing.

Entries are (zone, rule, name, ip, expiry). The file is JSON in the state dir, written
atomically (temporary file, fsync, rename, fsync of the directory) so a crash leaves either the
old or the new file. On start the daemon calls `relearn(learner, now)`, which hands every
unexpired entry back to the Learner with its remaining TTL.

Cap per name: MAX_IPS_PER_NAME addresses per (zone, rule, name) are remembered, most recently
answered first. Dropping an older address here never cuts a flow: the datapath entry is not
removed, it simply is not refreshed, and an expired datapath entry stops only new flows
(established ones continue, SPEC). The cap bounds what a hostile authoritative server can make
us re-learn after a restart and what one answer can open. Not thread-safe: one event loop owns it.
"""

from __future__ import annotations

import ipaddress
import json
from collections import OrderedDict
from pathlib import Path

from skyguard import fsutil
from skyguard.errors import DnsError

MAX_IPS_PER_NAME = 16  # like a #define: per (zone, rule, name); a CDN answer rarely holds > 8
FILE_NAME = "dns-learned.json"
FORMAT_VERSION = 1


class LearnedStore:
    def __init__(self, path: Path | None):
        self.path = path
        # (zone, rule, name) -> OrderedDict[ip text -> expiry (unix seconds)], oldest first
        self._entries: dict[tuple[str, str, str], OrderedDict[str, float]] = {}
        self._keys_by_name: dict[str, set[tuple[str, str, str]]] = {}  # for answered()
        self.dirty = False
        self.urgent = False  # an address we never saw: persist before the next answer if possible

    def add(self, zone: str, rule: str, name: str, ips: list[str], expiry: float) -> bool:
        """Remember ips; returns True if an address is new (callers persist at once then)."""
        key = (zone, rule, name)
        table = self._entries.setdefault(key, OrderedDict())
        self._keys_by_name.setdefault(name, set()).add(key)
        new = False
        for ip in ips:
            if ip not in table:
                new = True
            table[ip] = max(expiry, table.get(ip, 0.0))
            table.move_to_end(ip)
        while len(table) > MAX_IPS_PER_NAME:
            table.popitem(last=False)
        self.dirty = True
        self.urgent = self.urgent or new
        return new

    def entries(self, now: float):
        for (zone, rule, name), table in self._entries.items():
            for ip, expiry in table.items():
                if expiry > now:
                    yield zone, rule, name, ip, expiry

    def answered(self, name: str, ip: str, now: float) -> bool:
        """Was `ip` answered to a VM for `name` (any zone, any rule) and is it unexpired? Asked
        by the credential proxy on every swap, so it looks at this name's entries only."""
        return any(self._entries[key].get(ip, 0.0) > now for key in self._keys_by_name.get(name, ()))

    def prune(self, now: float) -> None:
        for key in list(self._entries):
            table = self._entries[key]
            for ip in [ip for ip, expiry in table.items() if expiry <= now]:
                del table[ip]
            if not table:
                del self._entries[key]
                keys = self._keys_by_name[key[2]]
                keys.discard(key)
                if not keys:
                    del self._keys_by_name[key[2]]

    def snapshot(self, now: float) -> bytes:
        """The file's next contents (on the event loop: it reads the live tables). What it holds
        is no longer dirty; write() puts it on disk."""
        self.prune(now)
        document = {"version": FORMAT_VERSION,
                    "entries": [{"zone": z, "rule": r, "name": n, "ip": ip, "expiry": e}
                                for z, r, n, ip, e in self.entries(now)]}
        self.dirty = self.urgent = False
        # json.dumps, not json.dump: one pass of the C encoder, ~4x faster than the streaming one.
        return json.dumps(document, separators=(",", ":")).encode()

    def write(self, data: bytes) -> None:
        """Put a snapshot on disk, atomically and durably (any thread, one write at a time)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fsutil.write_private(self.path, data)

    def save(self, now: float) -> None:
        """snapshot() and write() at once (start, stop, tools); the DNS server writes from a
        thread of its own instead (server.StateWriter)."""
        self.write(self.snapshot(now))

    def load(self) -> None:
        """Read the file if there is one. A corrupt file is an error the operator must see: we
        do not silently start empty (the datapath pins still hold the entries meanwhile)."""
        if self.path is None or not self.path.exists():
            return
        try:
            document = json.loads(self.path.read_text())
            if document.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown version {document.get('version')!r}")
            for item in document["entries"]:
                ipaddress.ip_address(item["ip"])
                self.add(str(item["zone"]), str(item["rule"]), str(item["name"]),
                         [item["ip"]], float(item["expiry"]))
        except (ValueError, KeyError, TypeError) as e:
            raise DnsError(f"learned DNS state {self.path} is unreadable ({e}); move it aside to "
                           "start with no learned names (pinned datapath entries remain)") from e
        self.dirty = self.urgent = False

    def relearn(self, learner, now: float) -> int:
        """Hand every unexpired entry back to the learner, grouped per (zone, rule, remaining
        TTL). Returns the number of addresses re-learned."""
        groups: dict[tuple[str, str, int], list] = {}
        for zone, rule, _name, ip, expiry in self.entries(now):
            ttl = max(1, int(expiry - now))
            groups.setdefault((zone, rule, ttl), []).append(ipaddress.ip_address(ip))
        for (zone, rule, ttl), ips in groups.items():
            learner.learn(zone, rule, ips, ttl)
        return sum(len(ips) for ips in groups.values())
