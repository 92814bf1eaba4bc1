"""How the log's readers report a file of a log directory they could not read.

Whoever can write the log directory can put a directory, a FIFO or a dangling link where a
segment (or head.bin, checkpoints.log, a cache) should be. The readers open files only with
fsutil.open_regular / read_regular_file (a FIFO would block every read forever, a directory
cannot be read): both become an OSError whose reason (os_reason) the caller reports in one line
naming the file. Not here: what the bytes mean.
"""

from __future__ import annotations


def os_reason(e: OSError) -> str:
    """'no such file or directory', 'is a directory': what the OS said, to follow a colon."""
    text = e.strerror or str(e)
    return text[:1].lower() + text[1:]
