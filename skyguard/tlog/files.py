"""The one way the log's readers open a file of a log directory: only a regular file.

Whoever can write the log directory can put a directory, a FIFO or a dangling link where a
segment (or head.bin, checkpoints.log, a cache) should be. A FIFO would block every read
forever, a directory cannot be read: both become an OSError whose reason says what is there,
for the caller to report in one line naming the file. Not here: what the bytes mean.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO


def open_regular(path: Path) -> BinaryIO:
    """path opened for reading, if it is a regular file: OSError otherwise (never blocks)."""
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


def os_reason(e: OSError) -> str:
    """'no such file or directory', 'is a directory': what the OS said, to follow a colon."""
    text = e.strerror or str(e)
    return text[:1].lower() + text[1:]
