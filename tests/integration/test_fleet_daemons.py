"""Three full skyguard daemons in a fleet on a real 3-member etcd cluster on loopback: each
`skyguard up` in its own lab's host namespace with its own state dir, control socket and bpffs
pin dir, each joined with `skyguard fleet join` (beside the daemon, through its control socket)
once the hosts pinned each other's keys (`skyguard fleet identity`, `skyguard fleet trust`).
A policy pushed with `skyguard fleet policy push` is enforced by every host's datapath (a real
TCP connection between two lab VMs opens, then closes again with the next push) once the push
returns, which it does when every daemon reports the pushed revision; a push the hosts refuse (a
second admin's revision not counted) or one a host does not answer (its agent stopped) exits
non-zero naming each host and why. `fleet status` shows the three hosts with their programs, and
the daemons' real signed logs are cosigned by both peers (`log verify --witnesses 2`)."""

import json
import os
import signal
import subprocess
import time

import pytest
from daemon_support import PY, RunningDaemon, dropped, reaches, start_listener, stop_process

from skyguard import config
from skyguard.lab import Lab

POLICY = """apiVersion: skyguard/v1
kind: Policy
metadata: {{name: fleet-lab}}
zones:
  front:
    workloads:
      - {{name: web1, interface: sg-web1, mac: "02:00:00:00:05:02", addresses: [10.10.5.2]}}
  back:
    workloads:
      - {{name: db1, interface: sg-db1, mac: "02:00:00:00:06:02", addresses: [10.10.6.2]}}
rules: {rules}
# revision marker {marker}
"""
ALLOW = "\n  - {name: web-to-db, from: front, to: {zones: [back]}, ports: [tcp/7000]}"


def policy_text(allow: bool, marker: int) -> str:
    return POLICY.format(rules=ALLOW if allow else "[]", marker=marker)


