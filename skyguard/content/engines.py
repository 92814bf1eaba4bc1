"""The content engines that look at a buffer in memory: file type by content (libmagic through
python-magic), YARA (yara-python) and regular expressions. Pure functions over bytes, safe to call
from worker threads (libmagic's handle is not thread-safe, so it sits behind a lock).

Not here: clamd (clamd.py, over a socket), deciding which engines a file needs (inspector.py).
"""

from __future__ import annotations

import bz2
import gzip
import io
import struct
import threading
import zipfile
import zlib
from collections.abc import Sequence

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
# flagging it (AlertExceedsMax does not catch a zip entry past MaxFileSize in clamd 1.4): the
# bounds are kept here. Entries are decompressed with their output counted against one budget
# (`max_expanded` bytes for the whole file, nested archives included), so a bomb costs at most
# that much CPU; an entry is kept only from where it may hold a nested archive on.
#
# A zip is wherever clamd (and unzip) find one, not only at offset 0: after a prefix (a
# self-extractor's stub, or any bytes), by its central directory, and by its local headers alone
# (clamd walks those in any file). So besides the entries a central directory lists, every local
# header in the bytes is expanded and counted; what an entry expands to is looked into again.
MAX_ARCHIVE_DEPTH = 3
MAX_ARCHIVE_ENTRIES = 10_000
_READ = 1 << 16
_LOCAL_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # signature, version, flags, method, time, date, crc, sizes, lengths
_STORED, _DEFLATED, _DEFLATE64, _BZIP2 = 0, 8, 9, 12


class _Refused(Exception):
    """Why the file is refused (archive_problem's answer), raised from deep in the walk."""


def _may_hold_archive(data: bytes) -> bool:
    return _LOCAL_MAGIC in data or data[:2] == b"\x1f\x8b"


def _spend(budget: list, size: int, max_expanded: int) -> None:
    budget[0] -= size
    if budget[0] < 0:
        raise _Refused(f"an archive that expands past {max_expanded} bytes (decompression bomb)")


def _read_all(stream, budget: list, max_expanded: int) -> bytes:
    """What `stream` expands to, every byte counted; kept only from its first zip local header
    on (or whole when it is gzip): bytes before that cannot hold an archive, so a large harmless
    entry costs no memory."""
    out, keeping, tail, first = bytearray(), False, b"", True
    while chunk := stream.read(_READ):
        _spend(budget, len(chunk), max_expanded)
        if not keeping:
            keeping = first and chunk[:2] == b"\x1f\x8b"
            joined = chunk if keeping else tail + chunk
            at = 0 if keeping else joined.find(_LOCAL_MAGIC)
            keeping = at != -1
            chunk = joined[at:] if keeping else b""
            tail = joined[-3:]
        first = False
        out += chunk
    return bytes(out)


def archive_problem(data: bytes, max_expanded: int, depth: int = 0, budget: list | None = None) -> str | None:
    """Why this zip or gzip file (possibly nested, a zip possibly after other bytes) is refused,
    or None. Not an archive: None."""
    budget = budget if budget is not None else [max_expanded, MAX_ARCHIVE_ENTRIES]
    try:
        _walk(data, max_expanded, depth, budget)
    except _Refused as refusal:
        return str(refusal)
    return None


def _walk(data: bytes, max_expanded: int, depth: int, budget: list) -> None:
    if not _may_hold_archive(data):
        return
    if depth >= MAX_ARCHIVE_DEPTH:
        raise _Refused(f"archives nested deeper than {MAX_ARCHIVE_DEPTH}")
    if data[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
                inner = _read_all(stream, budget, max_expanded)
        except (OSError, EOFError, zlib.error) as error:
            raise _Refused(f"a gzip file that does not decode ({type(error).__name__})") from None
        _walk(inner, max_expanded, depth + 1, budget)
        return
    listed: set[int] = set()  # local headers a central directory lists (expanded through it)
    if data[:4] == _LOCAL_MAGIC or zipfile.is_zipfile(io.BytesIO(data)):
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
            infos = archive.infolist()
            budget[1] -= len(infos)
            if budget[1] < 0:
                raise _Refused(f"an archive with more than {MAX_ARCHIVE_ENTRIES} entries")
            for info in infos:
                listed.add(info.header_offset)
                if info.is_dir():
                    continue
                if info.flag_bits & 0x1:
                    raise _Refused("an encrypted archive entry cannot be inspected")
                with archive.open(info) as stream:
                    inner = _read_all(stream, budget, max_expanded)
                _walk(inner, max_expanded, depth + 1, budget)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError) as error:
            raise _Refused(f"a zip file that does not decode ({type(error).__name__})") from None
    _walk_local_headers(data, listed, max_expanded, depth, budget)


def _walk_local_headers(data: bytes, listed: set[int], max_expanded: int, depth: int, budget: list) -> None:
    """Every zip local header in `data` that no central directory listed, expanded as clamd would
    from the header alone. Bytes that only look like a header (they do not decompress) are left
    to clamd, which cannot expand them either."""
    view = memoryview(data)
    at = data.find(_LOCAL_MAGIC)
    while at != -1 and at + _LOCAL_HEADER.size <= len(data):
        fields = _LOCAL_HEADER.unpack_from(data, at)
        flags, method, name_length, extra_length = fields[2], fields[3], fields[9], fields[10]
        start = at + _LOCAL_HEADER.size + name_length + extra_length
        if at not in listed and not flags & 0x1 and method in (_DEFLATED, _BZIP2, _DEFLATE64):
            budget[1] -= 1
            if budget[1] < 0:
                raise _Refused(f"an archive with more than {MAX_ARCHIVE_ENTRIES} entries")
            if method == _DEFLATE64:  # clamd expands it; Python cannot bound it
                raise _Refused("a zip entry compressed with Deflate64 cannot be inspected")
            decoder = zlib.decompressobj(-zlib.MAX_WBITS) if method == _DEFLATED else bz2.BZ2Decompressor()
            try:
                inner = decoder.decompress(view[start:], budget[0] + 1)
            except (zlib.error, OSError, ValueError):
                inner = None  # not an entry
            if inner:
                _spend(budget, len(inner), max_expanded)
                _walk(inner, max_expanded, depth + 1, budget)
        at = data.find(_LOCAL_MAGIC, at + 1)
