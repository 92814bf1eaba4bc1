"""Measured launch, identity and quotes against a real TPM: swtpm on loopback ports, manufactured
with `swtpm_setup --create-ek-cert`, driven through skyguard's CLI as an operator and a remote
verifier would. tpm2_checkquote (tpm2-tools) is the independent oracle for the quote's signature,
nonce and PCR digest. Each attack of issue 18 fails with a message naming the reason.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from skyguard import config
from skyguard.policy.parse import parse_policy
from skyguard.tpm import identity, imports, quote
from skyguard.tpm.device import Tpm
from skyguard.tpm.hook import DaemonTpm
from skyguard.tpm.measure import Measurements, attach_item, launch_items, policy_item, program_items

VKEY = "host+0a1b2c3d+AQIDBA=="
TAGS = {"sg_from_vm": "0011223344556677", "sg_from_vm_tc": "1122334455667788", "sg_to_vm": "8899aabbccddeeff"}
POLICY = parse_policy(config.DEFAULT_POLICY.read_text(), source=str(config.DEFAULT_POLICY))


def cli(*args, check=True, env=None):
    proc = subprocess.run([sys.executable, "-m", "skyguard.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(config.REPO_ROOT), **(env or {})}, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module", autouse=True)
def one_package_digest():
    """Other work in this checkout may edit a file of the package between two launches of one
    test: every launch here measures the digest taken once (a changed package is a case below)."""
    from skyguard.tpm import measure

    digest = measure.package_digest()
    saved, measure.package_digest = measure.package_digest, lambda: digest
    yield digest
    measure.package_digest = saved


@pytest.fixture(scope="module")
def host(emulator, tmp_path_factory):
    """A state dir after `skyguard tpm init`, with the AK public key saved where a verifier keeps it."""
    state = tmp_path_factory.mktemp("state")
    info = json.loads(cli("tpm", "init", "--tcti", emulator.tcti, "--state-dir", str(state), "--json").stdout)
    verifier = tmp_path_factory.mktemp("verifier")
    (verifier / "ak.pem").write_text(info["ak_public"])
    return {"state": state, "info": info, "ak": verifier / "ak.pem", "dir": verifier}


def boot_and_launch(emulator, host, policy_sha=POLICY.sha256) -> Measurements:
    """A power cycle, then what a daemon start measures (launch, programs, policy, one attach)."""
    emulator.reboot()
    m = Measurements(Tpm(emulator.tcti, host["state"] / "tpm" / "lock"), host["state"], 13)
    assert m.open() == "fresh"
    for item in [*launch_items(VKEY), *program_items(TAGS), policy_item(POLICY.name, policy_sha),
                 attach_item("sg-web1", {"tc_egress": TAGS["sg_to_vm"], "tc_ingress": TAGS["sg_from_vm_tc"]})]:
        m.extend(*item)
    return m


def make_evidence(host, nonce: str, name: str = "evidence.json") -> Path:
    out = cli("attest", "--quote", "--nonce", nonce, "--state-dir", str(host["state"])).stdout
    path = host["dir"] / name
    path.write_text(out)
    return path


def verify(host, path, nonce, reference=None, check=False):
    args = ["attest", "--verify", str(path), "--ak", str(host["ak"]), "--nonce", nonce]
    if reference:
        args += ["--reference", str(reference)]
    return cli(*args, check=check)


@pytest.fixture(scope="module")
def reference(emulator, host):
    """The verifier's reference, made from a known-good host's evidence."""
    boot_and_launch(emulator, host)
    good = make_evidence(host, "aa" * 16, "good.json")
    ref = cli("attest", "--reference-from", str(good), "--ak", str(host["ak"]), "--nonce", "aa" * 16).stdout
    path = host["dir"] / "reference.json"
    path.write_text(ref)
    return path


def test_init_prints_a_bound_ak_and_an_ek_certificate_that_chains_to_the_emulator_ca(emulator, host):
    info = host["info"]
    assert info["ak_handle"] == "0x81010002" and info["pcr"] == 13 and not info["ak_reused"]
    assert "BEGIN PUBLIC KEY" in info["ak_public"] and "BEGIN PUBLIC KEY" in info["ek_public"]
    issuer = emulator.ca_certificate.read_text()
    assert identity.check_ek_certificate(info["ek_certificate"], info["ek_public"], issuer) == []
    # the issuer itself chains to the local CA's root
    from cryptography import x509

    root = x509.load_pem_x509_certificate((emulator.ca / "swtpm-localca-rootca-cert.pem").read_bytes())
    x509.load_pem_x509_certificate(issuer.encode()).verify_directly_issued_by(root)
    # a certificate for another key, or under another issuer, is refused
    assert identity.check_ek_certificate(info["ek_certificate"], info["ak_public"], issuer) == [
        "the EK certificate certifies another key than this TPM's EK"]
    assert "not issued by" in identity.check_ek_certificate(info["ek_certificate"], info["ek_public"],
                                                            root.public_bytes(_pem()).decode())[0]
    # init again: the same AK, reused, bound again
    again = json.loads(cli("tpm", "init", "--state-dir", str(host["state"]), "--json").stdout)
    assert again["ak_reused"] and again["ak_public"] == info["ak_public"]
    human = cli("tpm", "init", "--state-dir", str(host["state"]), "--ek-ca", str(emulator.ca_certificate)).stdout
    assert "make/activate credential" in human and "BEGIN CERTIFICATE" in human
    assert f"EK certificate (issued by {emulator.ca_certificate}, certifies this EK):" in human
    root_file = host["dir"] / "root.pem"
    root_file.write_bytes(root.public_bytes(_pem()))
    wrong = cli("tpm", "init", "--state-dir", str(host["state"]), "--ek-ca", str(root_file), check=False)
    assert wrong.returncode == 1 and "the EK certificate does not check out: the EK certificate is not issued by" \
        in wrong.stderr


def _pem():
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.PEM


def test_a_fresh_quote_verifies_in_python_and_in_tpm2_checkquote(emulator, host, reference):
    nonce = os.urandom(16).hex()
    path = make_evidence(host, nonce)
    document = json.loads(path.read_text())
    assert "no skyguard daemon is running" in document["statement_missing"]
    # the launch measured (the reference fixture's) guards what is imported after it
    assert any(isinstance(f, imports.MeasuredFinder) and f.package == "skyguard" for f in sys.meta_path)
    ok = verify(host, path, nonce, reference, check=True)
    assert "TPM quote OK" in ok.stdout and f"policy keysystems sha256 {POLICY.sha256}" in ok.stdout
    verdict = json.loads(cli("attest", "--verify", str(path), "--ak", str(host["ak"]), "--nonce", nonce,
                             "--reference", str(reference), "--json").stdout)
    # (not package_digest() of now: other work in this checkout may have changed a file since)
    assert verdict["ok"] and verdict["state"]["package_sha256"] in json.loads(reference.read_text())["package_sha256"]
    assert verdict["state"]["programs"] == TAGS
    # the oracle agrees, on the same bytes
    files = write_quote_files(host["dir"], document["tpm_quote"])
    assert checkquote(host, files, nonce).returncode == 0
    assert checkquote(host, files, "00" + nonce[2:]).returncode != 0
    assert verify(host, path, "00" + nonce[2:], reference).returncode == 1
    # the signed statement's TPM part (no quote) reads the same PCRs from the configured TPM
    from skyguard.attest import tpm_evidence

    read = tpm_evidence(host["state"])
    assert read["available"] and read["skyguard_pcr"] == 13
    assert read["pcrs_sha256"]["13"] == document["tpm_quote"]["pcrs"]["13"]


def write_quote_files(directory: Path, evidence: dict) -> dict:
    files = {}
    for field, name in (("attest", "q.msg"), ("signature", "q.sig"), ("tss_pcrs", "q.pcrs")):
        files[field] = directory / name
        files[field].write_bytes(base64.b64decode(evidence["quote"][field]))
    return files


def checkquote(host, files, nonce):
    return subprocess.run(["tpm2_checkquote", "-u", str(host["ak"]), "-m", str(files["attest"]),
                           "-s", str(files["signature"]), "-f", str(files["tss_pcrs"]), "-g", "sha256",
                           "-q", nonce], capture_output=True, text=True)


def edited(host, path: Path, change, name: str) -> Path:
    document = json.loads(path.read_text())
    change(document["tpm_quote"])
    out = path.with_name(name)
    out.write_text(json.dumps(document))
    return out


def test_each_attack_fails_naming_its_reason(emulator, host, reference):
    nonce = os.urandom(16).hex()
    path = make_evidence(host, nonce)
    cases = {
        "wrong nonce": (path, "11" * 16, "nonce: the quote answers nonce"),
        "edited PCR value": (edited(host, path, lambda e: e["pcrs"].update({"13": "00" * 32}), "pcr.json"), nonce,
                             "pcr digest: the PCR values in the evidence do not hash"),
        "edited event-log line": (edited(host, path, lambda e: e["event_log"].__setitem__(
            5, e["event_log"][5].replace(TAGS["sg_to_vm"][:4], "ffff")), "line.json"), nonce, "event log: replaying its"),
        "reordered event log": (edited(host, path, lambda e: e["event_log"].reverse(), "order.json"), nonce,
                                "event log: event log line 1 has seq"),
    }
    for what, (file, n, reason) in cases.items():
        result = verify(host, file, n, reference)
        assert result.returncode == 1 and "does NOT verify" in result.stderr and reason in result.stderr, \
            (what, result.stderr)
    # the oracle sees the edited PCR value too (its PCR file is the one in the evidence, edited)
    document = json.loads(path.read_text())
    files = write_quote_files(host["dir"], document["tpm_quote"])
    pcrs = bytearray(files["tss_pcrs"].read_bytes())
    at = pcrs.find(bytes.fromhex(document["tpm_quote"]["pcrs"]["13"]))
    assert at > 0
    pcrs[at] ^= 1
    files["tss_pcrs"].write_bytes(bytes(pcrs))
    assert checkquote(host, files, nonce).returncode != 0


def test_a_quote_by_another_ak_fails(emulator, host, reference, tmp_path):
    """A second AK on the same TPM (as another skyguard would make): its quotes are not ours."""
    other_state = tmp_path / "other"
    tpm = Tpm(emulator.tcti, host["state"] / "tpm" / "lock")
    info = identity.init(tpm, other_state, ak_handle=0x81010003)
    assert info["ak_public"] != host["info"]["ak_public"]
    (other_state / "tpm" / "eventlog.jsonl").write_text((host["state"] / "tpm" / "eventlog.jsonl").read_text())
    nonce = os.urandom(16).hex()
    evidence = quote.make(tpm, other_state, nonce)
    path = host["dir"] / "other-ak.json"
    path.write_text(json.dumps({"tpm_quote": evidence}))
    result = verify(host, path, nonce, reference)
    assert result.returncode == 1 and "signature: the quote is not signed by the given AK" in result.stderr
    # it does verify with its own AK: the failure is the key, nothing else
    (tmp_path / "ak2.pem").write_text(info["ak_public"])
    assert cli("attest", "--verify", str(path), "--ak", str(tmp_path / "ak2.pem"), "--nonce", nonce,
               "--reference", str(reference)).returncode == 0
    tpm.run("tpm2_evictcontrol", "-C", "o", "-c", "0x81010003")


def test_a_host_that_loaded_another_policy_fails_the_reference(emulator, host, reference):
    boot_and_launch(emulator, host)
    Measurements(Tpm(emulator.tcti, host["state"] / "tpm" / "lock"), host["state"], 13).open()
    m = Measurements(Tpm(emulator.tcti, host["state"] / "tpm" / "lock"), host["state"], 13)
    assert m.open() == "continued"
    m.extend(*policy_item("permissive", "5e" * 32))
    nonce = os.urandom(16).hex()
    result = verify(host, make_evidence(host, nonce), nonce, reference)
    assert result.returncode == 1
    assert result.stderr.endswith(f"does NOT verify:\n  policy 'permissive' sha256 (event log line 9): {'5e' * 32} "
                                  f"is not in the reference's policy_sha256\n"), result.stderr
    # a reboot and a clean launch verify again
    boot_and_launch(emulator, host)
    nonce = os.urandom(16).hex()
    assert verify(host, make_evidence(host, nonce), nonce, reference).returncode == 0


def test_a_host_running_other_skyguard_code_fails_the_reference(emulator, host, reference, one_package_digest):
    from skyguard.tpm import measure

    other = ("0" if one_package_digest[0][0] != "0" else "1") + one_package_digest[0][1:]
    measure.package_digest = lambda: (other, one_package_digest[1])
    try:
        boot_and_launch(emulator, host)
    finally:
        measure.package_digest = lambda: one_package_digest
    nonce = os.urandom(16).hex()
    result = verify(host, make_evidence(host, nonce), nonce, reference)
    assert result.returncode == 1 and f"package (event log line 1): {other} is not in the reference's " \
        f"package_sha256" in result.stderr


def test_root_cannot_rewind_skyguards_pcr(emulator, host, reference):
    boot_and_launch(emulator, host)
    tpm = Tpm(emulator.tcti)
    before = tpm.pcr_read([13])[13]
    with pytest.raises(Exception, match="locality"):
        tpm.pcr_reset(13)
    assert tpm.pcr_read([13])[13] == before
    # the only move root has is forward: then the log no longer replays, and verifiers say so
    tpm.pcr_extend(13, bytes(32))
    nonce = os.urandom(16).hex()
    result = verify(host, make_evidence(host, nonce), nonce, reference)
    assert result.returncode == 1 and "event log: replaying its 8 lines" in result.stderr \
        and "something else extended PCR 13" in result.stderr
    status = json.loads(cli("tpm", "status", "--state-dir", str(host["state"]), "--json").stdout)
    assert status["event_log_replays"] is False
    # the next daemon start notices, starts a log from that base, and quotes still fail, naming it
    assert DaemonTpm(host["state"]).measurements.started == "foreign"
    result = verify(host, make_evidence(host, nonce), nonce, reference)
    assert result.returncode == 1 and "it starts from a base value of PCR 13" in result.stderr
    # PCRs 16 and 23 are the ones root could reset: skyguard refuses them
    refused = cli("tpm", "init", "--state-dir", str(host["state"]), "--pcr", "16", check=False)
    assert refused.returncode == 2 and "never 16 or 23" in refused.stderr


def test_a_restart_continues_the_log_and_a_crash_between_write_and_extend_is_repaired(emulator, host):
    m = boot_and_launch(emulator, host)
    lines = (host["state"] / "tpm" / "eventlog.jsonl").read_text().splitlines()
    # a line written whose extend never happened (the daemon died in between)
    with open(host["state"] / "tpm" / "eventlog.jsonl", "a") as f:
        event = json.loads(lines[-1])
        f.write(json.dumps(dict(event, seq=len(lines)), sort_keys=True, separators=(",", ":")) + "\n")
    again = Measurements(Tpm(emulator.tcti, host["state"] / "tpm" / "lock"), host["state"], 13)
    assert again.open() == "continued" and again.count == len(lines) and again.value == m.value
    assert (host["state"] / "tpm" / "eventlog.jsonl").read_text().splitlines() == lines
    # a reboot starts a new log and keeps the old one beside
    emulator.reboot()
    assert Measurements(Tpm(emulator.tcti), host["state"], 13).open() == "fresh"
    assert list((host["state"] / "tpm").glob("eventlog.jsonl.*"))


def test_transient_handles_are_flushed_so_many_quotes_in_a_row_work(emulator, host):
    boot_and_launch(emulator, host)
    tpm = Tpm(emulator.tcti)
    for _ in range(12):  # the emulator has 3 object slots
        quote.make(tpm, host["state"], os.urandom(16).hex())
    assert tpm.run("tpm2_getcap", "handles-transient", flush=False).strip() == ""
    identity.init(tpm, host["state"])
    assert tpm.run("tpm2_getcap", "handles-transient", flush=False).strip() == ""


def test_a_missing_tpm_at_start_is_reported_and_quotes_fail_closed(host, tmp_path):
    dead = "swtpm:host=127.0.0.1,port=9"  # nothing listens on the discard port
    tpm = DaemonTpm(host["state"], tcti=dead)  # never raises: skyguard starts
    assert tpm.configured and not tpm.available and "the TPM failed at start" in tpm.problem
    tpm.measure_policy("p", "00" * 32)  # a no-op, not an exception
    assert tpm.status()["available"] is False
    result = cli("attest", "--quote", "--nonce", "0011" * 8, "--state-dir", str(host["state"]), "--tcti", dead,
                 check=False)
    assert result.returncode == 1 and "cannot reach the TPM" in result.stderr
    from skyguard.doctor import check_tpm

    os.environ["SKYGUARD_TPM_TCTI"] = dead
    try:
        check = check_tpm(host["state"])
    finally:
        del os.environ["SKYGUARD_TPM_TCTI"]
    assert not check.ok and "does not answer" in check.detail and check.fix
    # and no TPM at all: doctor passes, saying what that means
    empty = tmp_path / "no-tpm"
    empty.mkdir()
    check = check_tpm(empty)
    assert check.ok and "no TPM" in check.detail


def test_quote_and_verify_refuse_bad_input(host, tmp_path):
    bad = cli("attest", "--quote", "--nonce", "xyz", "--state-dir", str(host["state"]), check=False)
    assert bad.returncode == 2 and "nonce must be" in bad.stderr
    missing = cli("attest", "--quote", "--state-dir", str(host["state"]), check=False)
    assert missing.returncode == 2 and "--quote needs --nonce" in missing.stderr
    junk = tmp_path / "junk.json"
    junk.write_text('{"hello": 1}')
    result = cli("attest", "--verify", str(junk), "--ak", str(host["ak"]), "--nonce", "00" * 16, check=False)
    assert result.returncode == 2 and "not skyguard TPM evidence" in result.stderr
    not_json = tmp_path / "x.json"
    not_json.write_text("{")
    result = cli("attest", "--verify", str(not_json), "--ak", str(host["ak"]), "--nonce", "00" * 16, check=False)
    assert result.returncode == 2 and "is not JSON" in result.stderr


def test_init_refuses_a_key_at_the_ak_handle_that_could_sign_a_forged_quote(tmp_path):
    # Someone with the TPM before `tpm init` (an image, a previous owner, root) persists an
    # unrestricted signing key at the AK's handle. It is resident in this TPM, so make/activate
    # credential binds it to the EK; but TPM2_Sign signs any bytes with it, a TPMS_ATTEST made up
    # with any nonce and PCR values included. init must not hand it to verifiers as the AK.
    from support.swtpm_support import Swtpm

    emu = Swtpm(tmp_path / "swtpm")
    emu.start()
    try:
        env = {**os.environ, "TPM2TOOLS_TCTI": emu.tcti}

        def tool(*args):
            proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
            assert proc.returncode == 0, proc.stderr
            subprocess.run(["tpm2_flushcontext", "-t"], capture_output=True, env=env, timeout=60)

        tool("tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", "parent.ctx")
        tool("tpm2_create", "-C", "parent.ctx", "-G", "ecc256:ecdsa-sha256", "-u", "k.pub", "-r", "k.priv",
             "-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign")
        tool("tpm2_load", "-C", "parent.ctx", "-u", "k.pub", "-r", "k.priv", "-c", "k.ctx")
        tool("tpm2_evictcontrol", "-C", "o", "-c", "k.ctx", "0x81010002")
        state = tmp_path / "state"
        init = cli("tpm", "init", "--tcti", emu.tcti, "--state-dir", str(state), "--json", check=False)
        assert init.returncode == 1 and "not a restricted signing key" in init.stderr, init.stdout
        assert not (state / "tpm" / "tpm.json").exists()
    finally:
        emu.stop()
