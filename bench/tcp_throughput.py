#!/usr/bin/env python3
"""tcp-throughput: allowed TCP from one VM to another (iperf3, one stream) with a 10k-rule policy
enforced by skyguard, beside the same path with no filter (the anchor) and with nftables in the
host namespace holding the same rules as sets (what an operator would otherwise deploy).

Namespaces routed like the lab (bench/_vmnet.py). The machine is shared, so the three setups are
measured in interleaved rounds and the median of each is reported. Target: >= 0.95x no filter.
Not a measure of per-packet cost (datapath-cost) or of new connections (conn-rate).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import plot, progress, result  # noqa: E402
from _vmnet import VmNet, bench_policy, median, nft_ruleset  # noqa: E402

RULES = int(os.environ.get("SG_BENCH_RULES", "10000"))
SECONDS = float(os.environ.get("SG_BENCH_SECONDS", "4"))
ROUNDS = int(os.environ.get("SG_BENCH_ROUNDS", "3"))
ALLOW = [("a", "b", "tcp", 5201)]


def main() -> None:
    from skyguard.doctor import require_privileges

    require_privileges("bench/tcp_throughput.py")
    samples = {"no filter": [], "skyguard": [], "nftables": []}
    with VmNet(("a", "b")) as net:
        a, b = net.vms["a"], net.vms["b"]
        progress(f"generating a {RULES}-rule policy and the same rules for nftables")
        policy = bench_policy(net, RULES, ALLOW)
        ruleset = nft_ruleset(net, RULES, ALLOW)
        for r in range(ROUNDS):
            samples["no filter"].append(net.iperf(a, b, SECONDS))
            progress(f"round {r + 1}/{ROUNDS}: no filter {samples['no filter'][-1]:.2f} Gbit/s")
            net.skyguard_on(policy)
            samples["skyguard"].append(net.iperf(a, b, SECONDS))
            counters = net.skyguard_counters()
            net.skyguard_detach()
            allowed = sum(t["packets"] for t in counters["traffic"] if t["verdict"] in ("allow", "established"))
            progress(f"round {r + 1}/{ROUNDS}: skyguard {samples['skyguard'][-1]:.2f} Gbit/s "
                     f"({allowed} packets passed its programs)")
            if not allowed:
                raise SystemExit("skyguard saw no packets: the measurement did not go through it")
            net.nft_on(ruleset)
            samples["nftables"].append(net.iperf(a, b, SECONDS))
            passed = net.nft_counters()[0]
            net.nft_off()
            if not passed:
                raise SystemExit("nftables counted no packet: the measurement did not go through it")
            progress(f"round {r + 1}/{ROUNDS}: nftables {samples['nftables'][-1]:.2f} Gbit/s")
    figures = {k: median(v) for k, v in samples.items()}
    # the machine is shared: also judge each run against the no-filter run of the same round
    paired = median([s / n for s, n in zip(samples["skyguard"], samples["no filter"])])
    plot("tcp-throughput", figures, xlabel="setup", ylabel="Gbit/s (median)", kind="bar",
         title=f"TCP VM->VM, {RULES} rules")
    result("tcp-throughput", "Gbit/s", figures["skyguard"], figures["no filter"], target=0.95,
           unit="Gbit/s", rules=RULES, seconds_per_run=SECONDS, rounds=ROUNDS,
           nftables=figures["nftables"], median_ratio_per_round=paired,
           ratio_vs_nftables=figures["skyguard"] / figures["nftables"],
           samples=samples)


if __name__ == "__main__":
    main()
