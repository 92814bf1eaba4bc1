"""The programs attached to real interfaces with real traffic, in this test's own namespaces:
two VMs (bpx-*a, bpx-*b) routed through a host namespace (bpx-*h) over veth pairs, plus a tap
whose VM end is this test process writing frames. Checks allowed and denied TCP, UDP and ICMP
(v4 and v6), anti-spoofing, that programs stay enforcing after the owning Datapath is dropped,
that a new Datapath re-adopts the pinned maps and replaces the programs (TC -> generic XDP), and
that detach_all removes everything.
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import time
from pathlib import Path

import pytest
from bpf_support import ADDR, GW_MAC, IFACES, MAC, make_policy
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from skyguard.datapath import progrun
from support.client_waits import ping_argv, wait_s

TAG = f"bpx-{os.getpid() % 100000}"
HOST, VMA, VMB = f"{TAG}h", f"{TAG}a", f"{TAG}b"
GW = {"w1": ("10.1.0.1", "fd00:1::1"), "d1": ("10.2.0.1", "fd00:2::1")}
IFF_TAP, IFF_NO_PI, TUNSETIFF = 0x0002, 0x1000, 0x400454CA

SERVER = r"""
import socket, sys, threading
def tcp(port):
    for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(fam, socket.SOCK_STREAM); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6: s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port)); s.listen(16)
        serve = lambda s=s: [c.sendall(b"hello") or c.close() for c, _ in iter(s.accept, None)]
        threading.Thread(target=serve, daemon=True).start()
def udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
    threading.Thread(target=lambda: [s.sendto(d, a) for d, a in iter(lambda: s.recvfrom(100), None)], daemon=True).start()
for p in (5432, 22): tcp(p)
udp(5000); udp(5001)
print("ready", flush=True); sys.stdin.read()
"""

CLIENT = r"""
import socket, sys
kind, host, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
try:
    if kind == "tcp":
        s = socket.create_connection((host, port), timeout=timeout); print(s.recv(10).decode())
    else:
        s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(timeout); s.sendto(b"ping", (host, port))
        print(s.recvfrom(10)[0].decode())
except OSError as e:
    print("failed", type(e).__name__)
"""


def sh(*cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def in_ns(ns, *cmd, **kw):
    return sh("ip", "netns", "exec", ns, *cmd, **kw)


@pytest.fixture(scope="module")
def topology(root):
    for ns in (HOST, VMA, VMB):
        sh("ip", "netns", "del", ns, check=False)
        sh("ip", "netns", "add", ns)
    procs = []
    try:
        in_ns(HOST, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        in_ns(HOST, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        for wl, vm in (("w1", VMA), ("d1", VMB)):
            host_if = IFACES[wl]
            sh("ip", "-n", HOST, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", vm)
            sh("ip", "-n", vm, "link", "set", "eth0", "address", MAC[wl])
            sh("ip", "-n", HOST, "link", "set", host_if, "address", GW_MAC)
            v4, v6 = ADDR[wl]
            g4, g6 = GW[wl]
            sh("ip", "-n", HOST, "addr", "add", f"{g4}/24", "dev", host_if)
            sh("ip", "-n", HOST, "addr", "add", f"{g6}/64", "dev", host_if, "nodad")
            sh("ip", "-n", vm, "addr", "add", f"{v4}/24", "dev", "eth0")
            sh("ip", "-n", vm, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
            for ns, dev in ((HOST, host_if), (vm, "eth0"), (vm, "lo")):
                sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", vm, "route", "add", "default", "via", g4)
            sh("ip", "-n", vm, "-6", "route", "add", "default", "via", g6)
        server = subprocess.Popen(["ip", "netns", "exec", VMB, "python3", "-c", SERVER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        procs.append(server)
        assert server.stdout.readline().strip() == "ready"
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for ns in (HOST, VMA, VMB):
            sh("ip", "netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def host_thread(topology):
    w = progrun.NetnsThread(f"/run/netns/{HOST}")
    yield w
    w.close()


@pytest.fixture(scope="module")
def pins(root):
    path = Path(f"/sys/fs/bpf/{TAG}-traffic")
    yield path
    sh("rm", "-rf", str(path))


def client(kind, host, port, answer=False):
    """A connection from VM A. Expected-to-fail calls listen SILENCE_WAIT_S; expected-to-work ones
    (answer=True) wait ANSWER_WAIT_S, so a loaded machine (first neighbour discovery, 2 busy cores)
    does not fail them (support.client_waits)."""
    return in_ns(VMA, "python3", "-c", CLIENT, kind, host, str(port), str(wait_s(answer))).stdout.strip()


def ping(host):
    return in_ns(VMA, *ping_argv("-c", "1", host), check=False).returncode == 0


def drops(dp, worker, reason):
    return sum(d["packets"] for d in worker.call(dp.counters)["drops"] if d["reason"] == reason)


def open_tap(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def add_intruder_filter(pins: Path, ifname: str, where: str = "ingress", prio: int | None = None) -> Path:
    """Run in the host namespace: attach a program that accepts everything at `ifname`'s TC hook
    `where`, by default at skyguard's priority with another handle. Returns its pin (remove it)."""
    from bcc import BPF

    from skyguard.datapath import libbpf
    from skyguard.datapath.datapath import TC_PRIO

    program = BPF(text=b"int intruder(struct __sk_buff *skb) { return 0; /* TC_ACT_OK */ }")
    fn = program.load_func(b"intruder", BPF.SCHED_CLS)
    pin = pins / f"intruder-{ifname}-{where}"
    libbpf.pin(fn.fd, pin)
    sh("tc", "filter", "add", "dev", ifname, where, "prio", str(prio or TC_PRIO), "handle", "2", "bpf",
       "direct-action", "object-pinned", str(pin))
    return pin


