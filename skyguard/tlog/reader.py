"""The on-disk layout of a signed log directory, and a read-only view of it.

Layout of a log directory (mode 0700):
  log.json                  origin, verifier key, segment size: fixed when the log is created
  seg-<first index>.log     entries as framed records (records.py); a segment holds exactly
                            `segment_entries` records before the next one starts
  leaves.bin                32-byte leaf hash per entry, and
  nodes8.bin                32-byte root per aligned 256-leaf subtree: caches derived from the
                            segments (rebuilt on open), so proofs and reopening cost O(n/256)
  head.bin                  the signed checkpoint of every acknowledged entry (head.py)
  checkpoints.log           signed checkpoint notes, framed like entries, oldest first: the
                            history a witness and `log verify` bound edits with
  torn/                     bytes cut from a torn tail, and entries set aside because no
                            signature proved them, kept for forensics

The segments are the truth; the caches are derived; the checkpoints are signed. Not here:
writing (store.py), full verification (verify.py).
"""

from __future__ import annotations

import json
import mmap
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from skyguard.errors import LogError
from skyguard.fsutil import read_regular_file
from skyguard.tlog import records
from skyguard.tlog.checkpoint import Checkpoint, split_note
from skyguard.tlog.errors import BadLogInput
from skyguard.tlog.files import os_reason
from skyguard.tlog.hashing import HASH_SIZE, hash_leaf
from skyguard.tlog.head import HEAD_FILE, read_head
from skyguard.tlog.tree import NODE_SPAN

META_FILE = "log.json"
LEAVES_FILE = "leaves.bin"
NODES_FILE = "nodes8.bin"
CHECKPOINTS_FILE = "checkpoints.log"
TORN_DIR = "torn"
FORMAT_VERSION = 1
# The most entries a writer ever has on disk beyond its last durable signed checkpoint (it signs
# a head checkpoint after at most this many, before acknowledging any of them). So a crash
# leaves at most this many unproven entries, and more than this is not a crash (store.py).
MAX_UNPROVEN = 4096
_SEGMENT_RE = re.compile(r"^seg-(\d{20})\.log$")


def segment_name(first_index: int) -> str:
    return f"seg-{first_index:020d}.log"


def leaf_hashes_of(payloads: Iterable[bytes]) -> list[bytes]:
    return [hash_leaf(p) for p in payloads]


def _read_meta(directory: Path) -> dict:
    path = directory / META_FILE
    if not path.exists():
        raise LogError(f"no signed log at {directory} (no {META_FILE}); the daemon creates it "
                       f"on first start, or pass --log-dir to point at another one")
    try:
        meta = json.loads(read_regular_file(path))  # a FIFO is refused, never waited on
        seg = int(meta["segment_entries"])
        origin, vkey = str(meta["origin"]), str(meta["verifier_key"])
    except (ValueError, KeyError, TypeError):
        raise LogError(f"{path} is damaged; it names the log's origin and key") from None
    except OSError as e:
        raise LogError(f"{path} cannot be read ({e.strerror or e}); it names the log's origin "
                       f"and key") from None
    if meta.get("version") != FORMAT_VERSION or seg < NODE_SPAN or seg % NODE_SPAN:
        raise LogError(f"{path}: unsupported log format {meta.get('version')!r}")
    return {"origin": origin, "verifier_key": vkey, "segment_entries": seg}


def _note_size(note: str) -> int:
    """The size a checkpoint note claims (its signature unchecked), -1 if it does not parse."""
    try:
        return Checkpoint.parse_body(split_note(note)[0]).size
    except BadLogInput:
        return -1


def _list_segments(directory: Path, segment_entries: int) -> list[int]:
    firsts = sorted(int(m.group(1)) for p in directory.iterdir()
                    if (m := _SEGMENT_RE.match(p.name)))
    for position, first in enumerate(firsts):
        if first != position * segment_entries:
            raise LogError(f"segment files of {directory} are not contiguous: expected "
                           f"{segment_name(position * segment_entries)}, found "
                           f"{segment_name(first)} (a segment was removed or renamed)")
    return firsts


