"""What the writer does to a log directory it opens: scan the segments, cut a torn tail, and set
aside entries that no signed checkpoint proves (store.py states why; this is how).

Every step is safe to repeat after a crash in the middle of it: whole segments are moved aside
from the last one down (the rest stay contiguous), a copy of what is cut is durable before the
cut, and each rename or truncation is fsynced. Nothing here deletes data: it goes to torn/.
Not here: deciding what is covered (store.py), checking signatures (checkpoint.py).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from skyguard import fsutil
from skyguard.errors import LogError
from skyguard.tlog import records
from skyguard.tlog.entries import entry as make_entry
from skyguard.tlog.files import read_log_file
from skyguard.tlog.hashing import HASH_SIZE
from skyguard.tlog.reader import LEAVES_FILE, MAX_UNPROVEN, NODES_FILE, TORN_DIR, _list_segments, leaf_hashes_of, segment_name
from skyguard.tlog.tree import NODE_SPAN

log = logging.getLogger("skyguard.tlog")


@dataclass
class Segments:
    """What the segments hold: `size` entries; leaf hashes of [rebuild_from, size) in `tail`."""

    firsts: list[int]
    size: int
    rebuild_from: int
    tail: list[bytes]


def _torn_dir(directory: Path) -> Path:
    torn = directory / TORN_DIR
    torn.mkdir(mode=0o700, exist_ok=True)
    return torn


def cut_tail(directory: Path, path: Path, buf: bytes, good_end: int, problem: str,
             tag: str = "", what: str = "a torn tail") -> Path:
    """Copy the bytes after good_end to torn/ (durably), then truncate path there."""
    torn = _torn_dir(directory)
    keep = torn / f"{path.name}.{good_end}{tag}.{time.time_ns()}"
    fsutil.create_private(keep, buf[good_end:])
    fsutil.fsync_directory(torn)
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, good_end)
        os.fsync(fd)
    finally:
        os.close(fd)
    log.warning("signed log %s: cut %s of %d bytes at offset %d (%s); kept in %s",
                path.name, what, len(buf) - good_end, good_end, problem, keep)
    return keep


def scan_segments(directory: Path, seg: int, covered: int) -> Segments:
    """Read the segments the caches may not cover (normally only the last one); cut a torn tail
    that no checkpoint covers; refuse damage anywhere else."""
    firsts = _list_segments(directory, seg) or [0]
    leaves_path, nodes_path = directory / LEAVES_FILE, directory / NODES_FILE
    leaves_len = leaves_path.stat().st_size if leaves_path.exists() else 0
    nodes_len = nodes_path.stat().st_size if nodes_path.exists() else 0
    rebuild_from = min(firsts[-1], leaves_len // HASH_SIZE, nodes_len // HASH_SIZE * NODE_SPAN)
    rebuild_from -= rebuild_from % seg
    tail: list[bytes] = []
    for first in firsts:
        if first < rebuild_from:
            continue
        path = directory / segment_name(first)
        buf = read_log_file(path)
        scan = records.scan(buf, first, seg)
        is_last = first == firsts[-1]
        if scan.problem:
            good_end = first + len(scan.payloads)
            if not is_last or good_end < covered or scan.problem_kind != "torn":
                raise LogError(f"the log at {directory} is damaged at index {good_end} "
                               f"({scan.problem}) under a signed checkpoint of size "
                               f"{covered}; refusing to append: run `skyguard log verify`")
            cut_tail(directory, path, buf, scan.end_offset, scan.problem)
        elif not is_last and len(scan.payloads) != seg:
            raise LogError(f"{path} holds {len(scan.payloads)} entries, a sealed segment "
                           f"holds {seg}: run `skyguard log verify`")
        tail.extend(leaf_hashes_of(scan.payloads))
    return Segments(firsts, rebuild_from + len(tail), rebuild_from, tail)


def set_aside(directory: Path, seg: int, segments: Segments, keep: int,
              signed: bool) -> bytes:
    """Move entries [keep, size) to torn/ and return the log entry that records it: a
    `log_recovery` when a crash explains them (a signed checkpoint, at most MAX_UNPROVEN past
    it), else a `tamper`."""
    count = segments.size - keep
    crash = signed and count <= MAX_UNPROVEN
    kept = []
    stamp = time.time_ns()
    for first in reversed(segments.firsts):
        if first + seg <= keep:
            break
        path = directory / segment_name(first)
        if not path.exists():
            continue
        if first >= keep:   # the whole segment is unproven
            torn = _torn_dir(directory)
            target = torn / f"{path.name}.unproven.{stamp}"
            os.rename(path, target)
            fsutil.fsync_directory(torn)
            fsutil.fsync_directory(directory)
            kept.append(target.name)
            continue
        buf = read_log_file(path)
        payloads = records.scan(buf, first, seg).payloads
        offset = sum(records.HEADER_SIZE + len(p) for p in payloads[:keep - first])
        if offset < len(buf):
            kept.append(cut_tail(directory, path, buf, offset, "no signed checkpoint covers them",
                                 tag=".unproven", what="unproven entries").name)
    if crash:
        why = (f"{count} entries after the last signed checkpoint (size {keep}) were never "
               f"acknowledged: the writer stopped before signing them (a crash)")
    elif not signed:
        why = f"{count} entries and no signed checkpoint: nothing proves them"
    else:
        why = (f"{count} entries after the last signed checkpoint (size {keep}): more than "
               f"a crash can leave ({MAX_UNPROVEN}); added or rewritten without the key")
    (log.warning if crash else log.error)("signed log %s: set aside entries [%d, %d): %s; "
                                          "kept in %s", directory, keep, segments.size, why,
                                          ", ".join(kept))
    return make_entry("log_recovery" if crash else "tamper", part="log",
                      action="unproven entries set aside, not signed", first_index=keep,
                      count=count, kept=[f"{TORN_DIR}/{name}" for name in kept], why=why)
