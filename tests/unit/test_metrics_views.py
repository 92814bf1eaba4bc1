"""The readable views without a daemon: `skyguard status` tables, `skyguard top` frames and rates,
and the daemon-side "flows.active" reply (bounded, largest first, named by workload).

The live versions run against a real daemon in tests/integration/test_top_pty.py.
"""

import io
import socket

import pytest
from rich.console import Console

from skyguard import config
from skyguard.cli.render import print_status
from skyguard.cli.top import Snapshot, frame, rates_between
from skyguard.errors import BadInput
from skyguard.metrics.views import flows_reply
from skyguard.policy.parse import load_policy

POLICY = load_policy(config.DEFAULT_POLICY)

STATUS = {
    "pid": 4242, "uptime_s": 3725, "tamper_events": 2,
    "policy": {"name": "keysystems", "sha256": POLICY.sha256, "source": str(config.DEFAULT_POLICY)},
    "interfaces": {
        "sg-radius1": {"xdp": {"id": 31, "mode": "generic", "name": "sg_from_vm", "tag": "a1b2c3d4e5f60718"},
                       "tc_egress": {"id": 32, "name": "sg_to_vm", "tag": "0102030405060708"}},
        "sg-agent1": {"tc_egress": {"id": 34, "name": "sg_to_vm", "tag": "0102030405060708"}, "intact": False},
    },
    "maps": {"sg_ct": 12, "sg_policy": 57},
    "counters": {
        "traffic": [{"zone": "auth", "direction": "egress", "verdict": "allow", "packets": 10, "bytes": 1000},
                    {"zone": "sandbox", "direction": "egress", "verdict": "drop", "packets": 4, "bytes": 240}],
        "drops": [{"zone": "sandbox", "direction": "egress", "reason": "no_rule", "packets": 4, "bytes": 240}],
        "events_lost": 3,
    },
    "log": {"size": 77, "checkpointed_size": 70, "bytes": 20480, "checkpoint_age_s": 4, "origin": "host/log"},
}
FLOWS = {
    "flows": [{"ifindex": 9, "proto": 6, "src": "10.10.1.2", "dst": "10.10.2.2", "sport": 40000, "dport": 389,
               "zone": "auth", "direction": "egress", "state": "established", "rule": "auth-to-directory",
               "packets": 10, "bytes": 1000, "interface": "sg-radius1", "workload": "radius1"}],
    "total": 1, "by_zone": {"auth": 1, "sandbox": 0},
    "workloads": {"sg-radius1": {"workload": "radius1", "zone": "auth"},
                  "sg-agent1": {"workload": "agent1", "zone": "sandbox"}},
}


