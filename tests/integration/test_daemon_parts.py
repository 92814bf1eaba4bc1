"""`skyguard policy load` reaches every part the daemon hosts, not only the datapath: a part the
new policy needs is started, one it no longer needs is stopped (its listener closes), and a part
that cannot take the policy (a secret missing from the store) is stopped, logged and reported
while the daemon and the other parts go on. Real daemon, real listeners, real CLI."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from daemon_support import PY, RunningDaemon

from skyguard import config

ADMIN_PORT = 24311
ADMIN = f"""
admin:
  ssh:
    listen: "127.0.0.1:{ADMIN_PORT}"
    operators:
      - {{name: alice, public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIL3Bn450ZXB8e+M670v9a/bGPeCAylCnYQHGLc0Q/ZkV alice@ops", may_access: [directory]}}
"""


def _without_section(text: str, key: str) -> str:
    """The policy text minus one top-level section (its key line and the indented lines below)."""
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith(f"{key}:"):
            skipping = True
            continue
        if skipping and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        skipping = False
        out.append(line)
    return "".join(out)


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parts")
    base = config.DEFAULT_POLICY.read_text()
    files = {
        "with_admin": base + ADMIN,
        "bare": _without_section(_without_section(base, "credentials"), "tls_termination"),
        "base": base,
    }
    paths = {}
    for name, text in files.items():
        paths[name] = tmp / f"{name}.yaml"
        paths[name].write_text(text)
    return paths


@pytest.fixture(scope="module")
def daemon(lab, tmp_path_factory, policies):
    d = RunningDaemon(lab, tmp_path_factory.mktemp("parts-daemon"), policy_path=policies["with_admin"])
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


def listening(daemon, port: int) -> bool:
    probe = ("import socket,sys\ns=socket.socket()\ns.settimeout(2)\n"
             f"sys.exit(s.connect_ex(('127.0.0.1',{port})))")
    return subprocess.run(daemon._in_host([PY, "-c", probe]), capture_output=True, timeout=30).returncode == 0


def load(daemon, path, status: int = 0) -> dict:
    out = daemon.cli("policy", "load", str(path), "--json")
    assert out.returncode == status, out.stderr
    return json.loads(out.stdout)


def entries_since(daemon, kind: str, count_before: int) -> list[dict]:
    return daemon.log_entries(kind)[count_before:]


def test_admin_listener_follows_the_policy(daemon, policies):
    assert listening(daemon, ADMIN_PORT)
    stopped_before = len(daemon.log_entries("part_stopped"))
    load(daemon, policies["base"], status=1)  # no admin section: the SSH access proxy stops
    deadline = time.monotonic() + 10
    while listening(daemon, ADMIN_PORT) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not listening(daemon, ADMIN_PORT)
    assert any(e.get("part") == "admin" for e in entries_since(daemon, "part_stopped", stopped_before))
    load(daemon, policies["with_admin"], status=1)  # and comes back when a policy needs it again
    assert listening(daemon, ADMIN_PORT)
    assert daemon.running()


def test_a_part_that_cannot_take_the_policy_is_reported_and_the_daemon_lives(daemon, policies):
    # keysystems names secrets (github, sdnctl1) this daemon's store does not hold.
    reply = load(daemon, policies["with_admin"], status=1)
    assert "credentials" in reply["parts_failed"], reply
    assert "not in the store" in reply["parts_failed"]["credentials"]
    assert daemon.running() and listening(daemon, ADMIN_PORT)
    failed = daemon.log_entries("part_failed")
    assert failed and failed[-1]["part"] == "credentials"
    assert daemon.status()["policy"]["sha256"] == reply["sha256"]


def test_a_policy_without_credentials_needs_no_secrets(daemon, policies):
    reply = load(daemon, policies["bare"])
    assert reply["parts_failed"] == {}, reply
    assert not listening(daemon, ADMIN_PORT)
    assert daemon.running()


def test_every_command_that_reads_state_takes_the_daemons_state_dir(daemon, tmp_path):
    mine = str(daemon.state_dir)
    for args in (["status", "--json"], ["flows", "--json"], ["attest", "--json"], ["policy", "show", "--json"],
                 ["log", "verify"], ["secret", "list", "--json"], ["admin", "sessions", "--json"],
                 ["ca", "export"]):
        out = daemon.cli(*args, "--state-dir", mine)
        assert out.returncode == 0, (args, out.stderr)
    for args in (["status"], ["flows"], ["attest"], ["policy", "show"]):
        out = daemon.cli(*args, "--state-dir", str(tmp_path))
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert f"keeps its state in {mine}" in out.stderr
    assert daemon.running()


def test_status_lists_secrets_no_policy_names(daemon, policies):
    stored = subprocess.run(daemon._in_host([PY, "-m", "skyguard.cli.main", "secret", "set", "left-over"]),
                            input="not-a-real-value", capture_output=True, text=True, env=daemon.env, timeout=60)
    assert stored.returncode == 0, stored.stderr
    status = daemon.status()
    assert "left-over" in status["secrets"]["unused"]
    assert "github" in status["secrets"]["missing"] or status["secrets"]["missing"] == []
    assert "not-a-real-value" not in json.dumps(status)
    text = daemon.cli("status")
    assert "left-over" in text.stdout and "not-a-real-value" not in text.stdout
