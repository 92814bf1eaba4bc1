#!/usr/bin/env python3
"""Benchmark of the signed log: durable appends per second in batches, full verification speed,
and inclusion-proof verification time, beside the anchor: Tessera's published POSIX figures
(1.6k-2.9k durable writes/s; ratio reported against 2.9k). Tessera cannot run here (no Go
toolchain), so the anchor is its published number; the same run also measures skyguard's own
one-entry-per-fsync appends as a local baseline.

Run: `bench/run tlog` or `python bench/tlog.py [--entries N]`. Progress on stderr; the last stdout
line is one JSON object; results also go to bench/results/tlog.json. Not a test: nothing here
asserts a time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from skyguard.tlog.checkpoint import Checkpoint, Signer  # noqa: E402
from skyguard.tlog.entries import entry  # noqa: E402
from skyguard.tlog.hashing import hash_leaf  # noqa: E402
from skyguard.tlog.store import LogReader, LogWriter  # noqa: E402
from skyguard.tlog.tree import inclusion_proof, verify_inclusion  # noqa: E402
from skyguard.tlog.verify import verify_log  # noqa: E402

TESSERA_POSIX_WRITES_PER_S = 2900     # published upper figure (1.6k-2.9k)
TARGET_APPENDS = 50_000
TARGET_VERIFY = 200_000
TARGET_PROOF_US = 50.0


def progress(message: str) -> None:
    print(f"[tlog] {message}", file=sys.stderr, flush=True)


def flow_entries(count: int, offset: int = 0) -> list[bytes]:
    """Entries shaped like the datapath's flow records (~230 bytes of canonical JSON)."""
    base = time.time_ns()
    return [entry("flow_start", time=base + i, zone="auth", workload="radius1", direction="egress",
                  src="10.10.1.2", dst="10.20.1.2", sport=40000 + i % 20000, dport=389,
                  proto="tcp", verdict="allow", rule="auth-to-ldap", reason="rule",
                  flow_id=offset + i) for i in range(count)]


def bench_batched(directory: Path, signer: Signer, total: int, batch: int, submitters: int) -> float:
    """Durable appends/s: `submitters` threads each append batches and wait for durability."""
    batches = [flow_entries(batch, i * batch) for i in range(total // batch)]
    with LogWriter(directory, signer) as writer:
        per_thread = [batches[t::submitters] for t in range(submitters)]

        def work(mine):
            for b in mine:
                writer.append_batch(b)

        threads = [threading.Thread(target=work, args=(mine,)) for mine in per_thread]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        appended = writer.size
    return appended / elapsed


def bench_single(directory: Path, signer: Signer, count: int) -> float:
    """One entry, one wait for durability, repeated: what a non-batching caller gets."""
    entries = flow_entries(count)
    with LogWriter(directory, signer) as writer:
        start = time.perf_counter()
        for e in entries:
            writer.append(e)
        return count / (time.perf_counter() - start)


def bench_proof_verify(directory: Path, signer: Signer, rounds: int) -> tuple[float, int]:
    reader = LogReader(directory)
    note = reader.latest_checkpoint_note()
    checkpoint = Checkpoint.parse_body(signer.verifier.verify(note))
    size = checkpoint.size
    source = reader.source()
    index = size // 3
    proof = inclusion_proof(source, index, size)
    leaf = hash_leaf(reader.entry(index))
    start = time.perf_counter()
    for _ in range(rounds):
        verify_inclusion(index, size, leaf, proof, checkpoint.hash)
    return (time.perf_counter() - start) / rounds * 1e6, len(proof)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=400_000, help="entries for the batched run")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write (default: a temporary dir under /var/tmp, on disk)")
    args = parser.parse_args()
    signer = Signer("bench.skyguard/log", Ed25519PrivateKey.generate())
    base = Path(tempfile.mkdtemp(prefix="sg-bench-tlog-", dir=args.dir or "/var/tmp"))
    try:
        progress(f"single-entry durable appends (local baseline) in {base}")
        single = bench_single(base / "single", signer, 300)
        progress(f"  {single:,.0f} appends/s, one fsync each")
        progress(f"batched durable appends: {args.entries:,} entries in batches of {args.batch}, "
                 f"4 submitters")
        batched = bench_batched(base / "log", signer, args.entries, args.batch, 4)
        progress(f"  {batched:,.0f} appends/s")
        progress("verify: recompute every leaf, the tree and every checkpoint")
        start = time.perf_counter()
        report = verify_log(base / "log", signer.verifier)
        verify_rate = report.size / (time.perf_counter() - start)
        if not report.ok:
            progress(f"verification FAILED: {report.problem}")
            return 1
        progress(f"  {verify_rate:,.0f} entries/s over {report.size:,} entries")
        progress("inclusion proof verification")
        proof_us, proof_len = bench_proof_verify(base / "log", signer, 20_000)
        progress(f"  {proof_us:.1f} us per proof of {proof_len} hashes")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result = {
        "name": "tlog", "metric": "durable log appends per second (batches of "
                                  f"{args.batch})",
        "skyguard": round(batched), "anchor": TESSERA_POSIX_WRITES_PER_S,
        "anchor_source": "Tessera POSIX published 1.6k-2.9k durable writes/s (upper figure)",
        "ratio": round(batched / TESSERA_POSIX_WRITES_PER_S, 2), "target": TARGET_APPENDS,
        "single_entry_appends_per_s": round(single),
        "verify_entries_per_s": round(verify_rate), "verify_target": TARGET_VERIFY,
        "inclusion_proof_verify_us": round(proof_us, 2), "proof_target_us": TARGET_PROOF_US,
        "proof_hashes": proof_len,
    }
    result["meets_target"] = (batched >= TARGET_APPENDS and verify_rate >= TARGET_VERIFY
                              and proof_us <= TARGET_PROOF_US)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "tlog.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
