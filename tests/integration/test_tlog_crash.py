"""Crash safety of the signed log with a real writer process killed with SIGKILL at random
moments, and a real full disk (a small tmpfs, so that test needs root): every acknowledged entry survives
under a signed checkpoint, the log verifies after each crash, and a write failure stops
acknowledgements."""

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from skyguard.errors import LogError
from skyguard.tlog.checkpoint import Signer
from skyguard.tlog.entries import decode, entry
from skyguard.tlog.hostkey import host_signer
from skyguard.tlog.store import MAX_UNPROVEN, LogReader, LogWriter
from skyguard.tlog.verify import verify_log

REPO = Path(__file__).resolve().parents[2]
KILLS = 12

# The writer: four threads append batches of random sizes (so group commits merge them); after
# each acknowledgement it records "first count run seq" with one O_APPEND write (the ack file
# outlives a SIGKILL: the kernel keeps the page cache, only the process dies).
WRITER = textwrap.dedent("""
    import os, random, sys, threading
    from pathlib import Path
    from skyguard.tlog.entries import entry
    from skyguard.tlog.hostkey import host_signer
    from skyguard.tlog.store import LogWriter
    state, log_dir, acks, run = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    writer = LogWriter(log_dir, host_signer(state, name="crash.test/log"), checkpoint_every=700,
                       checkpoint_interval=0.05, segment_entries=1024)
    ack_fd = os.open(acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    lock = threading.Lock()
    seq = [0]
    def work(thread):
        rng = random.Random(run * 10 + thread)
        while True:
            n = rng.choice([1, 1, 3, 17, 100, 400])
            with lock:
                first_seq = seq[0]
                seq[0] += n
            batch = [entry("flow_start", time=run * 10**9 + first_seq + i, run=run,
                           seq=first_seq + i, pad="x" * rng.randrange(200)) for i in range(n)]
            first = writer.append_batch(batch)
            os.write(ack_fd, f"{first} {n} {run} {first_seq}\\n".encode())
    for t in range(4):
        threading.Thread(target=work, args=(t,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
""")


def test_sigkill_at_random_moments_loses_no_acknowledged_entry(tmp_path):
    state, log_dir, acks = tmp_path / "state", tmp_path / "log", tmp_path / "acks"
    verifier = host_signer(state, name="crash.test/log").verifier
    env = dict(os.environ, PYTHONPATH=str(REPO), SKYGUARD_STATE_DIR=str(state),
               SKYGUARD_RUN_DIR=str(tmp_path / "run"), SKYGUARD_PIN_DIR=str(tmp_path / "pin"))
    rng = random.Random(4)
    for run in range(KILLS):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(state), str(log_dir),
                                 str(acks), str(run)], env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            # Kill at a random moment: the stdout wait below returns after the delay.
            try:
                proc.wait(timeout=rng.uniform(0.01, 0.4))
            except subprocess.TimeoutExpired:
                pass
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the writer died before it was killed"

        # Read-only verification of the crashed log, before any repair.
        report = verify_log(log_dir, verifier)
        assert report.ok, f"after kill {run}: {report.problem}"
        # A crash leaves at most one unsigned block, and never an acknowledged entry unsigned.
        assert report.size - report.covered <= MAX_UNPROVEN
        reader = LogReader(log_dir)
        for line in acks.read_text().splitlines():
            first, count, acked_run, first_seq = map(int, line.split())
            assert first + count <= report.covered, \
                f"after kill {run}: acknowledged entries {first}..{first + count - 1} are not " \
                f"under a signed checkpoint (covered: {report.covered})"
            for i in range(count):
                record = decode(reader.entry(first + i))
                assert (record["run"], record["seq"]) == (acked_run, first_seq + i), \
                    f"after kill {run}: acknowledged entry {first + i} is wrong or missing"
    acked = sum(int(line.split()[1]) for line in acks.read_text().splitlines())
    assert acked > 0
    # A writer reopening the log repairs any torn tail and the result verifies with everything.
    with LogWriter(log_dir, host_signer(state, name="crash.test/log")) as writer:
        assert writer.size >= acked
    final = verify_log(log_dir, verifier)
    assert final.ok and final.size >= acked


def test_write_failure_stops_acknowledgements_loudly(tmp_path, root):
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tlogtest", str(mount)],
                   check=True)
    try:
        signer = Signer("full.test/log", Ed25519PrivateKey.generate())
        # No reserve: the write itself fails (test_tlog_full.py fills a log that keeps one).
        writer = LogWriter(mount / "log", signer, segment_entries=256, reserve_bytes=-1)
        acked = []
        with pytest.raises(LogError, match="failed to write"):
            for i in range(10_000):
                batch = [entry("deny", time=1, n=i, k=k, pad="y" * 900) for k in range(5)]
                acked.append((writer.append_batch(batch), batch))
        assert acked, "the disk filled before anything was written"
        # Nothing is acknowledged after the failure, even if space comes back.
        with pytest.raises(LogError, match="failed to write"):
            writer.append(entry("deny", time=2))
        with pytest.raises(LogError):
            writer.close()
        report = verify_log(mount / "log", signer.verifier)
        assert report.ok, report.problem
        reader = LogReader(mount / "log")
        for first, batch in acked:
            assert [reader.entry(first + k) for k in range(len(batch))] == batch
    finally:
        subprocess.run(["umount", str(mount)], check=True)
