"""The system libbpf.so.1 through ctypes, for the calls bcc 0.26 does not wrap: pinning an fd,
batch map reads (dump, count: one syscall per few thousand entries where bcc makes two per
entry), a map's or a program's info by fd or by id (and BPF_PROG_RUN, declared in progrun.py).
One handle per process, with argument types declared here once.

Memory safety is this module's job: every buffer the kernel writes into is sized from what the
kernel says about the object (BPF_OBJ_GET_INFO_BY_FD), never from what we expect it to be:
- the batch token: hash maps write a u32 bucket index, every other map type goes through the
  kernel's generic batch code, which writes a whole key (key_size bytes; an LPM trie key is 20);
- per-CPU values: value_size rounded up to 8, times the number of possible CPUs;
- info structs: a zeroed buffer larger than any struct we read, its length passed to the kernel.
bcc's own `items_lookup_batch` is not used: in 0.26 its batch token and its count are one c_uint32.

Not a binding of libbpf: only what skyguard calls. Errors come back as DatapathError naming the
errno.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import struct
from dataclasses import dataclass
from functools import lru_cache

from skyguard.errors import DatapathError

_HANDLE: ct.CDLL | None = None
INFO_BUFFER_SIZE = 512  # > sizeof(struct bpf_prog_info) and bpf_map_info on any kernel we know
PER_CPU_MAP_TYPES = {5, 6, 10, 21}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, PERCPU_CGROUP_STORAGE
HASH_MAP_TYPES = {1, 5, 9, 10}  # HASH, PERCPU_HASH, LRU_HASH, LRU_PERCPU_HASH: u32 bucket as token


def lib() -> ct.CDLL:
    global _HANDLE
    if _HANDLE is None:
        try:
            handle = ct.CDLL("libbpf.so.1", use_errno=True)
        except OSError as e:
            raise DatapathError("libbpf.so.1 is missing: install Debian's libbpf1 (scripts/setup)") from e
        handle.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
        handle.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
        handle.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
        handle.bpf_map_lookup_and_delete_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
        handle.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
        handle.bpf_map_lookup_batch.argtypes = [ct.c_int] + [ct.c_void_p] * 6
        _HANDLE = handle
    return _HANDLE


class BatchOpts(ct.Structure):  # struct bpf_map_batch_opts
    _fields_ = [("sz", ct.c_size_t), ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]


def _obj_info(fd: int, what: str) -> bytes:
    """The kernel's info struct for a map or program fd, in a zeroed buffer larger than the
    struct (the kernel writes min(our length, its size) and says how much in `size`)."""
    info = ct.create_string_buffer(INFO_BUFFER_SIZE)
    size = ct.c_uint32(INFO_BUFFER_SIZE)
    if lib().bpf_obj_get_info_by_fd(fd, info, ct.byref(size)) != 0:
        raise DatapathError(f"reading a BPF {what}'s info failed: {os.strerror(ct.get_errno())}")
    return info.raw[:min(size.value, INFO_BUFFER_SIZE)]


@lru_cache(maxsize=1)
def possible_cpus() -> int:
    """What the kernel sizes per-CPU values by (not the online count): /sys's `possible` list."""
    from bcc.utils import get_possible_cpus

    return len(get_possible_cpus())


@dataclass(frozen=True)
class MapInfo:
    """What the kernel says about a map: the sizes every buffer for it is computed from."""

    type: int
    key_size: int
    value_size: int
    max_entries: int
    name: str

    @property
    def per_cpu(self) -> bool:
        return self.type in PER_CPU_MAP_TYPES

    @property
    def stored_value_size(self) -> int:
        """Bytes one lookup writes: per-CPU maps write round_up(value_size, 8) per possible CPU."""
        if self.per_cpu:
            return (self.value_size + 7) // 8 * 8 * possible_cpus()
        return self.value_size

    @property
    def batch_token_size(self) -> int:
        """Bytes the kernel writes into out_batch: a u32 bucket for hash maps, a key otherwise."""
        return max(8, 4 if self.type in HASH_MAP_TYPES else self.key_size)


def map_info(fd: int) -> MapInfo:
    # struct bpf_map_info: __u32 type, id, key_size, value_size, max_entries, map_flags; char name[16]
    raw = _obj_info(fd, "map")
    kind, _id, key_size, value_size, max_entries, _flags = struct.unpack_from("<6I", raw)
    return MapInfo(kind, key_size, value_size, max_entries, raw[24:40].split(b"\0", 1)[0].decode(errors="replace"))


