"""bpf/abi.h is the one source of every number C and Python share; skyguard/datapath/abi.py mirrors
it. This reads the header text (no compiler, no privileges) and checks every mirror against it:
each #define of abi.h is either mirrored (same value) or named here as the programs' own; the index
macros give the same slots as Python's index functions; every struct has the same fields, in the
same order, of the same widths as its ctypes class; every map's key and value structs and size
agree with the mirrors; the `struct` formats are the ctypes classes' own layout; there is one
protocol table. (tests/bpf/test_abi.py checks the compiled layout itself, as root.)"""

from __future__ import annotations

import ast
import ctypes as ct
import re
import socket
from pathlib import Path

import pytest

from skyguard import config
from skyguard.datapath import abi, flowlog, reasons

BPF = config.BPF_DIR
ABI_H = BPF / "abi.h"

# Defines of abi.h that userspace has no use for, and why.
C_ONLY = {
    "SG_ABI_H": "include guard",
    "SG_DROP_REASONS": "the X-macro: skyguard/datapath/reasons.py parses its lines",
    "SG_X_ENUM": "builds enum sg_drop_reason from the X-macro",
}


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", " ", text, flags=re.S)


def _defines(path: Path) -> dict[str, tuple[tuple[str, ...] | None, str]]:
    """#define NAME [(params)] body, continuation lines joined: name -> (params or None, body)."""
    text = _strip_comments(path.read_text()).replace("\\\n", " ")
    out = {}
    for m in re.finditer(r"^#define\s+(\w+)(\(([^)]*)\))?[ \t]*(.*)$", text, flags=re.M):
        params = tuple(p.strip() for p in m.group(3).split(",")) if m.group(2) else None
        out[m.group(1)] = (params, m.group(4).strip())
    return out


_ALLOWED = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load, ast.Add, ast.Sub,
            ast.Mult, ast.FloorDiv, ast.LShift, ast.BitAnd, ast.BitOr, ast.USub)


def _value(body: str, defines: dict, params: dict | None = None) -> int:
    """An integer macro body (literals, other macros, + - * << & |) evaluated."""
    expr = re.sub(r"\b(0x[0-9a-fA-F]+|\d+)(ULL|UL|U|LL|L)?\b", r"\1", body).replace("/", "//")
    tree = ast.parse(expr, mode="eval")
    names = {}
    for node in ast.walk(tree):
        assert isinstance(node, _ALLOWED), f"not an integer expression: {body!r}"
        if isinstance(node, ast.Name):
            if params and node.id in params:
                names[node.id] = params[node.id]
            else:
                assert defines[node.id][0] is None, f"{node.id} is a function-like macro"
                names[node.id] = _value(defines[node.id][1], defines)
    return eval(compile(tree, "<abi.h>", "eval"), {"__builtins__": {}}, names)


def _macro(name: str, defines: dict):
    params, body = defines[name]
    return lambda *args: _value(body, defines, dict(zip(params, args, strict=True)))


def _all_defines() -> dict:
    """Every header's defines (the first definition wins: overridable defaults are #ifndef'd)."""
    out = {}
    for path in [ABI_H, *sorted((BPF / "lib").glob("*.h"))]:
        for name, value in _defines(path).items():
            out.setdefault(name, value)
    return out


ABI = _defines(ABI_H)
ALL = _all_defines()


def value(name: str) -> int:
    return _value(ALL[name][1], ALL)


