"""BPF_PROG_RUN for programs bcc loaded: run one frame through a real program in the kernel.

bcc 0.26 has no wrapper, so this calls `bpf_prog_test_run_opts` from the system libbpf.so.1 with
ctypes on the program's fd. Used by tests/bpf and bench/datapath_cost.py; never on the data path.
Also here: `NetnsThread`, a worker thread that has entered a network namespace, because test runs
that name an ifindex resolve it in the calling thread's namespace (setns is per thread).
Not here: building packets or maps.
"""

from __future__ import annotations

import concurrent.futures
import ctypes as ct
import ctypes.util
import os
from dataclasses import dataclass

from skyguard.datapath import libbpf
from skyguard.errors import DatapathError

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
TC_ACT_OK, TC_ACT_SHOT = 0, 2
CLONE_NEWNET = 0x40000000
SKB_CTX_SIZE = 192  # sizeof(struct __sk_buff) on 6.x
SKB_CTX_MARK_OFFSET = 8  # offsetof(struct __sk_buff, mark)
SKB_CTX_IFINDEX_OFFSET = 40  # offsetof(struct __sk_buff, ifindex)


class _TestRunOpts(ct.Structure):  # struct bpf_test_run_opts (libbpf >= 1.0)
    _fields_ = [
        ("sz", ct.c_size_t),
        ("data_in", ct.c_void_p),
        ("data_out", ct.c_void_p),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("ctx_in", ct.c_void_p),
        ("ctx_out", ct.c_void_p),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("repeat", ct.c_int),
        ("duration", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
    ]


class _XdpMd(ct.Structure):  # struct xdp_md
    _fields_ = [(n, ct.c_uint32) for n in
                ("data", "data_end", "data_meta", "ingress_ifindex", "rx_queue_index", "egress_ifindex")]


def _lib():
    handle = libbpf.lib()
    handle.bpf_prog_test_run_opts.argtypes = [ct.c_int, ct.POINTER(_TestRunOpts)]  # declared where the struct is
    return handle


@dataclass(frozen=True)
class RunResult:
    retval: int
    duration_ns: int  # kernel's average per repetition
    data_out: bytes


def run(prog_fd: int, frame: bytes, *, kind: str, ifindex: int = 0, repeat: int = 1, mark: int = 0) -> RunResult:
    """Run `frame` through the program. kind: "xdp" or "tc". ifindex (resolved in the calling
    thread's network namespace) becomes xdp_md.ingress_ifindex / __sk_buff.ifindex. mark: the
    __sk_buff.mark a TC program sees (what nftables set on the way, e.g. abi.MARK_DNS_REPLY)."""
    if mark and kind != "tc":
        raise ValueError("only a TC program has a packet mark")
    data_in = ct.create_string_buffer(bytes(frame), len(frame))
    out = ct.create_string_buffer(len(frame) + 512)
    opts = _TestRunOpts(sz=ct.sizeof(_TestRunOpts))
    opts.data_in = ct.cast(data_in, ct.c_void_p)
    opts.data_size_in = len(frame)
    opts.data_out = ct.cast(out, ct.c_void_p)
    opts.data_size_out = len(out)
    opts.repeat = repeat
    if kind == "xdp":
        ctx = _XdpMd(data=0, data_end=len(frame), ingress_ifindex=ifindex)
        if ifindex:
            opts.ctx_in = ct.cast(ct.pointer(ctx), ct.c_void_p)
            opts.ctx_size_in = ct.sizeof(ctx)
    elif kind == "tc":
        skb = ct.create_string_buffer(SKB_CTX_SIZE)
        if ifindex or mark:
            ct.memmove(ct.addressof(skb) + SKB_CTX_IFINDEX_OFFSET, ct.byref(ct.c_uint32(ifindex)), 4)
            ct.memmove(ct.addressof(skb) + SKB_CTX_MARK_OFFSET, ct.byref(ct.c_uint32(mark)), 4)
            opts.ctx_in = ct.cast(skb, ct.c_void_p)
            opts.ctx_size_in = SKB_CTX_SIZE
    else:
        raise ValueError(f"kind must be 'xdp' or 'tc', not {kind!r}")
    rc = _lib().bpf_prog_test_run_opts(prog_fd, ct.byref(opts))
    if rc != 0:
        err = ct.get_errno() or -rc
        raise DatapathError(f"BPF_PROG_RUN failed: {os.strerror(err)} (frame of {len(frame)} bytes, {kind})")
    return RunResult(opts.retval, opts.duration, out.raw[: opts.data_size_out])


class NetnsThread:
    """One worker thread inside the network namespace at `netns_path` (/run/netns/NAME).
    `call(fn, *args)` runs fn there and returns its result (exceptions propagate)."""

    def __init__(self, netns_path: str):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns")
        self._pool.submit(self._enter, netns_path).result()

    @staticmethod
    def _enter(path: str) -> None:
        libc = ct.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise DatapathError(f"setns({path}) failed: {os.strerror(ct.get_errno())}")
        finally:
            os.close(fd)

    def call(self, fn, *args, **kwargs):
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
