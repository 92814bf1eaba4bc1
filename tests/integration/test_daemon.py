"""The daemon enforcing policies/keysystems.yaml on the session lab, with real TCP, UDP and ICMP
over IPv4 and IPv6: what passes, what is dropped and why, and the lifecycle a user relies on
(new interfaces, atomic policy swap under traffic, SIGKILL, tampering, `down`, the root-only
control socket).

One daemon for the whole module (`skyguard up` compiles the programs once); tests that stop or
kill it start it again. The last test takes it down. Traffic stays inside the lab namespaces.
Timeouts below are bounds against hangs, never assertions about speed.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
import subprocess
import time

import pytest
from daemon_support import (
    PY,
    ContinuousProber,
    RunningDaemon,
    Stream,
    attached_programs,
    connects,
    drop_count,
    dropped,
    expect_probes,
    reaches,
    recreate_vm_link,
    start_listener,
    stop_process,
    wait_for,
)

from skyguard.dns.resolver import LEARN_GRACE_SECONDS
from skyguard.lab.addressing import addresses_for_name
from skyguard.policy.parse import load_policy
from support.client_waits import dig_argv

WORKLOAD_IFACES = {f"sg-{vm}" for vm in ("radius1", "tacacs1", "dc1", "dc2", "sdnctl1", "vfw1", "agent1")}
SYSLOG_V4, SYSLOG_V6 = "192.0.2.10", "2001:db8::10"
ADDR = {"radius1": ("10.10.1.2", "fd00:10:1::2"), "tacacs1": ("10.10.1.3", "fd00:10:1::3"),
        "dc1": ("10.10.2.2", "fd00:10:2::2"), "dc2": ("10.10.2.3", "fd00:10:2::3"),
        "sdnctl1": ("10.10.3.2", "fd00:10:3::2"), "vfw1": ("10.10.4.2", "fd00:10:4::2"),
        "agent1": ("10.10.5.2", "fd00:10:5::2")}
# What each VM listens on (TCP and UDP echo, v4 and v6). Streams use other ports.
LISTEN = {"radius1": ([49, 389], [1812]), "tacacs1": ([49], [1812]), "dc1": ([389, 636], [88]),
          "dc2": ([389, 50100], [88]), "vfw1": ([443, 830, 8443], [])}


@pytest.fixture(scope="module")
def daemon(lab, tmp_path_factory):
    d = RunningDaemon(lab, tmp_path_factory.mktemp("daemon"))
    listeners = []
    try:
        listeners = [start_listener(lab, vm, tcp, udp) for vm, (tcp, udp) in LISTEN.items()]
        d.start()
        yield d
    finally:
        d.cleanup()
        for proc in listeners:
            stop_process(proc)


# (source VM, kind, destination, port, expected): the policy's rules as a user reads them.
def _matrix():
    rows = []
    for fam in (0, 1):
        syslog = (SYSLOG_V4, SYSLOG_V6)[fam]
        rows += [
            # auth-to-directory: auth -> directory on 389, udp/88, icmp
            ("radius1", "tcp", ADDR["dc1"][fam], 389, True),
            ("radius1", "udp", ADDR["dc1"][fam], 88, True),
            ("radius1", "icmp", ADDR["dc1"][fam], 0, True),
            ("tacacs1", "tcp", ADDR["dc2"][fam], 389, True),
            # ... but not the other way round, and not on ports the rule does not name
            ("dc1", "tcp", ADDR["radius1"][fam], 389, False),
            ("dc1", "icmp", ADDR["radius1"][fam], 0, False),
            ("radius1", "tcp", ADDR["dc1"][fam], 636, True),
            ("radius1", "tcp", ADDR["vfw1"][fam], 443, False),
            # device-admin-auth: firewall and sdn -> auth
            ("vfw1", "tcp", ADDR["radius1"][fam], 49, True),
            ("vfw1", "udp", ADDR["radius1"][fam], 1812, True),
            ("sdnctl1", "udp", ADDR["tacacs1"][fam], 1812, True),
            # sdn-manages-firewall on 443 and 830, nothing else (8443 is not named)
            ("sdnctl1", "tcp", ADDR["vfw1"][fam], 443, True),
            ("sdnctl1", "tcp", ADDR["vfw1"][fam], 8443, False),
            ("sdnctl1", "icmp", ADDR["vfw1"][fam], 0, True),
            # sandbox: nothing into corp (deny), not even ICMP
            ("agent1", "tcp", ADDR["dc1"][fam], 389, False),
            ("agent1", "icmp", ADDR["dc1"][fam], 0, False),
            ("agent1", "udp", ADDR["radius1"][fam], 1812, False),
            # to the internet namespace: the syslog collector on udp/514 and tcp/6514 only
            ("agent1", "udp", syslog, 514, True),
            ("dc2", "tcp", syslog, 6514, True),
            ("radius1", "udp", syslog, 7, False),
            ("radius1", "tcp", syslog, 7, False),
            ("radius1", "tcp", syslog, 5001, False),
            ("agent1", "tcp", syslog, 514, False),
            ("radius1", "icmp", syslog, 0, False),
        ]
    return rows


MATRIX = _matrix()


@pytest.mark.parametrize("source", sorted({r[0] for r in MATRIX}))
def test_allowed_passes_and_denied_does_not(lab, daemon, source):
    rows = [r for r in MATRIX if r[0] == source]
    expect_probes(lab, source, [(kind, dst, port) for _, kind, dst, port, _ in rows], [want for *_, want in rows])


def test_status_reports_every_interface_policy_and_drop_reasons(lab, daemon):
    s = daemon.status()
    assert set(s["interfaces"]) == WORKLOAD_IFACES
    for ifname, (from_vm, to_vm) in attached_programs(s).items():
        assert from_vm and to_vm, f"{ifname} lacks a program: {s['interfaces'][ifname]}"
    assert s["policy"]["sha256"] == load_policy(lab.policy_path).sha256
    # denied traffic of this test is counted by zone and reason
    before = drop_count(s, "sandbox", "no_rule") + drop_count(s, "sandbox", "policy_deny")
    assert dropped(lab, "agent1", "tcp", ADDR["dc1"][0], 389)
    after = daemon.status()
    assert drop_count(after, "sandbox", "no_rule") + drop_count(after, "sandbox", "policy_deny") > before


@pytest.mark.parametrize("fam", [0, 1], ids=["v4", "v6"])
def test_replies_pass_but_unsolicited_inbound_is_dropped(lab, daemon, fam):
    # radius1 -> dc1 works (the echo is a reply through sg_to_vm of radius1)...
    assert reaches(lab, "radius1", "tcp", ADDR["dc1"][fam], 389)
    # ... but dc1 opening toward radius1's listener, and the internet doing so, is dropped.
    before = drop_count(daemon.status(), "auth", "no_rule")
    assert dropped(lab, "dc1", "tcp", ADDR["radius1"][fam], 49)
    expect_probes(lab, "internet", [("tcp", ADDR["radius1"][fam], 49), ("udp", ADDR["radius1"][fam], 1812),
                                    ("icmp", ADDR["radius1"][fam], 0)], [False, False, False])
    assert drop_count(daemon.status(), "auth", "no_rule") > before


@pytest.mark.parametrize("fam", [0, 1], ids=["v4", "v6"])
def test_spoofed_source_address_is_dropped_with_its_reason(lab, daemon, fam):
    foreign = ("10.10.2.99", "fd00:10:2::99")[fam]  # an address of the directory zone's range
    syslog = (SYSLOG_V4, SYSLOG_V6)[fam]
    plen = 128 if fam else 32
    add = ["ip", "addr", "add", f"{foreign}/{plen}", "dev", "eth0"] + (["nodad"] if fam else [])
    assert lab.exec("agent1", add, lab_resolver=False).returncode == 0
    try:
        # the same allowed exchange (syslog) passes from the VM's own address ...
        assert reaches(lab, "agent1", "udp", syslog, 514, source=ADDR["agent1"][fam])
        before = drop_count(daemon.status(), "sandbox", "spoof_ip")
        # ... and is dropped from the foreign one, counted as spoofing
        assert dropped(lab, "agent1", "udp", syslog, 514, source=foreign)
        assert dropped(lab, "agent1", "tcp", syslog, 6514, source=foreign)
        assert drop_count(daemon.status(), "sandbox", "spoof_ip") >= before + 2
    finally:
        lab.exec("agent1", ["ip", "addr", "del", f"{foreign}/{plen}", "dev", "eth0"], lab_resolver=False)


def _ifindex(lab, ifname):
    out = lab.exec("host", ["ip", "-j", "link", "show", "dev", ifname], lab_resolver=False,
                   capture_output=True, text=True)
    return json.loads(out.stdout)[0]["ifindex"]


def answered(lab, vm: str, name: str, qtype: str) -> list[tuple[int, str]]:
    """(TTL, address) of each address record dig in `vm` got for `name` (steered to the proxy)."""
    out = lab.exec(vm, dig_argv("+noall", "+answer", name, qtype), capture_output=True, text=True, timeout=60)
    return [(int(f[1]), f[4]) for f in (line.split() for line in out.stdout.splitlines()) if f[3:4] in (["A"], ["AAAA"])]


def test_an_address_two_names_answer_stays_open_while_the_longer_answer_says(lab, daemon):
    """A CDN: two names of the sandbox's rule answer one address, one for 300 s, the other for 5 s.
    The datapath held the address for the latest answer's TTL: it closed after 5 s while the VM
    kept the first name's answer for 300 s, and the VM's next connection to it was dropped."""
    daemon.ensure_running()
    shared = str(addresses_for_name("cdn.pythonhosted.test")[0])
    short = next(n for n in (f"ttl5.e{i}.pythonhosted.test" for i in range(10_000))
                 if str(addresses_for_name(n)[0]) == shared)
    only_short = str(addresses_for_name(short)[1])  # its AAAA: no other answer holds it
    assert answered(lab, "agent1", "cdn.pythonhosted.test", "A") == [(300, shared)]
    assert sorted(answered(lab, "agent1", short, "ANY")) == [(5, only_short), (5, shared)]
    past_short = time.monotonic() + 5 + LEARN_GRACE_SECONDS + 1
    time.sleep(past_short - time.monotonic())  # the 5 s answer (and the proxy's grace) runs out
    assert dropped(lab, "agent1", "tcp", only_short, 443)  # the short answer alone: closed at its TTL
    assert connects(lab, "agent1", shared, 443, expected=True)  # the VM still holds the 300 s answer


def test_a_new_interface_is_attached_and_enforced(lab, daemon):
    before = attached_programs(daemon.status())["sg-tacacs1"]
    old_ifindex = _ifindex(lab, "sg-tacacs1")
    recreate_vm_link(lab, "tacacs1")
    assert _ifindex(lab, "sg-tacacs1") != old_ifindex
    wait_for(lambda: attached_programs(daemon.status()).get("sg-tacacs1") == before, 10,
             "the daemon to attach its programs to the new sg-tacacs1")
    expect_probes(lab, "tacacs1", [("tcp", ADDR["dc1"][0], 389), ("tcp", ADDR["dc1"][1], 389),
                                   ("udp", SYSLOG_V4, 7), ("tcp", ADDR["vfw1"][0], 443)], [True, True, False, False])
    # the listener in tacacs1 was in its namespace all along; inbound enforcement works too
    assert reaches(lab, "vfw1", "tcp", ADDR["tacacs1"][0], 49)
    assert dropped(lab, "agent1", "tcp", ADDR["tacacs1"][0], 49)


# Runs inside agent1: denied UDP probes to the syslog collector's echo port, as fast as they go,
# while its interface is re-created; prints how many got an answer.
_WINDOW_PROBER = r"""
import socket, sys, time
answered = sent = 0
print("go", flush=True)
end = time.monotonic() + 3
while time.monotonic() < end:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.05)
    try:
        s.sendto(b"x", (sys.argv[1], 7)); s.recvfrom(10); answered += 1
    except OSError:
        pass
    sent += 1; s.close()
