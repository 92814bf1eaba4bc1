"""What the signed log's writer accepts, and when it refuses: the gate in front of its queue.

Each refusal fails closed (the caller's decision is not made: DNS answers nothing, a key operation
is refused, a policy is not loaded) and each ends on its own, without a restart:
- Space (LogSpaceLow): a group that would eat into the reserve of free space kept on the log's
  filesystem is refused before anything is written (its waiters get LogSpaceLow, one
  `log_space_low` entry goes in from the reserve, and the daemon log says so once); later entries
  are refused at once, and accepted again once the space is back (a `log_space_restored` entry
  says how many were refused). Nothing was written, so nothing is distrusted.
- A stalled disk (LogStalled): the writer has waited on one write (a group's records and their
  fdatasync, a head, a checkpoint) for STALL_AFTER_S. A healthy disk answers in milliseconds,
  so this is a hung or frozen one. What is queued stays queued and is written when the disk
  answers; nothing new is taken meanwhile, and whoever waits for an entry to be durable stops
  waiting (it is not acknowledged, though it may be written later).
- A backlog (LogStalled): MAX_QUEUED_ENTRIES entries or MAX_QUEUED_BYTES bytes wait behind the
  writer, in its queue or its group in flight: memory stays bounded whatever the disk does.
A stall or backlog ends when a write returns with the backlog under half its bound: a
`log_stall_ended` entry says how long the log was behind and how many entries it refused.

Thread-safe under `lock`, which the writer (store.py) shares for its own state. Not here: the
writing itself (store.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from skyguard.tlog import records
from skyguard.tlog.entries import entry
from skyguard.tlog.errors import LogSpaceLow, LogStalled, anew
from skyguard.tlog.hashing import HASH_SIZE

log = logging.getLogger("skyguard.tlog")

# Free bytes the writer leaves on the log's filesystem: its final checkpoint, the entries saying
# why it refuses, a new segment's first page. 64 MiB, or 1/50 of a smaller filesystem.
DEFAULT_RESERVE_BYTES = 64 << 20
RESERVE_FRACTION = 50
SPACE_RECHECK_S = 1.0               # while refusing, how often a submit looks at the space again
# One write waiting this long is a disk that does not answer (a healthy fsync takes milliseconds;
# a loaded one, well under a second): long enough for a busy disk, short enough that few DNS
# answers go out on entries queued behind a hung one.
STALL_AFTER_S = 5.0
# Entries waiting behind the writer: above the flow log's own bound (its 200k in flight), so a
# burst on a healthy disk is not refused; at ~300 bytes an entry, 512k entries take ~200 MB.
MAX_QUEUED_ENTRIES = 1 << 19
MAX_QUEUED_BYTES = 128 << 20


def filesystem_space(directory: Path) -> tuple[int, int]:
    """(free bytes an unprivileged writer may use, total bytes) of the filesystem of `directory`."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


