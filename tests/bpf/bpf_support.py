"""Shared pieces of the BPF tier: the test policy (built from skyguard.policy.model directly),
its workloads, and Harness, which runs frames through the real programs with BPF_PROG_RUN and
reads the drop reason back from the per-zone drop counters. Fixtures live in conftest.py.
"""

from __future__ import annotations

import ipaddress
import os

from skyguard.datapath import abi, libbpf, progrun
from skyguard.datapath.reasons import reason_name
from skyguard.policy.model import Destination, Policy, PortRange, Rule, Workload, Zone

NS = f"bpx-t{os.getpid()}"
IFACES = {"w1": "sgt-w1", "w2": "sgt-w2", "d1": "sgt-d1", "x1": "sgt-x1"}
MAC = {"w1": "02:00:00:00:01:02", "w2": "02:00:00:00:01:03", "d1": "02:00:00:00:02:02", "x1": "02:00:00:00:03:02"}
ADDR = {
    "w1": ("10.1.0.2", "fd00:1::2"),
    "w2": ("10.1.0.3", "fd00:1::3"),
    "d1": ("10.2.0.2", "fd00:2::2"),
    "x1": ("10.3.0.2", "fd00:3::2"),
}
GW_MAC = "02:00:00:00:00:01"


def _wl(name, zone):
    return Workload(name, zone, IFACES[name], MAC[name], tuple(ipaddress.ip_address(a) for a in ADDR[name]))


def P(spec):
    proto, _, ports = spec.partition("/")
    if not ports:
        return PortRange(proto)
    lo, _, hi = ports.partition("-")
    return PortRange(proto, int(lo), int(hi or lo))


def make_policy(extra_rules=(), drop_rules=()) -> Policy:
    """web (w1, w2), db (d1), other (x1). Ids: zones web=1 db=2 other=3; rules in order from 1."""
    zones = {
        "web": Zone("web", (_wl("w1", "web"), _wl("w2", "web"))),
        "db": Zone("db", (_wl("d1", "db"),)),
        "other": Zone("other", (_wl("x1", "other"),)),
    }
    net = lambda *c: tuple(ipaddress.ip_network(x) for x in c)  # noqa: E731
    rules = [
        Rule("web-to-db", "allow", ("web",), Destination(zones=("db",)),
             tuple(P(p) for p in ("tcp/5432", "tcp/8000-8100", "udp/5000", "icmp", "icmpv6"))),
        Rule("web-out", "allow", ("web",), Destination(cidrs=net("198.51.100.0/24", "2001:db8:100::/48")), (P("tcp/443"),)),
        Rule("no-bad-host", "deny", ("web",), Destination(cidrs=net("198.51.100.66/32")), ()),
        Rule("no-8050", "deny", ("web",), Destination(zones=("db",)), (P("tcp/8050"),)),
        Rule("web-updates", "allow", ("web",), Destination(fqdns=("deb.example.test",)), (P("tcp/80"), P("tcp/443"))),
        Rule("syslog", "allow", ("web", "db", "other"), Destination(networks=("logging",)), (P("udp/514"),)),
    ]
    rules = [r for r in rules if r.name not in drop_rules] + list(extra_rules)
    return Policy("bpf-tests", zones, {"logging": net("192.0.2.10/32")}, tuple(rules), sha256="test")


class Harness:
    """Runs frames through the real programs and reports (passed, drop reason name or None)."""

    def __init__(self, dp, worker):
        self.dp, self.worker = dp, worker
        self.ifindex = {}

    def apply(self, policy):
        return self.worker.call(self.dp.apply_policy, policy)

    def _drops(self):
        counters = libbpf.nonzero_per_cpu_counters(self.dp.map("sg_drops"))
        return {abi.split_drop_index(idx): packets for idx, packets, _ in counters}

    def run(self, frame: bytes, workload: str, direction: str, repeat: int = 1, hook: str | None = None,
            mark: int = 0):
        """hook: for egress, "xdp" or "tc" (default: the Datapath's from_vm hook). mark: skb->mark
        of a TC run (what nftables set on the way, e.g. abi.MARK_DNS_REPLY)."""
        ifindex = self.ifindex[workload]
        before = self._drops()
        if direction == "egress":
            kind = hook or ("xdp" if self.dp.from_vm_hook != "tc" else "tc")
            prog = self.dp._loaded.from_vm_xdp if kind == "xdp" else self.dp._loaded.from_vm_tc
        else:
            prog, kind = self.dp._loaded.to_vm, "tc"
        res = self.worker.call(progrun.run, prog.fd, bytes(frame), kind=kind, ifindex=ifindex, repeat=repeat,
                               mark=mark)
        passed = res.retval in ((progrun.XDP_PASS,) if kind == "xdp" else (progrun.TC_ACT_OK,))
        after = self._drops()
        grew = [k for k in after if after[k] > before.get(k, 0)]
        reason = reason_name(grew[0][2]) if grew else None
        assert passed == (reason is None), f"verdict {res.retval} disagrees with drop counters {grew}"
        return passed, reason


    def run_raw_verdict(self, frame: bytes, workload: str, direction: str = "egress") -> bool:
        """Whether the TC program of `direction` passes `frame` (no counters read: for floods)."""
        prog = self.dp._loaded.from_vm_tc if direction == "egress" else self.dp._loaded.to_vm
        res = self.worker.call(progrun.run, prog.fd, bytes(frame), kind="tc", ifindex=self.ifindex[workload])
        return res.retval == progrun.TC_ACT_OK
