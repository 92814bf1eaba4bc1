"""Signed policy distribution, the decision every host makes: only a policy signed by a
configured admin key, with the text its signature covers, for this host, and newer than the one
it runs is applied; unsigned, foreign-signed, altered and older ones are refused with a reason."""

import json

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from skyguard.cli.main import cli
from skyguard.fleet.signing import PolicyRefused, decide, open_policy, sign_policy
from skyguard.tlog.checkpoint import Signer

TEXT = "apiVersion: skyguard/v1\nkind: Policy\nmetadata: {name: p}\nzones: {}\nrules: []\n"


@pytest.fixture
def admin():
    return Signer("skyguard-admin", Ed25519PrivateKey.generate())


def test_signed_policy_opens_and_is_applied_once(admin):
    signed = open_policy(sign_policy(TEXT, 3, admin).to_json(), [admin.verifier])
    assert signed.revision == 3 and signed.text == TEXT
    assert decide(signed, "h1", 2, "x") is True
    assert decide(signed, "h1", 3, signed.sha256) is False          # already running it


@pytest.mark.parametrize("case,reason", [
    ("unsigned", "malformed"), ("foreign", "not_admin"), ("altered", "hash_mismatch"),
    ("garbage", "malformed")])
def test_bad_records_are_refused_with_a_reason(admin, case, reason):
    good = json.loads(sign_policy(TEXT, 3, admin).to_json())
    if case == "unsigned":
        value = json.dumps({"text": TEXT}).encode()
    elif case == "foreign":
        value = sign_policy(TEXT, 3, Signer("skyguard-admin", Ed25519PrivateKey.generate())).to_json()
    elif case == "altered":
        value = json.dumps({"note": good["note"], "text": TEXT + "# more\n"}).encode()
    else:
        value = b"\xff not json"
    with pytest.raises(PolicyRefused) as refused:
        open_policy(value, [admin.verifier])
    assert refused.value.reason == reason


def test_older_and_same_revision_other_policy_are_rollbacks(admin):
    old = open_policy(sign_policy(TEXT, 2, admin).to_json(), [admin.verifier])
    with pytest.raises(PolicyRefused) as refused:
        decide(old, "h1", 5, "abc")
    assert refused.value.reason == "rollback"
    with pytest.raises(PolicyRefused):
        decide(old, "h1", 2, "another hash")


def test_a_policy_for_other_hosts_is_ignored(admin):
    signed = open_policy(sign_policy(TEXT, 9, admin, ("h2", "h3")).to_json(), [admin.verifier])
    assert decide(signed, "h1", 1, None) is False
    assert decide(signed, "h2", 1, None) is True


def test_admin_key_command_never_overwrites(tmp_path):
    runner = CliRunner()
    first = runner.invoke(cli, ["fleet", "admin-key", str(tmp_path / "admin.pem")])
    assert first.exit_code == 0 and first.output.startswith("skyguard-admin+")
    assert (tmp_path / "admin.pem").stat().st_mode & 0o077 == 0
    again = runner.invoke(cli, ["fleet", "admin-key", str(tmp_path / "admin.pem")])
    assert again.exit_code != 0


def test_push_refuses_an_invalid_policy_before_reaching_etcd(tmp_path):
    runner = CliRunner()
    runner.invoke(cli, ["fleet", "admin-key", str(tmp_path / "admin.pem")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: skyguard/v1\nkind: Policy\nzones: 3\n")
    result = runner.invoke(cli, ["fleet", "policy", "push", str(bad), "--sign-key",
                                 str(tmp_path / "admin.pem"), "--etcd", "http://127.0.0.1:9"],
                           standalone_mode=False)
    from skyguard.errors import PolicyError
    assert isinstance(result.exception, PolicyError)
