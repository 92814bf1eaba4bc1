"""The fail-closed interface guard (skyguard/datapath/guard.py) with the real nftables, in a
network namespace of its own: an interface is let through only by the index its programs were
attached to, so one re-created under the same name stays dark."""

from __future__ import annotations

import os
import subprocess

import pytest

from skyguard.datapath import guard

pytestmark = pytest.mark.integration
NS = f"sg-guard-{os.getpid()}"


def _in_ns(*cmd: str) -> str:
    return subprocess.run(["ip", "netns", "exec", NS, *cmd], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def netns(root):
    subprocess.run(["ip", "netns", "add", NS], check=True)
    yield
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)


def _index(name: str) -> int:
    return int(_in_ns("cat", f"/sys/class/net/{name}/ifindex"))


def test_an_interface_recreated_after_attach_is_not_let_through(netns):
    _in_ns("ip", "link", "add", "sg-vm1", "type", "veth", "peer", "name", "sg-vm1p")
    attached_to = _index("sg-vm1")
    # re-created between attach() and the mark: same name, a new index, no programs
    _in_ns("ip", "link", "del", "sg-vm1")
    _in_ns("ip", "link", "add", "sg-vm1", "type", "veth", "peer", "name", "sg-vm1p")
    assert _index("sg-vm1") != attached_to
    code = ("import sys; from skyguard.datapath import guard; "
            "guard.install(['sg-vm1']); guard.mark_attached(int(sys.argv[1]))")
    subprocess.run(["ip", "netns", "exec", NS, os.sys.executable, "-c", code, str(attached_to)], check=True)
    listed = _in_ns("nft", "list", "set", "inet", guard.TABLE, "attached")
    assert "sg-vm1" not in listed  # the stale index names nothing: the new interface stays dark
    subprocess.run(["ip", "netns", "exec", NS, os.sys.executable, "-c", code, str(_index("sg-vm1"))], check=True)
    assert "sg-vm1" in _in_ns("nft", "list", "set", "inet", guard.TABLE, "attached")
