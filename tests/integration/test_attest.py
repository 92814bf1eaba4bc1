"""`skyguard attest` against the real daemon in the lab: the statement names the programs the
kernel runs on every workload interface (ids and tags as `ip`/`tc` report them), the policy's
hash and the log's checkpoint; it verifies with the host's verifier key and fails when any byte
is edited, with another key, or against another nonce.
"""

from __future__ import annotations

import json

import pytest
from test_flows import started_daemon


@pytest.fixture(scope="module")
def skyguard(lab, tmp_path_factory):
    yield from started_daemon(lab, tmp_path_factory, "attest")


@pytest.fixture(scope="module")
def vkey(skyguard):
    path = skyguard.work_dir / "host.vkey"
    path.write_text(skyguard.cli("log", "checkpoint", "--public-key").stdout)
    return path


def test_statement_names_programs_policy_and_log_and_verifies(skyguard, vkey):
    made = json.loads(skyguard.cli("attest", "--json", "--nonce", "00c0ffee" * 4).stdout)
    statement = made["statement"]
    status = json.loads(skyguard.cli("status", "--json").stdout)
    assert statement["policy"] == {"name": "keysystems", "sha256": status["policy"]["sha256"]}
    assert statement["nonce"] == "00c0ffee" * 4
    # every workload interface carries our programs, ids and tags as the kernel reports them
    assert set(statement["interfaces"]) == set(status["interfaces"])
    assert len(statement["interfaces"]) == 7
    ours = statement["programs"]
    for ifname, info in statement["interfaces"].items():
        assert info["ours"], (ifname, info)
        live = status["interfaces"][ifname]
        assert info["hooks"]["tc_egress"]["id"] == ours["sg_to_vm"]["id"] == live["tc_egress"]["id"]
        assert info["hooks"]["tc_egress"]["tag"] == ours["sg_to_vm"]["tag"] == live["tc_egress"]["tag"]
        assert info["hooks"]["tc_ingress"]["tag"] == ours["sg_from_vm_tc"]["tag"]
    # the log part is a real checkpoint of the running log
    assert statement["log"]["size"] >= 1 and statement["log"]["checkpoint"].startswith(statement["log"]["origin"])
    assert statement["tpm"]["available"] in (True, False) and (statement["tpm"]["available"] or statement["tpm"]["why"])

    note = skyguard.work_dir / "now.att"
    note.write_text(made["note"])
    ok = skyguard.cli("attest", "--verify", str(note), "--key", str(vkey), "--nonce", "00C0FFEE" * 4, "--json")
    assert json.loads(ok.stdout)["statement"] == statement
    # the --json output itself is accepted too, and the human form says OK
    as_json = skyguard.work_dir / "now.json"
    as_json.write_text(json.dumps(made))
    human = skyguard.cli("attest", "--verify", str(as_json), "--key", str(vkey)).stdout
    assert "attestation OK" in human and "sg-dc1" in human


def test_an_edited_statement_another_key_or_nonce_fails(skyguard, vkey, tmp_path):
    note = skyguard.cli("attest").stdout
    path = tmp_path / "a.att"
    # one byte: the policy hash's first hex digit changed
    sha = json.loads(skyguard.cli("status", "--json").stdout)["policy"]["sha256"]
    flipped = ("0" if sha[0] != "0" else "1") + sha[1:]
    path.write_text(note.replace(sha, flipped, 1))
    bad = skyguard.cli("attest", "--verify", str(path), "--key", str(vkey), check=False)
    assert bad.returncode == 1 and "does NOT verify" in bad.stderr and "invalid" in bad.stderr, bad.stderr
    # the untouched note passes, but not with another key or against another nonce
    path.write_text(note)
    assert skyguard.cli("attest", "--verify", str(path), "--key", str(vkey), check=False).returncode == 0
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from skyguard.tlog import Signer

    other = Signer(vkey.read_text().split("+")[0], Ed25519PrivateKey.generate()).verifier.vkey()
    wrong = skyguard.cli("attest", "--verify", str(path), "--key", other, check=False)
    assert wrong.returncode == 1 and "not signed by key" in wrong.stderr
    replay = skyguard.cli("attest", "--verify", str(path), "--key", str(vkey), "--nonce", "aa" * 16, check=False)
    assert replay.returncode == 1 and "nonce" in replay.stderr
    missing = skyguard.cli("attest", "--verify", str(path), check=False)
    assert missing.returncode == 2 and "--key" in missing.stderr
    bad_nonce = skyguard.cli("attest", "--nonce", "not-hex", check=False)
    assert bad_nonce.returncode == 2 and "hex" in bad_nonce.stderr
    # a 1-byte nonce is refused on both sides: 256 statements made ahead would answer every challenge
    short = skyguard.cli("attest", "--nonce", "0a", check=False)
    assert short.returncode == 2 and "nonce must be 32 to 128 hex digits" in short.stderr, short.stderr
    short = skyguard.cli("attest", "--verify", str(path), "--key", str(vkey), "--nonce", "0a", check=False)
    assert short.returncode == 2 and "nonce must be 32 to 128 hex digits" in short.stderr, short.stderr


def test_a_replaced_program_shows_in_the_statement_until_the_watchdog_repairs_it(skyguard):
    """Tamper with one interface (detach its TC programs) and attest at once: either the
    watchdog already re-attached (ours) or the statement says what is wrong; never a false 'ours'."""
    skyguard.lab.exec("host", ["tc", "qdisc", "del", "dev", "sg-vfw1", "clsact"], check=True)
    statement = json.loads(skyguard.cli("attest", "--json").stdout)["statement"]
    info = statement["interfaces"].get("sg-vfw1")
    assert info is not None
    if not info["ours"]:
        assert info["problem"] == "not attached"
    else:
        assert info["hooks"]["tc_egress"]["id"] == statement["programs"]["sg_to_vm"]["id"]