def wait_for(check, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def cli(*args, env=None, check=True):
    out = subprocess.run([PY, "-m", "skyguard.cli.main", *args], capture_output=True, text=True,
                         env=env or dict(os.environ, PYTHONPATH=str(config.REPO_ROOT)), timeout=60)
    if check and out.returncode != 0:
        raise AssertionError(f"skyguard {' '.join(args)}: {out.stderr}")
    return out


class FleetHost:
    def __init__(self, index, work):
        self.name = f"host{index}"
        prefix = f"t{os.getpid() % 100000}f{index}-"
        self.work = work / self.name
        self.work.mkdir(parents=True)
        (self.work / "lab.yaml").write_text(policy_text(False, 0))
        self.lab = Lab(policy_path=self.work / "lab.yaml", prefix=prefix, lab_dir=self.work / "lab",
                       progress=lambda m: None)
        self.daemon = None
        self.join = None
        self.listener = None

    def start_daemon(self):
        self.lab.up()
        self.daemon = RunningDaemon(self.lab, self.work / "daemon", policy_path=self.work / "lab.yaml")
        self.daemon.start()
        self.listener = start_listener(self.lab, "db1", tcp_ports=[7000])

    def start_join(self, endpoints, admin_keys):
        log = open(self.work / "join.log", "ab")
        self.join = subprocess.Popen(
            [PY, "-m", "skyguard.cli.main", "fleet", "join", "--etcd", endpoints, "--name", self.name,
             "--admin-key", str(admin_keys), "--state-dir", str(self.daemon.state_dir)],
            env=dict(self.daemon.env, SKYGUARD_FLEET_PERIOD="0.5"), stdin=subprocess.DEVNULL,
            stdout=log, stderr=log)
        log.close()

    def reaches_db(self) -> bool:
        return reaches(self.lab, "web1", "tcp", "10.10.6.2", 7000)

    def dropped_to_db(self) -> bool:
        return dropped(self.lab, "web1", "tcp", "10.10.6.2", 7000)

    def sha(self):
        return self.daemon.status()["policy"]["sha256"]

    def cleanup(self):
        if self.join is not None and self.join.poll() is None:
            self.join.send_signal(signal.SIGINT)
            try:
                self.join.wait(10)
            except subprocess.TimeoutExpired:
                self.join.kill()
                self.join.wait()
        stop_process(self.listener)
        if self.daemon is not None:
            self.daemon.cleanup()
        self.lab.down()


def pin_each_other(hosts, work):
    """What an operator does once the daemons run: each host's identity pinned on every other,
    and in the admin's own state dir (`admin_state`), from which pushes and `fleet status` run."""
    for host in hosts:
        path = work / f"{host.name}.identity.json"
        path.write_text(cli("fleet", "identity", "--name", host.name, "--state-dir", str(host.daemon.state_dir)).stdout)
        for state in [other.daemon.state_dir for other in hosts if other is not host] + [admin_state(work)]:
            cli("fleet", "trust", host.name, "--key", str(path), "--state-dir", str(state))


def admin_state(work):
    return work / "admin-state"


def admin_env(work):
    """What the admin runs `fleet policy push` and `fleet status` with: their state dir, where
    every host's key is pinned."""
    return dict(os.environ, PYTHONPATH=str(config.REPO_ROOT), SKYGUARD_STATE_DIR=str(admin_state(work)))


@pytest.fixture(scope="module")
def fleet(root, tmp_path_factory, etcd_cluster):
    work = tmp_path_factory.mktemp("fleetd")
    admin_pem = work / "admin.pem"
    admin_vkey = cli("fleet", "admin-key", str(admin_pem)).stdout.strip()
    admin2_pem = work / "admin2.pem"   # a second admin of the fleet: every host applies what either signs
    admin2_vkey = cli("fleet", "admin-key", str(admin2_pem)).stdout.strip()
    admin_keys = work / "admins.vkey"
    admin_keys.write_text(f"{admin_vkey}\n{admin2_vkey}\n")
    hosts = [FleetHost(i, work) for i in range(3)]
    cluster = etcd_cluster  # conftest.py: started and ready; stopped after this fixture
    try:
        for host in hosts:
            host.start_daemon()
        pin_each_other(hosts, work)
        for host in hosts:
            host.start_join(cluster.endpoints, admin_keys)
        # As an operator would before pushing to *: the members of the fleet then are what it names.
        wait_for(lambda: len(json.loads(cli("fleet", "status", "--etcd", cluster.endpoints, "--json",
                                            env=admin_env(work)).stdout)["members"])
                 == len(hosts), what="every host a member of the fleet")
        yield type("Fleet", (), {"hosts": hosts, "cluster": cluster, "admin_pem": admin_pem,
                                 "admin_vkey": admin_vkey, "admin2_pem": admin2_pem, "admin2_vkey": admin2_vkey,
                                 "work": work})
    finally:
        for host in hosts:
            try:
                host.cleanup()
            except Exception as e:   # the others are still cleaned
                print(f"cleanup of {host.name}: {e}")


def push_run(fleet, allow, marker, *extra, key=None):
    """`fleet policy push --json` as an admin runs it (by default the first admin, without the
    second's key); its exit code, JSON and stderr."""
    path = fleet.work / f"push-{marker}.yaml"
    path.write_text(policy_text(allow, marker))
    return cli("fleet", "policy", "push", str(path), "--sign-key", str(key or fleet.admin_pem),
               "--etcd", fleet.cluster.endpoints, "--json", *extra, check=False, env=admin_env(fleet.work))


def push(fleet, allow, marker, *extra, key=None):
    """A push every host enforces once it returns: exit 0, each host listed as enforcing."""
    out = push_run(fleet, allow, marker, *extra, key=key)
    assert out.returncode == 0, out.stderr
    pushed = json.loads(out.stdout)
    assert {name: r["outcome"] for name, r in pushed["results"].items()} == \
        {h.name: "enforcing" for h in fleet.hosts}, pushed
    return pushed


def test_a_pushed_policy_is_enforced_by_every_daemons_datapath(fleet):
    # Before the fix the push returned once the policy was in etcd, whether or not a host had
    # applied it. Now it returns once every host reports enforcing it: the datapaths do already.
    assert all(h.dropped_to_db() for h in fleet.hosts)   # the local policy denies
    opened = push(fleet, True, 1)
    assert all(h.sha() == opened["sha256"] for h in fleet.hosts)
    assert all(h.reaches_db() for h in fleet.hosts)
    closed = push(fleet, False, 2)
    assert all(h.sha() == closed["sha256"] for h in fleet.hosts)
    assert all(h.dropped_to_db() for h in fleet.hosts)
    view = wait_for(lambda: (v := json.loads(cli("fleet", "status", "--etcd", fleet.cluster.endpoints,
                                                 "--json", env=admin_env(fleet.work)).stdout))
                    and all(m["policy"]["sha256"] == closed["sha256"] for m in v["members"].values())
                    and len(v["members"]) == 3 and v, what="fleet status on revision 2")
    for member in view["members"].values():
        assert member["programs"] >= 2 and member["policy"]["revision"] == closed["revision"]


def test_a_push_the_hosts_refuse_exits_non_zero_naming_each_host_and_why(fleet):
    # Session 12's CI logs: a fleet of two admins; one pushes without the other's --admin-key, so
    # the other's newer revision is not counted and the push signs a revision the hosts already
    # run. Every host refused it as a rollback, and the push had exited 0. Now it says so.
    current = push(fleet, False, 3, "--admin-key", fleet.admin_vkey, key=fleet.admin2_pem)
    out = push_run(fleet, False, 4)
    assert out.returncode == 1, out.stderr
    refused = json.loads(out.stdout)
    assert refused["revision"] == current["revision"]   # the second admin's revision not counted
    for host in fleet.hosts:
        result = refused["results"][host.name]
        assert result["outcome"] == "refused" and result["reason"] == "rollback", result
        assert f"revision {current['revision']} is not newer" in result["problem"], result
        assert f"{host.name} refused revision {current['revision']} (rollback)" in out.stderr, out.stderr
        assert host.sha() == current["sha256"]   # still the second admin's policy
    assert "--admin-key" in out.stderr   # what to do about it
    # `fleet status` run after it (or after a push with --no-wait) says the same. Before the
    # fix it showed each host enforcing the second admin's revision, exit 0: nothing said every
    # host refused the push, nor why, nor when. Now each names the revision it refuses, the
    # reason and when (as its host key signed it), and the status exits 1.
    status = cli("fleet", "status", "--etcd", fleet.cluster.endpoints, "--admin-key", str(fleet.work / "admins.vkey"),
                 "--json", env=admin_env(fleet.work), check=False)
    view = json.loads(status.stdout)
    assert status.returncode == 1 and "3 members refuse revision" in status.stderr, status.stderr
    assert view["newest"]["sha256"] == refused["sha256"] and view["refusing"] == ["host0", "host1", "host2"], view
    for host in fleet.hosts:
        standing = view["members"][host.name]["standing"]
        assert standing["state"] == "refusing" and standing["enforces"]["sha256"] == current["sha256"], standing
        (refusal,) = standing["refused"]
        assert (refusal["revision"], refusal["reason"], refusal["newest"]) == (current["revision"], "rollback", True)
        assert "is not newer" in refusal["problem"] and refusal["age_s"] >= 0, refusal
    fixed = push(fleet, False, 5, "--admin-key", fleet.admin2_vkey)
    assert fixed["revision"] == current["revision"] + 1
    view = json.loads(cli("fleet", "status", "--etcd", fleet.cluster.endpoints, "--admin-key",
                          str(fleet.work / "admins.vkey"), "--json", env=admin_env(fleet.work)).stdout)   # exit 0
    assert view["ok"] and {m["standing"]["state"] for m in view["members"].values()} == {"enforcing"}, view


def test_a_push_a_host_does_not_answer_times_out_naming_it(fleet):
    # The agent of host2 hangs (SIGSTOP: a hung machine; its member record stays until its lease
    # expires). Before the fix the push exited 0; now it waits --wait seconds, then names it.
    stuck = fleet.hosts[2]
    stuck.join.send_signal(signal.SIGSTOP)
    try:
        out = push_run(fleet, True, 6, "--wait", "6")
    finally:
        stuck.join.send_signal(signal.SIGCONT)
    assert out.returncode == 1, out.stderr
    pushed = json.loads(out.stdout)
    outcomes = {name: r["outcome"] for name, r in pushed["results"].items()}
    assert outcomes == {"host0": "enforcing", "host1": "enforcing", "host2": "timed_out"}, pushed
    assert "host2" in out.stderr.rpartition("not enforcing")[2], out.stderr
    wait_for(lambda: stuck.sha() == pushed["sha256"], what="host2 applying it once it runs again")


def test_a_forged_enforcing_record_of_a_host_whose_agent_is_stopped_never_counts(fleet):
    # Member records were unsigned: with host2's agent stopped, whoever writes etcd put host2's
    # record back saying it enforces the revision being pushed, and the push counted it (exit 0)
    # while host2's daemon ran the one before. Now each host signs its record with its log key,
    # pinned in the admin's state dir, and the push counts only what that key signed: once the
    # wait is over host2 is named, forged.
    import asyncio

    from skyguard.fleet import keys
    from skyguard.fleet.etcd import EtcdStore
    from skyguard.fleet.signing import claimed, sha256_text

    store = EtcdStore(fleet.cluster.endpoints)
    stopped = fleet.hosts[2]
    stopped.join.send_signal(signal.SIGSTOP)
    try:
        genuine = json.loads(asyncio.run(store.get(keys.member(stopped.name)))[0].value)
        revision = claimed(asyncio.run(store.get(keys.POLICY))[0].value)[0] + 1   # the push's next one
        forged = dict(genuine, heartbeat=time.time(),
                      policy=dict(genuine["policy"], revision=revision, sha256=sha256_text(policy_text(True, 7))))
        asyncio.run(store.put(keys.member(stopped.name), json.dumps(forged).encode()))
        out = push_run(fleet, True, 7, "--wait", "6")
        pushed = json.loads(out.stdout)
        assert stopped.sha() != pushed["sha256"]   # what host2's datapath really runs
    finally:
        stopped.join.send_signal(signal.SIGCONT)
    assert pushed["revision"] == revision, pushed
    outcomes = {name: r["outcome"] for name, r in pushed["results"].items()}
    assert outcomes == {"host0": "enforcing", "host1": "enforcing", "host2": "forged"}, pushed
    assert out.returncode == 1 and "host2 (timed out after" in out.stderr.rpartition("not enforcing")[2], out.stderr
    wait_for(lambda: stopped.sha() == pushed["sha256"], what="host2 applying it once its agent runs again")


def test_the_daemons_logs_are_cosigned_by_both_peers(fleet):
    def witnessed(host):
        out = cli("log", "verify", "--state-dir", str(host.daemon.state_dir), "--witnesses", "2", check=False)
        return out.returncode == 0 and "cosigned by 2 witnesses" in out.stdout
    for host in fleet.hosts:
        wait_for(lambda host=host: witnessed(host), what=f"{host.name}'s log cosigned by two peers")
    loads = [e for e in fleet.hosts[0].daemon.log_entries("policy_load") if "fleet revision" in e.get("source", "")]
    assert loads, "the pushed policies are in the daemon's signed log"


def test_a_joined_agent_s_tamper_alert_is_in_its_daemon_s_signed_log(fleet):
    # `skyguard fleet join` beside a daemon wrote its fleet events (a tamper alert among them)
    # to a plain file in the state dir: before the fix the host's signed log never held the
    # alert, and editing the file erased it. Now the agent hands each event to the daemon
    # (control operation `fleet.record`), which appends it to its signed log.
    import asyncio

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from skyguard.fleet import keys
    from skyguard.fleet.etcd import EtcdStore
    from skyguard.fleet.peers import trust
    from skyguard.tlog.checkpoint import Checkpoint, Signer
    from skyguard.tlog.cosign import Cosigner
    from skyguard.tlog.hashing import hash_leaf
    from skyguard.tlog.tree import MemorySource, range_root

    store = EtcdStore(fleet.cluster.endpoints)
    key = Signer("forker", Ed25519PrivateKey.generate())
    origin = "forker-d.skyguard/log"
    record = {"name": "forker", "origin": origin, "log_vkey": key.verifier.vkey(),
              "witness_vkey": Cosigner("forker.skyguard/witness", Ed25519PrivateKey.generate()).verifier.vkey()}

    def checkpoint(salt):
        tree = MemorySource([hash_leaf(b"%s %d" % (salt, i)) for i in range(2)])
        note = Checkpoint(origin, 2, range_root(tree, 0, 2)).sign(key)
        asyncio.run(store.put(keys.checkpoint("forker"), json.dumps({"note": note, "proofs": {}}).encode()))

    def cosigned_by_all():
        items, _ = asyncio.run(store.get_prefix(keys.cosignatures_of("forker")))
        return {h.name for h in fleet.hosts} <= {i.key.rsplit("/", 1)[-1] for i in items}
    for host in fleet.hosts:   # pinned by the operator, as a member of the fleet
        trust(host.daemon.state_dir, "forker", record)
    try:
        asyncio.run(store.put(keys.member("forker"), json.dumps(record).encode()))
        checkpoint(b"entry")
        wait_for(cosigned_by_all, what="every host cosigning forker")
        checkpoint(b"forged")
        for host in fleet.hosts:
            wait_for(lambda host=host: any(e.get("peer") == "forker" for e in host.daemon.log_entries("tamper")),
                     what=f"the tamper alert on {host.name}'s signed log")
    finally:
        asyncio.run(store.delete(keys.member("forker")))
        asyncio.run(store.delete(keys.checkpoint("forker")))