def check_enforcement(dp, worker):
    assert client("tcp", ADDR["d1"][0], 5432, answer=True) == "hello"  # allowed v4
    assert client("tcp", ADDR["d1"][1], 5432, answer=True) == "hello"  # allowed v6 (ND passes both ways)
    assert client("udp", ADDR["d1"][0], 5000, answer=True) == "ping"  # allowed UDP and its reply
    assert ping(ADDR["d1"][0])  # icmp allowed by web-to-db
    before = drops(dp, worker, "no_rule")
    assert client("tcp", ADDR["d1"][0], 22).startswith("failed")  # denied port
    assert client("udp", ADDR["d1"][0], 5001).startswith("failed")
    assert drops(dp, worker, "no_rule") > before
    # deny hole inside the allowed range, seen by a real SYN
    before = drops(dp, worker, "policy_deny")
    assert client("tcp", ADDR["d1"][0], 8050).startswith("failed")
    assert drops(dp, worker, "policy_deny") > before


def test_veth_and_tap_enforcement_readoption_and_detach(host_thread, pins):
    from skyguard.datapath.datapath import Datapath

    policy = make_policy()
    dp = host_thread.call(Datapath, pins, "tc")
    host_thread.call(dp.apply_policy, policy)
    tap_fd = host_thread.call(open_tap, IFACES["x1"])
    try:
        sh("ip", "-n", HOST, "link", "set", IFACES["x1"], "up")
        assert set(host_thread.call(dp.verify)) == {IFACES[w] for w in ("w1", "d1", "x1")}  # not attached yet
        synced = host_thread.call(dp.sync)  # attaches every workload interface present
        assert set(synced["attached"]) == {IFACES[w] for w in ("w1", "d1", "x1")}
        assert synced["missing"] == [IFACES["w2"]]
        assert host_thread.call(dp.sync)["attached"] == []  # idempotent
        assert host_thread.call(dp.verify) == {}
        check_enforcement(dp, host_thread)

        # someone slips an accept-everything filter in beside ours (same priority, another
        # handle: cls_bpf puts a new one first): the watchdog check names the interface, and
        # sync() re-attaches, which removes it
        intruder = host_thread.call(add_intruder_filter, pins, IFACES["w1"])
        try:
            assert host_thread.call(dp.verify) == {
                IFACES["w1"]: "a program or filter that is not skyguard's is attached beside it"}
            assert host_thread.call(dp.sync)["attached"] == [IFACES["w1"]]
            assert host_thread.call(dp.verify) == {}
            assert client("tcp", ADDR["d1"][0], 22).startswith("failed")
        finally:
            intruder.unlink(missing_ok=True)
        # at another priority (behind ours) it is still not ours: named and removed the same way
        intruder = host_thread.call(add_intruder_filter, pins, IFACES["d1"], "egress", prio=7)
        try:
            assert host_thread.call(dp.verify) == {
                IFACES["d1"]: "a program or filter that is not skyguard's is attached beside it"}
            host_thread.call(dp.sync)
            assert host_thread.call(dp.verify) == {}
        finally:
            intruder.unlink(missing_ok=True)

        # spoofing from a real VM: another source address on its interface
        in_ns(VMA, "ip", "addr", "add", "10.1.0.99/24", "dev", "eth0")
        before = drops(dp, host_thread, "spoof_ip")
        assert in_ns(VMA, "ping", "-c", "1", "-W", "1", "-I", "10.1.0.99", ADDR["d1"][0], check=False).returncode != 0
        assert drops(dp, host_thread, "spoof_ip") > before

        # the tap: frames this process writes are what its VM sends
        ok = Ether(src=MAC["x1"], dst=GW_MAC) / IP(src=ADDR["x1"][0], dst="192.0.2.10") / UDP(sport=7, dport=514)
        spoofed = Ether(src="02:66:66:66:66:66", dst=GW_MAC) / IP(src=ADDR["x1"][0], dst="192.0.2.10") / UDP(dport=514)
        denied = Ether(src=MAC["x1"], dst=GW_MAC) / IP(src=ADDR["x1"][0], dst="192.0.2.11") / UDP(dport=514)
        counts = lambda: {(d["zone"], d["reason"]): d["packets"] for d in host_thread.call(dp.counters)["drops"]}  # noqa: E731
        allowed = lambda: sum(t["packets"] for t in host_thread.call(dp.counters)["traffic"]  # noqa: E731
                              if (t["zone"], t["verdict"]) == ("other", "allow"))
        b_drops, b_allow = counts(), allowed()
        for frame in (ok, spoofed, denied):
            os.write(tap_fd, bytes(frame))
        time.sleep(0.2)  # let the kernel process the writes (no timing is asserted)
        a_drops = counts()
        assert allowed() == b_allow + 1
        assert a_drops.get(("other", "spoof_mac"), 0) == b_drops.get(("other", "spoof_mac"), 0) + 1
        assert a_drops.get(("other", "no_rule"), 0) == b_drops.get(("other", "no_rule"), 0) + 1

        # the owner goes away: programs stay and keep enforcing (fail closed)
        ids_before = host_thread.call(dp.attached)
        host_thread.call(dp.close)
        assert client("tcp", ADDR["d1"][0], 22).startswith("failed")
        assert client("tcp", ADDR["d1"][0], 5432, answer=True) == "hello"

        # a new Datapath re-adopts the pinned maps and replaces the programs (here TC -> XDP)
        dp2 = host_thread.call(Datapath, pins, "xdp")
        gen_before = host_thread.call(lambda: dp2.gen)
        assert gen_before >= 1  # re-opened the pinned config: the old generation is still active
        host_thread.call(dp2.apply_policy, policy)
        for wl in ("w1", "d1", "x1"):
            host_thread.call(dp2.attach, IFACES[wl])
        now = host_thread.call(dp2.attached)
        assert now[IFACES["w1"]]["xdp"]["name"] == "sg_from_vm" and "tc_ingress" not in now[IFACES["w1"]]
        assert now[IFACES["w1"]]["tc_egress"]["id"] != ids_before[IFACES["w1"]]["tc_egress"]["id"]
        check_enforcement(dp2, host_thread)
        # someone replaces a program: the watchdog check names the interface
        sh("ip", "-n", HOST, "link", "set", "dev", IFACES["d1"], "xdpgeneric", "off")
        assert host_thread.call(dp2.verify) == {IFACES["d1"]: "not attached"}
        assert host_thread.call(dp2.sync)["attached"] == [IFACES["d1"]]

        removed = host_thread.call(dp2.detach_all)
        assert set(removed) == {IFACES["w1"], IFACES["d1"], IFACES["x1"]}
        assert host_thread.call(dp2.attached) == {}
        assert client("tcp", ADDR["d1"][0], 22, answer=True) == "hello"  # nothing enforces any more
        host_thread.call(dp2.close)
    finally:
        os.close(tap_fd)
