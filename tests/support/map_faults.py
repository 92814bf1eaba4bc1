"""A refusal of eBPF map deletions, injected into a real `skyguard up` where the kernel cannot be
made to refuse on demand (no BPF LSM nor kprobe override on the test machines): bcc's delete of
a key that carries a generation (`gen`) fails while the file named by SKYGUARD_TEST_MAP_FAULT
holds a mode, and works as usual otherwise (no file, or empty). Modes:

- "refuse": as bcc reports a refusal of the kernel's (errno EPERM, then KeyError)
- "raise": an OSError (EPERM) out of the delete, as a wrapper that raises on errors would

The daemon runs it first: `python -c "import support.map_faults; ..." up ...` (RunningDaemon's
`preload`). Only deletions are affected: writing a new generation and the flip work.
"""

from __future__ import annotations

import ctypes
import errno
import os

from bcc import table

FAULT_FILE = "SKYGUARD_TEST_MAP_FAULT"
_delete = table.TableBase.__delitem__


def _mode() -> str:
    path = os.environ.get(FAULT_FILE)
    if not path:
        return ""
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def _faulty_delete(self, key):
    mode = _mode() if hasattr(key, "gen") else ""
    if mode == "refuse":
        ctypes.set_errno(errno.EPERM)
        raise KeyError(key)
    if mode == "raise":
        raise OSError(errno.EPERM, "Operation not permitted (injected by tests/support/map_faults.py)")
    return _delete(self, key)


table.TableBase.__delitem__ = _faulty_delete  # type: ignore[method-assign]
