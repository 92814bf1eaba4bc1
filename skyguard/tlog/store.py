"""The durable, append-only store of the signed log: a writer with group commit, and a reader.

Layout of a log directory (mode 0700):
  log.json                  origin, verifier key, segment size: fixed when the log is created
  seg-<first index>.log     entries as framed records (records.py); a segment holds exactly
                            `segment_entries` records before the next one starts
  leaves.bin                32-byte leaf hash per entry, and
  nodes8.bin                32-byte root per aligned 256-leaf subtree: caches derived from the
                            segments (rebuilt on open), so proofs and reopening cost O(n/256)
  checkpoints.log           signed checkpoint notes, framed like entries, oldest first
  torn/                     bytes cut from a torn tail, kept for forensics

The segments are the truth; everything else is derived or signed. An entry is acknowledged only
after its segment and (when the segment file is new) the directory are fsynced; the caches are
fsynced when a segment is sealed, and the last segment's are rebuilt on open. Recovery
cuts a torn tail only where no checkpoint covers it: damage under a checkpoint is tampering, and
the writer refuses to extend such a log (fail closed) until `skyguard log verify` has been read.

Not here: full verification (verify.py), signing details (checkpoint.py).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import queue
import re
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from skyguard import fsutil
from skyguard.errors import LogError
from skyguard.tlog import records
from skyguard.tlog.checkpoint import Checkpoint, Signer, Verifier
from skyguard.tlog.errors import BadLogInput
from skyguard.tlog.hashing import HASH_SIZE, hash_leaf
from skyguard.tlog.tree import NODE_SPAN, CompactRange, fold_perfect, range_root

log = logging.getLogger("skyguard.tlog")

META_FILE = "log.json"
LEAVES_FILE = "leaves.bin"
NODES_FILE = "nodes8.bin"
CHECKPOINTS_FILE = "checkpoints.log"
TORN_DIR = "torn"
FORMAT_VERSION = 1
DEFAULT_SEGMENT_ENTRIES = 1 << 16   # ~65k entries (~10-20 MiB): bounds the rescan on open
DEFAULT_CHECKPOINT_EVERY = 10_000   # entries between checkpoints (a signature costs ~40 us)
DEFAULT_CHECKPOINT_INTERVAL = 10.0  # seconds between checkpoints while entries are pending
MAX_GROUP_ENTRIES = 1 << 16         # entries per group commit: bounds latency and memory
_SEGMENT_RE = re.compile(r"^seg-(\d{20})\.log$")


def segment_name(first_index: int) -> str:
    return f"seg-{first_index:020d}.log"


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def leaf_hashes_of(payloads: Iterable[bytes]) -> list[bytes]:
    return [hash_leaf(p) for p in payloads]


def _read_meta(directory: Path) -> dict:
    path = directory / META_FILE
    if not path.exists():
        raise LogError(f"no signed log at {directory} (no {META_FILE}); the daemon creates it "
                       f"on first start, or pass --log-dir to point at another one")
    try:
        meta = json.loads(path.read_text())
        seg = int(meta["segment_entries"])
        origin, vkey = str(meta["origin"]), str(meta["verifier_key"])
    except (ValueError, KeyError, TypeError):
        raise LogError(f"{path} is damaged; it names the log's origin and key") from None
    if meta.get("version") != FORMAT_VERSION or seg < NODE_SPAN or seg % NODE_SPAN:
        raise LogError(f"{path}: unsupported log format {meta.get('version')!r}")
    return {"origin": origin, "verifier_key": vkey, "segment_entries": seg}


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
        self.segments = _list_segments(self.directory, self.segment_entries)
        self._tail_scan: records.Scan | None = None
        self._last_scan: tuple[int, records.Scan] | None = None

    # --- entries -----------------------------------------------------------------------------
    def segment_path(self, first: int) -> Path:
        return self.directory / segment_name(first)

    def scan_segment(self, first: int) -> records.Scan:
        # One sealed segment is kept: `entry()` calls for nearby indexes then cost one read.
        if self._last_scan is None or self._last_scan[0] != first:
            scan = records.scan(self.segment_path(first).read_bytes(), first,
                                self.segment_entries)
            self._last_scan = (first, scan)
        return self._last_scan[1]

    def tail(self) -> tuple[int, records.Scan]:
        """(first index, scan) of the last segment, read once per reader."""
        if not self.segments:
            return 0, records.Scan([], 0, None)
        if self._tail_scan is None:
            self._tail_scan = self.scan_segment(self.segments[-1])
        return self.segments[-1], self._tail_scan

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
                raise LogError(f"{segment_name(first)}: {scan.problem}; run `skyguard log verify`")

    def entry(self, index: int) -> bytes:
        if not 0 <= index < self.size:
            raise BadLogInput(f"no entry {index}: the log has {self.size} entries")
        first = index - index % self.segment_entries
        scan = self.tail()[1] if first == self.segments[-1] else self.scan_segment(first)
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
                tail.extend(leaf_hashes_of(self.scan_segment(seg).payloads))
        tail.extend(leaf_hashes_of(scan.payloads))
        return StoredSource(_map(leaves_path, cached * HASH_SIZE),
                            _map(nodes_path, cached // NODE_SPAN * HASH_SIZE), cached, cached, tail)

    # --- checkpoints -------------------------------------------------------------------------
    def checkpoint_notes(self) -> list[str]:
        path = self.directory / CHECKPOINTS_FILE
        if not path.exists():
            return []
        return [p.decode("utf-8") for p in records.scan(path.read_bytes(), 0).payloads]

    def latest_checkpoint_note(self) -> str:
        notes = self.checkpoint_notes()
        if not notes:
            raise LogError(f"the log at {self.directory} has no checkpoint yet; the daemon writes "
                           f"one every few seconds while entries arrive and at shutdown")
        return notes[-1]


class LogWriter:
    """Appends entries durably, in group commits by one writer thread; signs checkpoints.

    Thread-safe: any thread may call append/append_batch/submit. Only the writer thread touches
    the files. After an I/O error every pending and later append fails (no silent acks).
    """

    def __init__(self, directory: Path | str, signer: Signer, *, origin: str | None = None,
                 checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                 checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
                 segment_entries: int = DEFAULT_SEGMENT_ENTRIES):
        self.directory = Path(directory)
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self._queue: queue.Queue = queue.Queue()
        self._failure: LogError | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._open(origin, segment_entries)
        self._thread = threading.Thread(target=self._run, name="skyguard-tlog-writer", daemon=True)
        self._thread.start()

    # --- opening and recovery ----------------------------------------------------------------
    def _open(self, origin: str | None, segment_entries: int) -> None:
        d = self.directory
        created = not (d / META_FILE).exists()
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if created:
            if segment_entries < NODE_SPAN or segment_entries % NODE_SPAN:
                raise BadLogInput(f"segment_entries must be a multiple of {NODE_SPAN}")
            meta = {"version": FORMAT_VERSION, "origin": origin or self.signer.name,
                    "verifier_key": self.signer.verifier.vkey(), "segment_entries": segment_entries}
            fsutil.write_private(d / META_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        meta = _read_meta(d)
        recorded = Verifier.from_vkey(meta["verifier_key"])
        if (recorded.public_key == self.signer.verifier.public_key
                and recorded.name != self.signer.name):
            # Same key, another default name (the hostname changed): keep the log's key name.
            self.signer = Signer(recorded.name, self.signer._key)
        if meta["verifier_key"] != self.signer.verifier.vkey():
            raise LogError(f"the log at {d} is signed by key {meta['verifier_key']}, not by this "
                           f"host key ({self.signer.verifier.vkey()}); use the right state dir")
        self.origin = meta["origin"]
        self.segment_entries = seg = meta["segment_entries"]

        # Checkpoints first: they decide whether damage at the tail may be cut.
        self._cp_path = d / CHECKPOINTS_FILE
        cp_buf = self._cp_path.read_bytes() if self._cp_path.exists() else b""
        cp_scan = records.scan(cp_buf, 0)
        if cp_scan.problem:
            self._cut_tail(self._cp_path, cp_buf, cp_scan.end_offset, cp_scan.problem)
        self._checkpoint_count = len(cp_scan.payloads)
        self.latest_checkpoint: Checkpoint | None = None
        if cp_scan.payloads:
            note = cp_scan.payloads[-1].decode("utf-8")
            self.latest_checkpoint = Checkpoint.parse_body(self.signer.verifier.verify(note))
        covered = self.latest_checkpoint.size if self.latest_checkpoint else 0

        firsts = _list_segments(d, seg)
        if not firsts:
            firsts = [0]
        leaves_path, nodes_path = d / LEAVES_FILE, d / NODES_FILE
        leaves_len = leaves_path.stat().st_size if leaves_path.exists() else 0
        nodes_len = nodes_path.stat().st_size if nodes_path.exists() else 0
        # Rebuild the caches from the first segment they may not fully cover (normally the tail).
        rebuild_from = min(firsts[-1], leaves_len // HASH_SIZE, nodes_len // HASH_SIZE * NODE_SPAN)
        rebuild_from -= rebuild_from % seg
        tail_hashes: list[bytes] = []
        for first in firsts:
            if first < rebuild_from:
                continue
            path = d / segment_name(first)
            buf = path.read_bytes() if path.exists() else b""
            scan = records.scan(buf, first, seg)
            is_last = first == firsts[-1]
            if scan.problem:
                good_end = first + len(scan.payloads)
                if not is_last or good_end < covered or scan.problem_kind != "torn":
                    raise LogError(f"the log at {d} is damaged at index {good_end} "
                                   f"({scan.problem}) under a signed checkpoint of size "
                                   f"{covered}; refusing to append: run `skyguard log verify`")
                self._cut_tail(path, buf, scan.end_offset, scan.problem)
            elif not is_last and len(scan.payloads) != seg:
                raise LogError(f"{path} holds {len(scan.payloads)} entries, a sealed segment "
                               f"holds {seg}: run `skyguard log verify`")
            tail_hashes.extend(leaf_hashes_of(scan.payloads))
        size = rebuild_from + len(tail_hashes)
        if size < covered:
            raise LogError(f"the log at {d} has {size} entries but its latest checkpoint covers "
                           f"{covered}: it was truncated; run `skyguard log verify`")

        # Rewrite the caches from rebuild_from, then fsync, before anything is acknowledged.
        self._leaves_fd = os.open(leaves_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._nodes_fd = os.open(nodes_path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self._leaves_fd, rebuild_from * HASH_SIZE)
        os.ftruncate(self._nodes_fd, rebuild_from // NODE_SPAN * HASH_SIZE)
        os.lseek(self._leaves_fd, 0, os.SEEK_END)
        os.lseek(self._nodes_fd, 0, os.SEEK_END)
        _write_all(self._leaves_fd, b"".join(tail_hashes))
        full = len(tail_hashes) - len(tail_hashes) % NODE_SPAN
        _write_all(self._nodes_fd, b"".join(fold_perfect(tail_hashes[i:i + NODE_SPAN])
                                            for i in range(0, full, NODE_SPAN)))
        os.fsync(self._leaves_fd)
        os.fsync(self._nodes_fd)

        # The writer keeps the tail segment's leaf hashes in memory for proofs and node folds.
        self._tail_start = firsts[-1]
        self._tail = tail_hashes[self._tail_start - rebuild_from:]
        self.size = size
        self._tree = CompactRange.for_size(self.source(), size)
        if self.latest_checkpoint:
            root = range_root(self.source(), 0, covered)
            if root != self.latest_checkpoint.hash:
                raise LogError(f"the log at {d} does not match its own latest checkpoint "
                               f"(size {covered}); refusing to append: run `skyguard log verify`")
        self._segment_first = firsts[-1] if os.path.exists(d / segment_name(firsts[-1])) else None
        self._segment_fd = None
        self._segment_count = size - firsts[-1]
        if self._segment_first is not None:
            self._segment_fd = os.open(d / segment_name(firsts[-1]), os.O_WRONLY | os.O_APPEND)
        self._cp_fd = os.open(self._cp_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        fsutil.fsync_directory(d)
        self._last_checkpoint_time = time.monotonic()
        self._checkpointed_size = covered

    def _cut_tail(self, path: Path, buf: bytes, good_end: int, problem: str) -> None:
        """Move the bytes after good_end to torn/ and truncate: they were never acknowledged."""
        torn = self.directory / TORN_DIR
        torn.mkdir(mode=0o700, exist_ok=True)
        keep = torn / f"{path.name}.{good_end}.{time.time_ns()}"
        keep.write_bytes(buf[good_end:])
        fd = os.open(path, os.O_RDWR)
        try:
            os.ftruncate(fd, good_end)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsutil.fsync_directory(torn)
        log.warning("signed log %s: cut a torn tail of %d bytes at offset %d (%s); kept in %s",
                    path.name, len(buf) - good_end, good_end, problem, keep)

    def source(self) -> StoredSource:
        """Hashes of [0, size) (for proofs while the writer runs; call from one thread)."""
        cached = self._tail_start
        return StoredSource(_map(self.directory / LEAVES_FILE, cached * HASH_SIZE),
                            _map(self.directory / NODES_FILE, cached // NODE_SPAN * HASH_SIZE),
                            cached, self._tail_start, self._tail)

    # --- public API --------------------------------------------------------------------------
    def submit(self, entries: Sequence[bytes]) -> Future:
        """Queue entries; the future resolves to the first one's index once all are durable."""
        entries = list(entries)
        for e in entries:
            if not isinstance(e, (bytes, bytearray)) or len(e) > records.MAX_PAYLOAD:
                raise BadLogInput("log entries are bytes of at most 1 MiB (see tlog.entry())")
        future: Future = Future()
        with self._lock:
            if self._failure:
                raise self._failure
            if self._closed:
                raise LogError("the signed log is closed")
            self._queue.put(("append", entries, future))
        return future

    def append_batch(self, entries: Sequence[bytes]) -> int:
        return self.submit(entries).result()

    def append(self, entry: bytes) -> int:
        return self.submit([entry]).result()

    def checkpoint(self) -> str:
        """Sign and store a checkpoint of everything durable now; returns the note."""
        future: Future = Future()
        with self._lock:
            if self._failure:
                raise self._failure
            self._queue.put(("checkpoint", None, future))
        return future.result()

    def head(self) -> dict:
        """What `skyguard status` and the metrics show: size, what the last checkpoint covers,
        how old it is, and the bytes on disk."""
        return {"size": self.size, "checkpointed_size": self._checkpointed_size,
                "checkpoint_age_s": round(time.monotonic() - self._last_checkpoint_time, 3),
                "origin": self.origin,
                "bytes": sum(p.stat().st_size for p in self.directory.glob("*") if p.is_file())}

    def latest_note(self) -> str | None:
        notes = LogReader(self.directory).checkpoint_notes()
        return notes[-1] if notes else None

    def close(self) -> None:
        """Commit what is queued, write a final checkpoint, stop the thread, close files."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(("stop", None, None))
        self._thread.join()
        for fd in (self._segment_fd, self._leaves_fd, self._nodes_fd, self._cp_fd):
            if fd is not None:
                os.close(fd)
        self._segment_fd = None
        if self._failure:
            raise self._failure

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- the writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            pending = self.size > self._checkpointed_size
            timeout = None
            if pending:
                timeout = max(0.0, self._last_checkpoint_time + self.checkpoint_interval
                              - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            group, futures, checkpoint_requests = [], [], []
            while item is not None:
                kind, entries, future = item
                if kind == "stop":
                    stopping = True
                elif kind == "checkpoint":
                    checkpoint_requests.append(future)
                else:
                    futures.append((future, self.size + len(group), len(entries)))
                    group.extend(entries)
                if len(group) >= MAX_GROUP_ENTRIES:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            if self._failure:
                self._fail_all(futures, checkpoint_requests)
                continue
            try:
                if group:
                    self._commit(group)
                for future, first, _count in futures:
                    future.set_result(first)
                futures = []
                due = (self.size - self._checkpointed_size >= self.checkpoint_every
                       or time.monotonic() - self._last_checkpoint_time >= self.checkpoint_interval)
                unsigned = self.size > self._checkpointed_size or self.latest_checkpoint is None
                if checkpoint_requests or (unsigned and (stopping or due)):
                    note = self._write_checkpoint()
                    for future in checkpoint_requests:
                        future.set_result(note)
                    checkpoint_requests = []
            except OSError as e:
                # Loud and final: after a failed write or fsync nothing more is acknowledged.
                self._failure = LogError(f"the signed log at {self.directory} failed to write "
                                         f"({e.strerror or e}); no entry is acknowledged any more: "
                                         f"fix the disk and restart")
                log.critical("%s", self._failure)
                self._fail_all(futures, checkpoint_requests)
        # Fail whatever arrived after stop.
        while True:
            try:
                _kind, _entries, future = self._queue.get_nowait()
            except queue.Empty:
                break
            if future:
                future.set_exception(LogError("the signed log is closed"))

    def _fail_all(self, futures, checkpoint_requests) -> None:
        for future, *_ in futures:
            future.set_exception(self._failure)
        for future in checkpoint_requests:
            future.set_exception(self._failure)

    def _commit(self, group: list[bytes]) -> None:
        seg = self.segment_entries
        position = 0
        tree = self._tree
        frame = records.frame
        while position < len(group):
            if self._segment_fd is None or self._segment_count == seg:
                self._start_segment()
            room = seg - self._segment_count
            chunk = group[position:position + room]
            first = self.size
            hashes = [hash_leaf(e) for e in chunk]
            data = b"".join([frame(first + i, e) for i, e in enumerate(chunk)])
            _write_all(self._segment_fd, data)
            _write_all(self._leaves_fd, b"".join(hashes))
            tail = self._tail
            before = len(tail)
            tail.extend(hashes)
            done_nodes = before // NODE_SPAN
            full_nodes = len(tail) // NODE_SPAN
            if full_nodes > done_nodes:
                _write_all(self._nodes_fd, b"".join(
                    fold_perfect(tail[i * NODE_SPAN:(i + 1) * NODE_SPAN])
                    for i in range(done_nodes, full_nodes)))
            # Only the segment must be durable to acknowledge: the caches of the tail segment are
            # rebuilt from it on open, and are fsynced when the segment is sealed.
            os.fdatasync(self._segment_fd)
            for h in hashes:
                tree.append(h)
            self.size += len(chunk)
            self._segment_count += len(chunk)
            position += len(chunk)

    def _start_segment(self) -> None:
        if self._segment_fd is not None:
            # Sealing: recovery trusts the caches for every segment before the last one.
            os.fsync(self._leaves_fd)
            os.fsync(self._nodes_fd)
            os.close(self._segment_fd)
        first = self.size
        path = self.directory / segment_name(first)
        self._segment_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        # The new file's name must be durable before any entry in it is acknowledged.
        fsutil.fsync_directory(self.directory)
        self._segment_first = first
        self._segment_count = 0
        self._tail_start = first
        self._tail = []

    def _write_checkpoint(self) -> str:
        checkpoint = Checkpoint(self.origin, self.size, self._tree.root())
        note = checkpoint.sign(self.signer)
        _write_all(self._cp_fd, records.frame(self._checkpoint_count, note.encode("utf-8")))
        os.fdatasync(self._cp_fd)
        self._checkpoint_count += 1
        self._checkpointed_size = self.size
        self._last_checkpoint_time = time.monotonic()
        self.latest_checkpoint = checkpoint
        return note
