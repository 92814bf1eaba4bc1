"""The system libbpf.so.1 through ctypes, for the calls bcc 0.26 does not wrap: pinning an fd,
batch map reads, a program's info by fd or by id (and BPF_PROG_RUN, declared in progrun.py).
One handle per process, with argument types declared here once.

Not a binding of libbpf: only what skyguard calls. Errors come back as DatapathError naming the
errno.
"""

from __future__ import annotations

import ctypes as ct
import os
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
