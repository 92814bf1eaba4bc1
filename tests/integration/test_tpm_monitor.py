"""Continuous attestation and the daemon's TPM hook, driven as the daemon drives them: DaemonTpm
with a real swtpm and a real signed log (LogWriter), the monitor part started, poked and stopped on
an asyncio loop, its metrics read from a Prometheus registry. Each extend and each quote's digest
land in the signed log; a policy outside the reference turns the metric (and so the alert) on.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest
from prometheus_client import CollectorRegistry

from skyguard import config
from skyguard.tlog import LogReader, LogWriter, entry, host_signer
from skyguard.tlog.verify import verify_log
from skyguard.tpm import hook as hook_module
from skyguard.tpm import identity, quote
from skyguard.tpm.device import Tpm
from skyguard.tpm.hook import DaemonTpm
from support.swtpm_support import Swtpm

TAGS = {"sg_from_vm": "0011223344556677", "sg_to_vm": "8899aabbccddeeff"}
GOOD_POLICY = "ab" * 32


@pytest.fixture
def daemon_like(tmp_path):
    """A state dir with `tpm init` done, a signed log, and a record() as the daemon's."""
    emu = Swtpm(tmp_path / "swtpm")
    emu.start()
    state = tmp_path / "state"
    identity.init(Tpm(emu.tcti, state / "tpm" / "lock"), state)
    signer = host_signer(state)
    writer = LogWriter(state / "log", signer)

    def record(kind, **fields):
        writer.append(entry(kind, **fields))

    yield emu, state, writer, record
    writer.close()
    emu.stop()


def entries(state, kind):
    out = []
    for _, raw in LogReader(state / "log").entries():
        e = json.loads(raw)
        if e["type"] == kind:
            out.append(e)
    return out


def launch(hook: DaemonTpm, vkey: str, policy=GOOD_POLICY):
    hook.measure_launch(vkey)
    hook.measure_programs(TAGS)
    hook.measure_policy("keysystems", policy)
    hook.measure_attach("sg-web1", {"tc_egress": {"id": 7, "name": "sg_to_vm", "tag": TAGS["sg_to_vm"]}})


