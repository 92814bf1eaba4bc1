"""Who holds a signed log (the writer's lock on its directory, store.py) and whether that process
waits on the log's disk, read from /proc without touching the log: it answers while the disk does
not. `skyguard down` returns while the log's disk does not answer (store.py close), and the old
process keeps the log until its write returns; `up`, `down` and `status` name it with this.

Waiting means a thread of the holder sleeps uninterruptibly (state D) in a call on a file of the
log's filesystem (the syscall's first argument, a descriptor, checked in /proc/PID/task/TID), so a
daemon that merely reads a slow disk elsewhere is not taken for one stuck on its log. Not here:
taking the lock (store.py), bounding the start (opening.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

LOCKS = Path("/proc/locks")
WHY = "a write there has not returned: a hung or frozen disk, see dmesg"


@dataclass(frozen=True)
class LogHolder:
    pid: int
    skyguard: bool   # its command line runs skyguard (said without the command line: it may hold secrets)
    waiting: bool    # one of its threads waits in the kernel on the log's filesystem

    @property
    def who(self) -> str:
        """How messages name a holder that waits on the log's disk."""
        return (f"the previous skyguard daemon's process (pid {self.pid})" if self.skyguard
                else f"process {self.pid}")

    def waits_on(self, directory: Path) -> str:
        """'is still waiting on the log's disk at D (why)', to follow who (or 'its process (pid P)')."""
        return f"is still waiting on the log's disk at {directory} ({WHY})"


def log_holder(directory: Path) -> LogHolder | None:
    """The process that holds the lock of the log at `directory` (its flock on the directory), or
    None: nobody holds it, there is no such directory, or the holder has just let go."""
    try:
        st = os.stat(directory)
        locks = LOCKS.read_text()
    except OSError:
        return None
    wanted = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in locks.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":  # a waiter's line reads "N: -> FLOCK ..."
            continue
        major, minor, inode = fields[5].split(":")
        if (int(major, 16), int(minor, 16), int(inode)) == wanted:
            pid = int(fields[4])
            return LogHolder(pid, b"skyguard" in _command_line(pid), _waits_on_device(pid, st.st_dev))
    return None


def _command_line(pid: int) -> bytes:
    """The command line of `pid`, read through any of its threads (the leader's reads empty once its
    main thread has exited and another still waits in the kernel)."""
    try:
        tasks = sorted(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return b""
    for task in tasks:
        try:
            line = (task / "cmdline").read_bytes()
        except OSError:
            continue
        if line:
            return line
    return b""


def _waits_on_device(pid: int, device: int) -> bool:
    """Does a thread of `pid` sleep uninterruptibly in a call on a descriptor of a file on `device`?"""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] != "D":
                continue
            call = (task / "syscall").read_text().split()  # "NR ARG0 ... SP PC", "running" or "-1 SP PC"
            if len(call) < 3 or call[0] == "-1":
                continue
            # The thread's own descriptor table: the leader's is gone once its main thread has exited.
            if os.stat(task / "fd" / str(int(call[1], 16))).st_dev == device:
                return True
        except (OSError, ValueError, IndexError):
            continue  # the thread moved on, or its first argument is no descriptor
    return False


def held_refusal(directory: Path) -> str | None:
    """Why a writer cannot open the log at `directory` now that another process holds it (who, and
    whether it waits on the log's disk), or None if nobody does."""
    holder = log_holder(directory)
    if holder is None:
        return None
    if holder.waiting:
        return (f"{holder.who} {holder.waits_on(directory)} and holds the log until it answers: "
                f"start skyguard again once the disk answers")
    what = "a skyguard process: a running daemon?" if holder.skyguard else "not skyguard"
    return f"another writer (process {holder.pid}, {what}) has the log at {directory} open; stop it first"
