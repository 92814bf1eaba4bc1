"""Flow logging end to end in the lab: the real daemon (`skyguard up`) runs in the lab's host
namespace and enforces policies/keysystems.yaml on the lab VMs' interfaces; real TCP and UDP
traffic between lab VMs must appear in `skyguard flows --json` and in the signed log with the
right verdict, rule, reason and counts, and the log must verify afterwards.

The daemon's state, run and pin directories are private to this module. Traffic stays inside
the lab's namespaces. Ring buffer loss accounting is tested in tests/bpf/test_flowlog.py, where
the ring can be made tiny.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from daemon_support import RunningDaemon, wait_for

from support.client_waits import ANSWER_WAIT_S

RADIUS1, DC1, AGENT1 = "10.10.1.2", "10.10.2.2", "10.10.5.2"

SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(4); print("ready", flush=True)
while True:
    c, _ = s.accept()
    data = b""
    while len(data) < 3000:
        chunk = c.recv(65536)
        if not chunk: break
        data += chunk
    c.sendall(data); c.close()
"""
CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.sendall(b"x" * 3000)
got = b""
while len(got) < 3000:
    chunk = c.recv(65536)
    if not chunk: break
    got += chunk
c.close(); print(len(got))
"""
FLOOD = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 40123))
for _ in range(int(sys.argv[3])):
    s.sendto(b"f" * 18, (sys.argv[1], int(sys.argv[2])))
"""


class FlowsDaemon(RunningDaemon):
    """The daemon under test; its CLI fails the test on a non-zero exit unless told otherwise."""

    def cli(self, *args, check=True, **kwargs):
        return super().cli(*args, check=check, **kwargs)

    def flows(self, *args):
        return json.loads(self.cli("flows", "--json", "--limit", "10000", *args).stdout)["records"]


def started_daemon(lab, tmp_path_factory, tag: str):
    """A module's daemon on the session lab, with private directories; cleaned up after."""
    daemon = FlowsDaemon(lab, tmp_path_factory.mktemp(f"flx-{tag}"))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.cleanup()


@pytest.fixture(scope="module")
def skyguard(lab, tmp_path_factory):
    yield from started_daemon(lab, tmp_path_factory, "flows")


