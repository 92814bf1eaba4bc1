"""Opening the signed log at the daemon's start within a bound: a log whose disk does not answer (a
hung device, a frozen filesystem) fails `skyguard up` once the disk has not answered for the log's
stall bound (intake.STALL_AFTER_S, the bound after which a running log refuses entries), naming
the log, before anything is started or attached, instead of holding the start for ever unsaid.

Opening writes (the tail's caches rebuilt, a torn tail cut), and a write to a frozen filesystem
waits in the kernel: that thread cannot be cancelled, and its process does not end, nor does
whoever waits for it (a shell, systemd) learn its exit status, until the write returns. So the
disk is asked first by a throwaway child process (PROBE: the directory's mode set again and the
directory fsynced, a write that changes nothing but its ctime, and that waits as the log's own
writes would, on a frozen filesystem and on a hung device alike); a child that has not finished
within the bound is killed (it ends once the disk answers, holding nothing meanwhile) and the start
fails at once, this process having nothing on that disk. Only then is the log opened, in a daemon
thread of its own, the disk asked again each bound while that runs: a disk that stops answering in
the middle fails the start the same way, but this process then ends only once the disk answers
(the daemon lets go of its run and pin dirs first: daemon.py run), and should the open finish
after all, what it opened is closed.

A log another process holds (holder.py: a previous daemon that `down` left waiting on this disk)
is named before the disk is asked. Not here: the log itself (store.py).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from skyguard.errors import LogError
from skyguard.tlog.errors import LogStalled
from skyguard.tlog.holder import WHY, held_refusal
from skyguard.tlog.intake import STALL_AFTER_S

log = logging.getLogger("skyguard.tlog")

PROBE = ("import os, sys\n"
         "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
         "os.fchmod(fd, os.fstat(fd).st_mode & 0o7777)\n"
         "os.fsync(fd)\n")


class _Closes(Protocol):
    def close(self) -> None: ...


Opened = TypeVar("Opened", bound=_Closes)


def open_log(directory: Path, opener: Callable[[], Opened], stall_after: float = STALL_AFTER_S) -> Opened:
    """opener() (which opens the log at `directory`: a LogWriter) once the log's disk has answered;
    LogError naming the process that holds the log, LogStalled once its disk has not answered for
    `stall_after` seconds; opener's own errors as they are."""
    held = held_refusal(directory)
    if held is not None:
        raise LogError(held)
    if not disk_answers(directory, stall_after):
        raise LogStalled(_not_answering(directory, stall_after))
    opening = _Opening(opener)
    while not opening.done.wait(stall_after):
        if not disk_answers(directory, stall_after):
            opening.abandon()
            raise LogStalled(_not_answering(directory, stall_after))
    return opening.result()


def disk_answers(directory: Path, bound: float = STALL_AFTER_S) -> bool:
    """Has a write to the filesystem of `directory` (or of its nearest existing parent) returned
    within `bound` seconds? Asked from a child process (PROBE); a write that fails has answered."""
    target = Path(directory)
    while not target.exists() and target != target.parent:  # a stat: it answers on a frozen filesystem
        target = target.parent
    child = subprocess.Popen([sys.executable, "-I", "-S", "-c", PROBE, str(target)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # nothing it holds outlives us
    try:
        child.wait(bound)
    except subprocess.TimeoutExpired:
        child.kill()  # it ends once its write returns
        return False
    return True


def _not_answering(directory: Path, bound: float) -> str:
    return (f"the signed log at {directory}: its disk does not answer ({WHY}; waited {bound:g} s); "
            f"nothing was started or attached (programs an earlier daemon left, if any, keep enforcing "
            f"its last policy): start skyguard again once the disk answers")


class _Opening(Generic[Opened]):
    """opener() in a daemon thread: interpreter exit does not wait for it (it may be in the kernel).
    Abandoned, whatever it opens is closed, now or when it returns."""

    def __init__(self, opener: Callable[[], Opened]):
        self._opener = opener
        self._lock = threading.Lock()
        self.done = threading.Event()
        self._abandoned = False
        self._opened: Opened | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, name="skyguard-tlog-open", daemon=True).start()

    def _run(self) -> None:
        try:
            opened = self._opener()
        except BaseException as e:  # noqa: BLE001 - handed to the caller as it is
            self._error = e
            self.done.set()
            return
        with self._lock:
            self._opened, unwanted = opened, self._abandoned
            self.done.set()
        if unwanted:
            _close_quietly(opened)

    def abandon(self) -> None:
        with self._lock:
            self._abandoned, opened = True, self._opened
        if opened is not None:  # it finished meanwhile: closed off this thread (its disk may not answer)
            threading.Thread(target=_close_quietly, args=(opened,), name="skyguard-tlog-open", daemon=True).start()

    def result(self) -> Opened:
        if self._error is not None:
            raise self._error
        assert self._opened is not None
        return self._opened


def _close_quietly(opened: _Closes) -> None:
    try:
        opened.close()
    except Exception as e:  # noqa: BLE001 - nobody waits for it; said in the host's log
        log.error("the signed log opened after the start gave up on it did not close: %s", e)
