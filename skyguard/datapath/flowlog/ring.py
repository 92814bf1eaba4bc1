"""The datapath's ring buffer (sg_events) read from its memory map, every committed record at once.

Why not bcc's ring_buffer_poll: it calls back into Python through ctypes once per record, and at
the rates conn-rate drives (tens of thousands of events a second) those calls cost more than
making the log entries. Here read() copies every committed record in one slice and the consumer
decodes the lot with one struct.iter_unpack.

The layout is the kernel's (kernel/bpf/ringbuf.c; libbpf's ringbuf.c reads it the same way):
page 0 of the map holds the consumer position (the reader writes it), page 1 the producer
position, then the data area, mapped twice in a row so that a record that wraps around is
contiguous. A record is an 8-byte header {u32 length with BUSY (bit 31: reserved, not committed
yet) and DISCARD (bit 30), u32 page offset}, then the sample, padded to 8 bytes. Positions only
grow; a position's place in the data area is position & (size - 1).

Every header is read before the bytes it covers are copied; x86-64 does not reorder a load with
an older load, which is the ordering libbpf's acquire loads give. Not thread-safe: one reader
(the flow log's thread) per map.
"""

from __future__ import annotations

import ctypes as ct
import mmap
import platform
import select
import struct

from skyguard.datapath import libbpf
from skyguard.errors import DatapathError

BUSY = 1 << 31
DISCARD = 1 << 30
HEADER_SIZE = 8
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
BPF_MAP_TYPE_RINGBUF = 27


def record_size(sample_size: int) -> int:
    """Bytes a record of `sample_size` takes in the ring: header, sample, padding to 8."""
    return (HEADER_SIZE + sample_size + 7) // 8 * 8


def take_records(buf, words: memoryview, data: int, mask: int, position: int, producer: int,
                 sample_size: int) -> tuple[list[bytes], int, int]:
    """The records committed in [position, producer) of a ring whose data area starts at `data`
    in `buf` (mapped twice in a row), `words` being buf as u32s: (runs of whole records of
    sample_size, copied; how many records of another size were skipped; the position after the
    last record taken). Stops at the first record still being written (BUSY)."""
    stride = record_size(sample_size)
    pieces, odd = [], 0
    while position < producer:
        start = data + (position & mask)
        n = (producer - position) // stride
        if n:
            # The headers of the next n records, read before their bytes are copied: how many
            # in a row are sample-sized, committed and not discarded.
            headers = words[start // 4:(start + n * stride) // 4:stride // 4].tolist()
            good = n if headers.count(sample_size) == n else next(i for i, h in enumerate(headers) if h != sample_size)
            if good:
                pieces.append(bytes(buf[start:start + good * stride]))
                position += good * stride
                if good == n:
                    continue
                start = data + (position & mask)
        header = _U32.unpack_from(buf, start)[0]
        if header & BUSY:
            break
        if not header & DISCARD:
            odd += 1
        position += record_size(header & ~(BUSY | DISCARD))
    return pieces, odd, position


class RingReader:
    """RingReader(map_fd, sample_size): wait() for data, read() the committed records. Records of
    `sample_size` bytes (all sg_events holds) come back as one buffer, each record_size() long,
    header included; any other record is skipped and counted. close() unmaps."""

    def __init__(self, map_fd: int, sample_size: int):
        if platform.machine() != "x86_64":  # elsewhere the header loads would need acquire barriers
            raise DatapathError(f"the flow log's ring reader relies on x86-64's load ordering; this "
                                f"machine is {platform.machine()}: it needs libbpf's reader ported first")
        info = libbpf.map_info(map_fd)
        if info.type != BPF_MAP_TYPE_RINGBUF:
            raise DatapathError(f"map {info.name!r} is not a ring buffer (type {info.type})")
        size = info.max_entries  # a ring buffer's data size, a power of two of pages
        page = mmap.PAGESIZE
        self.sample_size = sample_size
        self.stride = record_size(sample_size)
        self._mask = size - 1
        self._consumer_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._map = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._consumer = ct.c_uint64.from_buffer(self._consumer_map)  # one aligned 8-byte store
        self._words = memoryview(self._map).cast("I")  # headers, read one by one
        self._data = page  # where the data area starts in self._map
        self.position = self._consumer.value
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until the ring holds something; True if it does."""
        return bool(self._epoll.poll(timeout))

    def read(self) -> tuple[bytes, int]:
        """(every committed record of sample_size, in order, as one buffer; how many records of
        another size were skipped). Stops at the first record still being written."""
        producer = _U64.unpack_from(self._map, 0)[0]
        pieces, odd, position = take_records(self._map, self._words, self._data, self._mask, self.position,
                                             producer, self.sample_size)
        if position != self.position:
            self.position = position
            self._consumer.value = position  # the kernel may now reuse what was read
        return b"".join(pieces), odd

    def close(self) -> None:
        if self._epoll.closed:
            return
        self._epoll.close()
        self._words.release()
        del self._consumer
        self._consumer_map.close()
        self._map.close()
