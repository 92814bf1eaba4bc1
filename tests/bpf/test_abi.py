"""Every Python mirror in skyguard/datapath/abi.py against the layout the compiler produced for
the C structs in bpf/abi.h (bcc describes each map's key and value from clang's record layout,
padding included): same size, and every mirrored field at the same offset with the same size.
Also: the drop-reason table Python reads is the one the programs were compiled with.
"""

from __future__ import annotations

import ctypes as ct

import pytest

from skyguard.datapath import abi, reasons


def _fields(cls):
    return {name: (getattr(cls, name).offset, getattr(cls, name).size) for name, *_ in getattr(cls, "_fields_", [])}


@pytest.mark.parametrize("map_name", sorted({**abi.MAP_LAYOUT, **abi.MAP_LAYOUT_EXTRA}))
def test_mirror_matches_compiled_layout(datapath, map_name):
    key_mirror, val_mirror = {**abi.MAP_LAYOUT, **abi.MAP_LAYOUT_EXTRA}[map_name]
    table = datapath.map(map_name)
    leaf = getattr(table, "sLeaf", table.Leaf)  # per-CPU maps: bcc's Leaf is an array of CPUs
    for mirror, compiled in ((key_mirror, table.Key), (val_mirror, leaf)):
        assert ct.sizeof(mirror) == ct.sizeof(compiled), f"{map_name}: sizeof {mirror.__name__}"
        compiled_fields = _fields(compiled)
        for name, (offset, size) in _fields(mirror).items():
            assert name in compiled_fields, f"{map_name}: {mirror.__name__}.{name} is not in the C struct"
            assert compiled_fields[name] == (offset, size), f"{map_name}: {mirror.__name__}.{name} offset/size"
        missing = {n for n in compiled_fields if not n.startswith("__pad")} - set(_fields(mirror))
        assert not missing, f"{map_name}: C fields not mirrored: {missing}"


def test_every_pinned_map_is_mirrored(datapath, pin_dir):
    pinned = {p.name for p in pin_dir.iterdir() if not p.name.startswith("attach-")}
    assert pinned == set(abi.PINNED_MAPS) | set(abi.SHARE_MAPS)


def test_dns_reply_mark_matches_abi_h():
    import re

    from skyguard import config

    text = (config.BPF_DIR / "abi.h").read_text()
    assert int(re.search(r"#define SG_MARK_DNS_REPLY (0x[0-9a-fA-F]+)", text).group(1), 16) == abi.MARK_DNS_REPLY


def test_reason_table_parsed_from_abi_h(datapath):
    # The C enum comes from the same X-macro (and test_verdicts reads every reason back from the
    # programs' own counters); here: the parse found them all, dense from 1.
    codes = sorted(reasons.DROP_REASONS)
    assert codes == list(range(1, len(codes) + 1))
    assert reasons.reason_name(reasons.code("SPOOF_MAC")) == "spoof_mac"