@pytest.fixture(scope="module")
def tcp_server(lab, skyguard):
    proc = lab.popen("dc1", [sys.executable, "-c", SERVER, "389"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_allowed_tcp_flow_has_start_and_end_with_counts(lab, skyguard, tcp_server):
    out = lab.exec("radius1", [sys.executable, "-c", CLIENT, DC1, "389", str(ANSWER_WAIT_S)], capture_output=True,
                   text=True, timeout=ANSWER_WAIT_S + 30)
    assert out.returncode == 0 and out.stdout.strip() == "3000", out.stderr

    def ours(records, kind):
        return [r for r in records if r["type"] == kind and r["dport"] == 389 and r["src"] == RADIUS1]

    records = skyguard.flows("--verdict", "allow")
    starts = ours(records, "flow_start")
    # one decision where it leaves radius1 and one where it enters dc1
    assert {(r["interface"], r["direction"]) for r in starts} == {("sg-radius1", "egress"), ("sg-dc1", "ingress")}
    for r in starts:
        assert r["verdict"] == "allow" and r["rule"] == "auth-to-directory"
        assert (r["src_zone"], r["src_workload"], r["dst_zone"], r["dst_workload"]) == \
            ("auth", "radius1", "directory", "dc1")
        assert r["proto"] == "tcp" and r["dst"] == DC1
    # after the close, flow_end with counts (a conntrack scan or two later)
    ends = wait_for(lambda: len(e := ours(skyguard.flows("--verdict", "allow"), "flow_end")) == 2 and e,
                    30, "flow_end records")
    for r in ends:
        assert r["reason"] == "closed" and r["rule"] == "auth-to-directory"
        assert r["packets"] >= 6  # handshake, data both ways, FINs
        assert r["bytes"] > 6000  # 3000 bytes each way plus headers
    # the same records are in the signed log
    logged = [e for e in skyguard.log_entries("flow_end") if e["dport"] == 389 and e["src"] == RADIUS1]
    assert sorted((e["interface"], e["packets"], e["bytes"]) for e in logged) == \
        sorted((r["interface"], r["packets"], r["bytes"]) for r in ends)
    assert len([e for e in skyguard.log_entries("flow_start") if e["dport"] == 389]) == 2


def test_denied_flood_is_a_few_deny_entries_with_the_total_count(lab, skyguard):
    packets = 10_000
    out = lab.exec("agent1", [sys.executable, "-c", FLOOD, DC1, "9999", str(packets)], capture_output=True,
                   text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    denies = [r for r in skyguard.flows("--verdict", "deny", "--zone", "sandbox")
              if r.get("dport") == 9999 and r.get("sport") == 40123]
    assert 1 <= len(denies) <= 5, denies
    assert sum(r["packets"] for r in denies) == packets
    for r in denies:
        assert r["reason"] == "policy_deny" and r["verdict"] == "deny" and r["rule"] is None
        assert (r["src_workload"], r["dst_workload"], r["interface"]) == ("agent1", "dc1", "sg-agent1")
    logged = [e for e in skyguard.log_entries("deny") if e.get("dport") == 9999 and e.get("sport") == 40123]
    assert sum(e["packets"] for e in logged) == packets and len(logged) <= 5
    # the kernel's own drop counter agrees
    status = json.loads(skyguard.cli("status", "--json").stdout)
    drops = sum(d["packets"] for d in status["counters"]["drops"]
                if (d["zone"], d["reason"]) == ("sandbox", "policy_deny"))
    assert drops >= packets
    assert status["flowlog"]["ring_lost_total"] == 0


def test_flows_cli_filters_and_human_output(skyguard):
    text = skyguard.cli("flows", "--zone", "directory").stdout
    assert "auth-to-directory" in text and "radius1" in text
    deny_lines = skyguard.cli("flows", "--verdict", "deny").stdout.splitlines()
    assert deny_lines and all(" DENY " in line for line in deny_lines)
    bad = skyguard.cli("flows", "--verdict", "maybe", check=False)
    assert bad.returncode == 2 and "maybe" in bad.stderr
    unknown = skyguard.cli("flows", "--zone", "nowhere", check=False)
    assert unknown.returncode == 2 and "no zone 'nowhere'" in unknown.stderr and "sandbox" in unknown.stderr
    # --follow prints what arrives after it started (cursor), one JSON object per line
    follow = subprocess.Popen([sys.executable, "-m", "skyguard.cli.main", "flows", "--follow", "--json",
                               "--verdict", "deny"], env=skyguard.env, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        skyguard.lab.exec("agent1", [sys.executable, "-c", FLOOD, DC1, "9998", "3"], timeout=30)
        line = wait_for(lambda: _read_line_with_port(follow, 9998), 20, "a followed deny record")
        assert line["verdict"] == "deny" and line["reason"] == "policy_deny"
    finally:
        follow.terminate()
        follow.wait(10)


def _read_line_with_port(proc, port):
    import select

    while select.select([proc.stdout], [], [], 0.2)[0]:
        line = proc.stdout.readline()
        if not line:
            return None
        rec = json.loads(line)
        if rec.get("dport") == port:
            return rec
    return None


def test_log_verifies_after_the_daemon_stops(skyguard):
    skyguard.stop()
    proc = skyguard.cli("log", "verify", "--json")
    report = json.loads(proc.stdout)
    assert report["ok"], report
    kinds = {e["type"] for e in skyguard.log_entries()}
    assert {"daemon_start", "policy_load", "flow_start", "flow_end", "deny", "daemon_stop"} <= kinds


def test_human_format_of_every_record_kind():
    from skyguard.cli.flows import format_record

    base = {"time": 1_700_000_000_000_000_000, "interface": "sg-agent1", "direction": "egress", "proto": "udp",
            "src": "fd00:10:5::2", "sport": 5, "dst": "10.10.2.2", "dport": 9999, "src_zone": "sandbox",
            "src_workload": "agent1", "dst_zone": None, "dst_workload": None}
    deny = format_record(dict(base, type="deny", verdict="deny", rule=None, reason="policy_deny", packets=7))
    assert "DENY" in deny and "[fd00:10:5::2]:5 -> 10.10.2.2:9999" in deny and "packets=7" in deny
    assert "sandbox/agent1 -> outside" in deny and "at sg-agent1 (out of the VM)" in deny
    ping = format_record(dict(base, type="deny", verdict="deny", proto="icmp", rule=None, reason="no_rule"))
    assert "icmp fd00:10:5::2 -> 10.10.2.2  at" in ping
    end = format_record(dict(base, type="flow_end", verdict="allow", rule="syslog", reason="expired",
                             packets=3, bytes=180))
    assert "END" in end and "rule=syslog" in end and "bytes=180" in end
    summary = format_record({"type": "deny", "verdict": "deny", "summary": True, "flows": 35, "packets": 90,
                             "interface": "sg-agent1", "direction": "egress", "reason": "no_rule",
                             "src_zone": "sandbox", "time": 1})
    assert "35 flows on sg-agent1" in summary
    loss = format_record({"type": "ring_loss", "verdict": "loss", "lost": 12, "total": 40, "time": 1})
    assert "LOSS" in loss and "12 events" in loss
