"""How the log's readers report a file of a log directory they could not read.

Whoever can write the log directory can put a directory, a FIFO or a dangling link where a
segment (or head.bin, checkpoints.log, a cache) should be. The readers open files only with
fsutil.open_regular / read_regular_file (a FIFO would block every read forever, a directory
cannot be read): both become an OSError whose reason (os_reason) the caller reports in one line
naming the file. The writer reads the files it opens with read_log_file. Not here: what the
bytes mean.
"""

from __future__ import annotations

from pathlib import Path

from skyguard.errors import LogError
from skyguard.fsutil import read_regular_file


def os_reason(e: OSError) -> str:
    """'no such file or directory', 'is a directory': what the OS said, to follow a colon."""
    text = e.strerror or str(e)
    return text[:1].lower() + text[1:]


def read_log_file(path: Path) -> bytes:
    """The bytes of a file of the log directory (b"" when there is none); LogError naming it when it
    is not a regular file (a FIFO is refused, never waited on: the writer opening the log at the
    daemon's start would hang) or cannot be read."""
    try:
        return read_regular_file(path)
    except FileNotFoundError:
        return b""
    except OSError as e:
        raise LogError(f"cannot read {path}: {os_reason(e)} (skyguard writes only regular files there; "
                       f"move it away, then run `skyguard log verify`)") from None
