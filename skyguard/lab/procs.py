"""Processes the lab starts and stops (the internet servers, QEMU guests, whatever runs in a lab
namespace), in one place: read a command line, tell a live process from a gone or zombie one, and
stop a set of pids (SIGTERM, then SIGKILL after a grace period)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except OSError:
        return []


def alive(pid: int) -> bool:
    """True while `pid` runs. A zombie counts as gone, and is reaped if it is our child."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state != "Z":
        return True
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return False


def stop(pids, grace: float = STOP_GRACE) -> None:
    """SIGTERM every pid, SIGKILL whatever is left after `grace`, and wait (boundedly) until the
    killed ones are gone, so what they held (a tap, a namespace) is released on return."""
    pending = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            pending.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if alive(p)]
        time.sleep(0.05)
    for pid in pending:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    while pending and time.monotonic() < deadline + 5:
        pending = [p for p in pending if alive(p)]
        time.sleep(0.05)
