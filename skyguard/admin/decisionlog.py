"""An unsigned, JSON-lines DecisionLog for the SSH access proxy run without the daemon.

The interface is skyguard.parts.DecisionLog (`record(kind, **fields)`); in the daemon, the signed
Merkle-tree log (skyguard/tlog) stands behind it. `JsonLinesDecisionLog` is the plain fallback used
by tests and by a proxy run on its own: one entry per line, `{"type": kind, **fields}`, the shape
the signed log's entries decode to. Neither ever receives a secret.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from skyguard.parts import DecisionLog

__all__ = ["DecisionLog", "JsonLinesDecisionLog", "fallback_log_path"]


class JsonLinesDecisionLog:
    """One canonical JSON object per line, fsync'd per entry. Unsigned: edits are not detected."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._lock = threading.Lock()

    def record(self, kind: str, /, **fields) -> None:
        entry = {"type": kind, **fields}
        line = json.dumps(entry, sort_keys=True, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)

    def entries(self) -> Iterator[dict]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def fallback_log_path(state_dir: Path | str) -> Path:
    """Where the unsigned fallback log lives when the proxy runs without the signed log."""
    return Path(state_dir) / "admin" / "decisions.jsonl"