# abi.h define -> the Python name that mirrors it
MIRRORS = {
    "SG_DIR_EGRESS": abi.DIR_EGRESS,
    "SG_DIR_INGRESS": abi.DIR_INGRESS,
    "SG_VERDICT_ALLOW": abi.VERDICT_ALLOW,
    "SG_VERDICT_ESTABLISHED": abi.VERDICT_ESTABLISHED,
    "SG_VERDICT_CONTROL": abi.VERDICT_CONTROL,
    "SG_VERDICT_DNS": abi.VERDICT_DNS,
    "SG_VERDICT_DROP": abi.VERDICT_DROP,
    "SG_MARK_DNS_REPLY": abi.MARK_DNS_REPLY,
    "SG_POLICY_ALLOW": abi.POLICY_ALLOW,
    "SG_POLICY_DENY": abi.POLICY_DENY,
    "SG_PROTO_OTHER": abi.IPPROTO["other"],
    "SG_IPCACHE_FIXED_BITS": abi.IPCACHE_FIXED_BITS,
    "SG_IPCACHE_HOST_PREFIXLEN": abi.IPCACHE_HOST_PREFIXLEN,
    "SG_IPV4_MAPPED_BITS": abi.IPV4_MAPPED_BITS,
    "SG_POLICY_FIXED_BITS": abi.POLICY_FIXED_BITS,
    "SG_POLICY_EXACT_PREFIXLEN": abi.POLICY_EXACT_PREFIXLEN,
    "SG_CFG_EVENTS": abi.CFG_EVENTS,
    "SG_MAX_IFINDEX": abi.MAX_IFINDEX,
    "SG_CT_NEW": abi.CT_NEW,
    "SG_CT_ESTABLISHED": abi.CT_ESTABLISHED,
    "SG_CT_CLOSING": abi.CT_CLOSING,
    "SG_FIN_ORIG": abi.FIN_ORIG,
    "SG_FIN_REPLY": abi.FIN_REPLY,
    "SG_FIN_BOTH": abi.FIN_BOTH,
    "SG_MAX_ZONES": abi.MAX_ZONES,
    "SG_VERDICT_SLOTS": abi.VERDICT_SLOTS,
    "SG_DROP_SLOTS": abi.DROP_SLOTS,
    "SG_EVENT_FLOW_START": abi.EVENT_FLOW_START,
    "SG_EVENT_DROP": abi.EVENT_DROP,
    "SG_EVENT_FLOW_END": abi.EVENT_FLOW_END,
}
# abi.h index macro -> the Python function computing the same slot
INDEX_MACROS = {"SG_WORKLOAD_IDX": abi.workload_index, "SG_TRAFFIC_IDX": abi.traffic_index,
                "SG_DROP_IDX": abi.drop_index}
# defaults of the other headers that userspace sizes itself by
LIB_MIRRORS = {"SG_DENY_AGG_MAX": abi.DENY_AGG_MAX, "SG_DENY_EVENT_INTERVAL_NS": abi.DENY_EVENT_INTERVAL_NS}


def test_every_define_of_abi_h_is_mirrored_or_named_c_only():
    unaccounted = set(ABI) - set(MIRRORS) - set(INDEX_MACROS) - set(C_ONLY)
    assert not unaccounted, f"abi.h defines with no Python mirror (add one to abi.py, or to C_ONLY here): {unaccounted}"
    assert not (set(MIRRORS) | set(INDEX_MACROS)) - set(ABI), "mirrors of defines abi.h no longer has"


@pytest.mark.parametrize("name", sorted(MIRRORS))
def test_constant_mirrors_abi_h(name):
    assert MIRRORS[name] == value(name), f"{name} is {value(name)} in abi.h"


@pytest.mark.parametrize("name", sorted(LIB_MIRRORS))
def test_userspace_bounds_mirror_the_headers_defaults(name):
    assert LIB_MIRRORS[name] == value(name)


def test_name_tables_cover_exactly_the_defines():
    def named(prefix: str) -> dict[int, str]:
        return {value(n): n[len(prefix):].lower() for n in ABI if n.startswith(prefix)}

    verdicts = {v: n for v, n in named("SG_VERDICT_").items() if n != "slots"}  # SG_VERDICT_SLOTS is a count
    assert abi.VERDICTS == verdicts
    assert abi.DIRECTIONS == named("SG_DIR_")
    assert abi.CT_STATES == named("SG_CT_")


