#!/usr/bin/env python3
"""datapath-cost: what one packet costs in skyguard's real programs, measured with BPF_PROG_RUN
(kernel-timed, repeat >= 1e5) at 10, 1k and 100k rules. Anchor: itself at 10 rules.

Measured per rule count, on sg_from_vm as attached by default (TC) and as generic XDP:
- established: a packet of a flow already in conntrack (the common case);
- new (decision): a packet no flow covers, decided by ipcache LPM + policy LPM each time (a
  denied one, since an allowed one would enter conntrack and be "established" on repeat 2);
- new (allowed, +conntrack insert): median of single runs of distinct allowed flows; a single
  run carries the test-run setup, so this is an upper bound, not comparable to the above.
Runs as root, touches no interface (ifindex 1 in its own network namespace), pins under a
private directory it removes. Output: progress on stderr, one JSON line last on stdout, and the
same JSON under bench/results/.
Not here: throughput through real interfaces (bench tcp-throughput, flood).
"""

from __future__ import annotations

import ipaddress
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scapy.layers.inet import IP, TCP  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402

from skyguard.datapath import progrun  # noqa: E402
from skyguard.policy.model import Destination, Policy, PortRange, Rule, Workload, Zone  # noqa: E402

REPEAT = int(os.environ.get("SG_BENCH_REPEAT", "200000"))
RULE_COUNTS = (10, 1000, 100000)
TARGET = {"established_ns": 70, "new_ns": 250, "scale_ratio": 1.2}
MAC, SRC = "02:00:00:00:01:02", "10.1.0.2"
NS = f"sg-bench-{os.getpid()}"


def log(msg):
    print(f"[datapath-cost] {msg}", file=sys.stderr, flush=True)


def bench_policy(n_rules: int) -> tuple[Policy, str, int]:
    """n rules from zone web to distinct /32s (each its own identity), plus deny rules every 10th;
    returns the policy and one allowed (dst, port) in the middle of it."""
    web = Zone("web", (Workload("w1", "web", "lo", MAC, (ipaddress.ip_address(SRC),)),))
    db = Zone("db", (Workload("d1", "db", "sg-none", "02:00:00:00:02:02", (ipaddress.ip_address("10.2.0.2"),)),))
    rules = []
    base = int(ipaddress.ip_address("100.64.0.0"))
    for i in range(n_rules):
        dst = ipaddress.ip_network(ipaddress.ip_address(base + i))
        action = "deny" if i % 10 == 9 else "allow"
        port = 1000 + i % 1000
        rules.append(Rule(f"r{i}", action, ("web",), Destination(cidrs=(dst,)), (PortRange("tcp", port, port),)))
    mid = (n_rules // 2) // 10 * 10  # an allow rule
    policy = Policy(f"bench-{n_rules}", {"web": web, "db": db}, {}, tuple(rules))
    return policy, str(ipaddress.ip_address(base + mid)), 1000 + mid % 1000


def frame(dst, dport, sport=40000, flags="A"):
    return bytes(Ether(src=MAC, dst="02:00:00:00:00:01") / IP(src=SRC, dst=dst) / TCP(sport=sport, dport=dport, flags=flags))


def measure(dp, worker, kind, prog, n_rules):
    policy, dst, port = bench_policy(n_rules)
    t0 = time.monotonic()
    worker.call(dp.apply_policy, policy, {"lo": 1})
    log(f"{n_rules} rules applied in {time.monotonic() - t0:.1f}s "
        f"({len(dp.compiled.policy)} policy entries, {len(dp.compiled.ipcache)} prefixes)")
    dp.map("sg_ct").clear()
    run = lambda f, r: worker.call(progrun.run, prog.fd, f, kind=kind, ifindex=1, repeat=r)  # noqa: E731
    pass_code = progrun.XDP_PASS if kind == "xdp" else progrun.TC_ACT_OK
    syn = run(frame(dst, port, flags="S"), 1)
    assert syn.retval == pass_code, "the benchmark flow must be allowed"
    est = run(frame(dst, port), REPEAT)
    assert est.retval == pass_code
    denied = run(frame(dst, port + 1, sport=40001, flags="S"), REPEAT)  # same remote, no rule for that port
    assert denied.retval != pass_code
    singles = []
    for i in range(2000 if kind == "tc" else 50):
        singles.append(run(frame(dst, port, sport=20000 + i, flags="S"), 1).duration_ns)
    return {"established_ns": est.duration_ns, "new_ns": denied.duration_ns,
            "new_allowed_single_run_ns_median": statistics.median(singles)}  # includes per-run overhead


def harness_ns() -> int:
    """What BPF_PROG_RUN itself costs per repetition: an empty TC program (context for the
    absolute numbers; the targets are compared with it included)."""
    from bcc import BPF

    b = BPF(text=b"#include <uapi/linux/pkt_cls.h>\nint sg_empty(struct __sk_buff *skb) { return TC_ACT_OK; }")
    fn = b.load_func(b"sg_empty", BPF.SCHED_CLS)
    cost = progrun.run(fn.fd, frame("10.0.0.1", 1), kind="tc", repeat=REPEAT).duration_ns
    b.cleanup()
    return cost


def main():
    if os.geteuid() != 0:
        sys.exit("datapath-cost needs root (BPF_PROG_RUN)")
    from skyguard.datapath.datapath import Datapath

    pins = Path(f"/sys/fs/bpf/{NS}")
    subprocess.run(["ip", "netns", "add", NS], check=True)
    worker = progrun.NetnsThread(f"/run/netns/{NS}")
    try:
        subprocess.run(["ip", "-n", NS, "link", "set", "lo", "up"], check=True)
        dp = worker.call(Datapath, pins, "tc")
        results = {}
        for kind, prog in (("tc", dp._loaded.from_vm_tc), ("xdp", dp._loaded.from_vm_xdp)):
            for n in RULE_COUNTS:
                results[f"{kind}/{n}"] = measure(dp, worker, kind, prog, n)
                log(f"{kind} {n:>6} rules: {results[f'{kind}/{n}']}")
        dp.close()
    finally:
        worker.close()
        subprocess.run(["ip", "netns", "del", NS])
        subprocess.run(["rm", "-rf", str(pins)])

    small, big = results["tc/10"], results["tc/100000"]
    est_worst = max(r["established_ns"] for k, r in results.items() if k.startswith("tc/"))
    new_worst = max(r["new_ns"] for k, r in results.items() if k.startswith("tc/"))
    ratio = round(big["new_ns"] / small["new_ns"], 3)
    meets = est_worst <= TARGET["established_ns"] and new_worst <= TARGET["new_ns"] and ratio <= TARGET["scale_ratio"]
    out = {
        "name": "datapath-cost",
        "metric": "ns/packet via BPF_PROG_RUN (sg_from_vm, TC hook); ratio = new flow at 100k rules / at 10",
        "skyguard": {"established_ns": est_worst, "new_ns_100k": big["new_ns"], "new_ns_worst": new_worst},
        "anchor": {"new_ns_10": small["new_ns"], "established_ns_10": small["established_ns"]},
        "ratio": ratio,
        "target": TARGET,
        "meets_target": meets,
        "repeat": REPEAT,
        "harness_ns": harness_ns(),  # an empty TC program through BPF_PROG_RUN, included in every figure
        "detail": results,
    }
    res_dir = ROOT / "bench" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / "datapath-cost.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
