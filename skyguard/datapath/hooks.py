"""What sits at the hooks skyguard uses on one interface (XDP, TC ingress, TC egress), read over
netlink with pyroute2 in the calling thread's network namespace, with no subprocess: the daemon's
watchdog asks once a second for every workload interface.

Every filter is reported, not just ours: a second filter at a hook (even at our priority: cls_bpf
runs the newest handle first) could pass or redirect packets before skyguard sees them, so the
watchdog treats anything but our one program as tampering. Also what `status` and `attest` show
(Hooks.describe). Not here: attaching (datapath.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.tcmsg import sched_bpf

from skyguard.datapath import libbpf

# IFLA_XDP_ATTACHED values (linux/if_link.h), as `ip -j -d link` also reports them.
XDP_ATTACHED_MODE_NAMES = {1: "native", 2: "generic", 3: "offloaded", 4: "multi"}
# TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / TC_H_MIN_EGRESS), linux/pkt_sched.h
CLSACT_INGRESS = 0xFFFFFFF2
CLSACT_EGRESS = 0xFFFFFFF3


class _BpfFilterOptions(sched_bpf.options):
    """pyroute2 0.9.7 decodes a bpf filter's options without the kernel's last three attributes
    (linux/pkt_cls.h), and the program id is the one we compare."""

    nla_map = sched_bpf.options.nla_map + (
        ("TCA_BPF_FLAGS_GEN", "uint32"),
        ("TCA_BPF_TAG", "hex"),
        ("TCA_BPF_ID", "uint32"),
    )


if not any(name == "TCA_BPF_ID" for name, _ in sched_bpf.options.nla_map):
    sched_bpf.options = _BpfFilterOptions  # where pyroute2 looks up a "bpf" filter's options


@dataclass(frozen=True)
class TcFilter:
    kind: str  # "bpf", "u32", "matchall", ...
    prio: int
    handle: int
    program_id: int | None  # the BPF program's kernel id; None for other classifiers


@dataclass(frozen=True)
class Hooks:
    xdp: int | None  # id of the XDP program, if any
    xdp_mode: str | None  # "generic", "native", ...
    ingress: tuple[TcFilter, ...]
    egress: tuple[TcFilter, ...]

    def describe(self) -> dict:
        """{hook: {"id", "name", "tag"[, "mode"]}} of the program deciding first at each hook,
        the shape `skyguard status` and `attest` show."""
        out = {}
        first_tc = [next((f.program_id for f in filters if f.program_id), None) for filters in (self.ingress, self.egress)]
        for hook, program in (("xdp", self.xdp), ("tc_ingress", first_tc[0]), ("tc_egress", first_tc[1])):
            if program:
                # The kernel's own name and tag (a tc filter's TCA_BPF_NAME is only tc's label).
                info = libbpf.program_info_by_id(program)
                out[hook] = {"id": program, "name": info and info.name, "tag": info and info.tag}
        if "xdp" in out:
            out["xdp"]["mode"] = self.xdp_mode
        return out


def read_hooks(ipr: IPRoute, index: int, link=None) -> Hooks:
    """Everything at the hooks of interface `index` (raises NetlinkError if it is gone). `link`:
    its RTM_NEWLINK message when the caller already has it."""
    if link is None:
        [link] = ipr.get_links(index)
    xdp = link.get_attr("IFLA_XDP")
    program = xdp.get_attr("IFLA_XDP_PROG_ID") if xdp is not None else None
    mode = XDP_ATTACHED_MODE_NAMES.get(xdp.get_attr("IFLA_XDP_ATTACHED")) if program else None
    return Hooks(program or None, mode, _filters(ipr, index, CLSACT_INGRESS), _filters(ipr, index, CLSACT_EGRESS))


def _filters(ipr: IPRoute, index: int, parent: int) -> tuple[TcFilter, ...]:
    try:
        messages = ipr.get_filters(index=index, parent=parent)
    except NetlinkError:  # no clsact qdisc on the interface: no filters either
        return ()
    out = []
    for message in messages:
        options = message.get_attr("TCA_OPTIONS")
        if options is None:
            continue  # the entry the kernel lists per priority before that priority's filters
        kind = message.get_attr("TCA_KIND")
        program = options.get_attr("TCA_BPF_ID") if kind == "bpf" else None
        out.append(TcFilter(kind, message["info"] >> 16, message["handle"], program))  # info: prio << 16 | protocol
    return tuple(out)