print(sent, answered)
"""


def test_no_window_while_a_new_interface_waits_for_its_programs(lab, daemon):
    """Between a VM interface appearing and the daemon attaching to it, the guard keeps it dark."""
    prober = lab.popen("agent1", [PY, "-c", _WINDOW_PROBER, SYSLOG_V4], lab_resolver=False,
                       stdout=subprocess.PIPE, text=True)
    assert prober.stdout.readline().strip() == "go"
    recreate_vm_link(lab, "agent1")
    sent, answered = map(int, prober.communicate(timeout=30)[0].split())
    assert sent > 0 and answered == 0
    wait_for(lambda: "sg-agent1" in attached_programs(daemon.status()), 10, "re-attach to sg-agent1")


def _swapped_policy(lab, tmp_path):
    """keysystems with directory replication narrowed (no tcp/135, 3268, 49152-65535) and the SDN
    controller newly allowed to reach the firewall on tcp/8443."""
    text = lab.policy_path.read_text()
    old_repl = 'ports: [tcp/389, tcp/636, tcp/88, udp/88, tcp/135, tcp/3268, "tcp/49152-65535", icmp, icmpv6]'
    old_sdn = "ports: [tcp/443, tcp/830, icmp, icmpv6]"
    assert text.count(old_repl) == 1 and text.count(old_sdn) == 1, "keysystems.yaml changed; update this test"
    text = text.replace(old_repl, "ports: [tcp/389, tcp/636, tcp/88, udp/88, icmp, icmpv6]")
    text = text.replace(old_sdn, "ports: [tcp/443, tcp/830, tcp/8443, icmp, icmpv6]")
    text = text.replace("metadata: {name: keysystems}", "metadata: {name: keysystems-narrowed}")
    path = tmp_path / "narrowed.yaml"
    path.write_text(text)
    return path


def test_policy_swap_under_traffic(lab, daemon, tmp_path):
    daemon.ensure_running()
    new_policy = _swapped_policy(lab, tmp_path)
    kept = Stream(lab, "radius1", "dc1", ADDR["dc1"][1], 50001)  # auth-to-directory: stays allowed
    cut = Stream(lab, "dc1", "dc2", ADDR["dc2"][0], 50002)  # directory-replication range: revoked
    try:
        assert kept.flowing() and cut.flowing()
        assert reaches(lab, "dc1", "tcp", ADDR["dc2"][0], 50100)
        assert dropped(lab, "sdnctl1", "tcp", ADDR["vfw1"][0], 8443)
        revoked_before = drop_count(daemon.status(), "directory", "policy_revoked")

        out = daemon.cli("policy", "load", str(new_policy), "--json")
        assert out.returncode == 0, out.stderr

        assert daemon.status()["policy"]["sha256"] == load_policy(new_policy).sha256
        assert kept.flowing(), "an established flow the new policy still allows was cut"
        assert cut.stalled(), "an established flow the new policy denies kept flowing"
        assert drop_count(daemon.status(), "directory", "policy_revoked") > revoked_before
        # new connections follow the new policy both ways
        expect_probes(lab, "dc1", [("tcp", ADDR["dc2"][0], 50100), ("tcp", ADDR["dc2"][1], 50100),
                                   ("tcp", ADDR["dc2"][0], 389)], [False, False, True])
        expect_probes(lab, "sdnctl1", [("tcp", ADDR["vfw1"][0], 8443), ("tcp", ADDR["vfw1"][1], 8443)], [True, True])
        assert kept.flowing()
    finally:
        kept.close()
        cut.close()
        restored = daemon.cli("policy", "load", str(lab.policy_path))
        assert restored.returncode == 0, restored.stderr


def test_a_bad_policy_file_exits_2_and_changes_nothing(lab, daemon, tmp_path):
    daemon.ensure_running()
    shown = daemon.cli("policy", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    running_sha = json.loads(shown.stdout)["sha256"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(lab.policy_path.read_text().replace("ports: [udp/514, tcp/6514]", "ports: [udp/99999]"))
    out = daemon.cli("policy", "load", str(bad))
    assert out.returncode == 2
    assert "bad.yaml" in out.stderr and "99999" in out.stderr, out.stderr
    after = json.loads(daemon.cli("policy", "show", "--json").stdout)["sha256"]
    assert after == running_sha
    # and enforcement is the running policy's
    expect_probes(lab, "radius1", [("udp", SYSLOG_V4, 514), ("udp", SYSLOG_V4, 7)], [True, False])


def test_tampering_with_a_program_is_repaired_and_logged(lab, daemon):
    daemon.ensure_running()
    ours = attached_programs(daemon.status())["sg-vfw1"]
    deleted = lab.exec("host", ["tc", "filter", "del", "dev", "sg-vfw1", "ingress"], lab_resolver=False,
                       capture_output=True, text=True)
    assert deleted.returncode == 0, deleted.stderr
    wait_for(lambda: attached_programs(daemon.status()).get("sg-vfw1") == ours, 10,
             "the watchdog to re-attach sg_from_vm on sg-vfw1")
    tamper = wait_for(lambda: [e for e in daemon.log_entries("tamper") if e.get("interface") == "sg-vfw1"], 10,
                      "a tamper entry for sg-vfw1 in the signed log")
    assert tamper[-1]["action"] == "reattached"
    assert daemon.status()["tamper_events"] >= 1
    expect_probes(lab, "vfw1", [("tcp", SYSLOG_V4, 7), ("tcp", ADDR["radius1"][0], 49)], [False, True])


def test_the_control_socket_is_root_only(daemon):
    daemon.ensure_running()
    sock = daemon.run_dir / "control.sock"
    assert stat.S_IMODE(os.stat(daemon.run_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(daemon.state_dir).st_mode) == 0o700
    # a plain user cannot even reach it
    out = daemon.cli("status", "--json", user="nobody")
    assert out.returncode != 0 and "root" in out.stderr, out.stderr
    # a non-root user who can reach the file (DAC override) is refused by the daemon itself
    out = daemon.cli("policy", "load", str(daemon.policy_path), user="nobody", caps="+dac_override")
    assert out.returncode != 0
    assert "only root may use the skyguard control socket" in out.stderr, out.stderr
    assert daemon.running()


def _raw_request(path, data: bytes, timeout: float = 15) -> bytes:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
        return reply


@pytest.mark.parametrize("message", [b"[]\n", b'"status"\n', b"42\n", b'{"op": ["status"]}\n',
                                     b'{"op": {"a": 1}}\n', b"[" * 100_000 + b"\n", b'{"op": "status", "args": 7}\n'],
                         ids=["list", "string", "number", "op-list", "op-dict", "deep", "args-number"])
def test_a_malformed_control_message_gets_an_answer_and_the_daemon_goes_on(daemon, message):
    daemon.ensure_running()
    reply = _raw_request(daemon.run_dir / "control.sock", message)
    assert reply.endswith(b"\n"), f"no answer to {message[:30]!r}"
    answer = json.loads(reply)
    assert answer["ok"] is False and answer["error"], answer
    assert daemon.request("status")["policy"]["name"]


def _running_and_a_wider_policy(lab, daemon, tmp_path):
    """(the running policy's sha256, its programs, a policy file that also allows udp/7)."""
    daemon.ensure_running()
    running_sha = json.loads(daemon.cli("policy", "show", "--json").stdout)["sha256"]
    before = attached_programs(daemon.status())
    wider = tmp_path / "wider.yaml"
    wider.write_text(lab.policy_path.read_text().replace("ports: [udp/514, tcp/6514]",
                                                          "ports: [udp/514, udp/7, tcp/6514]"))
    return running_sha, before, wider


def test_a_second_up_changes_nothing_of_the_running_daemons_enforcement(lab, daemon, tmp_path):
    # An operator starts `skyguard up` again (another state dir, a wider policy) while one runs:
    # it must refuse before it touches the pinned maps, the programs or the steering.
    running_sha, before, wider = _running_and_a_wider_policy(lab, daemon, tmp_path)
    out = daemon.cli("up", "--policy", str(wider), "--state-dir", str(tmp_path / "state2"), "--metrics", "off",
                     timeout=120)
    assert out.returncode != 0
    assert "already" in out.stderr, out.stderr
    assert daemon.running()
    assert json.loads(daemon.cli("policy", "show", "--json").stdout)["sha256"] == running_sha
    assert attached_programs(daemon.status()) == before, "the second up replaced the running daemon's programs"
    expect_probes(lab, "radius1", [("udp", SYSLOG_V4, 514), ("udp", SYSLOG_V4, 7)], [True, False])
    assert daemon.status()["parts"]["dns"] == "running"


def test_a_second_daemon_with_its_own_run_dir_but_the_same_pin_dir_is_refused(lab, daemon, tmp_path):
    # Another run dir (so the run-dir lock does not stop it) but the same bpffs pin dir: the
    # second `up` must refuse before it loads its policy into the maps the first one enforces,
    # and a `down` from its environment must not detach the first one's programs.
    running_sha, before, wider = _running_and_a_wider_policy(lab, daemon, tmp_path)
    second = RunningDaemon(lab, tmp_path / "second", policy_path=wider)
    assert second.pin_dir == daemon.pin_dir and second.run_dir != daemon.run_dir
    second.launch()
    try:
        second.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        second.proc.terminate()  # never `down`: that would detach the first daemon's programs
        second.proc.wait(timeout=60)
        raise AssertionError(f"a second daemon ran on the pin dir {daemon.pin_dir}:\n{second.log_tail()}") from None
    assert second.proc.returncode != 0
    assert f"already enforces with the pin dir {daemon.pin_dir}" in second.log_tail(), second.log_tail()
    assert not (second.run_dir / "control.sock").exists() and not (second.state_dir / "log").exists()
    down = second.cli("down")
    assert down.returncode != 0 and "already enforces with the pin dir" in down.stderr, down.stderr
    assert daemon.running() and daemon.pin_dir.exists()
    assert json.loads(daemon.cli("policy", "show", "--json").stdout)["sha256"] == running_sha
    assert attached_programs(daemon.status()) == before, "the second daemon replaced the first one's programs"
    expect_probes(lab, "radius1", [("udp", SYSLOG_V4, 514), ("udp", SYSLOG_V4, 7)], [True, False])


@pytest.mark.parametrize("whose", ["state", "run"])
def test_up_refuses_a_state_or_run_dir_another_user_owns(lab, tmp_path, whose):
    # A local user who made the directory first (say under /tmp) could swap the host key, the
    # learned DNS answers or the control socket skyguard keeps there, whatever their modes.
    import pwd

    dirs = {"state": tmp_path / "state", "run": tmp_path / "run"}
    dirs[whose].mkdir(mode=0o755)
    nobody = pwd.getpwnam("nobody")
    os.chown(dirs[whose], nobody.pw_uid, nobody.pw_gid)
    pin_dir = f"/sys/fs/bpf/sgt-own-{os.getpid()}-{whose}"
    env = dict(os.environ, SKYGUARD_STATE_DIR=str(dirs["state"]), SKYGUARD_RUN_DIR=str(dirs["run"]),
               SKYGUARD_PIN_DIR=pin_dir, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen(["unshare", "--net", "--", PY, "-m", "skyguard.cli.main", "up", "--policy",
                             str(lab.policy_path), "--metrics", "off"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # a netns of its own: nothing shared is touched
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"up ran in a {whose} dir owned by nobody: {err[-2000:]}") from None
    finally:
        subprocess.run(["rm", "-rf", pin_dir], check=False)
    assert proc.returncode == 2, err
    assert f"belongs to uid {nobody.pw_uid}" in err, err
    assert os.stat(dirs[whose]).st_uid == nobody.pw_uid and not (dirs[whose] / "control.sock").exists()
    assert not (dirs["state"] / "log").exists()


def test_sigkill_under_traffic_keeps_enforcing_and_restart_readopts(lab, daemon):
    daemon.ensure_running()
    before = attached_programs(daemon.status())
    stream = Stream(lab, "radius1", "dc1", ADDR["dc1"][0], 50003)
    prober = ContinuousProber(lab, "agent1", allowed=(SYSLOG_V6, 514), denied=(ADDR["dc1"][1], 88))
    try:
        assert stream.flowing()
        daemon.kill()
        assert not daemon.run_dir.joinpath("control.sock").exists() or daemon.cli("status").returncode != 0
        # programs stay attached and keep the last policy
        assert stream.flowing(), "the established allowed stream stopped when the daemon died"
        expect_probes(lab, "agent1", [("icmp", ADDR["dc1"][0], 0), ("udp", SYSLOG_V4, 514)], [False, True])
        after_kill = subprocess.run(["nsenter", f"--net={daemon.host_netns}", "tc", "filter", "show", "dev",
                                     "sg-dc1", "ingress"], capture_output=True, text=True).stdout
        assert "sg_from_vm" in after_kill
        status = daemon.start()  # re-adopts the pinned maps and replaces the programs in place
        assert set(status["interfaces"]) == WORKLOAD_IFACES
        after = attached_programs(status)
        assert all(after[i] != before[i] for i in WORKLOAD_IFACES), "restart did not replace the programs"
        assert stream.flowing(), "the established allowed stream stopped across the restart"
    finally:
        counts = prober.stop()
        stream.close()
    assert counts["denied_ok"] == 0, f"a denied flow passed during kill and restart: {counts}"
    assert counts["allowed_ok"] > 0 and counts["allowed_lost"] == 0, f"allowed flows failed: {counts}"


def test_down_detaches_everything(lab, daemon):
    daemon.ensure_running()
    assert dropped(lab, "agent1", "icmp", ADDR["dc1"][0])
    out = daemon.stop()
    assert out.returncode == 0, out.stderr
    assert not daemon.running()
    listing = []
    for ifname in sorted(WORKLOAD_IFACES):
        for where in ("ingress", "egress"):
            listing.append(lab.exec("host", ["tc", "filter", "show", "dev", ifname, where], lab_resolver=False,
                                    capture_output=True, text=True).stdout)
    links = lab.exec("host", ["ip", "-d", "link", "show"], lab_resolver=False, capture_output=True, text=True).stdout
    assert not any(re.search(r"\bsg_", text) for text in listing), listing
    assert "prog/xdp" not in links
    assert not daemon.pin_dir.exists()
    # with nothing attached the lab is plain routing again: what was denied now passes
    assert reaches(lab, "agent1", "icmp", ADDR["dc1"][0])


def test_down_returns_once_the_daemon_has_let_go_of_its_run_dir(lab, daemon):
    """`down` returned as soon as the control socket stopped answering, while the daemon still
    shut down holding its run dir: `skyguard down && skyguard up` was refused ("a skyguard daemon
    already runs"), as an operator trial restarting with another policy found."""
    daemon.ensure_running()
    out = daemon.cli("down")
    assert out.returncode == 0, out.stderr
    fd = os.open(daemon.run_dir / "daemon.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: still held
    finally:
        os.close(fd)
    daemon.proc.wait(timeout=30)


def test_down_while_the_daemon_starts_stops_it_once_it_answers(lab, daemon):
    """`down` while `up` holds the run dir but has no control socket yet (compiling, loading the
    policy): it must stop that daemon, not take the "nothing running" path, clean up under it
    and leave it to come up enforcing after `down` said it was gone."""
    if daemon.running():
        daemon.stop()
    lock = daemon.run_dir / "daemon.lock"

    def starting() -> bool:
        fd = os.open(lock, os.O_RDWR) if lock.exists() else None
        if fd is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return not daemon.run_dir.joinpath("control.sock").exists()
        finally:
            os.close(fd)

    daemon.launch()
    wait_for(starting, 60, "the daemon to hold its run dir")
    out = daemon.cli("down")
    assert out.returncode == 0, out.stderr
    assert "no daemon was running" not in out.stdout, out.stdout
    daemon.proc.wait(timeout=60)
    assert not daemon.pin_dir.exists()
    assert reaches(lab, "agent1", "icmp", ADDR["dc1"][0])  # nothing enforces any more
