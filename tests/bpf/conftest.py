"""Fixtures for the BPF tier: one compiled Datapath per session, loaded into the real kernel,
driven through BPF_PROG_RUN from a thread inside this session's own network namespace (bpx-*),
whose veth interfaces give the programs real ifindexes. Maps are pinned under a private
directory and removed at the end. Not here: the cases themselves.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from bpf_support import IFACES, NS, Harness, make_policy

from skyguard.datapath import progrun


@pytest.fixture(scope="session")
def netns(root):
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        for ifname in IFACES.values():
            # veth pairs: this kernel has no dummy driver
            subprocess.run(["ip", "-n", NS, "link", "add", ifname, "type", "veth", "peer", "name", ifname + "p"],
                           check=True)
            subprocess.run(["ip", "-n", NS, "link", "set", ifname, "up"], check=True)
            subprocess.run(["ip", "-n", NS, "link", "set", ifname + "p", "up"], check=True)
        # A host that forwards, with a route out and an address of its own on w1's link: what
        # bpf_fib_lookup answers for neighbour discovery (tests/bpf/test_channels.py).
        for cmd in (["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
                    ["ip", "-6", "addr", "add", "fd00:1::1/64", "dev", IFACES["w1"], "nodad"],
                    ["ip", "-6", "route", "add", "default", "via", "fe80::99", "dev", IFACES["x1"]]):
            subprocess.run(["ip", "netns", "exec", NS, *cmd], check=True)
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


@pytest.fixture(scope="session")
def pin_dir(root):
    path = Path(f"/sys/fs/bpf/bpx-test-{os.getpid()}")
    yield path
    subprocess.run(["rm", "-rf", str(path)])


@pytest.fixture(scope="session")
def worker(netns):
    w = progrun.NetnsThread(f"/run/netns/{netns}")
    yield w
    w.close()


@pytest.fixture(scope="session")
def datapath(worker, pin_dir):
    from skyguard.datapath.datapath import Datapath

    dp = worker.call(Datapath, pin_dir, "tc")
    yield dp
    dp.close()


@pytest.fixture
def h(datapath, worker):
    """A harness with the base policy applied freshly and conntrack/fragments emptied."""
    hn = Harness(datapath, worker)
    for name in ("sg_ct", "sg_frag"):
        datapath.map(name).clear()
    datapath._learned.clear()
    hn.apply(make_policy())
    for wl, ifname in IFACES.items():
        hn.ifindex[wl] = worker.call(socket.if_nametoindex, ifname)
    return hn
