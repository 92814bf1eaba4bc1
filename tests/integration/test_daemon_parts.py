"""`skyguard policy load` reaches every part the daemon hosts, not only the datapath: a part the
new policy needs is started, one it no longer needs is stopped (its listener closes), and a part
that cannot take the policy is stopped, logged and reported (exit 1) while the daemon and the
other parts go on; one that runs without some of it (a TLS key missing from the store) is a warning.
Real daemon, real listeners, real CLI."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from daemon_support import PY, RunningDaemon, dropped, reaches, start_listener, stop_process, wait_for

from skyguard import config
from skyguard.custody.store import SecretStore
from skyguard.policy.parse import load_policy
from support.client_waits import ANSWER_WAIT_S

ADMIN_PORT = 24311
ALICE_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIL3Bn450ZXB8e+M670v9a/bGPeCAylCnYQHGLc0Q/ZkV alice@ops"
ADMIN = f"""
admin:
  ssh:
    listen: "127.0.0.1:{ADMIN_PORT}"
    operators:
      - {{name: alice, public_key: "{ALICE_KEY}", may_access: [directory]}}
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
        "unbindable_admin": base + ADMIN.replace("127.0.0.1", "192.0.2.201"),  # not this host's address
        "bare": _without_section(_without_section(base, "credentials"), "tls_termination"),
        "base": base,
    }
    paths = {}
    for name, text in files.items():
        paths[name] = tmp / f"{name}.yaml"
        paths[name].write_text(text)
    return paths


METRICS = "127.0.0.1:26021"  # loopback of the lab's host namespace


@pytest.fixture(scope="module")
def map_fault(tmp_path_factory):
    """Write "refuse" or "raise" here and the daemon's deletions of generation entries fail
    (tests/support/map_faults.py); empty, they work."""
    path = tmp_path_factory.mktemp("map-fault") / "mode"
    path.write_text("")
    return path


@pytest.fixture(scope="module")
def daemon(lab, tmp_path_factory, policies, map_fault):
    d = RunningDaemon(lab, tmp_path_factory.mktemp("parts-daemon"), policy_path=policies["with_admin"],
                      metrics=METRICS, preload="support.map_faults")
    d.env["SKYGUARD_PARTS_WAIT_S"] = "15"  # a load waits 15 s for a hung part, not 120 (every load here takes ~1 s)
    # A waiter gives up on a lock another process holds after 90 s, not 30: a part waiting for the TPM
    # lock must outlast the load's 15 s (test_a_load_whose_parts_outlast_the_wait_...)
    d.env["SKYGUARD_LOCK_WAIT_S"] = "90"
    d.env["SKYGUARD_TEST_MAP_FAULT"] = str(map_fault)
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


