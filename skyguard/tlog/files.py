"""The one way the log's readers open a file of a log directory: only a regular file.

Whoever can write the log directory can put a directory, a FIFO or a dangling link where a
segment (or head.bin, checkpoints.log, a cache) should be. A FIFO would block every read
forever, a directory cannot be read: both become an OSError whose reason says what is there,
for the caller to report in one line naming the file. Not here: what the bytes mean.
"""

from __future__ import annotations

from skyguard.fsutil import open_regular, read_regular_file

__all__ = ["open_regular", "os_reason", "read_regular_file"]  # open_regular, read_regular_file: fsutil's


def os_reason(e: OSError) -> str:
    """'no such file or directory', 'is a directory': what the OS said, to follow a colon."""
    text = e.strerror or str(e)
    return text[:1].lower() + text[1:]
