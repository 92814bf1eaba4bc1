"""Compiles bpf/sg_datapath.c with bcc and loads its programs: the one place that talks to bcc.

Configuration reaches the C text only through cflags (-DSG_PIN_DIR=..., limits), never by string
replacement. The one text transformation is inlining bpf/'s own `#include "lib/..."` headers
(source.py, which the TPM measurement hashes too). Not here: attaching to interfaces or writing
maps (datapath.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skyguard import config
from skyguard.datapath.source import MAIN_SOURCE, c_source
from skyguard.errors import DatapathError, PrivilegeError


@dataclass
class Loaded:
    bpf: Any  # bcc.BPF
    from_vm_xdp: Any  # bcc function handles (have .fd)
    from_vm_tc: Any
    to_vm: Any


def load(pin_dir: Path, defines: dict[str, str | int] | None = None) -> Loaded:
    """Compile and load every program. Maps are created, or re-opened when already pinned."""
    if os.geteuid() != 0:
        raise PrivilegeError("loading eBPF programs needs root (CAP_BPF, CAP_NET_ADMIN); run skyguard as root")
    try:
        from bcc import BPF
    except ImportError as e:
        raise DatapathError(
            "the bcc Python module is missing: run scripts/setup (it installs Debian's python3-bpfcc)"
        ) from e
    try:
        pin_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatapathError(f"cannot create the pin directory {pin_dir}: {e}; is bpffs mounted?") from e
    cflags = [f'-DSG_PIN_DIR="{pin_dir}"', f"-I{config.BPF_DIR}", "-Wno-unused-function"]
    for name, value in (defines or {}).items():
        cflags.append(f"-D{name}={value}")
    try:
        bpf = BPF(text=c_source().encode(), cflags=cflags)
        _check_pinned_sizes(bpf, pin_dir)
        return Loaded(
            bpf=bpf,
            from_vm_xdp=bpf.load_func(b"sg_from_vm", BPF.XDP),
            from_vm_tc=bpf.load_func(b"sg_from_vm_tc", BPF.SCHED_CLS),
            to_vm=bpf.load_func(b"sg_to_vm", BPF.SCHED_CLS),
        )
    except DatapathError:
        raise
    except Exception as e:  # bcc raises bare Exception for compile and verifier failures
        raise DatapathError(
            f"compiling or loading bpf/{MAIN_SOURCE} failed: {e}. If pinned maps from an older "
            f"skyguard have a different layout, remove {pin_dir} (skyguard down) and retry"
        ) from e


def _check_pinned_sizes(bpf, pin_dir: Path) -> None:
    """bcc re-opens a pinned map whatever size it was created with: after an upgrade that changed
    a map's size or layout, the new programs would run on the old map (a smaller conntrack, say).
    Refuse instead, saying how to start clean."""
    import ctypes as ct

    from skyguard.datapath import abi, libbpf

    for name in (*abi.PINNED_MAPS, *abi.SHARE_MAPS):
        table = bpf.get_table(name.encode())
        declared = (ct.sizeof(table.Key), ct.sizeof(getattr(table, "sLeaf", table.Leaf)), table.max_entries)
        info = libbpf.map_info(table.map_fd)
        if declared != (info.key_size, info.value_size, info.max_entries):
            raise DatapathError(
                f"the map {name} pinned in {pin_dir} has {info.max_entries} entries of {info.key_size}+"
                f"{info.value_size} bytes, but this skyguard declares {declared[2]} of {declared[0]}+"
                f"{declared[1]}: it was made by another version. Run `skyguard down` (detaches and "
                f"removes the pins) and start again")
