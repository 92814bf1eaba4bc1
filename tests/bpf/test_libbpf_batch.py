"""Batch reads of every map type skyguard reads, against the kernel's own answer (bcc's one key
at a time). Regression: the batch token was 8 bytes, but an LPM trie goes through the kernel's
generic batch code, which writes a whole key (20 bytes for sg_ipcache) into it: `skyguard status`
corrupted the daemon's heap and, depending on the heap, killed it. With the token too small the
second batch also resumes from a truncated key, so small chunks show the bug deterministically.
"""

from __future__ import annotations

import ctypes as ct

import pytest
from bcc import BPF

from skyguard.datapath import libbpf

MAPS = r"""
struct lpm_key { __u32 prefixlen; __u8 addr[16]; };
struct counter { __u64 packets; __u64 bytes; };
BPF_LPM_TRIE(lpm, struct lpm_key, __u32, 1024);
BPF_HASH(hash, __u32, __u64, 1024);
BPF_TABLE("lru_hash", __u32, __u64, lru, 1024);
BPF_ARRAY(arr, __u64, 300);
BPF_PERCPU_ARRAY(counters, struct counter, 300);
"""


@pytest.fixture(scope="module")
def maps(root):
    b = BPF(text=MAPS.encode())
    yield b
    b.cleanup()


def _fill_lpm(table, n):
    for i in range(n):
        key = table.Key()
        key.prefixlen = 32 + 8 * (i % 13)
        key.addr[:] = list(i.to_bytes(4, "big") * 4)
        table[key] = ct.c_uint32(i)


@pytest.mark.parametrize("chunk", [1, 3, 64, 8192])
def test_lpm_trie_read_in_batches_is_exactly_its_content(maps, chunk):
    table = maps[b"lpm"]
    table.clear()
    _fill_lpm(table, 500)
    expected = {bytes(k): int(v.value) for k, v in table.items()}
    got = {k: int.from_bytes(v, "little") for k, v in libbpf.lookup_batch(table.map_fd, chunk=chunk)}
    assert got == expected
    assert libbpf.count(table) == 500


def test_map_info_sizes_buffers_from_the_kernel(maps):
    lpm = libbpf.map_info(maps[b"lpm"].map_fd)
    assert (lpm.key_size, lpm.value_size, lpm.max_entries) == (20, 4, 1024)
    assert lpm.batch_token_size == 20  # generic batch: a whole key
    assert libbpf.map_info(maps[b"hash"].map_fd).batch_token_size == 8  # hash: a u32 bucket (>= 8)
    per_cpu = libbpf.map_info(maps[b"counters"].map_fd)
    assert per_cpu.per_cpu and per_cpu.stored_value_size == 16 * libbpf.possible_cpus()


@pytest.mark.parametrize("name", ["hash", "lru"])
def test_hash_maps_read_in_batches(maps, name):
    table = maps[name.encode()]
    table.clear()
    for i in range(700):
        table[ct.c_uint32(i * 7919)] = ct.c_uint64(i)
    got = {int.from_bytes(k, "little"): int.from_bytes(v, "little")
           for k, v in libbpf.lookup_batch(table.map_fd, chunk=5)}
    assert got == {i * 7919: i for i in range(700)}
    assert libbpf.count(table) == 700


def test_per_cpu_counters_sum_every_cpu(maps):
    table = maps[b"counters"]
    ncpus = libbpf.possible_cpus()
    leaf = table.sLeaf  # bcc: Leaf is the per-CPU array of sLeaf
    for idx in (0, 7, 299):
        table[ct.c_int(idx)] = table.Leaf(*[leaf(packets=idx + cpu + 1, bytes=100 * (cpu + 1)) for cpu in range(ncpus)])
    got = {i: (p, b) for i, p, b in libbpf.nonzero_per_cpu_counters(table)}
    assert got == {idx: (sum(idx + c + 1 for c in range(ncpus)), sum(100 * (c + 1) for c in range(ncpus)))
                   for idx in (0, 7, 299)}


def test_dump_refuses_sizes_that_disagree_with_the_kernel(maps):
    import struct

    from skyguard.errors import DatapathError

    with pytest.raises(DatapathError, match="20-byte keys"):
        list(libbpf.dump(maps[b"lpm"], 8, struct.Struct("<I")))


def test_a_pinned_map_of_another_size_is_refused_not_reused(root, tmp_path):
    """bcc re-opens a pinned map whatever its size: an upgrade that grew sg_ct would have run the
    new programs on the old, smaller table. The loader refuses and says how to start clean."""
    import os
    import subprocess

    from skyguard.datapath import loader
    from skyguard.errors import DatapathError

    pin_dir = f"/sys/fs/bpf/sgtest-size-{os.getpid()}"
    os.makedirs(pin_dir)
    try:
        old = BPF(text=f'BPF_TABLE_PINNED("lru_hash", u32, u64, sg_ct, 64, "{pin_dir}/sg_ct");'.encode())
        with pytest.raises(DatapathError, match=r"sg_ct pinned in .* has 64 entries.*skyguard down"):
            loader.load(__import__("pathlib").Path(pin_dir))
        old.cleanup()
    finally:
        subprocess.run(["rm", "-rf", pin_dir])
