"""Bad fleet options are refused before anything starts, each naming what is wrong (exit 2)."""

import pytest
from click.testing import CliRunner

from skyguard.cli.main import cli
from skyguard.errors import BadInput
from skyguard.fleet.daemon_hook import fleet_options
from skyguard.fleet.etcd import parse_endpoints


def test_endpoints_are_parsed_and_bad_ones_named():
    assert parse_endpoints("http://127.0.0.1:2379, 10.0.0.2:22379") == [("127.0.0.1", 2379), ("10.0.0.2", 22379)]
    for bad, words in (("https://h:2379", "TLS"), ("http://h:port", "not a number"), ("", "no etcd endpoint"),
                       ("http://h:2379/v3", "http://HOST:PORT")):
        with pytest.raises(BadInput, match=words):
            parse_endpoints(bad)


@pytest.mark.parametrize("etcd,name,keys,words", [
    ("http://127.0.0.1:2379", None, [], "go together"),
    ("http://127.0.0.1:2379", "host/1", ["x"], "member name"),
    ("http://127.0.0.1:2379", "host1", ["not-a-key"], "admin key"),
])
def test_up_fleet_options_are_checked_before_start(etcd, name, keys, words):
    with pytest.raises(BadInput, match=words):
        fleet_options(etcd, name, keys)


def test_no_fleet_options_means_no_fleet():
    assert fleet_options(None, None, ()) is None


def test_join_without_an_admin_key_is_refused(tmp_path):
    result = CliRunner().invoke(cli, ["fleet", "join", "--etcd", "http://127.0.0.1:9", "--name", "h1",
                                      "--state-dir", str(tmp_path)], standalone_mode=False, env={})
    assert isinstance(result.exception, BadInput) and "--admin-key" in str(result.exception)


def test_a_restart_starts_from_the_kept_fleet_policy_only_if_still_signed(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from skyguard.fleet.daemon_hook import kept_fleet_policy
    from skyguard.fleet.signing import sign_policy
    from skyguard.tlog.checkpoint import Signer

    admin = Signer("skyguard-admin", Ed25519PrivateKey.generate())
    assert kept_fleet_policy(tmp_path, [admin.verifier.vkey()]) is None
    (tmp_path / "fleet").mkdir()
    (tmp_path / "fleet" / "policy.json").write_bytes(sign_policy("text: 1\n", 4, admin).to_json())
    assert kept_fleet_policy(tmp_path, [admin.verifier.vkey()]) == ("text: 1\n", "fleet revision 4")
    other = Signer("skyguard-admin", Ed25519PrivateKey.generate())
    assert kept_fleet_policy(tmp_path, [other.verifier.vkey()]) is None   # another admin now


def test_the_daemon_s_fleet_record_operation_takes_only_fleet_events():
    from skyguard.fleet.daemon_hook import record_handler

    written = []
    daemon = type("Daemon", (), {"tamper_events": 0, "record": lambda self, kind, **f: written.append((kind, f))})()
    handle = record_handler(daemon)
    assert handle({"kind": "tamper", "fields": {"peer": "c", "problem": "x" * 5000}}) == {"recorded": "tamper"}
    assert daemon.tamper_events == 1 and written[0][1]["peer"] == "c" and len(written[0][1]["problem"]) == 1000
    for args, words in (({"kind": "key_create", "fields": {}}, "one of"),
                        ({"kind": "tamper", "fields": {"type": "other"}}, "not allowed"),
                        ({"kind": "tamper", "fields": {"peer": ["nested"]}}, "string, number"),
                        ({"kind": "tamper", "fields": "x"}, "object")):
        with pytest.raises(BadInput, match=words):
            handle(args)
    assert len(written) == 1


def test_fleet_trust_pins_a_peer_s_identity_and_never_replaces_a_pin(tmp_path):
    import json

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from skyguard.tlog import LogWriter, entry, host_signer
    from skyguard.tlog.checkpoint import Signer
    from skyguard.tlog.cosign import Cosigner

    runner = CliRunner()

    def run(*args):
        return runner.invoke(cli, ["fleet", *args], standalone_mode=False, env={})

    def identity(name, origin):
        return {"name": name, "origin": origin, "log_vkey": Signer(origin, Ed25519PrivateKey.generate()).verifier.vkey(),
                "witness_vkey": Cosigner(f"{name}.skyguard/witness", Ed25519PrivateKey.generate()).verifier.vkey()}

    def trust(name, value):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(value))
        return run("trust", name, "--key", str(path), "--state-dir", str(tmp_path / "state"))
    # `fleet identity` on a host whose daemon started (its log names the origin), pinned elsewhere.
    peer = tmp_path / "peer"
    assert "start `skyguard up` first" in str(run("identity", "--name", "h1", "--state-dir", str(peer)).exception)
    with LogWriter(peer / "log", host_signer(peer)) as writer:
        writer.append(entry("daemon_start"))
    printed = run("identity", "--name", "h1", "--state-dir", str(peer))
    assert printed.exception is None and json.loads(printed.output)["origin"] == writer.origin
    (tmp_path / "h1.json").write_text(printed.output)
    assert run("trust", "h1", "--key", str(tmp_path / "h1.json"), "--state-dir", str(tmp_path / "state")).exception is None
    h2 = identity("h2", "h2.example/log")
    assert trust("h2", h2).exception is None and trust("h2", h2).exception is None   # the same keys again
    for name, value, words in (("h2", identity("h2", "h2.example/log"), "other keys"),
                               ("h3", dict(identity("h3", "h3.example/log"), origin="h2.example/log"), "pinned here for h2"),
                               ("h4", identity("h3", "h3.example/log"), "'h3''s, not 'h4''s"),
                               ("h5", {"origin": "x"}, "fleet identity"),
                               ("h6", dict(identity("h6", "h6.example/log"), log_vkey="not-a-key"), "not a log key")):
        result = trust(name, value)
        assert isinstance(result.exception, BadInput) and words in str(result.exception), (name, result.exception)
    pinned = json.loads((tmp_path / "state" / "fleet" / "peers.json").read_text())
    assert set(pinned) == {"h1", "h2"} and all(p["pinned"] == "operator" for p in pinned.values())
    assert run("untrust", "h2", "--state-dir", str(tmp_path / "state")).exception is None
    assert trust("h2", identity("h2", "h2.example/log")).exception is None   # new keys once forgotten
