"""The content engines that look at a buffer in memory: file type by content (libmagic through
python-magic), YARA (yara-python) and regular expressions. Pure functions over bytes, safe to call
from worker threads (libmagic's handle is not thread-safe, so it sits behind a lock).

Not here: clamd (clamd.py, over a socket), deciding which engines a file needs (inspector.py).
"""

from __future__ import annotations

import gzip
import io
import threading
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any

from skyguard.content.errors import ContentError

# libmagic reads at most this much of a file to type it (its own default is 7 MiB): enough for
# every magic number and for the zip central directory of office documents in practice.
MAGIC_BYTES = 1 << 20
YARA_TIMEOUT = 10  # seconds one YARA match may take before the file is refused unscanned

_magic_lock = threading.Lock()
_magic = None


def mime_of(data: bytes) -> str:
    """The MIME type libmagic finds in the bytes themselves (never a name or a header)."""
    global _magic
    try:
        import magic
    except ImportError:
        raise ContentError("file types need python-magic and libmagic1 (scripts/setup installs them)") from None
    with _magic_lock:
        if _magic is None:
            _magic = magic.Magic(mime=True)
        try:
            return str(_magic.from_buffer(bytes(data[:MAGIC_BYTES]))).lower()
        except magic.MagicException as error:
            raise ContentError(f"libmagic could not type the content: {error}") from None


def compile_yara(paths: Sequence[str]):
    """One yara.Rules from every file (each in its own namespace, so rule names may repeat)."""
    import yara

    try:
        return yara.compile(filepaths={f"f{i}": path for i, path in enumerate(paths)})
    except yara.Error as error:  # the file changed since the policy was checked
        raise ContentError(f"YARA rules do not compile: {str(error)[:200]}") from None


def yara_match(rules, data: bytes) -> str | None:
    """The first YARA rule that matches, or None."""
    import yara

    try:
        matches = rules.match(data=bytes(data), timeout=YARA_TIMEOUT)
    except yara.TimeoutError:
        raise ContentError(f"YARA took longer than {YARA_TIMEOUT}s on the content") from None
    except yara.Error as error:
        raise ContentError(f"YARA failed on the content: {str(error)[:200]}") from None
    return matches[0].rule if matches else None


# ---- archive bounds ----------------------------------------------------------------------------
# clamd looks into archives, but past its own limits it skips what it cannot expand rather than
# flagging it (AlertExceedsMax does not catch a zip bomb in clamd 1.4): the bounds are kept here.
# Entries are decompressed as a stream and counted, never held whole (only a nested archive is,
# within the remaining budget), so a bomb costs at most `max_expanded` bytes of CPU, no memory.
MAX_ARCHIVE_DEPTH = 3
MAX_ARCHIVE_ENTRIES = 10_000
_READ = 1 << 16


def archive_problem(data: bytes, max_expanded: int, depth: int = 0, budget: list | None = None) -> str | None:
    """Why this zip or gzip file (possibly nested) is refused, or None. Not an archive: None."""
    budget = budget if budget is not None else [max_expanded, MAX_ARCHIVE_ENTRIES]
    kind = "zip" if data[:4] == b"PK\x03\x04" else "gzip" if data[:2] == b"\x1f\x8b" else None
    if kind is None:
        return None
    if depth >= MAX_ARCHIVE_DEPTH:
        return f"archives nested deeper than {MAX_ARCHIVE_DEPTH}"
    try:
        members: list[tuple[zipfile.ZipInfo | None, Any]]
        if kind == "gzip":
            members = [(None, gzip.GzipFile(fileobj=io.BytesIO(data)))]
        else:
            archive = zipfile.ZipFile(io.BytesIO(data))
            infos = archive.infolist()
            budget[1] -= len(infos)
            if budget[1] < 0:
                return f"an archive with more than {MAX_ARCHIVE_ENTRIES} entries"
            members = [(info, None) for info in infos if not info.is_dir()]
        for info, stream in members:
            if stream is None:
                if info.flag_bits & 0x1:
                    return "an encrypted archive entry cannot be inspected"
                stream = archive.open(info)
            with stream:
                head = bytearray()
                while chunk := stream.read(_READ):
                    budget[0] -= len(chunk)
                    if budget[0] < 0:
                        return f"an archive that expands past {max_expanded} bytes (decompression bomb)"
                    if len(head) < 8 or head[:4] == b"PK\x03\x04" or head[:2] == b"\x1f\x8b":
                        head += chunk  # kept only while it may be a nested archive
                if head[:4] == b"PK\x03\x04" or head[:2] == b"\x1f\x8b":
                    problem = archive_problem(bytes(head), max_expanded, depth + 1, budget)
                    if problem:
                        return problem
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError) as error:
        return f"a {kind} file that does not decode ({type(error).__name__})"
    return None

