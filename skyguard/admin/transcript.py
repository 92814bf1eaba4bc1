"""A session recording's file, written behind by a thread of its own, never on the event loop.

Every SSH and console session of the daemon relays on one event loop; a write that waits on the
disk (a hung or frozen disk, a full journal) would stop all of them. So a session only queues what
it records (`write` never blocks), and the transcript's own thread hands it to the kernel at once,
in order, with plain write(2)s: still written through (a killed proxy loses at most what was
queued in that instant, not what the kernel had), without an fsync per event (close() fsyncs).
The SHA-256 is taken of exactly the bytes the kernel accepted, so the end-of-session hash is the
file's whatever happened.

The queue is bounded. Past PAUSE_AT bytes queued the transcript is `behind`: its session stops
reading either side (nothing more comes in to record) until the thread brings it down to
RESUME_AT, when `notify` is called (from the thread: see on_loop). How long a session may stay
paused, and what it tells the operator, is the session's decision (admin/session.py,
console/session.py): it ends the session, fail closed. A write past MAX_QUEUED bytes (a session
that did not pause) or after a failed write raises RecordingStalled / RecordingError: an event
that cannot be recorded is never relayed. ClosingRecords keeps a part's records still being closed
(their last bytes written, fsynced, hashed) for its stop() and its backlog metric. Not the
transcript's format (recording.py, console/recording.py), not the session archive.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from skyguard.errors import AdminError

log = logging.getLogger("skyguard.admin")

# Bytes queued for a transcript, not yet with the kernel. A session pauses at PAUSE_AT (so what
# reached the operator or the VM ahead of its record is at most this, plus one SSH packet or RFB
# message), resumes at RESUME_AT; MAX_QUEUED bounds the memory of one session's queue whatever
# happens, except that one event alone is always taken (a full-screen RFB update at 4 bytes a
# pixel is 8 MiB at 1920x1080: the session already holds it in memory). Trade-off: a higher
# PAUSE_AT rides out longer disk hiccups without pausing, and lets more reach the operator before
# it is on disk.
PAUSE_AT = 256 * 1024
RESUME_AT = 64 * 1024
MAX_QUEUED = 16 * 1024 * 1024


class RecordingError(AdminError):
    """A session's recording cannot take an event: its file could not be written. `result` is what
    the session record says when the session is ended for it."""

    result = "recording_failed"


class RecordingStalled(RecordingError):
    """A session's recording is not keeping up: its writer is stuck or too slow (a stalled disk)."""

    result = "recording_stalled"


def on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> Callable[[], None]:
    """A `notify` for Transcript that runs `callback` on `loop` (a closed loop: nothing to tell)."""
    def notify() -> None:
        try:
            loop.call_soon_threadsafe(callback)
        except RuntimeError:
            pass
    return notify


