"""Fixtures shared by the adversarial tier and the fuzz tier (both conftests import them):

- `bpf_runner`: one compiled Datapath per session in this session's own namespace (avx-b<pid>),
  whose veths give the programs real ifindexes; maps pinned under a private bpffs folder.
- `attack_lab`: the lab of policies/keysystems.yaml (namespaces avx<pid>-*) with the daemon
  running in its host namespace and throwaway state/run/pin dirs (skyguard/attack.py's Arena).
Everything is removed at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from pathlib import Path

import pytest
from adv_support import IFACES, DatapathRunner

from skyguard.datapath import progrun

NS = f"avx-b{os.getpid() % 100000}"


@contextlib.contextmanager
def bpf_runner_session(tag: str = ""):
    """A DatapathRunner over a freshly compiled Datapath in namespace avx-b<pid><tag>; removed after."""
    from skyguard.datapath.datapath import Datapath

    ns = NS + tag
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    pin_dir = Path(f"/sys/fs/bpf/avx-test-{os.getpid()}{tag}")
    worker = None
    dp = None
    try:
        for ifname in IFACES:
            subprocess.run(["ip", "-n", ns, "link", "add", ifname, "type", "veth", "peer", "name", ifname + "p"],
                           check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", ifname, "up"], check=True)
        worker = progrun.NetnsThread(f"/run/netns/{ns}")
        dp = worker.call(Datapath, pin_dir, "tc")
        ifindex = {name: worker.call(socket.if_nametoindex, name) for name in IFACES}
        yield DatapathRunner(dp, worker, ifindex)
    finally:
        if dp is not None:
            dp.close()
        if worker is not None:
            worker.close()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["rm", "-rf", str(pin_dir)])


@contextlib.contextmanager
def arena_session(workdir: Path, progress=None):
    """The lab (namespaces avx<pid>-*) with the daemon running; torn down after."""
    from skyguard.attack import Arena

    arena = Arena(prefix=f"avx{os.getpid() % 100000}-", workdir=workdir, progress=progress)
    try:
        arena.up()
        yield arena
    finally:
        arena.down()


@pytest.fixture(scope="session")
def bpf_runner(root):
    with bpf_runner_session() as runner:
        yield runner


@pytest.fixture(scope="session")
def attack_lab(root, tmp_path_factory):
    with arena_session(tmp_path_factory.mktemp("arena")) as arena:
        yield arena
