"""Names for the datapath's numbers in flow records: zone and rule ids, ifindex -> workload,
address -> workload (FlowNames), the fields every flow record carries (flow_fields), the
canonical encoding of a record as a log entry (encode_entry), and flow_start/flow_end entries as
formats made once per flow shape (FlowTemplates). No thread, no ring: lookups and encodings.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

from skyguard.datapath import abi
from skyguard.errors import DatapathError

PROTO_NAMES = abi.PROTO_NAMES

# The same bytes as skyguard.tlog.entries.canonical (sorted keys, no spaces, UTF-8), without its
# per-value type walk: every record here is built from str, int and None only, and at 50k flows/s
# the walk cost more than the encoding. tests/bpf/test_flowlog.py checks both agree.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_entry(kind: str, record: dict) -> bytes:
    """A canonical log entry of type `kind` from a record of str/int/None values with a `time`."""
    return _CANONICAL.encode({"type": kind, **record}).encode("utf-8")


class FlowNames:
    """Turns the datapath's numbers into names: zone and rule ids, ifindex -> workload, address
    -> workload. Rebuilt whenever the datapath holds another compiled policy.
    `ifindex_of(interface)` resolves names; the default resolves in the calling thread's netns."""

    def __init__(self, datapath, ifindex_of: Callable[[str], int] | None = None):
        self.datapath = datapath
        self.ifindex_of = ifindex_of or _if_nametoindex
        self._compiled = object()  # never a Datapath's: the first lookup builds the tables
        self._last_miss = 0.0
        self.version = 0  # grows whenever the tables are rebuilt (callers cache by it)

    def refresh(self) -> int:
        """Rebuild if the datapath holds another policy; returns the tables' version."""
        self._refresh()
        return self.version

    def _refresh(self, force: bool = False) -> None:
        compiled = self.datapath.compiled
        if compiled is self._compiled and not force:
            return
        self._compiled = compiled
        self.version += 1
        self.zones = {0: "unknown"}
        self.rules: dict[int, str] = {}
        self.by_ifindex: dict[int, tuple[str, str]] = {}
        self.by_address: dict[str, tuple[str, str]] = {}
        if compiled is None:
            return
        self.zones.update({i: z for z, i in compiled.zone_ids.items()})
        self.rules.update({i: r for r, i in compiled.rule_ids.items()})
        for w in self.datapath.policy.workloads():
            ifindex = self.ifindex_of(w.interface)
            if ifindex:
                self.by_ifindex[ifindex] = (w.interface, w.name)
            for a in w.addresses:
                self.by_address[str(a)] = (w.zone, w.name)

    def zone(self, zone_id: int) -> str:
        self._refresh()
        return self.zones.get(zone_id, str(zone_id))

    def rule(self, rule_id: int) -> str:
        self._refresh()
        return self.rules.get(rule_id, str(rule_id))

    def interface(self, ifindex: int) -> tuple[str, str | None]:
        """(interface name, workload name) of an ifindex; re-resolves at most once a second
        when an interface appeared after the policy was loaded."""
        self._refresh()
        hit = self.by_ifindex.get(ifindex)
        if hit is None and time.monotonic() - self._last_miss > 1.0:
            self._last_miss = time.monotonic()
            self._refresh(force=True)
            hit = self.by_ifindex.get(ifindex)
        return hit if hit else (f"ifindex-{ifindex}", None)

    def peer(self, address: str) -> tuple[str | None, str | None]:
        """(zone, workload) when the address is a workload's, else (None, None): outside."""
        self._refresh()
        return self.by_address.get(address, (None, None))