def rendered(renderable, width=160) -> str:
    console = Console(width=width, record=True, color_system=None, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_status_shows_every_section():
    console = Console(width=160, record=True, color_system=None, file=io.StringIO())
    print_status(STATUS, console=console)
    text = console.export_text()
    for expected in ("pid 4242", "1h02m", "keysystems", POLICY.sha256[:16], "sg-radius1", "sg_from_vm", "#31",
                     "sg_to_vm", "tampered", "none", "sg_policy", "57", "auth", "egress", "allow", "no_rule",
                     "sandbox", "Signed log", "77", "20.0 KiB", "events lost", "tamper events", "4s ago", "host/log",
                     "7 entries not yet under a signed checkpoint"):
        assert expected in text, f"{expected!r} missing from:\n{text}"


def test_status_of_a_fresh_daemon_does_not_crash():
    text = rendered(__import__("skyguard.cli.render", fromlist=["status_tables"]).status_tables(
        {"pid": 1, "uptime_s": 0, "policy": {"name": "p", "sha256": "0" * 64}, "interfaces": {}, "maps": {},
         "counters": {"traffic": [], "drops": [], "events_lost": 0}, "log": None}))
    assert "no traffic yet" in text and "no drops" in text and "no interface carries" in text


def test_top_frame_shows_zones_workloads_flows_and_drops():
    text = rendered(frame(Snapshot(STATUS, FLOWS, 1.0), None))
    for expected in ("Zones", "auth", "sandbox", "radius1", "agent1", "2/2", "1/2", "10.10.1.2:40000",
                     "10.10.2.2:389", "auth-to-directory", "no_rule", "events lost 3"):
        assert expected in text, f"{expected!r} missing from:\n{text}"


def test_top_rates_come_from_two_readings():
    later = dict(STATUS, counters={
        "traffic": [{"zone": "auth", "direction": "egress", "verdict": "allow", "packets": 30, "bytes": 3000},
                    {"zone": "sandbox", "direction": "egress", "verdict": "drop", "packets": 44, "bytes": 2640}],
        "drops": [{"zone": "sandbox", "direction": "egress", "reason": "no_rule", "packets": 44, "bytes": 2640}],
        "events_lost": 3})
    rates = rates_between(Snapshot(STATUS, FLOWS, 10.0), Snapshot(later, FLOWS, 12.0))
    assert rates.traffic[("auth", "egress", "allow")] == (10.0, 1000.0)
    assert rates.drops[("sandbox", "no_rule")] == 20.0
    text = rendered(frame(Snapshot(later, FLOWS, 12.0), rates))
    assert "10 pps" in text and "20 pps" in text
    assert rates_between(None, Snapshot(later, FLOWS, 12.0)) is None


def test_top_zone_filter_hides_other_zones():
    text = rendered(frame(Snapshot(STATUS, FLOWS, 1.0), None, only={"sandbox"}))
    assert "agent1" in text and "radius1" not in text


def test_top_frame_when_the_daemon_is_gone():
    text = rendered(frame(Snapshot({}, {}, 1.0, error="no skyguard daemon is running"), None))
    assert "no skyguard daemon is running" in text


class FlowSource:
    def __init__(self, flows):
        self._flows = flows

    def flows(self):
        return list(self._flows)


def test_flows_reply_is_bounded_and_largest_first():
    lo = socket.if_nametoindex("lo")
    flows = [{"ifindex": lo, "zone": "sandbox", "src": f"198.51.100.{i % 250}", "bytes": i, "packets": 1}
             for i in range(5000)]
    reply = flows_reply(FlowSource(flows), POLICY, {"limit": 10})
    assert reply["total"] == 5000 and len(reply["flows"]) == 10
    assert [f["bytes"] for f in reply["flows"]] == list(range(4999, 4989, -1))
    assert reply["flows"][0]["interface"] == "lo" and reply["flows"][0]["workload"] == ""
    assert reply["by_zone"]["sandbox"] == 5000 and reply["by_zone"]["auth"] == 0
    assert reply["workloads"]["sg-radius1"] == {"workload": "radius1", "zone": "auth"}
    only_auth = flows_reply(FlowSource(flows), POLICY, {"zone": "auth"})
    assert only_auth["flows"] == [] and only_auth["total"] == 0


@pytest.mark.parametrize("args", [{"limit": 0}, {"limit": "10"}, {"limit": True}, {"limit": 10**9}, {"zone": 3}])
def test_flows_reply_refuses_bad_arguments(args):
    with pytest.raises(BadInput, match="flows.active:"):
        flows_reply(FlowSource([]), POLICY, args)


def test_top_without_a_daemon_says_how_to_start_one(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, SKYGUARD_RUN_DIR=str(tmp_path), PYTHONPATH=str(config.REPO_ROOT))
    for argv in (["top"], ["top", "--once"]):
        out = subprocess.run([sys.executable, "-m", "skyguard.cli.main", *argv], env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 1
        assert "no skyguard daemon is running" in out.stderr and "skyguard up" in out.stderr
    out = subprocess.run([sys.executable, "-m", "skyguard.cli.main", "top", "--interval", "0.01"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--interval" in out.stderr
