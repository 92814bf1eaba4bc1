"""A disk that stalls on demand, for tests of what a part does while its state cannot be written: a
small ext4 image mounted on a loop device, frozen with fsfreeze (every write to it then waits in the
kernel until it is thawed, as on a hung disk) and thawed again. No monkeypatching: the part's own
writes block, in whichever thread makes them.

    with FrozenDisk(tmp / "slow-disk") as disk:    # mounted at disk.path
        ...part with its state under disk.path...
        disk.freeze()
        while not blocked_in_the_kernel(): ...     # a write of the part waits now
        disk.thaw()

A folder that exists already is mounted over (what it holds is hidden until the block is left).
Leaving the block thaws and unmounts (stop the part that uses it first, inside the block); a
safety timer thaws it anyway after SAFETY seconds, so a failing test never leaves a frozen
filesystem behind. Not a slow disk (writes do not trickle): a
stopped one.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

SAFETY = 180.0  # seconds after which the disk is thawed whatever the test does; a bound, not a timing


class FrozenDisk:
    def __init__(self, path: Path, size: str = "64M"):
        self.path, self.image, self.size = path, path.with_name(path.name + ".img"), size
        self._frozen = threading.Event()
        self._lock = threading.Lock()
        self._safety = threading.Timer(SAFETY, self.thaw)
        self._safety.daemon = True

    def __enter__(self) -> FrozenDisk:
        self.path.mkdir(mode=0o700, exist_ok=True)
        subprocess.run(["truncate", "-s", self.size, str(self.image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", str(self.image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(self.image), str(self.path)], check=True)
        self.path.chmod(0o700)
        self._safety.start()
        return self

    def freeze(self) -> None:
        with self._lock:
            subprocess.run(["fsfreeze", "-f", str(self.path)], check=True)
            self._frozen.set()

    def thaw(self) -> None:
        with self._lock:
            if self._frozen.is_set():
                subprocess.run(["fsfreeze", "-u", str(self.path)], check=False)
                self._frozen.clear()

    @property
    def frozen(self) -> bool:
        return self._frozen.is_set()

    def __exit__(self, *exc) -> None:
        """Thaw and unmount: stop the part using the disk before leaving the block."""
        self.thaw()
        self._safety.cancel()
        subprocess.run(["umount", str(self.path)], check=False)


def blocked_in_the_kernel(pid: int | str = "self") -> bool:
    """Some thread of process `pid` (this one by default) waits uninterruptibly (state D): a
    write to the frozen disk."""
    return threads_blocked_in_the_kernel(pid) > 0


def threads_blocked_in_the_kernel(pid: int | str = "self") -> int:
    """How many threads of process `pid` (this one by default) wait uninterruptibly (state D)."""
    blocked = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:  # the process is gone
        return 0
    for task in tasks:
        try:
            if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "D":
                blocked += 1
        except OSError:
            continue
    return blocked
