#!/usr/bin/env python3
"""Benchmark `fleet`: time from `policy push` to enforced on all three hosts of a fleet, and
cosigning throughput per host.

Three full daemons, each `skyguard up` in its own lab (host namespace, state, control socket, pin
dir) and joined with `skyguard fleet join` to a real 3-member etcd cluster on loopback once each
pinned the others' keys (`fleet identity`, `fleet trust`), as in tests/integration/test_fleet_daemons.py,
whose harness this reuses. In each lab a prober in VM
web1 opens a new TCP connection to db1:7000 every ~20 ms (50 ms timeout) and prints the verdict
with a timestamp. 20 pushes alternate a policy that allows that flow and one that does not; a
push is enforced on a host at the first probe after the push that shows the new verdict, and on
the fleet when it is on all three. The anchor is the same change made locally on one daemon
through its control socket (what `skyguard policy load` sends), timed the same way.

Cosigning: one witness cosigning successive checkpoints of a growing real log, each with its
consistency proof (verify the log's signature and the proof, fsync the witness state, sign):
checkpoints per second on one core. The two fsyncs of the witness state (file and directory,
~11 ms here) dominate: the state must be durable before a cosignature leaves.

Progress on stderr; the last stdout line is the JSON result. Not a test: nothing here asserts.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests"), str(REPO / "tests" / "integration")]

from _common import plot, progress, result  # noqa: E402

PUSHES = 20
PROBER = r"""
import socket, sys, time
while True:
    s = socket.socket(); s.settimeout(0.05)
    t = time.time()
    try:
        s.connect(("10.10.6.2", 7000)); ok = 1
    except OSError:
        ok = 0
    s.close()
    print(f"{t:.4f} {ok}", flush=True)
    time.sleep(0.02)
