"""The durable, append-only writer of the signed log: group commit, signed heads, recovery.

What an acknowledgement means, and what a crash can leave (the design):
- An entry is acknowledged only once (1) its record is fsynced in its segment (and the directory,
  for a new segment file) and (2) a signed checkpoint covering it is durable in head.bin
  (head.py). The writer puts at most MAX_UNPROVEN entries on disk before signing such a head. So
  at every instant every acknowledged entry is under a durable signature, and at most
  MAX_UNPROVEN entries, none of them acknowledged, lie beyond the last one.
- A new log gets a signed checkpoint of size 0 before its first entry: a non-empty log always
  has a signature somewhere, and one with none has lost it.
- So the files tell a crash from a rewrite by someone without the key. A crash leaves the last
  signed checkpoint covering all but at most MAX_UNPROVEN trailing entries. Entries with no
  signed checkpoint at all, more than MAX_UNPROVEN beyond the last one, or damage under one, are
  not a crash. (A rollback to an earlier signed state, plus at most MAX_UNPROVEN forged entries,
  looks like a crash from the files alone: those entries are never reported as verified nor
  signed, and a witness's saved checkpoint catches the rollback.)
- On open the writer signs nothing it cannot prove against its last checkpoint: entries beyond it
  are moved to torn/ and a signed entry says so (`log_recovery` when a crash explains them,
  `tamper` when it cannot). Damage under a checkpoint (an edit, a truncation, a root that does not
  match) is refused: the writer does not open (fail closed) until `skyguard log verify` has been
  read and the log moved aside.
- checkpoints.log keeps the history: a checkpoint every N entries or T seconds and at close,
  which bounds where a careful rewrite can hide and what witnesses compare.
Caches are fsynced when a segment is sealed; the last segment's are rebuilt on open.

A full filesystem (one VM's events can fill it), a disk that stalls (a write that does not
return) and a backlog past its bound are refused at the gate (intake.py), each until it is over,
without a restart; a wait for durability ends when the disk stalls, and close() gives up waiting
for a writer stalled on its disk (the final checkpoint is then not written, and the host's log
says so). A write or fsync that fails is final: after it the kernel may have dropped the pages,
and nothing more is acknowledged until a restart re-reads the files.

Not here: the layout and the reader (reader.py), full verification (verify.py), signing details
(checkpoint.py).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

from skyguard import fsutil
from skyguard.errors import LogError
from skyguard.tlog import records
from skyguard.tlog.checkpoint import MAX_TREE_SIZE, Checkpoint, Signer, Verifier
from skyguard.tlog.entries import entry
from skyguard.tlog.errors import BadLogInput, VerificationError, anew
from skyguard.tlog.files import read_log_file
from skyguard.tlog.hashing import EMPTY_ROOT, HASH_SIZE, hash_leaves
from skyguard.tlog.head import MAX_NOTE, HeadWriter, read_head
from skyguard.tlog.holder import held_refusal
from skyguard.tlog.intake import MAX_QUEUED_BYTES, MAX_QUEUED_ENTRIES, STALL_AFTER_S, Intake

# The layout and the reader live in reader.py; these names stay importable from here.
from skyguard.tlog.reader import (  # noqa: F401
    CHECKPOINTS_FILE,
    FORMAT_VERSION,
    LEAVES_FILE,
    MAX_UNPROVEN,
    META_FILE,
    NODES_FILE,
    TORN_DIR,
    LogReader,
    StoredSource,
    _list_segments,
    _map,
    _read_meta,
    leaf_hashes_of,
    segment_name,
)
from skyguard.tlog.recovery import cut_tail, scan_segments, set_aside
from skyguard.tlog.tree import NODE_LEVEL, NODE_SPAN, CompactRange, fold_perfect, range_root

log = logging.getLogger("skyguard.tlog")

DEFAULT_SEGMENT_ENTRIES = 1 << 16   # ~65k entries (~10-20 MiB): bounds the rescan on open
DEFAULT_CHECKPOINT_EVERY = 10_000   # entries between checkpoints (a signature costs ~40 us)
DEFAULT_CHECKPOINT_INTERVAL = 10.0  # seconds between checkpoints while entries are pending
MAX_GROUP_ENTRIES = 1 << 16         # entries per group commit: bounds latency and memory
WAIT_SLICE_S = 0.25                 # how often a wait for the writer looks whether it stalled


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class LogWriter:
    """Appends entries durably, in group commits by one writer thread; signs checkpoints.

    Thread-safe: any thread may call append/append_batch/submit. Only the writer thread touches
    the files. After an I/O error every pending and later append fails (no silent acks). It
    refuses entries while its filesystem is below `reserve_bytes` (LogSpaceLow), while it waits
    on its disk past `stall_after` seconds or has `max_entries` or `max_bytes` waiting
    (LogStalled): see intake.py (reserve_bytes None: its default; negative: never refuses for space).
    """

    def __init__(self, directory: Path | str, signer: Signer, *, origin: str | None = None,
                 checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                 checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
                 segment_entries: int = DEFAULT_SEGMENT_ENTRIES, reserve_bytes: int | None = None,
                 stall_after: float = STALL_AFTER_S, max_entries: int = MAX_QUEUED_ENTRIES,
                 max_bytes: int = MAX_QUEUED_BYTES):
        self.directory = Path(directory)
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self._queue: queue.Queue = queue.Queue()
        self._failure: LogError | None = None
        self._closed = False
        try:
            recovery = self._open(origin, segment_entries)
            self.intake = Intake(self.directory, reserve_bytes,
                                 lambda entries: self._queue.put(("append", entries, Future())),
                                 stall_after=stall_after, max_entries=max_entries, max_bytes=max_bytes)
        except BaseException:
            self._release_files()   # a refused log keeps no descriptor and no lock
            raise
        self._thread = threading.Thread(target=self._run, name="skyguard-tlog-writer", daemon=True)
        self._thread.start()
        if recovery is not None:
            self.append(recovery)   # what was set aside is on record before anything else

    @property
    def _lock(self) -> threading.Lock:
        return self.intake.lock

    @property
    def reserve_bytes(self) -> int:
        return self.intake.reserve_bytes

    @reserve_bytes.setter
    def reserve_bytes(self, value: int) -> None:
        self.intake.reserve_bytes = value

    # --- opening and recovery ----------------------------------------------------------------
    def _open(self, origin: str | None, segment_entries: int) -> bytes | None:
        """Open or create the log; returns the entry recording what was set aside, if any."""
        d = self.directory
        created = not (d / META_FILE).exists()
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        # One writer per log: a second one would take the first one's group in flight for a
        # crash's leftovers and set it aside. The lock goes with the process, even on SIGKILL.
        self._lock_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            # Who, and whether it waits on this disk (a daemon `down` left waiting on it: close()).
            raise LogError(held_refusal(d) or f"another writer has the log at {d} open (it has let go "
                           f"since: try again)") from None
        if created:
            if segment_entries < NODE_SPAN or segment_entries % NODE_SPAN:
                raise BadLogInput(f"segment_entries must be a multiple of {NODE_SPAN}")
            origin = origin or self.signer.name
            # Refuse now an origin no checkpoint can carry (unprintable, or too long for a slot).
            largest = Checkpoint(origin, MAX_TREE_SIZE, EMPTY_ROOT).sign(self.signer)
            if len(largest.encode("utf-8")) > MAX_NOTE:
                raise BadLogInput(f"log origin {origin[:40]!r}... is too long for a checkpoint")
            meta: dict = {"version": FORMAT_VERSION, "origin": origin,
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

        # Checkpoints first: they decide what may be cut and what must be set aside.
        self._cp_path = d / CHECKPOINTS_FILE
        cp_buf = read_log_file(self._cp_path)
        cp_scan = records.scan(cp_buf, 0)
        if cp_scan.problem:
            cut_tail(d, self._cp_path, cp_buf, cp_scan.end_offset, cp_scan.problem)
        self._checkpoint_count = len(cp_scan.payloads)
        self.latest_checkpoint: Checkpoint | None = None   # the latest in checkpoints.log
        signed = []
        if cp_scan.payloads:
            self.latest_checkpoint = self._verified(cp_scan.payloads[-1], CHECKPOINTS_FILE)
            signed.append(self.latest_checkpoint)
        head = read_head(d)
        signed += [self._verified(note.encode("utf-8"), "head.bin") for _, note in head.notes]
        covered = max((c.size for c in signed), default=0)

        segments = scan_segments(d, seg, covered)
        if segments.size < covered:
            raise LogError(f"the log at {d} has {segments.size} entries but its latest "
                           f"checkpoint covers {covered}: it was truncated; run "
                           f"`skyguard log verify`")
        recovery = None
        if segments.size > covered:
            # Nothing proves these entries: never sign them (store.py's docstring says why).
            recovery = set_aside(d, seg, segments, covered, bool(signed))
            segments = scan_segments(d, seg, covered)
        size, firsts, rebuild_from, tail_hashes = (segments.size, segments.firsts,
                                                   segments.rebuild_from, segments.tail)

        # Rewrite the caches from rebuild_from, then fsync, before anything is acknowledged.
        leaves_path, nodes_path = d / LEAVES_FILE, d / NODES_FILE
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
        for checkpoint in signed:
            if range_root(self.source(), 0, checkpoint.size) != checkpoint.hash:
                raise LogError(f"the log at {d} does not match its own signed checkpoint of "
                               f"size {checkpoint.size}; refusing to append: run "
                               f"`skyguard log verify`")
        self._segment_first = firsts[-1] if os.path.exists(d / segment_name(firsts[-1])) else None
        self._segment_fd = None
        self._segment_count = size - firsts[-1]
        if self._segment_first is not None:
            self._segment_fd = os.open(d / segment_name(firsts[-1]), os.O_WRONLY | os.O_APPEND)
        self._cp_fd = os.open(self._cp_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._head = HeadWriter(d, head.next_sequence)
        fsutil.fsync_directory(d)
        self._last_checkpoint_time = time.monotonic()
        self._checkpointed_size = self.latest_checkpoint.size if self.latest_checkpoint else 0
        self._head_note: str | None = None
        self._head_size = covered
        if not signed:
            self._write_head()   # a new log's size-0 checkpoint, before its first entry
        return recovery

    def _verified(self, payload: bytes, where: str) -> Checkpoint:
        """A checkpoint this log stored, checked with this writer's key and origin."""
        try:
            checkpoint = Checkpoint.parse_body(self.signer.verifier.verify(
                payload.decode("utf-8")))
        except (UnicodeDecodeError, BadLogInput, VerificationError) as e:
            raise LogError(f"a checkpoint in {where} of the log at {self.directory} does not "
                           f"verify ({e}); refusing to append: run `skyguard log verify`") from None
        if checkpoint.origin != self.origin:
            raise LogError(f"a checkpoint in {where} of the log at {self.directory} is for log "
                           f"{checkpoint.origin!r}; refusing to append: run `skyguard log verify`")
        return checkpoint

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
                raise anew(self._failure)
            if self._closed:
                raise LogError("the signed log is closed")
            self.intake.admit(entries)   # or raises LogSpaceLow, LogStalled (intake.py)
            self._queue.put(("append", entries, future))
        return future

    def refusal(self) -> LogError | None:
        """Why the log would refuse an entry now (a failed write, a stalled disk, no space), or None."""
        with self._lock:
            return self._failure or self.intake.refusing()

    def stalled(self) -> bool:
        """Has the writer waited on its disk past stall_after (intake.py)?"""
        return self.intake.stalled()

    def wait(self, future: Future):
        """The future's result once the writer has it; LogStalled once the writer has waited on
        its disk past stall_after (the entry is then not acknowledged; it may be written later)."""
        while True:
            try:
                return future.result(WAIT_SLICE_S)
            except TimeoutError:
                if self.intake.stalled():
                    with self._lock:
                        stalled = self.intake.behind()
                    if stalled is not None:
                        raise anew(stalled) from None

    def append_batch(self, entries: Sequence[bytes]) -> int:
        return self.wait(self.submit(entries))

    def append(self, entry: bytes) -> int:
        return self.wait(self.submit([entry]))

    def checkpoint(self) -> str:
        """Sign and store a checkpoint of everything durable now; returns the note."""
        future: Future = Future()
        with self._lock:
            if self._failure:
                raise anew(self._failure)
            self._queue.put(("checkpoint", None, future))
        return self.wait(future)

    def head(self) -> dict:
        """What `skyguard status` and the metrics show: size, what the last signed checkpoint
        (the head) covers, what checkpoints.log covers and how old its last one is, the bytes on
        disk, and the gate's facts (intake.py): free bytes and reserve, entries refused for space
        and while behind, entries waiting, how long the current write has waited, and why it
        accepts none now (None while it accepts them)."""
        on_disk = sum(p.stat().st_size for p in self.directory.glob("*") if p.is_file())  # not under the lock
        with self._lock:
            facts = self.intake.facts()
            if self._failure:
                facts["refusing"] = str(self._failure)
            return {"size": self.size, "checkpointed_size": self._head_size,
                    "history_size": self._checkpointed_size,
                    "checkpoint_age_s": round(time.monotonic() - self._last_checkpoint_time, 3),
                    "origin": self.origin, "bytes": on_disk, **facts}

    def latest_note(self) -> str | None:
        """The signed checkpoint of everything acknowledged so far (the head)."""
        return self._head_note or LogReader(self.directory).latest_checkpoint_note()

    def close(self) -> None:
        """Commit what is queued, write a final checkpoint, stop the thread, close files. Waits
        while the writer makes progress; once it has waited on its disk past stall_after, says in
        the host's log what it did not write and returns (the thread keeps its files: the kernel
        holds it in a write, and whatever it finishes is set aside at the next open unless a
        signed head covers it)."""
        with self._lock:
            stopping, self._closed = not self._closed, True
            if stopping:
                self._queue.put(("stop", None, None))
            elif self._lock_fd is None:
                return   # closed already (called again after a stall: its files are let go now)
        while self._thread.is_alive():
            self._thread.join(WAIT_SLICE_S)
            if self._thread.is_alive() and self.intake.stalled():
                log.error("the signed log at %s: its writer has waited on its disk for %.0f s; its final "
                          "checkpoint was not written, nor %d entries waiting (none of them acknowledged)",
                          self.directory, self.intake.write_wait(), self.intake.queued_entries)
                return
        self._release_files()
        if self._failure:
            raise anew(self._failure)

    def _release_files(self) -> None:
        """Close every descriptor the writer holds, the lock's last (that releases it)."""
        for name in ("_segment_fd", "_leaves_fd", "_nodes_fd", "_cp_fd", "_lock_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
        if getattr(self, "_head", None) is not None:
            self._head.close()

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
            group: list = []
            futures: list = []
            checkpoint_requests: list = []
            self.intake.writing()
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
            try:
                self._write_group(group, futures, checkpoint_requests, stopping)
            finally:
                self.intake.written(len(group), sum(map(len, group)))
        # Fail whatever arrived after stop.
        while True:
            try:
                _kind, _entries, future = self._queue.get_nowait()
            except queue.Empty:
                break
            if future:
                future.set_exception(LogError("the signed log is closed"))

    def _write_group(self, group: list[bytes], futures: list, checkpoint_requests: list, stopping: bool) -> None:
        """Commit a group, acknowledge it, write a checkpoint when due (or asked for)."""
        if self._failure:
            self._fail_all(futures, checkpoint_requests)
            return
        try:
            if group and not self.intake.room_for(group):
                self._refuse(futures, len(group))
                futures, group = [], []
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
        except Exception as e:  # noqa: BLE001 - any failure here must fail every waiter
            # Loud and final: after a failed write or fsync nothing more is acknowledged.
            self._failure = LogError(f"the signed log at {self.directory} failed to write "
                                     f"({getattr(e, 'strerror', None) or e}); no entry is "
                                     f"acknowledged any more: fix the disk and restart")
            log.critical("%s", self._failure)
            self._fail_all(futures, checkpoint_requests)

    def _fail_all(self, futures, checkpoint_requests) -> None:
        for future, *_ in futures:
            future.set_exception(anew(self._failure))
        for future in checkpoint_requests:
            future.set_exception(anew(self._failure))

    def _refuse(self, futures: list, count: int) -> None:
        """Fail a group for space, writing none of it; the first refusal of an episode is logged
        loudly and goes in the log, from the reserve (a write that fails there is final)."""
        refusal, first = self.intake.refuse_for_space(count)
        for future, *_ in futures:
            future.set_exception(anew(refusal))
        if first:
            log.critical("%s", refusal)
            self._commit([entry("log_space_low", free_bytes=self.intake.free_bytes,
                                reserve_bytes=self.reserve_bytes)])

    def _commit(self, group: list[bytes]) -> None:
        """Write the group and sign a head after every MAX_UNPROVEN entries and at its end:
        only then are they acknowledged (store.py's docstring)."""
        for start in range(0, len(group), MAX_UNPROVEN):
            self._write_entries(group[start:start + MAX_UNPROVEN])
            self._write_head()

    def _write_entries(self, group: list[bytes]) -> None:
        seg = self.segment_entries
        position = 0
        while position < len(group):
            if self._segment_fd is None or self._segment_count == seg:
                self._start_segment()
            room = seg - self._segment_count
            chunk = group[position:position + room]
            hashes = hash_leaves(chunk)
            _write_all(self._segment_fd, records.frames(self.size, chunk))
            _write_all(self._leaves_fd, b"".join(hashes))
            # The tree's merges give the roots of the NODE_SPAN-leaf subtrees this chunk completes
            # (segments start aligned to them): each interior hash is computed once.
            tree = self._tree.copy()
            nodes = tree.extend(hashes, NODE_LEVEL)
            if nodes:
                _write_all(self._nodes_fd, b"".join(nodes))
            # Of the files, only the segment must be durable before the head is signed: the
            # caches of the tail segment are rebuilt from it on open, fsynced when it is sealed.
            os.fdatasync(self._segment_fd)
            self._tree = tree
            self._tail.extend(hashes)
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

    def _write_head(self) -> str:
        """Sign the tree as it is now into head.bin, durably."""
        note = Checkpoint(self.origin, self.size, self._tree.root()).sign(self.signer)
        self._head.write(note)
        self._head_note, self._head_size = note, self.size
        return note

    def _write_checkpoint(self) -> str:
        """Append a checkpoint of everything durable to checkpoints.log (the history)."""
        checkpoint = Checkpoint(self.origin, self.size, self._tree.root())
        note = self._head_note if self._head_size == self.size and self._head_note else \
            checkpoint.sign(self.signer)
        _write_all(self._cp_fd, records.frame(self._checkpoint_count, note.encode("utf-8")))
        os.fdatasync(self._cp_fd)
        self._checkpoint_count += 1
        self._checkpointed_size = self.size
        self._last_checkpoint_time = time.monotonic()
        self.latest_checkpoint = checkpoint
        return note
