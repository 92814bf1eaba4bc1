"""The system libbpf.so.1 through ctypes, for the calls bcc 0.26 does not wrap: pinning an fd,
batch map reads (dump, count: one syscall per few thousand entries where bcc makes two per
entry), a program's info by fd or by id (and BPF_PROG_RUN, declared in progrun.py).
One handle per process, with argument types declared here once.

Not a binding of libbpf: only what skyguard calls. Errors come back as DatapathError naming the
errno.
"""

from __future__ import annotations

import ctypes as ct
import os
import struct
from dataclasses import dataclass

from skyguard.errors import DatapathError

_HANDLE: ct.CDLL | None = None


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


def batch_opts() -> BatchOpts:
    return BatchOpts(sz=ct.sizeof(BatchOpts))


def dump(table, key_size: int, value_struct: struct.Struct, chunk: int = 8192):
    """(key bytes, unpacked value) of every entry of a hash map, by BPF_MAP_LOOKUP_BATCH (one
    syscall per `chunk` entries instead of two per entry; values unpacked in bulk)."""
    handle = lib()
    fd = table.map_fd
    value_size = value_struct.size
    opts = batch_opts()
    in_batch = ct.create_string_buffer(8)
    out_batch = ct.create_string_buffer(8)
    first = True
    keys = ct.create_string_buffer(chunk * key_size)
    values = ct.create_string_buffer(chunk * value_size)
    while True:
        asked = ct.c_uint32(chunk)  # in: room for; out: entries returned
        rc = handle.bpf_map_lookup_batch(fd, None if first else in_batch, out_batch, keys, values,
                                         ct.byref(asked), ct.byref(opts))
        err = ct.get_errno() if rc else 0
        if rc and err == 28 and asked.value == 0:  # ENOSPC: one bucket holds more than chunk
            chunk *= 2
            keys = ct.create_string_buffer(chunk * key_size)
            values = ct.create_string_buffer(chunk * value_size)
            continue
        got = asked.value
        kraw = keys.raw[:got * key_size]
        vraw = values.raw[:got * value_size]
        for i, val in enumerate(value_struct.iter_unpack(vraw)):
            yield kraw[i * key_size:(i + 1) * key_size], val
        if rc:
            if err == 2:  # ENOENT: that was the last batch
                return
            raise DatapathError(f"reading a BPF map in batches failed: {os.strerror(err)}")
        ct.memmove(in_batch, out_batch, 8)
        first = False


def count(table) -> int:
    """Entries in a map: arrays hold max_entries; hash and LRU maps are counted by batch reads;
    maps without batch support (LPM tries) one key at a time."""
    from bcc.table import ArrayBase

    if isinstance(table, ArrayBase):
        return table.max_entries
    value = struct.Struct(f"{ct.sizeof(table.Leaf)}s")
    try:
        return sum(1 for _ in dump(table, ct.sizeof(table.Key), value))
    except DatapathError:
        return sum(1 for _ in table.keys())


@dataclass(frozen=True)
class ProgramInfo:
    """What `bpftool prog`, `ip link` and `tc filter show` say about a loaded program."""

    id: int
    tag: str  # 16 hex digits
    name: str


def program_info(fd: int) -> ProgramInfo:
    info = (ct.c_uint8 * 256)()
    size = ct.c_uint32(256)
    if lib().bpf_obj_get_info_by_fd(fd, info, ct.byref(size)) != 0:
        raise DatapathError(f"reading a BPF program's info failed: {os.strerror(ct.get_errno())}")
    raw = bytes(info)
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