def listening(daemon, port: int) -> bool:
    """Does something accept on 127.0.0.1:port in the host namespace? (Nothing there: refused at
    once; so the connection is waited for as an answer, ANSWER_WAIT_S.)"""
    probe = (f"import socket,sys\ns=socket.socket()\ns.settimeout({ANSWER_WAIT_S})\n"
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
    load(daemon, policies["base"])  # no admin section: the SSH access proxy stops
    deadline = time.monotonic() + 10
    while listening(daemon, ADMIN_PORT) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not listening(daemon, ADMIN_PORT)
    assert any(e.get("part") == "admin" for e in entries_since(daemon, "part_stopped", stopped_before))
    load(daemon, policies["with_admin"])  # and comes back when a policy needs it again
    assert listening(daemon, ADMIN_PORT)
    assert daemon.running()


# The parts these policies never ask for: present in status, not started.
UNUSED_PARTS = {"apps": "not needed", "console": "not needed", "keys": "not needed"}


def test_a_part_that_runs_without_some_of_the_policy_is_a_warning(daemon, policies):
    # keysystems names secrets (github, sdnctl1) this daemon's store does not hold: the credential
    # proxy runs (a request needing the missing secret is refused), TLS termination of sdnctl1
    # cannot: the load succeeds with a warning, status and the log say what is off.
    out = daemon.cli("policy", "load", str(policies["with_admin"]), "--json")
    assert out.returncode == 0, out.stderr
    problem = json.loads(out.stdout)["part_problems"]["credentials"]
    assert problem["state"] == "degraded" and "'sdnctl1'" in problem["problem"], problem
    assert "warning: credentials runs without some of the policy" in out.stderr
    status = daemon.status()
    assert status["parts"] == {"dns": "running", "credentials": "degraded", "admin": "running", **UNUSED_PARTS}
    assert {"github", "sdnctl1"} <= set(status["secrets"]["missing"])
    assert daemon.log_entries("part_degraded")[-1]["part"] == "credentials"


def test_a_part_that_cannot_take_the_policy_is_stopped_and_the_daemon_lives(daemon, policies):
    load(daemon, policies["base"])
    reply = load(daemon, policies["unbindable_admin"], status=1)  # it cannot listen there
    assert reply["part_problems"]["admin"]["state"] == "failed", reply
    assert daemon.running() and not listening(daemon, ADMIN_PORT)
    assert daemon.log_entries("part_failed")[-1]["part"] == "admin"
    assert daemon.status()["parts"]["admin"] == "failed"
    load(daemon, policies["with_admin"])  # a later policy it can take brings it back
    assert listening(daemon, ADMIN_PORT) and daemon.status()["parts"]["admin"] == "running"


SDN_TO_FIREWALL = "ports: [tcp/443, tcp/830, icmp, icmpv6]"  # keysystems' sdn -> firewall rule
VFW1_V4 = "10.10.4.2"


def _hold_the_tpm(state_dir):
    """Seal the store's key "by a TPM" whose lock another process holds (as a `skyguard tpm`
    command stuck on a hung TPM would): whoever needs the key waits for the lock. Returns the
    undo: release the lock (the waiter then finds no TPM at that address and is refused the key)
    and put the file key back."""
    secrets, tpm_dir = state_dir / "secrets", state_dir / "tpm"
    key_file, aside = secrets / "sealing.key", secrets / "sealing.key.aside"
    sealed, tpm_config = secrets / "sealing.key.tpm", tpm_dir / "tpm.json"
    tpm_dir.mkdir(mode=0o700, exist_ok=True)
    tpm_config.write_text(json.dumps({"tcti": "swtpm:host=127.0.0.1,port=9"}))  # discard: nothing answers
    lock = os.open(tpm_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    key_file.rename(aside)
    sealed.write_text(json.dumps({"version": 1, "bank": "sha256", "pcrs": [0], "policy": "", "public": "",
                                  "private": ""}))

    def undo():
        os.close(lock)
        sealed.unlink()
        tpm_config.unlink()
        aside.rename(key_file)

    return undo


def test_a_load_whose_parts_outlast_the_wait_is_reported_as_the_datapath_enforces_it(lab, daemon, policies, tmp_path):
    # A part that takes longer to take a policy than the daemon waits for it (here TLS termination
    # decrypting its certificate with a store key sealed by a TPM that another process holds): the
    # datapath enforces the new policy from the swap on, so the reply,
    # status, `policy show` and the signed log must say so, and no other load may start while the
    # parts still take this one (the two would interleave on the loop and could leave the parts on
    # the older policy under the newer datapath).
    load(daemon, policies["base"])
    text = policies["base"].read_text()
    assert text.count(SDN_TO_FIREWALL) == 1 and text.count("certificate: sdnctl1") == 1, "keysystems.yaml changed"
    slow = tmp_path / "slow.yaml"
    slow.write_text(text.replace(SDN_TO_FIREWALL, "ports: [tcp/443, tcp/830, tcp/8443, icmp, icmpv6]")
                    .replace("certificate: sdnctl1", "certificate: sg-slow-cert"))
    new_sha = load_policy(slow).sha256
    store = SecretStore(daemon.state_dir / "secrets")
    store.set("sg-slow-cert", b"not a certificate")  # present: the part goes on to decrypt it
    release = _hold_the_tpm(daemon.state_dir)
    listener = start_listener(lab, "vfw1", tcp_ports=[8443])
    try:
        assert dropped(lab, "sdnctl1", "tcp", VFW1_V4, 8443)
        loads_before = len(daemon.log_entries("policy_load"))
        loading = ThreadPoolExecutor(1).submit(daemon.cli, "policy", "load", str(slow), "--json", timeout=300)
        wait_for(lambda: reaches(lab, "sdnctl1", "tcp", VFW1_V4, 8443), 60, "the datapath to enforce the new policy")
        # status answers while the load still waits for its parts (it waited for the whole load)
        during = json.loads(daemon.cli("status", "--json", check=True, timeout=12).stdout)
        assert not loading.done(), "status answered only once the load was over"
        assert during["policy"]["sha256"] == new_sha and during["parts"]["credentials"] == "pending", during
        out = loading.result()
        status = daemon.status()
        assert status["policy"]["sha256"] == new_sha, "status names a policy the datapath no longer enforces"
        assert json.loads(daemon.cli("policy", "show", "--json").stdout)["sha256"] == new_sha
        assert [e["sha256"] for e in daemon.log_entries("policy_load")[loads_before:]] == [new_sha]
        assert status["parts"]["credentials"] == "pending"
        assert out.returncode == 1, out.stderr
        reply = json.loads(out.stdout)
        assert reply["sha256"] == new_sha and reply["part_problems"]["credentials"]["state"] == "pending", reply
        assert "credentials has not finished taking the new policy" in out.stderr, out.stderr
        again = daemon.cli("policy", "load", str(policies["base"]), "--json")
        assert again.returncode != 0 and "still taking" in again.stderr, again.stderr
        assert reaches(lab, "sdnctl1", "tcp", VFW1_V4, 8443), "a refused load changed the datapath"
        assert daemon.status()["policy"]["sha256"] == new_sha
    finally:
        release()
        stop_process(listener)
        wait_for(lambda: daemon.status()["parts"]["credentials"] != "pending", 60, "the credential part to finish")
        store.remove("sg-slow-cert")
    load(daemon, policies["base"])  # and loads work again once the parts are done
    assert daemon.status()["parts"]["credentials"] == "degraded"
    assert dropped(lab, "sdnctl1", "tcp", VFW1_V4, 8443)


def test_a_fifo_where_the_sealing_key_should_be_fails_the_part_closed_at_once(daemon, policies, tmp_path):
    """Whoever can write the state directory can put a FIFO where the sealing key is: the part
    that needs the key (TLS termination decrypting its certificate) is refused it at once, with
    an error naming the file, instead of waiting for a writer that never comes; the load ends
    (the part runs without that termination, so it stays denied) and the daemon answers."""
    load(daemon, policies["base"])
    fifo_cert = tmp_path / "fifo-cert.yaml"
    fifo_cert.write_text(policies["base"].read_text().replace("certificate: sdnctl1", "certificate: sg-fifo-cert"))
    store = SecretStore(daemon.state_dir / "secrets")
    store.set("sg-fifo-cert", b"not a certificate")
    key = store.key_file.read_bytes()
    store.key_file.unlink()
    os.mkfifo(store.key_file, 0o600)
    try:
        out = daemon.cli("policy", "load", str(fifo_cert), "--json", timeout=120)
        reply = json.loads(out.stdout)
        problem = reply["part_problems"]["credentials"]
        assert problem["state"] == "degraded", reply
        assert f"sealing key {store.key_file}" in problem["problem"], problem
        assert "not a regular file" in problem["problem"], problem
        assert out.returncode == 0, out.stderr
        status = daemon.status()
        assert status["parts"]["credentials"] == "degraded" and status["policy"]["sha256"] == reply["sha256"]
    finally:
        try:  # a reader blocked on it (before the fix) gets the key
            fd = os.open(store.key_file, os.O_WRONLY | os.O_NONBLOCK)
            os.write(fd, key)
            os.close(fd)
        except OSError:
            pass
        wait_for(lambda: daemon.status()["parts"]["credentials"] != "pending", 60, "the credential part to finish")
        store.key_file.unlink()
        store.key_file.write_bytes(key)
        store.key_file.chmod(0o600)
        store.remove("sg-fifo-cert")
    load(daemon, policies["base"])
    assert daemon.running()


GENERATION_MAPS = ("sg_ipcache", "sg_ipcache_host", "sg_policy", "sg_policy_exact", "sg_srcip")


def exposition(lab) -> str:
    return lab.exec("host", ["curl", "-sf", f"http://{METRICS}/metrics"], lab_resolver=False,
                    capture_output=True, text=True, timeout=20).stdout


def metric(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split("{")[0].split(" ")[0] == name]
    assert len(values) == 1, f"{name} in the exposition: {values}"
    return values[0]


def test_a_swap_whose_cleanup_fails_stands_and_the_failure_is_counted(lab, daemon, policies, map_fault, tmp_path):
    # The generation flip is the commit point: once the datapath enforces the new policy, deleting
    # the old generation's entries may fail (the kernel refuses a delete, or the delete raises),
    # and the daemon must still name and log the policy the datapath enforces, count the failure
    # in its metrics, and leave the leftovers to the next swap, which deletes them.
    load(daemon, policies["base"])
    open_8443 = tmp_path / "open-8443.yaml"
    open_8443.write_text(policies["base"].read_text().replace(SDN_TO_FIREWALL,
                                                              "ports: [tcp/443, tcp/830, tcp/8443, icmp, icmpv6]"))
    settled = {name: daemon.status()["maps"][name] for name in GENERATION_MAPS}
    failures_before = metric(exposition(lab), "skyguard_datapath_cleanup_failures_total")
    listener = start_listener(lab, "vfw1", tcp_ports=[8443])
    try:
        for mode, path, reachable in (("raise", open_8443, True), ("refuse", policies["base"], False)):
            sha = load_policy(path).sha256
            map_fault.write_text(mode)
            try:
                out = daemon.cli("policy", "load", str(path), "--json")
            finally:
                map_fault.write_text("")
            assert out.returncode == 0, (mode, out.stderr)
            assert json.loads(out.stdout)["sha256"] == sha
            assert daemon.status()["policy"]["sha256"] == sha, f"{mode}: status names a policy the datapath no longer enforces"
            assert f'skyguard_policy_info{{name="keysystems",sha256="{sha}"}} 1.0' in exposition(lab)
            assert daemon.log_entries("policy_load")[-1]["sha256"] == sha
            follows = (reaches if reachable else dropped)(lab, "sdnctl1", "tcp", VFW1_V4, 8443)
            assert follows, f"{mode}: traffic follows another policy"
        assert metric(exposition(lab), "skyguard_datapath_cleanup_failures_total") == failures_before + 2
        left = {name: daemon.status()["maps"][name] for name in GENERATION_MAPS}
        assert all(left[name] >= settled[name] for name in GENERATION_MAPS) and left != settled, (left, settled)
        load(daemon, policies["base"])  # the next swap deletes what the failed cleanups left
        assert {name: daemon.status()["maps"][name] for name in GENERATION_MAPS} == settled
        assert metric(exposition(lab), "skyguard_datapath_cleanup_failures_total") == failures_before + 2
        assert dropped(lab, "sdnctl1", "tcp", VFW1_V4, 8443)
    finally:
        stop_process(listener)
    assert "the old generation's entries could not all be deleted" in daemon.log_tail(200000)


def test_a_policy_without_credentials_needs_no_secrets(daemon, policies):
    reply = load(daemon, policies["bare"])
    assert reply["part_problems"] == {}, reply
    assert not listening(daemon, ADMIN_PORT)
    assert daemon.status()["parts"] == {"dns": "running", "credentials": "not needed", "admin": "not needed",
                                        **UNUSED_PARTS}
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
    assert "not-a-real-value" not in json.dumps(status)
    text = daemon.cli("status")
    assert "left-over" in text.stdout and "not-a-real-value" not in text.stdout


def test_status_answers_when_a_fifo_sits_where_a_sealed_secret_should_be(daemon):
    """Whoever can write the state directory can put a FIFO where a `.sealed` file is expected:
    status must answer (not wait forever for a writer), naming the file, and say the rest."""
    fifo = daemon.state_dir / "secrets" / "stuck.sealed"
    os.mkfifo(fifo, 0o600)
    try:
        out = daemon.cli("status", timeout=45)
        assert out.returncode == 0, out.stderr
        assert "cannot read secret 'stuck'" in out.stdout, out.stdout  # the table wraps the rest
        status = daemon.status()
        assert status["secrets"]["problem"] == f"cannot read secret 'stuck' ({fifo}): not a regular file"
        assert status["interfaces"]
        listed = daemon.cli("secret", "list", timeout=45)
        assert listed.returncode != 0 and str(fifo) in listed.stderr and "not a regular file" in listed.stderr
    finally:
        try:  # a reader still blocked on it (before the fix) gets its end of file
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        fifo.unlink()
    assert daemon.running()
