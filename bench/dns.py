#!/usr/bin/env python3
"""Benchmark `dns`: queries/s and added latency through skyguard's DNS proxy, side by side with
a plain dnslib forwarder (the throughput anchor) and unbound answering directly (the latency
anchor), in one run.

Setup, all on loopback (ports PORT_BASE..PORT_BASE+3, default 23100; `--port-base` or
$SKYGUARD_BENCH_DNS_PORT_BASE for parallel runs): unbound serves a static `test.` zone and is the
upstream of both forwarders; dnsperf drives each target.
- Throughput: dnsperf at unlimited rate for DURATION seconds per target.
- Latency: dnsperf at 1k qps with per-query latencies (-v), in ROUNDS rounds of ROUND_SECONDS
  per side that rotate their order over unbound, a bare relay and skyguard, so a noisy neighbour
  on a shared machine hits every side alike. Samples are pooled (default 6 x 5 s = 30k per side):
  "added" p50/p99/p999 is skyguard's percentile minus unbound's. Each round's own added p99 is
  reported too, to show how stable the figure is. The bare relay (uvloop, no parsing, no policy)
  is the floor any forwarder in this language pays on this machine for the extra hop: the part
  of skyguard's added latency that policy work could ever remove is the part above it.
The proxy runs its full per-query path (policy, tunnelling detection, TTL clamp, CNAME walk,
rebinding check, learning, metrics) with an in-memory learner standing in for the BPF map update
and no signed log (those costs belong to their own benchmarks), on uvloop and with the same
latency settings the daemon applies (skyguard.dns.latency). Its garbage-collector pauses are
counted and reported.

`--compare-with TREE` ($SKYGUARD_BENCH_DNS_COMPARE_WITH with bench/run) adds the proxy of another source tree
(run by this file's harness over that tree's skyguard package) to the throughput runs and the latency rounds: a before/after
comparison in which both sides share the machine's noise (PORT_BASE+4).

Not a test: it asserts nothing. Progress goes to stderr; the last stdout line is one JSON object
(also written to bench/results/dns.json). Run: `bench/run dns` or `python bench/dns.py` (root
not needed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
if os.environ.get("SKYGUARD_BENCH_DNS_TREE"):  # --compare-with: that tree's skyguard package
    sys.path.insert(0, os.environ["SKYGUARD_BENCH_DNS_TREE"])

from _common import RESULTS_DIR, progress  # noqa: E402

PORT_BASE = int(os.environ.get("SKYGUARD_BENCH_DNS_PORT_BASE", "23100"))
NAMES = 400
DURATION = float(os.environ.get("SKYGUARD_BENCH_DNS_SECONDS", "8"))
ROUNDS = int(os.environ.get("SKYGUARD_BENCH_DNS_ROUNDS", "6"))
ROUND_SECONDS = float(os.environ.get("SKYGUARD_BENCH_DNS_ROUND_SECONDS", "5"))
LATENCY_QPS = 1000
TARGET_RATIO = 2.0
TARGET_ADDED_P99_MS = 1.0


def log(message: str) -> None:
    progress(f"[dns] {message}")


def names():
    for i in range(NAMES):
        yield f"www.site{i}.test", f"203.0.113.{i % 250 + 1}"


# ---- the servers (each runs as its own process) -----------------------------------------

def serve_dnslib(port: int, upstream_port: int) -> None:
    from dnslib.proxy import ProxyResolver
    from dnslib.server import DNSLogger, DNSServer

    logger = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data")
    server = DNSServer(ProxyResolver("127.0.0.1", upstream_port, timeout=2), port=port,
                       address="127.0.0.1", logger=logger)
    server.start()


def serve_relay(port: int, upstream_port: int) -> None:
    """The floor of any forwarder in this language and loop: uvloop, one upstream socket, the
    query relayed as it came and the reply relayed back by ID, nothing parsed, nothing decided.
    What it adds over unbound is the cost of one more hop (two more process wake-ups) on this
    machine; what skyguard adds beyond it is the policy work."""
    import asyncio

    import uvloop

    upstream_address = ("127.0.0.1", upstream_port)

    class Upstream(asyncio.DatagramProtocol):
        def __init__(self):
            self.transport = None
            self.waiting = {}  # query ID -> client address (dnsperf's IDs are unique in flight)

        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            client = self.waiting.pop(data[:2], None)
            if client is not None:
                listener.transport.sendto(data, client)

    class Listener(asyncio.DatagramProtocol):
        def __init__(self):
            self.transport = None

        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            upstream.waiting[data[:2]] = addr
            upstream.transport.sendto(data, upstream_address)

    loop = uvloop.new_event_loop()
    _, upstream = loop.run_until_complete(loop.create_datagram_endpoint(
        Upstream, local_addr=("127.0.0.1", 0)))
    _, listener = loop.run_until_complete(loop.create_datagram_endpoint(
        Listener, local_addr=("127.0.0.1", port)))
    loop.run_forever()


def serve_skyguard(port: int, upstream_port: int, stats_path: str) -> None:
    import asyncio
    import ipaddress

    from skyguard.dns.interfaces import PolicyDirectory
    from skyguard.dns.resolver import DnsPolicyResolver
    from skyguard.dns.server import DnsServer, Upstream
    from skyguard.parts import NullLog
    from skyguard.policy.model import Destination, DnsConfig, Policy, PortRange, Rule, Workload, Zone

    class DictLearner:
        """Stands in for Datapath.learn: one dict write per (zone, rule, ip)."""

        def __init__(self):
            self.table = {}

        def learn(self, zone, rule_name, ips, ttl):
            for ip in ips:
                self.table[(zone, rule_name, ip)] = ttl

    client = Workload("bench", "bench", "lo", "02:00:00:00:00:01",
                      (ipaddress.ip_address("127.0.0.1"),))
    policy = Policy("bench", {"bench": Zone("bench", (client,))}, {},
                    (Rule("bench-web", "allow", ("bench",), Destination(fqdns=("**.test",)),
                          (PortRange("tcp", 443, 443),)),),
                    DnsConfig(("127.0.0.1",), "refused", 5, 3600))
    resolver = DnsPolicyResolver(policy, PolicyDirectory(policy), DictLearner(), log=NullLog())
    server = DnsServer(resolver, [Upstream("127.0.0.1", upstream_port)],
                       listen=[("127.0.0.1", port)])

    import gc

    pauses: dict[int, list[float]] = {}  # generation -> pause seconds, while measuring
    started = [0.0]

    def time_gc(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.setdefault(info["generation"], []).append(time.perf_counter() - started[0])

    def write_stats(*_):
        buckets = [(sample.labels["le"], sample.value)
                   for family in resolver.metrics.registry.collect()
                   if family.name == "skyguard_dns_learn_seconds"
                   for sample in family.samples if sample.name.endswith("_bucket")]
        gc_pauses = {str(g): {"count": len(v), "max_ms": round(max(v) * 1e3, 3),
                              "total_ms": round(sum(v) * 1e3, 3)} for g, v in sorted(pauses.items())}
        Path(stats_path).write_text(json.dumps({"learn_buckets": buckets, "gc_pauses": gc_pauses}))
        os._exit(0)

    def reset_stats(*_):  # the driver's mark: measuring starts now (startup collections are not)
        pauses.clear()

    signal.signal(signal.SIGTERM, write_stats)
    signal.signal(signal.SIGUSR1, reset_stats)
    gc.callbacks.append(time_gc)
    if not os.environ.get("SKYGUARD_BENCH_NO_UVLOOP"):
        try:
            import uvloop  # optional; SKYGUARD_BENCH_NO_UVLOOP=1 measures the stock loop
            uvloop.install()
        except ImportError:
            pass
    loop = asyncio.new_event_loop()
    loop.run_until_complete(server.start())
    try:
        from skyguard.dns.latency import settle_for_latency
    except ImportError:  # a tree from before skyguard.dns.latency: measured as it was
        pass
    else:
        if not os.environ.get("SKYGUARD_BENCH_DNS_NO_TUNING"):
            settle_for_latency()
    loop.run_forever()


# ---- driver ------------------------------------------------------------------------------

def wait_port(port: int, server: subprocess.Popen | None = None, timeout=10.0) -> None:
    """Until something answers a query on port; fails at once if server (its process) exits."""
    query = bytes.fromhex("abcd01000001000000000000") + b"\x03www\x05site0\x04test\x00\x00\x01\x00\x01"
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        while time.monotonic() < deadline:
            if server is not None and server.poll() is not None:
                raise RuntimeError(f"the server for port {port} ({' '.join(map(str, server.args[:3]))}"
                                   f" ...) exited with status {server.returncode}; its error is above")
            s.sendto(query, ("127.0.0.1", port))
            try:
                s.recv(4096)
                return
            except OSError:
                continue
    raise RuntimeError(f"nothing answers on 127.0.0.1:{port}")


def dnsperf(port: int, queries: Path, *extra: str) -> str:
    command = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), *extra]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def throughput(port: int, queries: Path) -> tuple[float, float]:
    out = dnsperf(port, queries, "-l", str(DURATION), "-c", "1", "-q", "100", "-t", "2")
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))
    lost = float(re.search(r"Queries lost:\s+\d+ \(([\d.]+)%\)", out).group(1))
    return qps, lost


def latencies(port: int, queries: Path, seconds: float) -> tuple[list[float], int]:
    """Per-query latencies (seconds) at LATENCY_QPS, and how many queries got no answer."""
    out = dnsperf(port, queries, "-l", str(seconds), "-Q", str(LATENCY_QPS), "-v", "-t", "2")
    values = [float(m) for m in re.findall(r"^> \w+ \S+ \S+ ([\d.]+)$", out, re.M)]
    lost = int(re.search(r"Queries lost:\s+(\d+)", out).group(1))
    return values, lost


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0 < q < 1) by the nearest-rank method: a sample that was really seen."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


def summarise(values: list[float]) -> dict:
    return {"samples": len(values), "p50_ms": round(percentile(values, 0.50) * 1e3, 3),
            "p90_ms": round(percentile(values, 0.90) * 1e3, 3),
            "p99_ms": round(percentile(values, 0.99) * 1e3, 3),
            "p999_ms": round(percentile(values, 0.999) * 1e3, 3),
            "max_ms": round(max(values) * 1e3, 3)}


def unbound_conf(work: Path, port: int) -> str:
    local = "\n".join(f'  local-data: "{n}. 300 IN A {ip}"' for n, ip in names())
    return f"""server:
  interface: 127.0.0.1
  port: {port}
  do-daemonize: no
  use-syslog: no
  logfile: ""
  username: ""
  chroot: ""
  directory: "{work}"
  pidfile: ""
  num-threads: 1
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  verbosity: 0
  local-zone: "test." static
{local}
"""


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs: steal is time the hypervisor ran something else while
    this VM's vCPUs wanted to run, a tail no process in the VM can shorten."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


def main(port_base: int, compare_tree: Path | None = None) -> None:
    skyguard_port, dnslib_port, unbound_port = port_base, port_base + 1, port_base + 2
    relay_port, compared_port = port_base + 3, port_base + 4
    if compare_tree is not None and not (compare_tree / "skyguard" / "dns" / "server.py").is_file():
        sys.exit(f"--compare-with {compare_tree}: no skyguard/dns/server.py there; give the root "
                 "of a skyguard source tree (e.g. from `git archive COMMIT | tar -x -C DIR`)")
    for tool in ("dnsperf", "unbound"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed: run scripts/setup (it installs dnsperf, unbound)")
    if ROUNDS < 1 or ROUND_SECONDS <= 0 or DURATION <= 0:
        sys.exit("SKYGUARD_BENCH_DNS_ROUNDS must be >= 1 and the durations > 0")
    work = Path(tempfile.mkdtemp(prefix="skyguard-bench-dns-"))
    conf = work / "unbound.conf"
    conf.write_text(unbound_conf(work, unbound_port))
    queries = work / "queries.txt"
    queries.write_text("".join(f"{n} A\n" for n, _ in names()))
    stats_path = work / "skyguard-stats.json"
    load_before = load_average()
    procs = []
    try:
        procs.append(subprocess.Popen(["unbound", "-c", str(conf)], stderr=subprocess.DEVNULL))
        wait_port(unbound_port, procs[-1])
        py = sys.executable
        dnslib = subprocess.Popen([py, __file__, "--serve-dnslib", str(dnslib_port),
                                   str(unbound_port)])
        skyguard = subprocess.Popen([py, __file__, "--serve-skyguard", str(skyguard_port),
                                     str(unbound_port), str(stats_path)])
        relay = subprocess.Popen([py, __file__, "--serve-relay", str(relay_port),
                                  str(unbound_port)])
        procs += [dnslib, skyguard, relay]
        wait_port(dnslib_port, dnslib)
        wait_port(skyguard_port, skyguard)
        wait_port(relay_port, relay)
        targets = [("unbound", unbound_port), ("dnslib", dnslib_port), ("skyguard", skyguard_port)]
        if compare_tree is not None:
            # The same proxy harness (this file) over the other tree's skyguard package.
            compared = subprocess.Popen(
                [py, __file__, "--serve-skyguard", str(compared_port), str(unbound_port),
                 str(work / "compared-stats.json")],
                env={**os.environ, "SKYGUARD_BENCH_DNS_TREE": str(compare_tree.resolve())})
            procs.append(compared)
            wait_port(compared_port, compared)
            targets.append(("compared", compared_port))

        results = {}
        for label, port in targets:
            log(f"throughput through {label} for {DURATION:g}s ...")
            qps, lost = throughput(port, queries)
            log(f"  {label}: {qps:,.0f} queries/s, {lost:.2f}% lost")
            results[label] = {"qps": qps, "lost_percent": lost}
        results["relay"] = {}

        # Latency: rounds rotate the order of the sides, so slow drifts and neighbours' bursts
        # land on all of them. A warm-up second first: the proxy's caches fill on first sight.
        latencies(skyguard_port, queries, 1)
        latencies(relay_port, queries, 1)
        if compare_tree is not None:
            latencies(compared_port, queries, 1)
        skyguard.send_signal(signal.SIGUSR1)  # count GC pauses from here on
        steal_before, total_before = cpu_ticks()
        sides = [("unbound", unbound_port), ("relay", relay_port), ("skyguard", skyguard_port)]
        if compare_tree is not None:
            sides.append(("compared", compared_port))
        pooled = {label: [] for label, _ in sides}
        lost = {label: 0 for label, _ in sides}
        rounds = []
        for round_index in range(ROUNDS):
            shift = round_index % len(sides)
            this_round = {}
            for label, port in sides[shift:] + sides[:shift]:
                values, missing = latencies(port, queries, ROUND_SECONDS)
                if not values:
                    raise RuntimeError(f"dnsperf got no answers from {label} at {LATENCY_QPS} qps")
                pooled[label].extend(values)
                lost[label] += missing
                this_round[label] = percentile(values, 0.99) * 1e3
            added = this_round["skyguard"] - this_round["unbound"]
            rounds.append(round(added, 3))
            log(f"latency round {round_index + 1}/{ROUNDS} at {LATENCY_QPS} qps, "
                f"{ROUND_SECONDS:g}s each, p99: unbound {this_round['unbound']:.3f} ms, "
                f"bare relay {this_round['relay']:.3f} ms, skyguard {this_round['skyguard']:.3f} "
                f"ms (added {added:.3f} ms)")
        steal_after, total_after = cpu_ticks()
        steal_percent = 100.0 * (steal_after - steal_before) / max(1, total_after - total_before)
        for label in pooled:
            results[label]["latency"] = summarise(pooled[label])
            results[label]["latency"]["lost"] = lost[label]
        skyguard.send_signal(signal.SIGTERM)
        skyguard.wait(10)
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(work, ignore_errors=True)

    sky, direct = results["skyguard"]["latency"], results["unbound"]["latency"]
    relay = results.pop("relay")["latency"]
    compared = results.pop("compared", None)
    added = {q: round(sky[f"{q}_ms"] - direct[f"{q}_ms"], 3) for q in ("p50", "p99", "p999")}
    relay_added = {q: round(relay[f"{q}_ms"] - direct[f"{q}_ms"], 3) for q in ("p50", "p99", "p999")}
    ratio = results["skyguard"]["qps"] / results["dnslib"]["qps"]
    learn = stats.get("learn_buckets", [])
    total = learn[-1][1] if learn else 0
    learn_p99 = next((float(le) for le, count in learn if total and count >= 0.99 * total), None)
    meets_throughput = ratio >= TARGET_RATIO
    meets_latency = added["p99"] <= TARGET_ADDED_P99_MS
    summary = {
        "name": "dns", "metric": "queries/s through the proxy (dnsperf, loopback)",
        "skyguard": round(results["skyguard"]["qps"]), "anchor": round(results["dnslib"]["qps"]),
        "anchor_name": "plain dnslib forwarder (dnslib.proxy.ProxyResolver)",
        "ratio": round(ratio, 2), "target": TARGET_RATIO,
        "meets_target": bool(meets_throughput and meets_latency),
        "meets_throughput_target": meets_throughput, "meets_latency_target": meets_latency,
        "higher_is_better": True, "target_applies_to": "ratio",
        "unbound_qps": round(results["unbound"]["qps"]),
        "added_p99_ms_at_1k_qps": added["p99"], "added_p99_target_ms": TARGET_ADDED_P99_MS,
        "added_p50_ms_at_1k_qps": added["p50"], "added_p999_ms_at_1k_qps": added["p999"],
        "added_p99_ms_per_round": rounds,
        "added_p99_ms_median_of_rounds": round(sorted(rounds)[len(rounds) // 2], 3),
        "bare_relay_added_ms_at_1k_qps": relay_added,
        "bare_relay_latency": relay,
        "latency_method": f"{ROUNDS} rounds x {ROUND_SECONDS:g}s at {LATENCY_QPS} qps per side, "
                          "sides in rotating order, samples pooled; added = skyguard percentile "
                          "- unbound percentile (so an unlucky unbound tail can make it negative)",
        "p99_ms": {"unbound": direct["p99_ms"], "skyguard": sky["p99_ms"]},
        "answer_to_learned_p99_le_ms": learn_p99 * 1e3 if learn_p99 is not None else None,
        "skyguard_gc_pauses_while_measuring": stats.get("gc_pauses"),
        "load_average_before_after": [load_before, load_average()],
        "cpu_steal_percent_while_measuring_latency": round(steal_percent, 2),
        "host": {"kernel": os.uname().release, "cpus": os.cpu_count()},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "details": results,
    }
    if compared is not None:
        other = compared["latency"]
        summary["compared_with"] = {
            "tree": str(compare_tree), "qps": round(compared["qps"]),
            "added_ms_at_1k_qps": {q: round(other[f"{q}_ms"] - direct[f"{q}_ms"], 3)
                                   for q in ("p50", "p99", "p999")},
            "latency": other}
        log(f"compared tree {compare_tree}: {compared['qps']:,.0f} queries/s, added p50 "
            f"{summary['compared_with']['added_ms_at_1k_qps']['p50']:.3f} ms, p99 "
            f"{summary['compared_with']['added_ms_at_1k_qps']['p99']:.3f} ms")
    log(f"added latency at {LATENCY_QPS} qps: p50 {added['p50']:.3f} ms, p99 {added['p99']:.3f} ms"
        f" (target <= {TARGET_ADDED_P99_MS:g}), p999 {added['p999']:.3f} ms; "
        f"throughput {ratio:.2f}x dnslib (target >= {TARGET_RATIO:g}x); a bare relay adds "
        f"p50 {relay_added['p50']:.3f} ms, p99 {relay_added['p99']:.3f} ms")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "dns.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-base", type=int, default=PORT_BASE,
                        help="loopback UDP ports BASE (skyguard), BASE+1 (dnslib), BASE+2 "
                             "(unbound); default $SKYGUARD_BENCH_DNS_PORT_BASE or 23100")
    compare_default = os.environ.get("SKYGUARD_BENCH_DNS_COMPARE_WITH")
    parser.add_argument("--compare-with", type=Path, metavar="TREE",
                        default=Path(compare_default) if compare_default else None,
                        help="($SKYGUARD_BENCH_DNS_COMPARE_WITH) also measure the proxy of another skyguard source tree (e.g. an "
                             "older commit unpacked with git archive) in the same rounds: "
                             "before/after figures that share the machine's noise")
    parser.add_argument("--serve-dnslib", nargs=2, type=int, metavar=("PORT", "UPSTREAM_PORT"))
    parser.add_argument("--serve-relay", nargs=2, type=int, metavar=("PORT", "UPSTREAM_PORT"))
    parser.add_argument("--serve-skyguard", nargs=3, metavar=("PORT", "UPSTREAM_PORT", "STATS"))
    args = parser.parse_args()
    if args.serve_dnslib:
        serve_dnslib(*args.serve_dnslib)
    elif args.serve_relay:
        serve_relay(*args.serve_relay)
    elif args.serve_skyguard:
        serve_skyguard(int(args.serve_skyguard[0]), int(args.serve_skyguard[1]),
                       args.serve_skyguard[2])
    else:
        main(args.port_base, args.compare_with)