def _if_nametoindex(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0


class AddressText:
    """16-byte abi addresses as text, cached (the same few addresses recur in every record)."""

    def __init__(self, bound: int = 65536):
        self._cache: dict[bytes, str] = {}
        self._bound = bound

    def __call__(self, raw: bytes) -> str:
        s = self._cache.get(raw)
        if s is None:
            if len(self._cache) > self._bound:
                self._cache.clear()
            s = self._cache[raw] = str(abi.addr_from16(raw))
        return s


def flow_fields(names, addr: AddressText, ifindex, zone, direction, proto, saddr, daddr, sport, dport) -> dict:
    """The fields of a flow record: interface, direction, protocol, both ends with their zone and
    workload (the VM's side from the interface, the other from its address)."""
    interface, workload = names.interface(ifindex)
    zone_name = names.zone(zone)
    src, dst = addr(saddr), addr(daddr)
    if direction == abi.DIR_EGRESS:  # the VM sent it: it is the source
        src_zone, src_wl = zone_name, workload
        dst_zone, dst_wl = names.peer(dst)
    else:
        dst_zone, dst_wl = zone_name, workload
        src_zone, src_wl = names.peer(src)
    return {"interface": interface, "direction": abi.DIRECTIONS.get(direction, str(direction)),
            "proto": PROTO_NAMES.get(proto, str(proto)), "src": src, "sport": sport, "dst": dst,
            "dport": dport, "src_zone": src_zone, "src_workload": src_wl, "dst_zone": dst_zone,
            "dst_workload": dst_wl}


# Values no real port, time or count takes, marking where each goes in an entry template.
_SENTINELS = {"bytes": 7_000_000_004, "dport": 7_000_000_002, "packets": 7_000_000_005, "sport": 7_000_000_001,
              "time": 7_000_000_003}
# The values of a flow entry, in sorted order (their order in the canonical text): what a
# template takes, in this order.
START_VALUES = ("dport", "sport", "time")
END_VALUES = ("bytes", "dport", "packets", "sport", "time")


class FlowTemplates:
    """flow_start and flow_end entries as bytes formats, one per flow shape = (ifindex, zone,
    direction, proto, saddr, daddr, rule_id, reason): reason "rule" makes a flow_start, whose
    values are START_VALUES; any other ("closed", "expired", "removed") a flow_end, END_VALUES.
    At tens of thousands of flows a second most share everything but ports, time and counts:
    encoding the rest once per shape makes an entry one bytes format: `template % values` is the
    canonical entry (tests/bpf/test_flowlog.py checks every one), whose JSON is the record
    `skyguard flows` shows. Not thread-safe: the consumer thread owns it.
    """

    MAX_SHAPES = 4096  # past this (a VM talking to many outside addresses) the cache starts again

    def __init__(self, names: FlowNames, addr: AddressText):
        self.names, self.addr = names, addr
        self.cache: dict[tuple, bytes] = {}
        self._version = -1

    def current(self) -> dict[tuple, bytes]:
        """The templates by flow shape (use .get(flow) or make(flow)), emptied whenever the
        names changed (another policy)."""
        if self.names.refresh() != self._version:
            self.cache.clear()
            self._version = self.names.version
        return self.cache

    def make(self, flow: tuple) -> bytes:
        """The template of a flow shape, remembered unless its interface is not resolved yet."""
        ifindex, zone, direction, proto, saddr, daddr, rule_id, reason = flow
        kind, varying = ("flow_start", START_VALUES) if reason == "rule" else ("flow_end", END_VALUES)
        base = flow_fields(self.names, self.addr, ifindex, zone, direction, proto, saddr, daddr,
                           _SENTINELS["sport"], _SENTINELS["dport"])
        base.update(verdict="allow", rule=self.names.rule(rule_id), reason=reason,
                    **{name: _SENTINELS[name] for name in varying if name not in ("sport", "dport")})
        text = encode_entry(kind, base).replace(b"%", b"%%")
        for name in varying:  # sorted: the canonical text holds them in this order
            marker = f'"{name}":{_SENTINELS[name]}'.encode()
            if text.count(marker) != 1:
                raise DatapathError(f"flow log: cannot build an entry template ({name})")
            text = text.replace(marker, f'"{name}":%d'.encode())
        if base["src_workload"] is None and base["dst_workload"] is None:
            return text  # an interface not resolved yet: do not remember a name that may change
        if len(self.cache) > self.MAX_SHAPES:
            self.cache.clear()
        self.cache[flow] = text
        return text
