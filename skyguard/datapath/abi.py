"""Python mirrors of the structs and constants in bpf/abi.h, for writing and reading maps.

Each class names the C struct it MUST match; tests/bpf/test_abi.py checks every size and offset
against the layout the compiler produced (bcc's table key/leaf types), and tests/unit/test_abi_header.py
(no privileges) checks every constant here and every struct's fields against the text of abi.h.
Byte order follows abi.h: addresses and ports in network order, IPv4 as IPv4-mapped IPv6, the rest
host order. Not here: what values to write (compile.py) or how (datapath.py).
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import struct
from typing import Any

DIR_EGRESS = 0  # what the VM sends (sg_from_vm)
DIR_INGRESS = 1  # what the VM receives (sg_to_vm)
DIRECTIONS = {DIR_EGRESS: "egress", DIR_INGRESS: "ingress"}

VERDICT_ALLOW = 1
VERDICT_ESTABLISHED = 2
VERDICT_CONTROL = 3
VERDICT_DNS = 4
VERDICT_DROP = 5
VERDICTS = {1: "allow", 2: "established", 3: "control", 4: "dns", 5: "drop"}

POLICY_ALLOW = 1
POLICY_DENY = 2

# SG_MARK_DNS_REPLY: the skb->mark bit the DNS steering sets on the DNS proxy's replies to a VM
# (the only DNS that passes sg_to_vm). tests/bpf/test_abi.py checks it against abi.h.
MARK_DNS_REPLY = 0x00400000

CFG_EVENTS = 0x1

CT_NEW = 0
CT_ESTABLISHED = 1
CT_CLOSING = 2
CT_STATES = {CT_NEW: "new", CT_ESTABLISHED: "established", CT_CLOSING: "closing"}
FIN_ORIG = 0x1  # sg_ct_val.fins: the flow's creator sent FIN
FIN_REPLY = 0x2  # the other side sent FIN
FIN_BOTH = 0x3  # both did, or either sent RST
EVENT_FLOW_START = 1
EVENT_DROP = 2
EVENT_FLOW_END = 3  # the datapath removed a flow's entry before a conntrack scan logged its end

# The one table of IP protocols: the numbers the kernel uses (IPPROTO_* of <linux/in.h>) by the
# names rules use; "other" (SG_PROTO_OTHER) is every other protocol, in policy keys.
IPPROTO = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "other": 0}
PROTO_NAMES = {number: name for name, number in IPPROTO.items() if name != "other"}

IPCACHE_FIXED_BITS = 32  # gen
IPCACHE_HOST_PREFIXLEN = IPCACHE_FIXED_BITS + 128  # every sg_ipcache_host key
IPV4_MAPPED_BITS = 96  # an IPv4 prefix of length p is the first 96 + p bits of ::ffff:a.b.c.d
POLICY_FIXED_BITS = 96  # gen, direction, proto, zone, identity
POLICY_EXACT_PREFIXLEN = POLICY_FIXED_BITS + 16  # every sg_policy_exact key (one port)

# Defaults of bpf/lib/events.h that userspace sizes itself by (the header lets tests override them).
DENY_AGG_MAX = 65536  # SG_DENY_AGG_MAX: denied flows the kernel aggregates at once
DENY_EVENT_INTERVAL_NS = 1_000_000_000  # SG_DENY_EVENT_INTERVAL_NS: one event per denied flow per this


def addr16(ip) -> bytes:
    """16 bytes as abi.h stores addresses: IPv6 as is, IPv4 as ::ffff:a.b.c.d."""
    ip = ipaddress.ip_address(ip) if not isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else ip
    if ip.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def addr_from16(raw: bytes):
    ip = ipaddress.IPv6Address(bytes(raw))
    return ip.ipv4_mapped or ip


U8x16 = ct.c_uint8 * 16
U8x6 = ct.c_uint8 * 6


class ConfigVal(ct.Structure):  # struct sg_config_val
    _fields_ = [("gen", ct.c_uint32), ("flags", ct.c_uint32)]


class IpcacheKey(ct.Structure):  # struct sg_ipcache_key
    _fields_ = [("prefixlen", ct.c_uint32), ("gen", ct.c_uint32), ("addr", U8x16)]


class IpcacheVal(ct.Structure):  # struct sg_ipcache_val
    _fields_ = [("identity", ct.c_uint32), ("prefixlen", ct.c_uint32), ("expires_ns", ct.c_uint64)]


class PolicyKey(ct.Structure):  # struct sg_policy_key
    _fields_ = [
        ("prefixlen", ct.c_uint32),
        ("gen", ct.c_uint32),
        ("direction", ct.c_uint8),
        ("proto", ct.c_uint8),
        ("zone", ct.c_uint16),
        ("identity", ct.c_uint32),
        ("port", ct.c_uint16),  # network order
        ("pad", ct.c_uint16),
    ]


class PolicyVal(ct.Structure):  # struct sg_policy_val
    _fields_ = [("rule_id", ct.c_uint32), ("verdict", ct.c_uint8), ("pad", ct.c_uint8 * 3)]


MAX_IFINDEX = 65536  # SG_MAX_IFINDEX


def workload_index(ifindex: int, gen: int) -> int:  # SG_WORKLOAD_IDX
    return ifindex * 2 + (gen & 1)


class WorkloadVal(ct.Structure):  # struct sg_workload_val
    _fields_ = [("gen", ct.c_uint32), ("zone", ct.c_uint16), ("workload", ct.c_uint16), ("mac", U8x6), ("pad", ct.c_uint16)]


class SrcipKey(ct.Structure):  # struct sg_srcip_key
    _fields_ = [("ifindex", ct.c_uint32), ("gen", ct.c_uint32), ("addr", U8x16)]


class CtKey(ct.Structure):  # struct sg_ct_key
    _fields_ = [
        ("ifindex", ct.c_uint32),
        ("proto", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
        ("saddr", U8x16),
        ("daddr", U8x16),
        ("sport", ct.c_uint16),  # network order
        ("dport", ct.c_uint16),
    ]


class CtVal(ct.Structure):  # struct sg_ct_val
    _fields_ = [
        ("expires_ns", ct.c_uint64),
        ("packets", ct.c_uint64),
        ("bytes", ct.c_uint64),
        ("gen", ct.c_uint32),
        ("rule_id", ct.c_uint32),
        ("zone", ct.c_uint16),
        ("direction", ct.c_uint8),
        ("state", ct.c_uint8),
        ("fins", ct.c_uint8),
        ("seq_seen", ct.c_uint8),  # TCP: sides whose seq_end is known (bit 0 creator, bit 1 other)
        ("seq_end", ct.c_uint32 * 2),  # TCP, per side: the sequence number after the last it sent
    ]


_FORMATS: dict[Any, str] = {ct.c_uint8: "B", ct.c_uint16: "H", ct.c_uint32: "I", ct.c_uint64: "Q"}


def struct_of(cls: type[ct.Structure], tail: bool = True) -> struct.Struct:
    """A `struct` format for unpacking many `cls` values at once (faster than ctypes), derived from
    its fields: byte arrays become bytes, fields named pad* and alignment gaps are skipped, and the
    tail padding is kept when `tail` (the stride of an array of them, as the kernel lays it out)."""
    out, pos = ["<"], 0
    fields: list[tuple[str, Any]] = cls._fields_  # type: ignore[assignment]  # (name, ctype) pairs here
    for name, ctype in fields:
        field = getattr(cls, name)
        if field.offset > pos:
            out.append(f"{field.offset - pos}x")
        if name.startswith("pad"):
            out.append(f"{field.size}x")
        elif issubclass(ctype, ct.Array) and ctype._type_ is ct.c_uint8:
            out.append(f"{ctype._length_}s")
        elif issubclass(ctype, ct.Array):
            out.append(f"{ctype._length_}{_FORMATS[ctype._type_]}")
        else:
            out.append(_FORMATS[ctype])
        pos = field.offset + field.size
    if tail and ct.sizeof(cls) > pos:
        out.append(f"{ct.sizeof(cls) - pos}x")
    return struct.Struct("".join(out))


# struct sg_ct_key / sg_ct_val for bulk unpacking (batch reads); ports in network order.
CT_KEY = struct_of(CtKey)  # ifindex, proto, saddr, daddr, sport, dport
CT_VAL = struct_of(CtVal, tail=False)  # expires_ns, packets, bytes, gen, rule_id, zone, direction, state, fins,
# seq_seen, seq_end (two values)
CT_VAL_PADDED = struct_of(CtVal)  # as the kernel lays out an array of them


class ShareHand(ct.Structure):  # struct sg_share_hand
    _fields_ = [("ct", ct.c_uint32 * 2), ("frag", ct.c_uint32 * 2)]  # by direction


class FragKey(ct.Structure):  # struct sg_frag_key
    _fields_ = [
        ("ifindex", ct.c_uint32),
        ("id", ct.c_uint32),
        ("proto", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
        ("saddr", U8x16),
        ("daddr", U8x16),
    ]


class FragVal(ct.Structure):  # struct sg_frag_val
    _fields_ = [("expires_ns", ct.c_uint64)]


# Counter array layout (abi.h SG_TRAFFIC_IDX / SG_DROP_IDX).
MAX_ZONES = 256
VERDICT_SLOTS = 8
DROP_SLOTS = 32


def traffic_index(zone: int, direction: int, verdict: int) -> int:
    return (zone * 2 + direction) * VERDICT_SLOTS + verdict


def drop_index(zone: int, direction: int, reason: int) -> int:
    return (zone * 2 + direction) * DROP_SLOTS + reason


def split_traffic_index(idx: int) -> tuple[int, int, int]:
    """(zone, direction, verdict)"""
    return idx // (2 * VERDICT_SLOTS), (idx // VERDICT_SLOTS) % 2, idx % VERDICT_SLOTS


def split_drop_index(idx: int) -> tuple[int, int, int]:
    """(zone, direction, reason)"""
    return idx // (2 * DROP_SLOTS), (idx // DROP_SLOTS) % 2, idx % DROP_SLOTS


class CounterVal(ct.Structure):  # struct sg_counter_val
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64)]


class Event(ct.Structure):  # struct sg_event
    _fields_ = [
        ("ts_ns", ct.c_uint64),
        ("ifindex", ct.c_uint32),
        ("rule_id", ct.c_uint32),
        ("zone", ct.c_uint16),
        ("type", ct.c_uint8),
        ("direction", ct.c_uint8),
        ("reason", ct.c_uint8),
        ("proto", ct.c_uint8),
        ("pad", ct.c_uint16),
        ("saddr", U8x16),
        ("daddr", U8x16),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("len", ct.c_uint32),
        ("count", ct.c_uint32),  # drops: packets this (aggregated) event stands for
        ("packets", ct.c_uint64),  # flow_end: the flow's counts (reason: its CT_* state)
        ("bytes", ct.c_uint64),
    ]


# struct sg_event for the ring buffer consumer, ports read raw (network order).
EVENT = struct_of(Event)

# C struct name -> its mirror; tests/unit/test_abi_header.py compares each one's fields with abi.h.
STRUCTS: dict[str, type[ct.Structure]] = {
    "sg_config_val": ConfigVal, "sg_ipcache_key": IpcacheKey, "sg_ipcache_val": IpcacheVal,
    "sg_policy_key": PolicyKey, "sg_policy_val": PolicyVal, "sg_workload_val": WorkloadVal,
    "sg_srcip_key": SrcipKey, "sg_ct_key": CtKey, "sg_ct_val": CtVal, "sg_share_hand": ShareHand,
    "sg_frag_key": FragKey, "sg_frag_val": FragVal, "sg_counter_val": CounterVal, "sg_event": Event,
}

# map name in C -> (key mirror, value mirror); the ABI test walks this.
MAP_LAYOUT = {
    "sg_config": (ct.c_uint32, ConfigVal),
    "sg_ipcache": (IpcacheKey, IpcacheVal),
    "sg_ipcache_host": (IpcacheKey, IpcacheVal),
    "sg_policy": (PolicyKey, PolicyVal),
    "sg_policy_exact": (PolicyKey, PolicyVal),
    "sg_workload": (ct.c_uint32, WorkloadVal),
    "sg_srcip": (SrcipKey, ct.c_uint8),
    "sg_ct": (CtKey, CtVal),
    "sg_frag": (FragKey, FragVal),
    "sg_traffic": (ct.c_uint32, CounterVal),
    "sg_drops": (ct.c_uint32, CounterVal),
}
PINNED_MAPS = tuple(MAP_LAYOUT)
# Pinned too, but the programs' own bookkeeping (each VM's share of sg_ct and sg_frag,
# bpf/lib/conntrack.h): nothing in userspace reads them, and they are not counted as map sizes.
SHARE_MAPS = {
    "sg_ct_slots": (ct.c_uint32, CtKey),
    "sg_frag_slots": (ct.c_uint32, FragKey),
    "sg_share_hands": (ct.c_uint32, ShareHand),
}
# layout-only map (never written) that exposes struct sg_event, and the share maps
MAP_LAYOUT_EXTRA = {"sg_ev_layout": (ct.c_int, Event), **SHARE_MAPS}