class StoredSource:
    """NodeSource over the caches for [0, cached) and in-memory leaf hashes for the tail."""

    def __init__(self, leaves: mmap.mmap | bytes, nodes: mmap.mmap | bytes, cached: int,
                 tail_start: int, tail: Sequence[bytes]):
        self._leaves, self._nodes = leaves, nodes
        self.cached, self.tail_start, self.tail = cached, tail_start, tail

    def leaf_hashes(self, start, end):
        out = []
        if start < self.cached:
            stop = min(end, self.cached)
            buf = self._leaves
            out = [bytes(buf[i * HASH_SIZE:(i + 1) * HASH_SIZE]) for i in range(start, stop)]
            start = stop
        if start < end:
            out.extend(self.tail[start - self.tail_start:end - self.tail_start])
        return out

    def level_nodes(self, start, end):
        if end * NODE_SPAN > self.cached:
            return None
        buf = self._nodes
        return [bytes(buf[i * HASH_SIZE:(i + 1) * HASH_SIZE]) for i in range(start, end)]


def _map(path: Path, length: int):
    if length == 0:
        return b""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ)


class LogReader:
    """Read-only view of a log directory; never modifies it (a crashed tail is reported, kept)."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        meta = _read_meta(self.directory)
        self.origin = meta["origin"]
        self.verifier_key = meta["verifier_key"]
        self.segment_entries = meta["segment_entries"]
        # Read before the segments are listed: the writer signs a head only over entries it
        # already wrote, so a log with fewer readable entries than this lost some.
        self.acknowledged = max(map(_note_size, self.head_notes()), default=0)
        self.segments = _list_segments(self.directory, self.segment_entries)
        self._tail_scan: records.Scan | None = None
        self._last_scan: tuple[int, records.Scan] | None = None

    # --- entries -----------------------------------------------------------------------------
    def segment_path(self, first: int) -> Path:
        return self.directory / segment_name(first)

    def damaged(self, first: int, problem: str) -> LogError:
        """The one-line error for a segment that cannot be read as the log's."""
        return LogError(f"segment {self.segment_path(first)}: {problem}; run `skyguard log "
                        f"verify` to check the whole log")

    def scan_segment(self, first: int) -> records.Scan:
        """The records of one segment: LogError naming it if it is not a regular file.
        A sealed segment with fewer than `segment_entries` records has `problem` set."""
        # One sealed segment is kept: `entry()` calls for nearby indexes then cost one read.
        if self._last_scan is None or self._last_scan[0] != first:
            try:
                buf = read_regular_file(self.segment_path(first))
            except OSError as e:
                raise self.damaged(first, f"cannot be read: {os_reason(e)}") from None
            seg = self.segment_entries
            scan = records.scan(buf, first, seg)
            if not scan.problem and len(scan.payloads) < seg and first != self.segments[-1]:
                scan.problem, scan.problem_kind = (
                    f"ends after {len(scan.payloads)} of its {seg} entries, and the next segment "
                    f"follows it (entries removed)", "order")
            self._last_scan = (first, scan)
        return self._last_scan[1]

    def sealed_scan(self, first: int) -> records.Scan:
        """scan_segment of a segment whose every record is needed: LogError if one is not."""
        scan = self.tail()[1] if first == self.segments[-1] else self.scan_segment(first)
        if scan.problem and first != self.segments[-1]:
            raise self.damaged(first, scan.problem)
        return scan

    def tail(self) -> tuple[int, records.Scan]:
        """(first index, scan) of the last segment, read once per reader. A torn record at
        its end is a crash (or a write under way) and not counted; LogError if the readable
        entries are fewer than the head checkpoint covers (entries lost, not a crash)."""
        last = self.segments[-1] if self.segments else 0
        if self._tail_scan is None:
            scan = self.scan_segment(last) if self.segments else records.Scan([], 0, None)
            readable = last + len(scan.payloads)
            if readable < self.acknowledged:
                if not self.segments or len(scan.payloads) == self.segment_entries:
                    raise self.damaged(readable, f"is missing, but the head checkpoint covers "
                                                 f"{self.acknowledged} entries (entries removed)")
                raise self.damaged(last, f"{scan.problem or f'ends at index {readable}'}, but the "
                                         f"head checkpoint covers {self.acknowledged} entries "
                                         f"(entries lost: not a crash)")
            self._tail_scan = scan
        return last, self._tail_scan

    @property
    def size(self) -> int:
        """Entries readable in order (a torn tail is not counted)."""
        first, scan = self.tail()
        return first + len(scan.payloads)

    def entries(self, start: int = 0) -> Iterator[tuple[int, bytes]]:
        for first in self.segments:
            if first + self.segment_entries <= start:
                continue
            scan = self.tail()[1] if first == self.segments[-1] else self.scan_segment(first)
            for offset, payload in enumerate(scan.payloads):
                if first + offset >= start:
                    yield first + offset, payload
            if scan.problem and first != self.segments[-1]:
                raise self.damaged(first, scan.problem)

    def entry(self, index: int) -> bytes:
        if not 0 <= index < self.size:
            raise BadLogInput(f"no entry {index}: the log has {self.size} entries")
        first = index - index % self.segment_entries
        scan = self.tail()[1] if first == self.segments[-1] else self.scan_segment(first)
        if index - first >= len(scan.payloads):
            raise self.damaged(first, str(scan.problem))
        return scan.payloads[index - first]

    # --- tree --------------------------------------------------------------------------------
    def source(self) -> StoredSource:
        """Hashes for proofs: cached for sealed segments, recomputed for the tail."""
        first, scan = self.tail()
        leaves_path = self.directory / LEAVES_FILE
        nodes_path = self.directory / NODES_FILE
        leaves_len = leaves_path.stat().st_size if leaves_path.exists() else 0
        nodes_len = nodes_path.stat().st_size if nodes_path.exists() else 0
        cached = min(first, leaves_len // HASH_SIZE, nodes_len // HASH_SIZE * NODE_SPAN)
        cached -= cached % self.segment_entries
        tail = []
        for seg in self.segments:
            if seg >= cached and seg != first:
                tail.extend(leaf_hashes_of(self.sealed_scan(seg).payloads))
        tail.extend(leaf_hashes_of(scan.payloads))
        return StoredSource(_map(leaves_path, cached * HASH_SIZE),
                            _map(nodes_path, cached // NODE_SPAN * HASH_SIZE), cached, cached, tail)

    # --- checkpoints -------------------------------------------------------------------------
    def checkpoint_notes(self) -> list[str]:
        path = self.directory / CHECKPOINTS_FILE
        if not path.exists():
            return []
        try:
            buf = read_regular_file(path)
        except OSError as e:
            raise LogError(f"{path} cannot be read: {os_reason(e)}") from None
        return [p.decode("utf-8", "replace") for p in records.scan(buf, 0).payloads]

    def head_notes(self) -> list[str]:
        """The head checkpoint notes (newest last): together they cover every acknowledged entry."""
        try:
            return [note for _, note in read_head(self.directory).notes]
        except OSError as e:
            raise LogError(f"{self.directory / HEAD_FILE} cannot be read: {os_reason(e)}") \
                from None

    def latest_checkpoint_note(self) -> str:
        """The note (head or stored) with the largest size; its signature is the caller's to
        check. Notes that do not parse are skipped here and reported by `log verify`."""
        best, best_size = None, -1
        for note in self.checkpoint_notes()[-1:] + self.head_notes():
            size = _note_size(note)
            if size > best_size:
                best, best_size = note, size
        if best is None:
            raise LogError(f"the log at {self.directory} has no checkpoint yet; the daemon signs "
                           f"one when it creates the log and one for every group of entries")
        return best