class Intake:
    """The writer's gate: admit() before an entry is queued, writing()/written() around each of
    the writer's writes. `enqueue(entries)` puts the gate's own entries in the writer's queue
    (called under `lock`). reserve_bytes: None for DEFAULT_RESERVE_BYTES or 1/RESERVE_FRACTION of
    the filesystem; a negative one never refuses for space."""

    def __init__(self, directory: Path, reserve_bytes: int | None, enqueue: Callable[[list[bytes]], None], *,
                 stall_after: float = STALL_AFTER_S, max_entries: int = MAX_QUEUED_ENTRIES,
                 max_bytes: int = MAX_QUEUED_BYTES):
        self.lock = threading.Lock()
        self.directory = directory
        self.free_bytes, total = filesystem_space(directory)
        self.reserve_bytes = (reserve_bytes if reserve_bytes is not None
                              else min(DEFAULT_RESERVE_BYTES, total // RESERVE_FRACTION))
        self.stall_after, self.max_entries, self.max_bytes = stall_after, max_entries, max_bytes
        self._enqueue = enqueue
        self.refusal: LogSpaceLow | None = None   # set while the filesystem is below the reserve
        self.refused_entries = 0                  # entries refused for space since the start
        self._refused_now = 0                     # ... in the current episode
        self._space_checked = 0.0
        self.queued_entries = self.queued_bytes = 0   # admitted, not yet written (or failed)
        self.writing_since: float | None = None   # when the writer's current write began
        self.stall: LogStalled | None = None      # set while the writer is behind
        self.stall_refused_entries = 0            # entries refused while behind, since the start
        self._stall_refused_now = 0
        self._stall_began = 0.0

    # --- callers' side (under self.lock) -----------------------------------------------------
    def admit(self, entries: list[bytes]) -> None:
        """Count `entries` as queued, or raise the refusal in force (counting them refused)."""
        size = sum(map(len, entries))
        behind = self.behind(len(entries), size)
        if behind is not None:
            self.stall_refused_entries += len(entries)
            self._stall_refused_now += len(entries)
            raise anew(behind)
        if self.refusal is not None and not self._space_back():
            self.refused_entries += len(entries)
            self._refused_now += len(entries)
            raise anew(self.refusal)
        self.queued_entries += len(entries)
        self.queued_bytes += size

    def own(self, entries: list[bytes]) -> None:
        """The gate's own entries: queued whatever it refuses (they say why)."""
        self.queued_entries += len(entries)
        self.queued_bytes += sum(map(len, entries))
        self._enqueue(entries)

    def write_wait(self) -> float:
        """Seconds the writer's current write has waited on its disk (0 between writes)."""
        since = self.writing_since
        return 0.0 if since is None else max(0.0, time.monotonic() - since)

    def stalled(self) -> bool:
        """Has the writer's current write waited STALL_AFTER_S (a disk that does not answer)?"""
        return self.write_wait() >= self.stall_after

    def behind(self, count: int = 0, size: int = 0) -> LogStalled | None:
        """The refusal while the writer is stalled, or would be past its backlog bound with
        `count` more entries of `size` bytes; the first of an episode is logged."""
        if self.stall is not None:
            return self.stall
        if self.stalled():
            why = (f"its writer has waited on its disk for more than {self.stall_after:g} s (a hung or "
                   f"frozen disk: see dmesg)")
        elif self.queued_entries + count > self.max_entries or self.queued_bytes + size > self.max_bytes:
            why = (f"{self.queued_entries} entries ({self.queued_bytes} bytes) wait to be written, its "
                   f"bound (its disk does not keep up)")
        else:
            return None
        self.stall = LogStalled(f"the signed log at {self.directory} refuses new entries: {why}; what is "
                                f"queued is written when the disk answers, and it accepts entries again then")
        began = self.writing_since  # when the write that stalled began
        self._stall_began, self._stall_refused_now = began if began is not None else time.monotonic(), 0
        log.critical("%s", self.stall)
        return self.stall

    def refusing(self) -> LogStalled | LogSpaceLow | None:
        """Why the gate would refuse an entry now (space looked at again when due), or None."""
        if self.refusal is not None:
            self._space_back()
        return self.behind() or self.refusal

    def facts(self) -> dict:
        """The gate's part of the writer's head(): space, backlog, and why it refuses (or None)."""
        if self.refusal is None:
            self.free_bytes, _total = filesystem_space(self.directory)
        refusing = self.refusing()
        return {"filesystem_free_bytes": self.free_bytes, "reserve_bytes": self.reserve_bytes,
                "refused_entries": self.refused_entries, "stall_refused_entries": self.stall_refused_entries,
                "queued_entries": self.queued_entries, "write_wait_s": round(self.write_wait(), 3),
                "refusing": str(refusing) if refusing else None}

    def _space_back(self) -> bool:
        """While refusing for space: is the filesystem back above the reserve (with a margin of a
        quarter of it, so a log at the edge does not flap)? Looks at most every SPACE_RECHECK_S;
        when it is, the writer resumes and says how many it refused."""
        now = time.monotonic()
        if now - self._space_checked < SPACE_RECHECK_S:
            return False
        self._space_checked = now
        self.free_bytes, _total = filesystem_space(self.directory)
        if self.free_bytes < self.reserve_bytes + self.reserve_bytes // 4:
            return False
        log.warning("the signed log at %s accepts entries again (%d bytes free); it refused %d",
                    self.directory, self.free_bytes, self._refused_now)
        self.own([entry("log_space_restored", refused=self._refused_now, free_bytes=self.free_bytes,
                        reserve_bytes=self.reserve_bytes)])
        self.refusal, self._refused_now = None, 0
        return True

    # --- the writer's side ---------------------------------------------------------------------
    def writing(self) -> None:
        """The writer starts a write (what stalled() measures)."""
        self.writing_since = time.monotonic()

    def written(self, count: int, size: int) -> None:
        """The write returned (or failed): its `count` entries of `size` bytes leave the backlog;
        an episode of being behind ends if the backlog is under half its bound."""
        with self.lock:
            self.writing_since = None
            self.queued_entries -= count
            self.queued_bytes -= size
            if (self.stall is None or 2 * self.queued_entries > self.max_entries
                    or 2 * self.queued_bytes > self.max_bytes):
                return
            behind_s = time.monotonic() - self._stall_began
            log.warning("the signed log at %s accepts entries again: it was behind for about %.0f s and "
                        "refused %d", self.directory, behind_s, self._stall_refused_now)
            self.stall = None
            self.own([entry("log_stall_ended", behind_s=int(behind_s), refused=self._stall_refused_now)])

    def room_for(self, group: list[bytes]) -> bool:
        """Would the filesystem keep its reserve after this group (records and cache hashes)?"""
        if self.reserve_bytes < 0:
            return True
        needed = sum(len(e) for e in group) + len(group) * (records.HEADER_SIZE + 2 * HASH_SIZE)
        self.free_bytes, _total = filesystem_space(self.directory)
        return self.free_bytes - needed >= self.reserve_bytes

    def refuse_for_space(self, count: int) -> tuple[LogSpaceLow, bool]:
        """A group of `count` entries is refused for space: (the refusal, is it the episode's first)."""
        with self.lock:
            self.refused_entries += count
            self._refused_now += count
            first = self.refusal is None
            if first:
                self.refusal = LogSpaceLow(
                    f"the signed log at {self.directory} refuses new entries: its filesystem has "
                    f"{self.free_bytes} bytes free and it keeps {self.reserve_bytes} (its final "
                    f"checkpoint's); free space there (`skyguard status` shows what fills the log) "
                    f"and it resumes")
                self._space_checked = time.monotonic()
            return self.refusal, first
