"""The real daemon on a real TPM: `skyguard up` in the lab's host namespace with a swtpm listening
on that namespace's loopback. The launch, the programs, the policy and every attach are measured
into PCR 13 and logged; a remote verifier's check of a fresh quote passes against the reference of
that state and fails, naming the policy, once another policy is hot-loaded; continuous attestation
puts each quote's digest in the signed log; status says which TPM and which store key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from daemon_support import RunningDaemon, wait_for

from skyguard import config
from support.swtpm_support import Swtpm


@pytest.fixture(scope="module")
def tpm_daemon(lab, tmp_path_factory):
    work = tmp_path_factory.mktemp("tpmd")
    emulator = Swtpm(work / "swtpm", netns=str(lab.netns_path("host")))
    emulator.start()
    daemon = RunningDaemon(lab, work)
    daemon.env["SKYGUARD_TPM_TCTI"] = emulator.tcti
    try:
        daemon.cli("tpm", "init", check=True)
        daemon.start()
        yield daemon
    finally:
        daemon.cleanup()
        emulator.stop()


def log_entries(daemon, kind: str) -> list[dict]:
    out = daemon.cli("log", "show", "--type", kind, "--json", check=True).stdout
    return [json.loads(line)["entry"] for line in out.splitlines() if line.strip()]


def test_the_daemon_measures_its_launch_and_a_verifier_checks_the_quote(tpm_daemon, tmp_path):
    d = tpm_daemon
    status = json.loads(d.cli("status", "--json", check=True).stdout)
    tpm = status["tpm"]
    assert tpm["available"] and tpm["pcr"] == 13 and tpm["event_log"] == "fresh" and tpm["store_key"] in ("file", "none")
    ak = tmp_path / "ak.pem"
    ak.write_text(json.loads((d.state_dir / "tpm" / "tpm.json").read_text())["ak_public"])
    good = tmp_path / "good.json"
    good.write_text(d.cli("attest", "--quote", "--nonce", "01" * 16, check=True).stdout)
    document = json.loads(good.read_text())
    # the daemon's own signed statement rides along, and names the same policy
    assert document["statement"]["policy"]["sha256"] == status["policy"]["sha256"]
    kinds = [json.loads(line)["kind"] for line in document["tpm_quote"]["event_log"]]
    assert kinds[:3] == ["package", "bpf_object", "log_key"] and kinds.count("program") == 3
    assert "policy" in kinds and kinds.count("attach") == len(status["interfaces"])
    ref = tmp_path / "ref.json"
    ref.write_text(d.cli("attest", "--reference-from", str(good), "--ak", str(ak), "--nonce", "01" * 16,
                         check=True).stdout)
    reference = json.loads(ref.read_text())
    assert reference["policy_sha256"] == [status["policy"]["sha256"]]
    assert reference["log_keys"] == [d.cli("log", "checkpoint", "--public-key", check=True).stdout.strip()]
    tags = {p["tag"] for hooks in status["interfaces"].values() for p in hooks.values()}
    assert tags <= set(reference["program_tags"])
    nonce = os.urandom(16).hex()
    fresh = tmp_path / "fresh.json"
    fresh.write_text(d.cli("attest", "--quote", "--nonce", nonce, check=True).stdout)
    ok = d.cli("attest", "--verify", str(fresh), "--ak", str(ak), "--nonce", nonce, "--reference", str(ref))
    assert ok.returncode == 0 and "TPM quote OK" in ok.stdout, ok.stderr
    # with the host key too: the daemon's signed statement agrees with what the TPM measured
    vkey = tmp_path / "host.vkey"
    vkey.write_text(d.cli("log", "checkpoint", "--public-key", check=True).stdout)
    both = d.cli("attest", "--verify", str(fresh), "--ak", str(ak), "--nonce", nonce, "--reference", str(ref),
                 "--key", str(vkey))
    assert both.returncode == 0, both.stderr

    # another policy, hot-loaded: measured, and the verifier names it
    other = tmp_path / "other.yaml"
    other.write_text(config.DEFAULT_POLICY.read_text().replace("name: keysystems", "name: keysystems-other", 1))
    d.cli("policy", "load", str(other), check=True)
    nonce = os.urandom(16).hex()
    fresh.write_text(d.cli("attest", "--quote", "--nonce", nonce, check=True).stdout)
    bad = d.cli("attest", "--verify", str(fresh), "--ak", str(ak), "--nonce", nonce, "--reference", str(ref))
    assert bad.returncode == 1 and "policy 'keysystems-other' sha256" in bad.stderr, bad.stderr
    # continuous attestation quoted at start and on the change; each digest is in the signed log
    quotes, extends = log_entries(d, "tpm_quote"), log_entries(d, "tpm_extend")
    assert len(quotes) >= 2 and all(len(q.get("digest", "")) == 64 for q in quotes), quotes
    assert len(extends) >= len(kinds) + 1 and extends[-1]["measured"] in ("policy", "attach")


def test_a_daemon_whose_tpm_is_missing_starts_and_says_so(lab, tpm_daemon, tmp_path_factory):
    tpm_daemon.stop()  # one daemon per pin dir (the lab's): a second is refused
    work = tmp_path_factory.mktemp("tpmd-dead")
    daemon = RunningDaemon(lab, work)
    daemon.env["SKYGUARD_TPM_TCTI"] = "swtpm:host=127.0.0.1,port=9"  # nothing listens there
    try:
        status = daemon.start()  # skyguard starts: enforcement does not wait for a TPM
        assert status["tpm"]["configured"] and not status["tpm"]["available"]
        assert "the TPM failed at start" in status["tpm"]["problem"]
        assert "attestation" not in status["parts"]  # no AK, nothing to quote with
        assert len(status["interfaces"]) == 7
        errors = log_entries(daemon, "tpm_error")
        assert errors and "cannot reach the TPM" in errors[0]["error"]
        quote = daemon.cli("attest", "--quote", "--nonce", "0011" * 8)
        assert quote.returncode == 1 and "no attestation key" in quote.stderr  # fail closed, saying why
        doctor = json.loads(daemon.cli("doctor", "--json").stdout)
        tpm = next(c for c in doctor["checks"] if c["name"] == "TPM")
        assert not tpm["ok"] and "does not answer" in tpm["detail"] and tpm["fix"]
    finally:
        daemon.cleanup()


def test_a_daemon_whose_tpm_json_is_a_fifo_starts_and_says_why(lab, tpm_daemon, tmp_path_factory):
    """A FIFO where `tpm init` keeps tpm.json: read plainly, `skyguard up` waited on it forever."""
    tpm_daemon.stop()  # one daemon per pin dir (the lab's)
    work = tmp_path_factory.mktemp("tpmd-fifo")
    daemon = RunningDaemon(lab, work)
    (daemon.state_dir / "tpm").mkdir(parents=True, mode=0o700)
    os.mkfifo(daemon.state_dir / "tpm" / "tpm.json", 0o600)
    try:
        status = daemon.start()
        assert status["tpm"]["configured"] and not status["tpm"]["available"]
        problem = status["tpm"]["problem"]
        assert "tpm.json" in problem and "not a regular file" in problem and "move it away" in problem, problem
        assert len(status["interfaces"]) == 7  # enforcement does not wait on the TPM
        errors = log_entries(daemon, "tpm_error")
        assert errors and "not a regular file" in errors[0]["error"]
    finally:
        daemon.cleanup()


ADMIN = """
admin:
  ssh:
    listen: "127.0.0.1:24312"
    operators:
      - {name: alice, public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIL3Bn450ZXB8e+M670v9a/bGPeCAylCnYQHGLc0Q/ZkV", \
may_access: [directory]}
"""
# Another process holding a lock file, as a `skyguard tpm` command stuck on a hung TPM would.
HOLD = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600); " \
       "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"


def test_a_lock_another_process_holds_fails_the_part_waiting_on_it_and_the_next_load_retries(
        lab, tpm_daemon, tmp_path_factory):
    """The TPM's lock and the sealed store's .lock, held by a stuck process while the daemon loads a
    policy whose new part (the SSH access proxy) must unseal the store key and make its host key:
    waited on forever, the load hung (and every load after it); now the part fails, saying which
    lock and who holds it, and the next load starts it.
    Measuring that policy waited on the TPM's lock too. It used to stop measurement until the
    daemon restarted (quotes failed for good); a lock held for a while is transient: the
    measurement is pending (quotes fail closed meanwhile), retried, and in once the lock is free."""
    tpm_daemon.stop()  # one daemon per pin dir (the lab's)
    work = tmp_path_factory.mktemp("tpmd-locks")
    daemon = RunningDaemon(lab, work)
    daemon.env["SKYGUARD_TPM_TCTI"] = tpm_daemon.env["SKYGUARD_TPM_TCTI"]
    daemon.env["SKYGUARD_LOCK_WAIT_S"] = "3"  # how long a waiter waits (30 s by default)
    with_admin = work / "with-admin.yaml"
    with_admin.write_text(config.DEFAULT_POLICY.read_text() + ADMIN)
    daemon.cli("tpm", "init", check=True)
    daemon.cli("tpm", "seal-store", check=True)  # a part opening the store unseals its key with the TPM
    try:
        daemon.start()
        for lock, what in ((daemon.state_dir / "tpm" / "lock", "the TPM lock"),
                           (daemon.state_dir / "secrets" / ".lock", "the secret store's lock")):
            holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
            try:
                assert holder.stdout.readline().strip() == "held"
                out = daemon.cli("policy", "load", str(with_admin), "--json", timeout=120)
                problem = json.loads(out.stdout)["part_problems"]["admin"]
                assert problem["state"] == "failed", problem
                assert f"{what} {lock} is held by another process (pid {holder.pid}, python" in problem["problem"]
                assert out.returncode == 1 and daemon.status()["parts"]["admin"] == "failed"
                if what == "the TPM lock":  # the policy's measurement waits, and says so
                    tpm = daemon.status()["tpm"]
                    assert tpm["available"] and tpm["measurements_pending"] >= 1, tpm
                    assert "waits for the TPM lock" in tpm["problem"] and f"pid {holder.pid}" in tpm["problem"]
                    deferred = daemon.log_entries("tpm_measure_deferred")
                    assert deferred and deferred[-1]["measured"] == "policy", deferred
                    # meanwhile continuous attestation fails closed: the PCR lacks the enforced policy
                    wait_for(lambda: any("pending" in q.get("error", "") for q in daemon.log_entries("tpm_quote")),
                             60, "a quote refused while the policy's measurement is pending")
            finally:
                holder.kill()
                holder.wait()
        # The lock is free again: the policy's measurement goes in, without a restart.
        wait_for(lambda: "problem" not in daemon.status()["tpm"], 60, "the pending measurement to go in")
        tpm = daemon.status()["tpm"]
        assert tpm["available"] and tpm["measurements_pending"] == 0, tpm
        sha = daemon.status()["policy"]["sha256"]
        extends = daemon.log_entries("tpm_extend")
        assert any(e["measured"] == "policy" and e["digest"] == sha for e in extends), extends
        assert daemon.log_entries("tpm_measure_resumed")
        assert daemon.cli("attest", "--quote", "--nonce", "02" * 16).returncode == 0
        out = daemon.cli("policy", "load", str(with_admin), "--json", timeout=120)
        assert out.returncode == 0, out.stderr
        assert daemon.status()["parts"]["admin"] == "running"
    finally:
        daemon.cleanup()


def test_the_tpm_lock_held_at_the_daemon_s_start_leaves_the_launch_pending_until_it_is_free(
        lab, tpm_daemon, tmp_path_factory, tmp_path):
    """Another process holds the TPM's lock as `skyguard up` starts (`attest --quote`, `tpm
    seal-store`, or one stuck on a hung TPM). Before the fix the start waited for it, then took
    the TPM for failed: nothing was measured and quotes failed until a restart. Now the start
    does not wait: its measurements are pending, in the daemon's order, quotes fail closed and
    status says why; once the lock is free they go in, and a verifier replays them."""
    tpm_daemon.stop()  # one daemon per pin dir (the lab's)
    work = tmp_path_factory.mktemp("tpmd-startlock")
    emulator = Swtpm(work / "swtpm", netns=str(lab.netns_path("host")))  # its own: the reference needs a fresh PCR
    emulator.start()
    daemon = RunningDaemon(lab, work)
    daemon.env["SKYGUARD_TPM_TCTI"] = emulator.tcti
    daemon.env["SKYGUARD_LOCK_WAIT_S"] = "3"  # how long a retry waits (30 s by default)
    try:
        daemon.cli("tpm", "init", check=True)
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(daemon.state_dir / "tpm" / "lock")],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            status = daemon.start()
            assert len(status["interfaces"]) == 7  # enforcement did not wait on the TPM
            tpm = status["tpm"]
            assert tpm["available"] and tpm["event_log"] == "pending" and tpm["measurements_pending"] >= 7, tpm
            assert "waits for the TPM lock" in tpm["problem"] and f"pid {holder.pid}" in tpm["problem"], tpm
            assert daemon.log_entries("tpm_measure_deferred")[0]["measured"] == "event_log"
            assert "TPM lock" in " ".join(daemon.cli("status", check=True).stdout.split())  # the table says why
            wait_for(lambda: any("pending" in q.get("error", "") for q in daemon.log_entries("tpm_quote")),
                     60, "a quote refused while the launch's measurements are pending")
        finally:
            holder.kill()
            holder.wait()
        wait_for(lambda: "problem" not in daemon.status()["tpm"], 60, "the pending measurements to go in")
        status = daemon.status()
        tpm = status["tpm"]
        assert tpm["available"] and tpm["measurements_pending"] == 0 and tpm["event_log"] != "pending", tpm
        assert daemon.log_entries("tpm_measure_resumed")
        ak = tmp_path / "ak.pem"
        ak.write_text(json.loads((daemon.state_dir / "tpm" / "tpm.json").read_text())["ak_public"])
        good = tmp_path / "good.json"
        good.write_text(daemon.cli("attest", "--quote", "--nonce", "03" * 16, check=True).stdout)
        kinds = [json.loads(line)["kind"] for line in json.loads(good.read_text())["tpm_quote"]["event_log"]]
        assert kinds[:7] == ["package", "bpf_object", "log_key", "program", "program", "program", "policy"], kinds
        assert kinds.count("attach") == len(status["interfaces"]), kinds
        ref = tmp_path / "ref.json"
        ref.write_text(daemon.cli("attest", "--reference-from", str(good), "--ak", str(ak), "--nonce", "03" * 16,
                                  check=True).stdout)
        nonce = os.urandom(16).hex()
        fresh = tmp_path / "fresh.json"
        fresh.write_text(daemon.cli("attest", "--quote", "--nonce", nonce, check=True).stdout)
        ok = daemon.cli("attest", "--verify", str(fresh), "--ak", str(ak), "--nonce", nonce, "--reference", str(ref))
        assert ok.returncode == 0 and "TPM quote OK" in ok.stdout, ok.stderr
    finally:
        daemon.cleanup()
        emulator.stop()
