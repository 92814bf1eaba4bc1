"""Private files written durably: the one way skyguard writes a file that must never be seen
half-written or by another user (keys, sealed secrets, pinned host keys, session metadata). And
the one way to read a file of a state directory that must be a regular file (open_regular):
whoever can write the directory can put a FIFO there, and a plain open() of it waits forever.
And the one way to take a lock file shared by skyguard's processes (exclusive_lock): within a
bound, so that a holder stuck on a hung TPM does not hang its waiters too.

write_private() replaces a file atomically: a crash leaves the old file or the new one, never a
mix, and no moment exists where the data is on disk with a wider mode. Not for append-only
files (the signed log keeps its own segment files).
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def open_regular(path: Path) -> BinaryIO:
    """path opened for reading, if it is a regular file: OSError otherwise, whose strerror says
    what is there ("is a directory", "not a regular file"). Never blocks (a FIFO is opened
    non-blocking, then refused)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise OSError(errno.EISDIR, "is a directory")
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: Path) -> bytes:
    """The bytes of a regular file; OSError for anything else (see open_regular)."""
    with open_regular(path) as f:
        return f.read()


def create_private(path: Path, data: bytes) -> None:
    """Create `path` (which must not exist) with mode 0600 and `data`, flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        Path(path).unlink(missing_ok=True)
        raise
    os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data` (mode 0600): temporary file beside it, fsync, rename, fsync the
    directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    create_private(tmp, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def private_dir(path: Path) -> Path:
    """Create directory `path` (and its parents) if missing and make it mode 0700, refusing one
    that another user owns (a symlink is followed to what it names): its owner could rename,
    replace or add the files skyguard keeps there (a host key, learned DNS answers, a socket),
    whatever their own modes. Returns `path`."""
    from skyguard.errors import BadInput

    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        owner = os.fstat(fd).st_uid
        if owner != os.geteuid():
            raise BadInput(f"{path} belongs to uid {owner}, not to this process (uid {os.geteuid()}): "
                           "whoever owns it could replace what skyguard keeps there; give a directory "
                           "of your own (or chown it)")
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new name in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LockTimeout(TimeoutError):
    """exclusive_lock waited its bound: another process holds the lock (str says which, if known)."""


@contextmanager
def exclusive_lock(path: Path, wait_s: float) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created 0600 if missing) for the block, waiting at most
    `wait_s` seconds for another process to release it; LockTimeout (naming the file and the
    holder's pid and process name, never its command line) when it does not."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline, pause = time.monotonic() + wait_s, 0.01
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"{path} is held by another process ({lock_holder(fd)})"
                                      + (f" for over {wait_s:.0f} s" if wait_s > 0 else "")) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.2)
        yield
    finally:
        os.close(fd)


def lock_holder(fd: int) -> str:
    """Who holds the flock on the file open as `fd`, from /proc/locks: "pid N, NAME" (NAME from
    /proc/N/comm: a command line may hold secrets), or "unknown"."""
    st = os.fstat(fd)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
                    pid = fields[4]
                    try:
                        name = Path(f"/proc/{pid}/comm").read_text(errors="replace").strip()
                    except OSError:
                        name = "?"
                    return f"pid {pid}, {name}"
    except OSError:
        pass
    return "unknown"