class Transcript:
    """A new file (mode 0600) and the thread that writes it. `write` from any thread (in practice
    the event loop, and a worker for the last events); `close` from a worker thread: it waits for
    the queue to be written. `notify()`: called from the writer thread when a transcript that was
    behind has caught up (RESUME_AT) or a write failed; it must not block."""

    def __init__(self, path: Path, notify: Callable[[], None] | None = None):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        # Held until closed, or until this process has ended (a write the kernel holds on a stalled
        # disk keeps it past `skyguard down`): another process's recovery waits for it (recording.py).
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        self._notify = notify
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: list[bytes] = []
        self._queued = 0  # bytes in _queue and in the thread's hands, not yet written
        self._behind = False  # past PAUSE_AT, not yet back at RESUME_AT
        self._closing = False
        self.error: OSError | None = None  # the write that failed; nothing is written after it
        self.written = 0
        self._digest = hashlib.sha256()  # of the bytes written, in order (the writer thread's)
        self._thread = threading.Thread(target=self._run, name=f"transcript {path.name}", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Bytes recorded but not yet handed to the kernel (the backlog)."""
        return self._queued

    @property
    def behind(self) -> bool:
        """The writer is PAUSE_AT bytes behind and has not caught up to RESUME_AT since."""
        return self._behind

    def write(self, data: bytes) -> None:
        """Queue `data` behind what was queued before. Never blocks on the disk. RecordingError
        once a write failed; RecordingStalled when the queue would pass MAX_QUEUED."""
        if not data:
            return
        with self._lock:
            if self.error is not None:
                raise RecordingError(f"the transcript {self.path} could not be written: "
                                     f"{self.error.strerror or self.error}")
            if self._closing:
                raise RecordingError(f"the transcript {self.path} is closed")
            if self._queued and self._queued + len(data) > MAX_QUEUED:  # (one event alone always fits)
                raise RecordingStalled(f"the transcript {self.path} is {self._queued} bytes behind: "
                                       "the disk under the session records is not keeping up")
            self._queue.append(data)
            self._queued += len(data)
            if self._queued >= PAUSE_AT:
                self._behind = True
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return  # closing, and everything queued is written
                chunk = self._queue[0] if len(self._queue) == 1 else b"".join(self._queue)
                self._queue.clear()
            done, error = 0, None
            view = memoryview(chunk)
            try:
                while done < len(chunk):  # a short write: the rest again (the next one says why)
                    n = os.write(self._fd, view[done:])
                    self._digest.update(view[done:done + n])
                    done += n
            except OSError as e:
                error = e
            tell = False
            with self._lock:
                self.written += done
                self._queued -= len(chunk)
                if error is not None:
                    self.error = error
                    self._queue.clear()  # never written: order would be broken past the gap
                    self._queued = 0
                    tell = True
                elif self._behind and self._queued <= RESUME_AT:
                    self._behind = False
                    tell = True
            if error is not None:
                log.error("the transcript %s could not be written: %s", self.path, error.strerror or error)
            if tell and self._notify is not None:
                self._notify()
            if error is not None:
                return

    def close(self) -> str:
        """Wait until everything queued is written (or a write failed), fsync and close; the
        SHA-256 of exactly what was written. Blocks on the disk: call off the event loop."""
        with self._lock:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        try:
            if self.error is None:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
        return self._digest.hexdigest()


class Queued(Protocol):
    """A session's recording as ClosingRecords sees it (SessionRecording, VncRecording)."""

    id: str

    @property
    def queued(self) -> int: ...


class ClosingRecords:
    """A part's session records being closed off the loop (the transcript's queue written, fsync,
    hash, the end logged: a stalled disk holds them, not the loop). On the loop."""

    def __init__(self):
        self._tasks: dict[asyncio.Task, Queued] = {}  # -> the recording (queued bytes: `backlog`)

    def keep(self, closing: Coroutine, recording: Queued) -> None:
        task = asyncio.get_running_loop().create_task(closing)
        self._tasks[task] = recording
        task.add_done_callback(lambda done: self._tasks.pop(done, None))

    async def wait(self, timeout: float) -> list[str]:
        """Until every record kept so far is closed (a part's stop(): ended sessions on disk), for
        at most `timeout` seconds: a disk that does not answer must not hold up the shutdown
        (programs detached, the daemon restarted). The ids of the records still not closed then
        (they go on closing while the process lives; else the next start's recovery closes them)."""
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        return sorted(self._tasks[task].id for task in tasks if not task.done() and task in self._tasks)

    def backlog(self, open_recordings: Iterable[Queued]) -> int:
        """Bytes not yet written of `open_recordings` and of the records closing. Safe from the
        exporter's thread at scrape time (list() copies the dict's values in one step)."""
        return sum(recording.queued for recording in set(open_recordings) | set(list(self._tasks.values())))


def report_left_open(sessions: list[str], waited: float, part: str, record: Callable[..., None]) -> None:
    """A part stopped with `sessions`' records still closing (ClosingRecords.wait): said in the
    host's log and the decision log (`record(kind, **fields)`). Their records stay 'active' on
    disk until this process closes them or, if it ends first, the next start's recovery does
    (result interrupted, the transcript hashed as it is then)."""
    log.error("the %s part stopped with %d session record(s) not closed after %g s: the disk under the session "
              "records is not answering; left open: %s (closed when the disk answers, else at the next start, "
              "result interrupted)", part, len(sessions), waited, ", ".join(sessions))
    record("admin_session_records_left_open", part=part, sessions=sessions)


def recording_metrics(registry: CollectorRegistry, prefix: str, sessions: str) -> tuple[Gauge, Counter, Gauge]:
    """A proxy's recording gauges (paused sessions, pauses, backlog bytes) under `prefix`
    (skyguard_admin_ssh, skyguard_console). Sessions ended because their recording stalled or
    failed count in the proxy's sessions_total (results recording_stalled, recording_failed)."""
    paused = Gauge(f"{prefix}_recording_paused_sessions", f"{sessions} sessions paused now because their "
                   "recording's writer is behind (the disk under the session records is slow or stalled)",
                   registry=registry)
    pauses = Counter(f"{prefix}_recording_pauses_total",
                     f"Times a {sessions} session was paused because its recording's writer fell behind", registry=registry)
    backlog = Gauge(f"{prefix}_recording_backlog_bytes",
                    f"Bytes of {sessions} session recordings not yet written to disk", registry=registry)
    return paused, pauses, backlog
