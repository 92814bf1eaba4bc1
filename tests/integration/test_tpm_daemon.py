"""The real daemon on a real TPM: `skyguard up` in the lab's host namespace with a swtpm listening
on that namespace's loopback. The launch, the programs, the policy and every attach are measured
into PCR 13 and logged; a remote verifier's check of a fresh quote passes against the reference of
that state and fails, naming the policy, once another policy is hot-loaded; continuous attestation
puts each quote's digest in the signed log; status says which TPM and which store key.
"""

from __future__ import annotations

import json
import os

import pytest
from daemon_support import RunningDaemon

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