def cli(*args):
    return subprocess.run([sys.executable, "-m", "skyguard.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(config.REPO_ROOT)}, timeout=60)


def sample(registry, name, **labels):
    value = registry.get_sample_value(name, labels or None)
    return value


async def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_measurements_and_quotes_go_to_the_signed_log_and_the_metric_follows_the_reference(daemon_like):
    emu, state, writer, record = daemon_like
    hook = DaemonTpm(state, record=record)
    assert hook.available and hook.status()["event_log"] == "fresh"
    vkey = writer.signer.verifier.vkey()
    launch(hook, vkey)
    extends = entries(state, "tpm_extend")
    assert [e["measured"] for e in extends] == ["package", "bpf_object", "log_key", "program", "program",
                                                 "policy", "attach"]
    assert extends[2]["detail"] == {"key": vkey}
    # the reference a verifier made from this known-good state, installed for the monitor
    ak = json.loads((state / "tpm" / "tpm.json").read_text())["ak_public"]
    nonce = "5a" * 16
    ref = quote.reference_from(quote.make(hook.tpm, state, nonce), ak, nonce)
    (state / "ref.json").write_text(json.dumps(ref))
    installed = cli("tpm", "reference", str(state / "ref.json"), "--state-dir", str(state))
    assert installed.returncode == 0 and (state / "tpm" / "reference.json").exists(), installed.stderr
    (state / "junk.json").write_text('{"a": 1}')
    junk = cli("tpm", "reference", str(state / "junk.json"), "--state-dir", str(state))
    assert junk.returncode == 2 and "not a skyguard reference" in junk.stderr

    registry = CollectorRegistry()

    async def scenario():
        monitor = hook.monitor(registry, period_s=3600)  # only the first quote and changes
        await monitor.start()
        await wait_for(lambda: monitor.last)
        first = dict(monitor.last)
        assert first["result"] == "ok", first
        assert sample(registry, "skyguard_tpm_attestation_ok") == 1
        assert sample(registry, "skyguard_tpm_reference_configured") == 1
        assert sample(registry, "skyguard_tpm_quotes_total", result="ok") == 1
        # another policy is loaded: the daemon measures it, the monitor quotes on the change
        await monitor.set_policy(None)
        hook.measure_policy("permissive", "5e" * 32)
        await wait_for(lambda: monitor.last.get("result") == "outside_reference")
        assert sample(registry, "skyguard_tpm_attestation_ok") == 0
        assert any("policy 'permissive'" in f for f in monitor.last["failures"])
        await monitor.stop()
        return first

    first = asyncio.run(scenario())
    quotes = entries(state, "tpm_quote")
    assert quotes[0]["digest"] == first["digest"] and quotes[0]["result"] == "ok"
    assert quotes[-1]["result"] == "outside_reference" and quotes[-1]["failures"]
    assert len(quotes[0]["digest"]) == 64 and quotes[0]["pcr"] == 13
    status = hook.status()
    assert status["last_quote"]["result"] == "outside_reference" and status["store_key"] == "none"
    writer.checkpoint()
    assert verify_log(state / "log", writer.signer.verifier).ok


def test_quotes_run_on_a_schedule(daemon_like):
    emu, state, writer, record = daemon_like
    hook = DaemonTpm(state, record=record)
    launch(hook, writer.signer.verifier.vkey())
    registry = CollectorRegistry()

    async def scenario():
        monitor = hook.monitor(registry, period_s=0.2)
        await monitor.start()
        await wait_for(lambda: (sample(registry, "skyguard_tpm_quotes_total", result="ok") or 0) >= 3)
        await monitor.stop()

    asyncio.run(scenario())
    # no reference set: the quote and replay are checked, and that is said
    assert sample(registry, "skyguard_tpm_reference_configured") == 0
    assert sample(registry, "skyguard_tpm_attestation_ok") == 1
    assert len(entries(state, "tpm_quote")) >= 3


def test_a_tpm_that_fails_makes_every_quote_fail_and_the_daemon_goes_on(daemon_like):
    emu, state, writer, record = daemon_like
    hook = DaemonTpm(state, record=record)
    launch(hook, writer.signer.verifier.vkey())
    registry = CollectorRegistry()
    emu.stop()  # the TPM goes away under a running daemon
    hook.measure_policy("keysystems", GOOD_POLICY)  # no exception
    assert not hook.available and "a TPM extend failed" in hook.problem
    assert entries(state, "tpm_error")

    async def scenario():
        monitor = hook.monitor(registry, period_s=3600)
        await monitor.start()
        await wait_for(lambda: monitor.last)
        await monitor.stop()
        return monitor.last

    last = asyncio.run(scenario())
    assert last["result"] == "failed" and "measurement stopped" in last["error"]
    assert sample(registry, "skyguard_tpm_attestation_ok") == 0
    assert sample(registry, "skyguard_tpm_quotes_total", result="failed") == 1
    # the event log holds no line the PCR lacks: the failed extend's line was taken back
    lines = (state / "tpm" / "eventlog.jsonl").read_text().splitlines()
    assert len(lines) == 7 and '"kind":"policy"' in lines[5]
    # the TPM comes back after a power cycle: the next start begins a fresh log, the old one kept
    emu.start()
    again = DaemonTpm(state, record=record)
    assert again.available and again.measurements.started == "fresh"
    assert (state / "tpm" / "eventlog.jsonl.1").read_text().splitlines() == lines


def test_no_tpm_at_all_is_a_quiet_no_op(tmp_path, monkeypatch):
    monkeypatch.delenv("SKYGUARD_TPM_TCTI", raising=False)
    recorded = []
    hook = DaemonTpm(tmp_path / "state", record=lambda kind, **f: recorded.append(kind))
    assert not hook.configured and not hook.available and "no TPM" in hook.problem
    launch(hook, "host+00000000+AA==")
    assert recorded == [] and not hook.wants_monitor()
    assert hook.status() == {"available": False, "configured": False, "store_key": "none",
                             "problem": hook.problem}


def test_a_damaged_tpm_configuration_is_reported_not_raised(tmp_path):
    (tmp_path / "tpm").mkdir()
    (tmp_path / "tpm" / "tpm.json").write_text("{")
    recorded = []
    hook = DaemonTpm(tmp_path, record=lambda kind, **f: recorded.append(kind))
    assert hook.configured and not hook.available and "cannot be read" in hook.problem
    assert recorded == ["tpm_error"] and hook.failure()


def test_after_a_failed_extend_a_quote_cannot_pass_off_the_last_measured_state(daemon_like, tmp_path):
    # The TPM does not answer for one extend (a resource manager restarting, a full disk for the
    # event log): the daemon stops measuring, and the next policy it loads is not measured. A
    # quote made afterwards must not verify as the state measured before (fail closed): the
    # verifier would otherwise be told the host runs the known-good policy.
    emu, state, writer, record = daemon_like
    hook = DaemonTpm(state, record=record)
    launch(hook, writer.signer.verifier.vkey())
    ak = tmp_path / "ak.pem"
    ak.write_text(json.loads((state / "tpm" / "tpm.json").read_text())["ak_public"])
    nonce0 = "5a" * 16
    (tmp_path / "ref.json").write_text(json.dumps(quote.reference_from(quote.make(hook.tpm, state, nonce0),
                                                                       ak.read_text(), nonce0)))
    working = hook.tpm.tcti
    hook.tpm.tcti = "swtpm:host=127.0.0.1,port=9"  # nothing answers there
    hook.measure_policy("keysystems", GOOD_POLICY)
    hook.tpm.tcti = working  # the TPM answers again; the daemon no longer measures
    assert not hook.available and "a TPM extend failed" in hook.problem
    hook.measure_policy("permissive", "5e" * 32)  # enforced, never measured
    nonce = "6b" * 16
    made = cli("attest", "--quote", "--nonce", nonce, "--state-dir", str(state), "--tcti", working)
    if made.returncode == 0:
        (tmp_path / "evidence.json").write_text(made.stdout)
        checked = cli("attest", "--verify", str(tmp_path / "evidence.json"), "--ak", str(ak), "--nonce", nonce,
                      "--reference", str(tmp_path / "ref.json"))
        assert checked.returncode == 1, checked.stdout
    else:
        assert made.returncode == 1 and "measurement stopped" in made.stderr, made.stderr
    # a daemon restarted with a working TPM measures again, and quotes work again
    again = DaemonTpm(state, record=record)
    assert again.available and again.measurements.started == "continued"
    launch(again, writer.signer.verifier.vkey())
    fresh = cli("attest", "--quote", "--nonce", nonce, "--state-dir", str(state), "--tcti", working)
    assert fresh.returncode == 0, fresh.stderr


def test_a_damaged_event_log_stops_measuring_instead_of_failing_the_policy_load(daemon_like):
    # The event log gains a line skyguard never wrote (a disk error, a hand edit): the next
    # measurement must not raise into the daemon's policy load, which has already swapped the
    # datapath by then (a half-applied policy); it stops measuring, like a failed extend.
    emu, state, writer, record = daemon_like
    hook = DaemonTpm(state, record=record)
    launch(hook, writer.signer.verifier.vkey())
    log = next((state / "tpm").glob("eventlog*.jsonl"))
    with log.open("ab") as f:
        f.write(b"\xff not json\n")
    hook.measure_policy("keysystems", GOOD_POLICY)  # must not raise
    assert not hook.available and hook.problem



def test_a_monitor_stopped_just_as_a_change_wakes_it_stops(daemon_like):
    # The daemon stops its parts by cancelling their tasks. Before the fix the monitor waited for
    # a change with asyncio.wait_for, which on Python 3.11 drops a cancellation that arrives just
    # as the wait is answered: the monitor went on quoting and its stop() never returned (the
    # daemon's shutdown hung on it). The stop is sent at each point after a change in turn.
    emu, state, writer, record = daemon_like
    hook = DaemonTpm(state, record=record)
    launch(hook, writer.signer.verifier.vkey())

    async def scenario():
        hung = []
        for point in range(10):
            monitor = hook.monitor(None, period_s=3600)   # only the first quote and changes
            await monitor.start()
            await wait_for(lambda monitor=monitor: monitor.last)
            await asyncio.sleep(0.1)   # back to waiting for a change
            monitor.changed()
            for _ in range(point):
                await asyncio.sleep(0)
            stop = asyncio.create_task(monitor.stop())
            _, pending = await asyncio.wait({stop}, timeout=5)
            if pending:
                hung.append(point)
                await monitor.stop()   # a second cancellation, while it quotes or sleeps
                await stop
        return hung

    assert asyncio.run(scenario()) == []


HOLD = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600); " \
       "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"


def test_a_measurement_waiting_for_a_lock_held_too_long_stops_measuring(daemon_like, monkeypatch):
    # The TPM lock held by another process through every retry: the pending measurement is bounded,
    # and then measurement stops as for a failed extend (quotes fail closed until a restart).
    emu, state, writer, record = daemon_like
    monkeypatch.setattr(config, "LOCK_WAIT_S", 0.2)
    monkeypatch.setattr(hook_module, "LOCK_RETRIES", 2)
    monkeypatch.setattr(hook_module, "RETRY_PAUSE_S", 0.05)
    hook = DaemonTpm(state, record=record)
    launch(hook, writer.signer.verifier.vkey())
    registry = CollectorRegistry()
    monitor = hook.monitor(registry, period_s=3600)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(state / "tpm" / "lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        hook.measure_policy("permissive", "5e" * 32)  # no exception: pending
        hook.measure_attach("sg-web2", {"tc_egress": {"id": 8, "name": "sg_to_vm", "tag": TAGS["sg_to_vm"]}})
        assert monitor.attest_once()["result"] == "failed"  # fail closed while it waits
        assert sample(registry, "skyguard_tpm_measurements_pending") == 2
        deadline = time.monotonic() + 60
        while hook.available:
            assert time.monotonic() < deadline, "the pending measurement was retried without bound"
            time.sleep(0.05)
    finally:
        holder.kill()
        holder.wait()
    assert "waited for the TPM lock 3 times" in hook.problem and hook.pending() == 0
    hook.measure_policy("permissive", "5e" * 32)  # nothing more is measured
    assert "measurement stopped" in monitor.attest_once()["error"]
    assert [e["measured"] for e in entries(state, "tpm_measure_deferred")] == ["policy"]
    assert not entries(state, "tpm_measure_resumed")
    made = cli("attest", "--quote", "--nonce", "7c" * 16, "--state-dir", str(state), "--tcti", emu.tcti)
    assert made.returncode == 1 and "measurement stopped" in made.stderr, made.stderr


def test_a_tpm_failing_once_the_lock_held_at_start_is_free_stops_measuring(daemon_like, monkeypatch):
    # The TPM lock held as the daemon starts leaves its launch pending (test_tpm_daemon.py shows it
    # going in); a TPM that fails once the lock is free stops measurement as at any start: nothing
    # left pending for ever, quotes refused until a restart, never `pending` again.
    from skyguard.tpm import measure

    emu, state, writer, record = daemon_like
    monkeypatch.setattr(hook_module, "RETRY_PAUSE_S", 0.05)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(state / "tpm" / "lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        hook = DaemonTpm(state, record=record)  # does not wait for the lock
        launch(hook, writer.signer.verifier.vkey())  # 7 measurements: queued behind the opening
        assert hook.available and hook.pending() == 7 and hook.status()["event_log"] == "pending"
        assert hook.failure().startswith(measure.PENDING) and measure.stopped(state).startswith(measure.PENDING)
        emu.stop()
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 60
    while hook.available:
        assert time.monotonic() < deadline, "a TPM that failed once the lock was free left the launch pending"
        time.sleep(0.05)
    assert "the TPM failed at start" in hook.problem and hook.pending() == 0
    assert not measure.stopped(state).startswith(measure.PENDING)
    assert [e["measured"] for e in entries(state, "tpm_measure_deferred")] == ["event_log"]
    assert entries(state, "tpm_error") and not entries(state, "tpm_measure_resumed")