@pytest.mark.parametrize("macro", sorted(INDEX_MACROS))
def test_index_functions_compute_the_macros_slots(macro):
    c_index, py_index = _macro(macro, ABI), INDEX_MACROS[macro]
    n = len(ABI[macro][0])
    samples = [(1, 1), (7, 2), (65535, 3)] if n == 2 else [
        (z, d, v) for z in (0, 1, 255) for d in (0, 1) for v in (0, 1, 5, 7)]
    for args in samples:
        assert py_index(*args) == c_index(*args), f"{macro}{args}"


def test_split_functions_invert_the_indexes():
    for zone in (0, 3, abi.MAX_ZONES - 1):
        for direction in (abi.DIR_EGRESS, abi.DIR_INGRESS):
            for verdict in range(abi.VERDICT_SLOTS):
                assert abi.split_traffic_index(abi.traffic_index(zone, direction, verdict)) == (zone, direction, verdict)
            for reason in range(abi.DROP_SLOTS):
                assert abi.split_drop_index(abi.drop_index(zone, direction, reason)) == (zone, direction, reason)


def test_slot_counts_hold_every_verdict_and_reason():
    assert max(abi.VERDICTS) < abi.VERDICT_SLOTS
    assert max(reasons.DROP_REASONS) < abi.DROP_SLOTS


# ---- structs --------------------------------------------------------------------------------

_C_TYPES = {"__u8": ct.c_uint8, "__u16": ct.c_uint16, "__u32": ct.c_uint32, "__u64": ct.c_uint64}


def _structs(path: Path) -> dict[str, list[tuple[str, object]]]:
    text = _strip_comments(path.read_text())
    out = {}
    for m in re.finditer(r"struct\s+(sg_\w+)\s*\{(.*?)\};", text, flags=re.S):
        fields = []
        for f in re.finditer(r"(__u\d+)\s+(\w+)(?:\[(\w+)\])?\s*;", m.group(2)):
            ctype = _C_TYPES[f.group(1)]
            fields.append((f.group(2), ctype * int(f.group(3)) if f.group(3) else ctype))
        out[m.group(1)] = fields
    return out


STRUCTS = _structs(ABI_H)


def _ctype_id(t):
    return (t._type_, t._length_) if issubclass(t, ct.Array) else t


def test_every_struct_of_abi_h_has_its_mirror():
    assert set(STRUCTS) == set(abi.STRUCTS)


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_mirror_has_the_c_fields(name):
    c_fields = [(n, _ctype_id(t)) for n, t in STRUCTS[name]]
    py_fields = [(n, _ctype_id(t)) for n, t in abi.STRUCTS[name]._fields_]
    assert py_fields == c_fields


def _maps() -> dict[str, tuple[str, str, int]]:
    """name -> (key type, value type, max entries) of every map the bpf sources declare."""
    text = " ".join(_strip_comments(p.read_text()) for p in [BPF / "sg_datapath.c", *(BPF / "lib").glob("*.h")])
    text = re.sub(r"\s+", " ", text)
    out = {}
    for m in re.finditer(r'BPF_TABLE(?:_PINNED)?\("\w+", ([^,]+), ([^,]+), (\w+), ([^,)]+)', text):
        out[m.group(3)] = (m.group(1).strip(), m.group(2).strip(), value_of(m.group(4)))
    for m in re.finditer(r"BPF_(?:PERCPU_)?ARRAY\((\w+), ([^,]+), ([^)]+)\)", text):
        out[m.group(1)] = ("__u32", m.group(2).strip(), value_of(m.group(3)))
    return out


def value_of(expr: str) -> int:
    return _value(expr.strip(), ALL)


def _c_name(mirror) -> str:
    by_class = {cls: f"struct {name}" for name, cls in abi.STRUCTS.items()}
    scalars = {ct.c_uint8: "__u8", ct.c_uint32: "__u32", ct.c_int: "__u32"}
    return by_class.get(mirror) or scalars[mirror]


@pytest.mark.parametrize("map_name", sorted({**abi.MAP_LAYOUT, **abi.MAP_LAYOUT_EXTRA}))
def test_map_key_and_value_types_are_the_mirrored_structs(map_name):
    key, val = {**abi.MAP_LAYOUT, **abi.MAP_LAYOUT_EXTRA}[map_name]
    declared_key, declared_val, _size = _maps()[map_name]
    assert (declared_key, declared_val) == (_c_name(key), _c_name(val))


