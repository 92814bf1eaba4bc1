#!/usr/bin/env python3
"""Benchmark `dns`: queries/s and added p99 latency through skyguard's DNS proxy, side by side
with a plain dnslib forwarder (the anchor) and unbound answering directly, in one run.

Setup, all on loopback (ports 23100-23102): unbound serves a static `test.` zone and is the
upstream of both forwarders; dnsperf drives each target. Throughput: dnsperf unlimited rate for
DURATION seconds. Latency: dnsperf at 1k qps with per-query latencies (-v); "added" p99 is the
forwarder's p99 minus unbound's direct p99. The proxy runs its full per-query path (policy,
tunnelling detection, TTL clamp, CNAME walk, rebinding check, learning) with an in-memory learner
standing in for the BPF map update and no signed log: those costs belong to their own benchmarks.

Not a test: it asserts nothing. Progress goes to stderr; the last stdout line is one JSON object.
Run: `bench/run dns` or `python bench/dns.py` (root not needed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SKYGUARD_PORT, DNSLIB_PORT, UNBOUND_PORT = 23100, 23101, 23102
NAMES = 400
DURATION = float(os.environ.get("SKYGUARD_BENCH_DNS_SECONDS", "8"))
LATENCY_QPS = 1000
TARGET_RATIO = 2.0
TARGET_ADDED_P99_MS = 1.0


def log(message: str) -> None:
    print(f"[dns] {message}", file=sys.stderr, flush=True)


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


def serve_skyguard(port: int, upstream_port: int, stats_path: str) -> None:
    import asyncio
    import ipaddress

    from skyguard.dns.interfaces import NullLog, PolicyDirectory
    from skyguard.dns.resolver import DnsPolicyResolver
    from skyguard.dns.server import DnsServer, Upstream
    from skyguard.policy.model import (Destination, DnsConfig, Policy, PortRange, Rule,
                                       Workload, Zone)

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

    def write_stats(*_):
        hist = resolver.metrics.learn_latency.collect()[0]
        buckets = [(s.labels["le"], s.value) for s in hist.samples if s.name.endswith("_bucket")]
        Path(stats_path).write_text(json.dumps({"learn_buckets": buckets}))
        os._exit(0)

    signal.signal(signal.SIGTERM, write_stats)
    if not os.environ.get("SKYGUARD_BENCH_NO_UVLOOP"):
        try:
            import uvloop  # optional; SKYGUARD_BENCH_NO_UVLOOP=1 measures the stock loop
            uvloop.install()
        except ImportError:
            pass
    loop = asyncio.new_event_loop()
    loop.run_until_complete(server.start())
    loop.run_forever()


# ---- driver ------------------------------------------------------------------------------

def wait_port(port: int, timeout=10.0) -> None:
    query = bytes.fromhex("abcd01000001000000000000") + b"\x03www\x05site0\x04test\x00\x00\x01\x00\x01"
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        while time.monotonic() < deadline:
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


def latencies(port: int, queries: Path) -> list[float]:
    out = dnsperf(port, queries, "-l", "5", "-Q", str(LATENCY_QPS), "-v", "-t", "2")
    return [float(m) for m in re.findall(r"^> \w+ \S+ \S+ ([\d.]+)$", out, re.M)]


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 100 else float("nan")


def main() -> None:
    for tool in ("dnsperf", "unbound"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed: run scripts/setup (it installs dnsperf, unbound)")
    work = Path(tempfile.mkdtemp(prefix="skyguard-bench-dns-"))
    conf = work / "unbound.conf"
    local = "\n".join(f'  local-data: "{n}. 300 IN A {ip}"' for n, ip in names())
    conf.write_text(f"""server:
  interface: 127.0.0.1
  port: {UNBOUND_PORT}
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
""")
    queries = work / "queries.txt"
    queries.write_text("".join(f"{n} A\n" for n, _ in names()))
    stats_path = work / "skyguard-stats.json"
    procs = []
    try:
        procs.append(subprocess.Popen(["unbound", "-c", str(conf)], stderr=subprocess.DEVNULL))
        wait_port(UNBOUND_PORT)
        py = sys.executable
        procs.append(subprocess.Popen([py, __file__, "--serve-dnslib", str(DNSLIB_PORT),
                                       str(UNBOUND_PORT)]))
        skyguard = subprocess.Popen([py, __file__, "--serve-skyguard", str(SKYGUARD_PORT),
                                     str(UNBOUND_PORT), str(stats_path)])
        procs.append(skyguard)
        wait_port(DNSLIB_PORT)
        wait_port(SKYGUARD_PORT)

        results = {}
        for label, port in (("unbound", UNBOUND_PORT), ("dnslib", DNSLIB_PORT),
                            ("skyguard", SKYGUARD_PORT)):
            log(f"throughput through {label} for {DURATION:.0f}s ...")
            qps, lost = throughput(port, queries)
            log(f"  {label}: {qps:,.0f} queries/s, {lost:.2f}% lost")
            results[label] = {"qps": qps, "lost_percent": lost}
        for label, port in (("unbound", UNBOUND_PORT), ("dnslib", DNSLIB_PORT),
                            ("skyguard", SKYGUARD_PORT)):
            log(f"latency through {label} at {LATENCY_QPS} qps ...")
            values = latencies(port, queries)
            results[label].update(p99_ms=p99(values) * 1e3,
                                  p50_ms=statistics.median(values) * 1e3 if values else None,
                                  latency_samples=len(values))
            log(f"  {label}: p50 {results[label]['p50_ms']:.3f} ms, "
                f"p99 {results[label]['p99_ms']:.3f} ms")
        skyguard.send_signal(signal.SIGTERM)
        skyguard.wait(10)
        learn = json.loads(stats_path.read_text())["learn_buckets"] if stats_path.exists() else []
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(work, ignore_errors=True)

    ratio = results["skyguard"]["qps"] / results["dnslib"]["qps"]
    added_p99 = results["skyguard"]["p99_ms"] - results["unbound"]["p99_ms"]
    total = learn[-1][1] if learn else 0
    learn_p99 = next((float(le) for le, count in learn if total and count >= 0.99 * total), None)
    summary = {
        "name": "dns", "metric": "queries/s through the proxy (dnsperf, loopback)",
        "skyguard": round(results["skyguard"]["qps"]), "anchor": round(results["dnslib"]["qps"]),
        "anchor_name": "plain dnslib forwarder (dnslib.proxy.ProxyResolver)",
        "ratio": round(ratio, 2), "target": TARGET_RATIO,
        "unbound_qps": round(results["unbound"]["qps"]),
        "added_p99_ms_at_1k_qps": round(added_p99, 3), "added_p99_target_ms": TARGET_ADDED_P99_MS,
        "p99_ms": {k: round(v["p99_ms"], 3) for k, v in results.items()},
        "answer_to_learned_p99_le_ms": learn_p99 * 1e3 if learn_p99 is not None else None,
        "meets_target": bool(ratio >= TARGET_RATIO and added_p99 <= TARGET_ADDED_P99_MS),
        "details": results,
    }
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"dns-{time.strftime('%Y%m%dT%H%M%S')}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-dnslib", nargs=2, type=int, metavar=("PORT", "UPSTREAM_PORT"))
    parser.add_argument("--serve-skyguard", nargs=3, metavar=("PORT", "UPSTREAM_PORT", "STATS"))
    args = parser.parse_args()
    if args.serve_dnslib:
        serve_dnslib(*args.serve_dnslib)
    elif args.serve_skyguard:
        serve_skyguard(int(args.serve_skyguard[0]), int(args.serve_skyguard[1]),
                       args.serve_skyguard[2])
    else:
        main()
