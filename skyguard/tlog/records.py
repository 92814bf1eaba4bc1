"""The on-disk framing shared by segment files and the checkpoints file.

A record is a 16-byte header, then the payload: crc32 (u32), payload length (u32), record index
(u64), all little-endian; the CRC covers length, index and payload, so a torn write, a record
moved to another position, or a flipped byte is caught at that exact record. The index in the
header is what lets verification name the exact position of reordered records.

Not a defence against a deliberate edit (anyone can recompute a CRC): that is the Merkle tree's
and the signed checkpoints' job. Not here: which files hold records.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

HEADER = struct.Struct("<IIQ")
HEADER_SIZE = HEADER.size
_LENGTH_INDEX = struct.Struct("<IQ")
# A bound so a corrupted length field cannot make a reader allocate gigabytes.
MAX_PAYLOAD = 1 << 20


def frame(index: int, payload: bytes) -> bytes:
    body = _LENGTH_INDEX.pack(len(payload), index) + payload
    return struct.pack("<I", zlib.crc32(body)) + body


def frames(first_index: int, payloads) -> bytes:
    """b"".join(frame(first_index + i, p) for i, p in enumerate(payloads)), without copying each
    payload twice: the CRC runs over the header's tail, then on over the payload."""
    crc32, length_index, header = zlib.crc32, _LENGTH_INDEX.pack, HEADER.pack
    parts: list[bytes] = []
    append = parts.append
    for index, payload in enumerate(payloads, first_index):
        n = len(payload)
        append(header(crc32(payload, crc32(length_index(n, index))), n, index))
        append(payload)
    return b"".join(parts)


@dataclass
class Scan:
    """What a buffer of records holds: the good records, where they end, and why they stop."""

    payloads: list          # bytes of each good record, in order
    end_offset: int         # offset just past the last good record
    problem: str | None     # None if the buffer ends exactly after the last good record
    problem_kind: str | None = None  # "torn" (incomplete/corrupt record) or "order" (bad index)


def scan(buf: bytes, first_index: int, limit: int | None = None) -> Scan:
    """Parse records from buf, expecting indexes first_index, first_index+1, ..."""
    view = memoryview(buf)
    n = len(buf)
    off = 0
    expected = first_index
    payloads: list[bytes] = []
    append = payloads.append
    unpack_from = HEADER.unpack_from
    crc32 = zlib.crc32
    stop = None if limit is None else first_index + limit
    while off < n:
        if expected == stop:
            return Scan(payloads, off, f"data after the last record of the segment (index {expected})",
                        "torn")
        if off + HEADER_SIZE > n:
            return Scan(payloads, off, f"incomplete record header at index {expected}", "torn")
        crc, length, index = unpack_from(buf, off)
        end = off + HEADER_SIZE + length
        if length > MAX_PAYLOAD or end > n:
            return Scan(payloads, off, f"incomplete or oversized record at index {expected}", "torn")
        if crc32(view[off + 4:end]) != crc:
            return Scan(payloads, off, f"record {expected} fails its checksum (edited or torn)",
                        "torn")
        if index != expected:
            return Scan(payloads, off, f"record at position {expected} claims index {index} "
                                       f"(entries reordered, removed or inserted)", "order")
        append(buf[off + HEADER_SIZE:end])
        off = end
        expected += 1
    return Scan(payloads, off, None)


def parse_one(buf: bytes) -> tuple[int, bytes] | None:
    """(index, payload) of the one record at the start of buf (padding may follow), or None if
    it is incomplete or fails its checksum."""
    if len(buf) < HEADER_SIZE:
        return None
    crc, length, index = HEADER.unpack_from(buf, 0)
    end = HEADER_SIZE + length
    if length > MAX_PAYLOAD or end > len(buf) or zlib.crc32(memoryview(buf)[4:end]) != crc:
        return None
    return index, bytes(buf[HEADER_SIZE:end])