"""


class Prober:
    """The latest verdicts from one lab's web1 -> db1:7000, with their times."""

    def __init__(self, lab):
        from daemon_support import PY

        self.proc = lab.popen("web1", [PY, "-c", PROBER], lab_resolver=False, stdout=subprocess.PIPE, text=True)
        self.samples: list[tuple[float, int]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            t, ok = line.split()
            with self.lock:
                self.samples.append((float(t), int(ok)))

    def enforced_at(self, since: float, allowed: bool) -> float | None:
        """The time of the first probe started after `since` showing the wanted verdict, if the
        probes after it agree (a verdict that flips back is not enforcement)."""
        with self.lock:
            after = [(t, ok) for t, ok in self.samples if t >= since]
        for i, (t, ok) in enumerate(after):
            if ok == int(allowed) and all(o == int(allowed) for _, o in after[i:]) and len(after) - i >= 3:
                return t
        return None

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def wait_enforced(probers, since, allowed, timeout=30.0) -> list[float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        times = [p.enforced_at(since, allowed) for p in probers]
        if all(t is not None for t in times):
            return [t - since for t in times]
        time.sleep(0.05)
    raise RuntimeError(f"not enforced on every host within {timeout:.0f} s")


def cosign_rate(work: Path, seconds: float = 3.0) -> float:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from skyguard.tlog import LogWriter, entry, host_signer
    from skyguard.tlog.cosign import Cosigner, Witness
    from skyguard.tlog.store import LogReader
    from skyguard.tlog.tree import consistency_proof

    state = work / "cosign"
    signer = host_signer(state)
    notes = []
    with LogWriter(state / "log", signer) as writer:
        for i in range(400):
            writer.append_batch([entry("flow_start", i=i, j=j) for j in range(10)])
            notes.append(writer.latest_note())
    source = LogReader(state / "log").source()
    from skyguard.tlog.checkpoint import Checkpoint, split_note

    sizes = [Checkpoint.parse_body(split_note(n)[0]).size for n in notes]
    proofs = [None] + [consistency_proof(source, sizes[i - 1], sizes[i]) for i in range(1, len(sizes))]
    vkey = signer.verifier.vkey()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        witness = Witness(work / f"witness-{done}", Cosigner("w.bench/witness", Ed25519PrivateKey.generate()))
        for note, proof in zip(notes, proofs):
            witness.cosign(note, vkey, proof)
            done += 1
    return done / (time.perf_counter() - start)


def main() -> None:
    from test_fleet_daemons import FleetHost, cli, pin_each_other, policy_text

    from skyguard.fleet.admin import push_policy
    from skyguard.fleet.etcd import EtcdStore
    from skyguard.fleet.signing import admin_signer
    from support.etcd_support import LocalEtcdCluster

    work = Path(tempfile.mkdtemp(prefix="sg-bench-fleet-"))
    progress(f"cosigning throughput (work dir {work})")
    rate = cosign_rate(work)
    progress(f"  {rate:.0f} checkpoints cosigned per second (one core, durable witness state)")
    admin_pem = work / "admin.pem"
    admin_vkey = cli("fleet", "admin-key", str(admin_pem)).stdout.strip()
    signer = admin_signer(admin_pem)
    hosts = [FleetHost(i, work) for i in range(3)]
    probers = []
    cluster = LocalEtcdCluster(work / "etcd")
    try:
        with cluster:
            for host in hosts:
                progress(f"starting lab and daemon {host.name}")
                host.start_daemon()
            pin_each_other(hosts, work)   # what an operator does before the hosts witness each other
            for host in hosts:
                host.start_join(cluster.endpoints, admin_vkey)
            probers = [Prober(h.lab) for h in hosts]
            store = EtcdStore(cluster.endpoints)
            # Local anchor: the same flip through host0's control socket (what `skyguard policy
            # load` sends, without the CLI's start-up), timed the same way.
            from skyguard import control

            socket_file = hosts[0].daemon.run_dir / "control.sock"
            local = []
            for k in range(6):
                allowed = k % 2 == 0
                path = work / f"local-{k}.yaml"
                path.write_text(policy_text(allowed, 1000 + k))
                t0 = time.time()
                control.request("policy.load", socket_file=socket_file, text=path.read_text(), source=str(path))
                local.append(wait_enforced(probers[:1], t0, allowed)[0])
            progress(f"  local policy load to enforced: median {statistics.median(local) * 1000:.0f} ms")
            fleet_times, per_host = [], []
            for k in range(PUSHES):
                allowed = k % 2 == 0
                text = policy_text(allowed, k + 1)
                t0 = time.time()
                asyncio.run(push_policy(store, text, signer))
                times = wait_enforced(probers, t0, allowed)
                fleet_times.append(max(times))
                per_host.append(times)
                progress(f"  push {k + 1:2d} ({'allow' if allowed else 'deny '}): enforced on all 3 "
                         f"hosts after {max(times) * 1000:.0f} ms (hosts {', '.join(f'{t * 1000:.0f}' for t in times)})")
    finally:
        for p in probers:
            p.stop()
        for host in hosts:
            try:
                host.cleanup()
            except Exception as e:
                progress(f"cleanup of {host.name}: {e}")
        cluster.stop_all()
    median, worst = statistics.median(fleet_times), max(fleet_times)
    plot("fleet", {"push to enforced on all 3 hosts": [(i + 1, t * 1000) for i, t in enumerate(fleet_times)]},
         xlabel="push", ylabel="ms", title="fleet: policy push to enforced (datapath verdict)")
    result("fleet", "policy push to enforced on all 3 hosts, median (s)", median, statistics.median(local),
           target=1.0, higher_is_better=False, target_applies_to="skyguard",
           worst_s=worst, median_s=median, local_load_median_s=statistics.median(local),
           pushes=PUSHES, per_push_s=fleet_times, per_host_s=per_host,
           probe_resolution_s="about 0.02 (allow) and 0.07 (deny: a 50 ms connect timeout)",
           cosign_checkpoints_per_s=rate,
           note="the anchor is the same policy flip loaded locally through one host's control socket; target: median under 1 s")


if __name__ == "__main__":
    main()