def _batches(fd: int, info: MapInfo, chunk: int):
    """(entries, keys bytes, values bytes) per BPF_MAP_LOOKUP_BATCH call until the map is read."""
    key_size, value_size = info.key_size, info.stored_value_size
    opts = BatchOpts(sz=ct.sizeof(BatchOpts))
    in_batch = ct.create_string_buffer(info.batch_token_size)
    out_batch = ct.create_string_buffer(info.batch_token_size)
    first = True
    chunk = max(1, min(chunk, info.max_entries or 1))
    keys = ct.create_string_buffer(chunk * key_size)
    values = ct.create_string_buffer(chunk * value_size)
    while True:
        asked = ct.c_uint32(chunk)  # in: room for; out: entries returned
        rc = lib().bpf_map_lookup_batch(fd, None if first else in_batch, out_batch, keys, values,
                                        ct.byref(asked), ct.byref(opts))
        err = ct.get_errno() if rc else 0
        if rc and err == errno.ENOSPC and asked.value == 0:  # one hash bucket holds more than chunk
            chunk *= 2
            keys = ct.create_string_buffer(chunk * key_size)
            values = ct.create_string_buffer(chunk * value_size)
            continue
        got = min(asked.value, chunk)
        if got:
            yield got, keys.raw[:got * key_size], values.raw[:got * value_size]
        if rc:
            if err == errno.ENOENT:  # that was the last batch
                return
            raise DatapathError(f"reading BPF map {info.name!r} in batches failed: {os.strerror(err)}",
                                errno=err)
        ct.memmove(in_batch, out_batch, info.batch_token_size)
        first = False


def lookup_batch(fd: int, chunk: int = 8192):
    """(key bytes, value bytes) of every entry of a map, by BPF_MAP_LOOKUP_BATCH (one syscall per
    `chunk` entries instead of two per entry). Per-CPU values come as all CPUs' slots, each
    round_up(value_size, 8) bytes. Raises DatapathError (with .errno) for map types without batch
    support."""
    info = map_info(fd)
    ks, vs = info.key_size, info.stored_value_size
    for got, kraw, vraw in _batches(fd, info, chunk):
        for i in range(got):
            yield kraw[i * ks:(i + 1) * ks], vraw[i * vs:(i + 1) * vs]


def dump(table, key_size: int, value_struct: struct.Struct, chunk: int = 8192):
    """(key bytes, unpacked value) of every entry of a (not per-CPU) map. The caller's idea of the
    key and value sizes is checked against the kernel's before anything is read."""
    info = map_info(table.map_fd)
    if info.per_cpu or (key_size, value_struct.size) != (info.key_size, info.value_size):
        raise DatapathError(f"map {info.name!r} holds {info.key_size}-byte keys and {info.value_size}-byte "
                            f"values{' per CPU' if info.per_cpu else ''}; the reader expected {key_size} "
                            f"and {value_struct.size}: userspace and bpf/abi.h disagree")
    for key, value in lookup_batch(table.map_fd, chunk):
        yield key, value_struct.unpack(value)


def nonzero_per_cpu_counters(table):
    """(index, packets, bytes) of every non-zero slot of a per-CPU array of struct sg_counter_val
    {u64 packets, bytes}, CPUs summed, from batch reads unpacked in bulk (a metrics scrape reads
    thousands of slots; bcc's per-key reads would be one syscall each)."""
    from array import array

    info = map_info(table.map_fd)
    if not info.per_cpu or info.key_size != 4 or info.value_size != 16:
        raise DatapathError(f"map {info.name!r} is not a per-CPU array of {{packets, bytes}} counters")
    ncpus = possible_cpus()
    for got, kraw, vraw in _batches(table.map_fd, info, info.max_entries):
        keys, flat = array("I"), array("Q")
        keys.frombytes(kraw)
        flat.frombytes(vraw)  # per key: ncpus x (packets, bytes)
        for i in range(got):
            row = flat[i * 2 * ncpus:(i + 1) * 2 * ncpus]
            packets = sum(row[0::2])
            if packets:
                yield keys[i], packets, sum(row[1::2])


def count(table) -> int:
    """Entries in a map: arrays hold max_entries; other maps are counted by batch reads, or one
    key at a time where the map type has no batch support."""
    info = map_info(table.map_fd)
    if info.type in (2, 6):  # ARRAY, PERCPU_ARRAY: every slot exists
        return info.max_entries
    try:
        return sum(1 for _ in lookup_batch(table.map_fd))
    except DatapathError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, 524):  # 524: the kernel's ENOTSUPP
            raise
        return sum(1 for _ in table.keys())


@dataclass(frozen=True)
class ProgramInfo:
    """What `bpftool prog`, `ip link` and `tc filter show` say about a loaded program."""

    id: int
    tag: str  # 16 hex digits
    name: str


def program_info(fd: int) -> ProgramInfo:
    raw = _obj_info(fd, "program")
    # struct bpf_prog_info: __u32 type; __u32 id; __u8 tag[8]; ... char name[16] at offset 64
    return ProgramInfo(int.from_bytes(raw[4:8], "little"), raw[8:16].hex(),
                       raw[64:80].split(b"\0", 1)[0].decode(errors="replace"))


def program_info_by_id(program_id: int) -> ProgramInfo | None:
    """None when no such program is loaded (any more)."""
    fd = lib().bpf_prog_get_fd_by_id(program_id)
    if fd < 0:
        return None
    try:
        return program_info(fd)
    finally:
        os.close(fd)


def pin(fd: int, path) -> None:
    if lib().bpf_obj_pin(fd, str(path).encode()) != 0:
        raise DatapathError(f"pinning a BPF object at {path} failed: {os.strerror(ct.get_errno())}")
