#!/usr/bin/env python3
"""flood: a denied flood of 64-byte UDP frames (trafgen, random source ports, so every frame may be
a new flow) from VM c toward VM b, while VM a streams TCP to b (iperf3, allowed). Reported: the
stream's throughput under the flood as a fraction of the same stream without it, with skyguard
enforcing the policy and with nftables in the host's forward path dropping the same flood with
the same rules (bench/_vmnet.py). Measured in interleaved rounds; each flood run is judged against the run without flood just
before it, and the median of those fractions is reported.

Targets: skyguard keeps >= 0.8x of its stream throughput; skyguard's fraction is ahead of
nftables'. Also recorded: the flood's offered rate (frames the host received from c per second)
in each case, and that skyguard dropped them with a reason.
The same flood with no filter at all (delivered to b, which answers nothing) is measured too: on
a 2-core machine the flood's sender and its receive path take CPU from the stream whatever
filters, so that fraction is the floor any filter is judged against.
Not here: throughput with no flood against no filter (tcp-throughput).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import plot, progress, result  # noqa: E402
from _vmnet import TAG, VmNet, bench_policy, median, nft_ruleset  # noqa: E402

RULES = int(os.environ.get("SG_BENCH_RULES", "10000"))
SECONDS = float(os.environ.get("SG_BENCH_SECONDS", "3"))
ROUNDS = int(os.environ.get("SG_BENCH_ROUNDS", "5"))  # the per-round fractions are noisy on a shared machine
ALLOW = [("a", "b", "tcp", 5201)]
FLOOD_PORT = 9  # no rule allows it
# The attacker's vCPU and the victims' vCPU: on a 2-core host the flood and the stream each get
# one, as separate VMs would, so what the stream loses is what the flood's handling costs it.
FLOOD_CPU, STREAM_CPU = 0, (1 if (os.cpu_count() or 1) > 1 else 0)


def trafgen_config(net: VmNet) -> Path:
    c, b = net.vms["c"], net.vms["b"]
    # 14 (Ethernet) + 20 (IPv4) + 8 (UDP) + 22 = 64 bytes on the wire without FCS
    text = (f"{{ eth(da={net.host_mac(c)}, sa={c.mac}), ipv4(sa={c.v4}, da={b.v4}, ttl=64), "
            f"udp(sp=drnd(), dp={FLOOD_PORT}), fill(0x41, 22) }}\n")
    path = Path(f"/tmp/{TAG}-flood.cfg")
    path.write_text(text)
    return path


class Flood:
    def __init__(self, net: VmNet, config: Path):
        self.net, self.c = net, net.vms["c"]
        self.start_packets = net.rx_packets(self.c)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.c.cmd(["taskset", "-c", str(FLOOD_CPU), "trafgen", "--dev", "eth0",
                                                 "--conf", str(config), "-P", "1", "-q"]),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # the flood is at full rate before the stream starts
        if self.proc.poll() is not None:
            raise SystemExit(f"trafgen failed: {self.proc.stderr.read().decode()[-500:]}")

    def stop(self) -> float:
        """Stop; return the offered rate in frames per second."""
        packets = self.net.rx_packets(self.c) - self.start_packets
        elapsed = time.monotonic() - self.started
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return packets / elapsed


def main() -> None:
    from skyguard.doctor import require_privileges

    require_privileges("bench/flood.py")
    if not shutil.which("trafgen"):
        raise SystemExit("trafgen is missing: apt-get install netsniff-ng (scripts/setup installs it)")
    setups = ("no filter", "skyguard", "nftables")
    samples = {k: [] for s in setups for k in (s, s + "+flood")}
    offered = {s: [] for s in setups}
    drops = 0
    with VmNet(("a", "b", "c")) as net:
        a, b = net.vms["a"], net.vms["b"]
        config = trafgen_config(net)
        policy = bench_policy(net, RULES, ALLOW)
        ruleset = nft_ruleset(net, RULES, ALLOW)
        try:
            for r in range(ROUNDS):
                for setup in setups:
                    if setup == "skyguard":
                        net.skyguard_on(policy)
                    elif setup == "nftables":
                        net.nft_on(ruleset)
                    samples[setup].append(net.iperf(a, b, SECONDS, cpu=STREAM_CPU))
                    flood = Flood(net, config)
                    try:
                        samples[f"{setup}+flood"].append(net.iperf(a, b, SECONDS, cpu=STREAM_CPU))
                    finally:
                        offered[setup].append(flood.stop())
                    if setup == "skyguard":
                        counters = net.skyguard_counters()
                        drops = sum(d["packets"] for d in counters["drops"] if d["zone"] == "c")
                        net.skyguard_detach()
                    elif setup == "nftables":
                        nft_dropped = net.nft_counters()[-1]
                        net.nft_off()
                        if not nft_dropped:
                            raise SystemExit("nftables dropped nothing: the flood did not reach its rules")
                    progress(f"round {r + 1}/{ROUNDS} {setup}: stream {samples[setup][-1]:.2f} Gbit/s alone, "
                             f"{samples[setup + '+flood'][-1]:.2f} under a flood of "
                             f"{offered[setup][-1] / 1e3:.0f}k frames/s")
            if not drops:
                raise SystemExit("skyguard counted no drop from c: the flood did not go through it")
        finally:
            config.unlink(missing_ok=True)
    med = {k: median(v) for k, v in samples.items()}
    # the machine is shared: judge each flood run against the run just before it, then take medians
    per_round = {s: [f / alone for f, alone in zip(samples[s + "+flood"], samples[s])] for s in setups}
    kept = {s: median(v) for s, v in per_round.items()}
    plot("flood", {f"{s}{' + flood' if f else ''}": med[s + ("+flood" if f else "")] for s in setups
                   for f in (False, True)},
         xlabel="setup", ylabel="stream Gbit/s (median)", kind="bar", title="TCP stream under a denied 64-byte flood")
    result("flood", "fraction of stream throughput kept under the flood", kept["skyguard"], kept["nftables"],
           target=0.8, target_applies_to="skyguard",
           meets_ahead_of_nftables=kept["skyguard"] >= kept["nftables"],
           kept_without_any_filter=kept["no filter"],  # what the flood costs the 2 CPUs by itself
           stream_gbps=med, flood_frames_per_s={k: median(v) for k, v in offered.items()},
           skyguard_drops_counted=drops, kept_per_round=per_round, rules=RULES, seconds_per_run=SECONDS, rounds=ROUNDS,
           samples=samples)


if __name__ == "__main__":
    main()
