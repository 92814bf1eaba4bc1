"""The fail-closed interface guard (skyguard/datapath/guard.py) with the real nftables, in a
network namespace of its own: an interface is let through only by the index its programs were
attached to, so one re-created under the same name stays dark."""

from __future__ import annotations

import os
import subprocess

import pytest

from skyguard.datapath import guard
from support.client_waits import ANSWER_WAIT_S, SILENCE_WAIT_S

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


RECEIVE = """
import select, socket, sys, time
socks = []
for port in (53, 5300):
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        s = socket.socket(socket.AF_INET, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        if kind == socket.SOCK_STREAM:
            s.listen()
        socks.append(s)
print("ready", flush=True)
# 5300 must come (waited for up to argv[1] s); once it has, what was sent before it (53) has had
# its chance too: listen argv[2] s more for it
got, deadline = set(), time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    if deadline - time.monotonic() > float(sys.argv[2]) and {"udp/5300", "tcp/5300"} <= got:
        deadline = time.monotonic() + float(sys.argv[2])
    for s in select.select(socks, [], [], 0.2)[0]:
        port = s.getsockname()[1]
        if s.type == socket.SOCK_DGRAM:
            s.recv(100)
            got.add(f"udp/{port}")
        else:
            s.accept()[0].close()
            got.add(f"tcp/{port}")
print(" ".join(sorted(got)), flush=True)
"""

SEND = """
import socket, sys
for port, wait in ((53, float(sys.argv[2])), (5300, float(sys.argv[3]))):  # 53 is dropped, 5300 passes
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"q", (sys.argv[1], port))
    s = socket.socket(); s.settimeout(wait)
    try:
        s.connect((sys.argv[1], port))
    except OSError:
        pass
"""


@pytest.fixture
def routed(root):
    """A host namespace routing between a VM's interface (sg-vm1, attached) and an upstream."""
    names = {k: f"{NS}-{k}" for k in ("vm", "up")}
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        for key, net in (("vm", "10.77.1"), ("up", "10.77.2")):
            peer = "sg-vm1" if key == "vm" else "sg-up"
            subprocess.run(["ip", "netns", "add", names[key]], check=True)
            _in_ns("ip", "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", names[key])
            _in_ns("ip", "addr", "add", f"{net}.1/24", "dev", peer)
            _in_ns("ip", "link", "set", peer, "up")
            for cmd in (("ip", "addr", "add", f"{net}.2/24", "dev", "eth0"), ("ip", "link", "set", "eth0", "up"),
                        ("ip", "link", "set", "lo", "up"), ("ip", "route", "add", "default", "via", f"{net}.1")):
                subprocess.run(["ip", "netns", "exec", names[key], *cmd], check=True)
        _in_ns("sysctl", "-qw", "net.ipv4.ip_forward=1")
        yield names
    finally:
        for ns in (NS, *names.values()):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_port_53_forwarded_from_a_workload_interface_is_dropped(routed):
    """Steered DNS goes to the host's proxy (input), never through forward: port 53 forwarded
    from a VM's interface missed the steering (an interface the DNS part does not steer yet, a
    DNS part that failed). The datapath passes it up to the host, so without this rule the host
    routed it to whatever resolver the VM named (its answers are dropped, but the query left)."""
    code = ("import sys; from skyguard.datapath import guard; "
            "guard.install(['sg-vm1']); guard.mark_attached(int(sys.argv[1]))")
    subprocess.run(["ip", "netns", "exec", NS, os.sys.executable, "-c", code, str(_index("sg-vm1"))], check=True)
    receiver = subprocess.Popen(["ip", "netns", "exec", routed["up"], os.sys.executable, "-c", RECEIVE,
                                 str(ANSWER_WAIT_S), str(SILENCE_WAIT_S)], stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout.readline().strip() == "ready"
        subprocess.run(["ip", "netns", "exec", routed["vm"], os.sys.executable, "-c", SEND, "10.77.2.2",
                        str(SILENCE_WAIT_S), str(ANSWER_WAIT_S)], check=True)
        assert receiver.stdout.readline().split() == ["tcp/5300", "udp/5300"]  # routed, but not DNS
    finally:
        receiver.kill()
        receiver.wait()