def test_index_maps_are_sized_for_every_index():
    maps = _maps()
    assert maps["sg_workload"][2] == abi.workload_index(abi.MAX_IFINDEX - 1, 1) + 1
    assert maps["sg_traffic"][2] == abi.traffic_index(abi.MAX_ZONES - 1, abi.DIR_INGRESS, abi.VERDICT_SLOTS - 1) + 1
    assert maps["sg_drops"][2] == abi.drop_index(abi.MAX_ZONES - 1, abi.DIR_INGRESS, abi.DROP_SLOTS - 1) + 1
    assert maps["sg_config"][2] == 1


def test_policy_h_names_its_prefix_lengths():
    text = _strip_comments((BPF / "lib" / "policy.h").read_text())
    assert "SG_IPCACHE_HOST_PREFIXLEN" in text and "SG_POLICY_EXACT_PREFIXLEN" in text
    assert not re.search(r"\.prefixlen\s*=\s*\d", text), "a literal prefix length in policy.h: name it in abi.h"


# ---- struct formats -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, cls, tail", [(abi.CT_KEY, abi.CtKey, True), (abi.CT_VAL, abi.CtVal, False),
                                            (abi.CT_VAL_PADDED, abi.CtVal, True), (abi.EVENT, abi.Event, True)])
def test_struct_formats_read_the_ctypes_layout(fmt, cls, tail):
    """A value filled through ctypes, packed as bytes, reads back field by field (pad skipped)."""
    last = getattr(cls, cls._fields_[-1][0])
    assert fmt.size == (ct.sizeof(cls) if tail else last.offset + last.size)
    obj, expected = cls(), []
    for i, (name, ctype) in enumerate(cls._fields_):
        if name.startswith("pad"):
            continue
        if issubclass(ctype, ct.Array) and ctype._type_ is not ct.c_uint8:  # numbers: one value each
            values = [i * 16 + j for j in range(ctype._length_)]
            getattr(obj, name)[:] = values
            expected.extend(values)
        elif issubclass(ctype, ct.Array):  # byte arrays (addresses) read as bytes
            raw = bytes((i * 16 + j) % 256 for j in range(ctype._length_))
            ct.memmove(ct.addressof(obj) + getattr(cls, name).offset, raw, len(raw))
            expected.append(raw)
        else:
            setattr(obj, name, i + 1)
            expected.append(i + 1)
    got = fmt.unpack(bytes(obj)[:fmt.size])
    assert list(got) == expected


# ---- one protocol table ---------------------------------------------------------------------


def test_protocol_numbers_are_the_kernels():
    assert {k: v for k, v in abi.IPPROTO.items() if k != "other"} == {
        "icmp": socket.IPPROTO_ICMP, "tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP,
        "icmpv6": socket.IPPROTO_ICMPV6}
    assert abi.PROTO_NAMES == {v: k for k, v in abi.IPPROTO.items() if k != "other"}
    assert flowlog.PROTO_NAMES is abi.PROTO_NAMES


def test_there_is_one_protocol_table():
    """No other module of skyguard/ types the protocol numbers again."""
    table = re.compile(r"""["']icmpv6["']\s*:\s*58|58\s*:\s*["']icmpv6["']""")
    copies = [str(p.relative_to(config.REPO_ROOT)) for p in (config.REPO_ROOT / "skyguard").rglob("*.py")
              if table.search(p.read_text()) and p.name != "abi.py"]
    assert not copies, f"protocol tables outside skyguard/datapath/abi.py: {copies}"


def test_drop_reasons_are_every_entry_of_the_x_macro():
    entries = re.findall(r"X\((\d+),", ABI["SG_DROP_REASONS"][1])
    assert sorted(reasons.DROP_REASONS) == sorted(int(c) for c in entries) == list(range(1, len(entries) + 1))
