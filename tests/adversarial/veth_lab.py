"""A small lab of namespaces for the datapath's channel tests (tests/adversarial/test_channels_veth.py):
three VMs routed through a host namespace over veths, with skyguard's real programs attached to
the host sides and its real DNS steering (skyguard/dns/steering.py) installed, plus an
"internet" namespace that plays the attacker's collector and an allowed peer.

  sandbox A (zone sandbox) --\\                       /-- internet I: 198.51.100.77, 2001:db8::99,
  app     B (zone app)     ----  host H (forwarding) ---   169.254.169.254 (collectors), 203.0.113.10,
  db      S (zone db)      --/   192.0.2.0/24 blackhole    2001:db8:113::10 (sandbox's allowed peer)

Sockets are made inside a namespace by a NetnsThread (a socket belongs to the namespace it was
created in) and then used from the test thread; frames are built with scapy and written to an
AF_PACKET socket on the VM's eth0, so they cross the veth and meet sg_from_vm like anything the VM
sends. The "DNS proxy" is a stand-in on the host that answers every query with 192.0.2.1: what
is under test is the datapath and the steering, not the resolver. Everything is removed on close.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import subprocess
import threading
import time
from pathlib import Path

from dnslib import QTYPE, RR, A, DNSRecord

from skyguard.datapath import progrun
from skyguard.dns import steering
from skyguard.policy.model import Destination, Policy, PortRange, Rule, Workload, Zone
from support.client_waits import ANSWER_WAIT_S

TAG = f"avc{os.getpid() % 100000}"
GW_MAC = "02:00:00:00:81:01"
PROXY_PORT = 5353
VMS = {  # name: (zone, mac, v4, v6, subnet index)
    "a": ("sandbox", "02:81:00:00:01:02", "10.81.1.2", "fd81:1::2", 1),
    "b": ("app", "02:81:00:00:02:02", "10.81.2.2", "fd81:2::2", 2),
    "s": ("db", "02:81:00:00:03:02", "10.81.3.2", "fd81:3::2", 3),
}
COLLECTORS = ("198.51.100.77", "2001:db8::99", "169.254.169.254")
PEER4, PEER6 = "203.0.113.10", "2001:db8:113::10"
SINK = "192.0.2.0/24"  # sandbox may send UDP there (a rule allows it); the host blackholes it
ETH_P_ALL = 0x0003


def sh(*cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def gateway(vm: str) -> tuple[str, str]:
    idx = VMS[vm][4]
    return f"10.81.{idx}.1", f"fd81:{idx}::1"


def policy() -> Policy:
    net = lambda *c: tuple(ipaddress.ip_network(x) for x in c)  # noqa: E731
    zones = {}
    for vm, (zone, mac, v4, v6, _) in VMS.items():
        w = Workload(vm, zone, f"{TAG}-{vm}", mac, (ipaddress.ip_address(v4), ipaddress.ip_address(v6)))
        zones[zone] = Zone(zone, (w,))
    rules = (
        Rule("app-db", "allow", ("app",), Destination(zones=("db",)),
             (PortRange("tcp", 5432, 5432), PortRange("udp", 1812, 1812))),
        Rule("db-app", "allow", ("db",), Destination(zones=("app",)), (PortRange("tcp", 7000, 7000),)),
        Rule("sandbox-sink", "allow", ("sandbox",), Destination(cidrs=net(SINK)), (PortRange("udp", 1, 65535),)),
        Rule("sandbox-peer", "allow", ("sandbox",), Destination(cidrs=net(f"{PEER4}/32", f"{PEER6}/128")),
             (PortRange("udp", 9999, 9999),)),
        Rule("no-metadata", "deny", ("sandbox", "app", "db"), Destination(cidrs=net("169.254.169.254/32")), ()),
    )
    return Policy("channels", zones, {}, rules, sha256="channels")


class Sniffer:
    """Every frame that reaches `ifname` in a namespace, kept for `count()`. Start it before the
    attack; it reads in a thread until closed."""

    def __init__(self, thread: progrun.NetnsThread, ifname: str = "eth0"):
        self.sock = thread.call(self._open, ifname)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @staticmethod
    def _open(ifname):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((ifname, 0))
        s.setblocking(False)
        return s

    def _read(self):
        while not self._stop.is_set():
            if select.select([self.sock], [], [], 0.05)[0]:
                try:
                    data, addr = self.sock.recvfrom(65535)
                except BlockingIOError:
                    continue
                if addr[2] != socket.PACKET_OUTGOING:
                    self.frames.append(data)

    def count(self, marker: bytes) -> int:
        """Frames received that contain `marker` (each attack carries its own)."""
        return sum(marker in f for f in list(self.frames))

    def close(self):
        self._stop.set()
        self._reader.join()
        self.sock.close()


class DnsStandIn:
    """Answers every query on the proxy port (UDP v4 + v6, TCP v4) with an A record 192.0.2.1."""

    def __init__(self, thread: progrun.NetnsThread):
        self.udp = [thread.call(self._udp, fam, addr) for fam, addr in
                    ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::"))]
        self.tcp = thread.call(self._tcp)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @staticmethod
    def _udp(fam, addr):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, PROXY_PORT))
        return s

    @staticmethod
    def _tcp():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", PROXY_PORT))
        s.listen(8)
        return s

    @staticmethod
    def answer(query: bytes) -> bytes:
        q = DNSRecord.parse(query)
        reply = q.reply()
        if q.q.qtype == QTYPE.A:
            reply.add_answer(RR(q.q.qname, QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
        return reply.pack()

    def _serve(self):
        socks = self.udp + [self.tcp]
        while not self._stop.is_set():
            for s in select.select(socks, [], [], 0.05)[0]:
                try:
                    if s is self.tcp:
                        conn, _ = s.accept()
                        conn.settimeout(ANSWER_WAIT_S)  # the client's question must come
                        with conn:
                            size = int.from_bytes(conn.recv(2), "big")
                            data = b""
                            while len(data) < size:
                                data += conn.recv(size - len(data))
                            out = self.answer(data)
                            conn.sendall(len(out).to_bytes(2, "big") + out)
                    else:
                        data, peer = s.recvfrom(4096)
                        s.sendto(self.answer(data), peer)
                except Exception:  # noqa: BLE001 - a test's garbage (not DNS) must not stop the stand-in
                    continue

    def close(self):
        self._stop.set()
        self._thread.join()
        for s in self.udp + [self.tcp]:
            s.close()


class VethLab:
    """The namespaces, the datapath attached to the VMs' host sides, and the steering."""

    def __init__(self, pin_dir: Path, defines: dict | None = None):
        self.ns = {name: f"{TAG}{name}" for name in ("h", "a", "b", "s", "i")}
        self.threads: dict[str, progrun.NetnsThread] = {}
        self.pin_dir = pin_dir
        self.dp = None
        self.dns = None
        self.defines = defines

    def iface(self, vm: str) -> str:
        return f"{TAG}-{vm}"

    def up(self):
        for ns in self.ns.values():
            sh("ip", "netns", "del", ns, check=False)
            sh("ip", "netns", "add", ns)
        h = self.ns["h"]
        for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
            sh("ip", "netns", "exec", h, "sysctl", "-qw", key)
        for vm, (_zone, mac, v4, v6, _idx) in VMS.items():
            host_if, ns = self.iface(vm), self.ns[vm]
            sh("ip", "-n", h, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", ns, "link", "set", "eth0", "address", mac)
            sh("ip", "-n", h, "link", "set", host_if, "address", GW_MAC)
            g4, g6 = gateway(vm)
            sh("ip", "-n", h, "addr", "add", f"{g4}/24", "dev", host_if)
            sh("ip", "-n", h, "addr", "add", f"{g6}/64", "dev", host_if, "nodad")
            sh("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
            for n, dev in ((h, host_if), (ns, "eth0"), (ns, "lo")):
                sh("ip", "-n", n, "link", "set", dev, "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", g4)
            sh("ip", "-n", ns, "-6", "route", "add", "default", "via", g6)
        i = self.ns["i"]
        sh("ip", "-n", h, "link", "add", f"{TAG}-i", "type", "veth", "peer", "name", "eth0", "netns", i)
        sh("ip", "-n", h, "addr", "add", "100.64.81.1/30", "dev", f"{TAG}-i")
        sh("ip", "-n", h, "addr", "add", "fd81:ff::1/64", "dev", f"{TAG}-i", "nodad")
        sh("ip", "-n", i, "addr", "add", "100.64.81.2/30", "dev", "eth0")
        sh("ip", "-n", i, "addr", "add", "fd81:ff::2/64", "dev", "eth0", "nodad")
        for addr in COLLECTORS + (PEER4, PEER6):
            if ":" in addr:
                sh("ip", "-n", i, "addr", "add", addr, "dev", "eth0", "nodad")
            else:
                sh("ip", "-n", i, "addr", "add", f"{addr}/32", "dev", "eth0")
        for n, dev in ((h, f"{TAG}-i"), (i, "eth0"), (i, "lo")):
            sh("ip", "-n", n, "link", "set", dev, "up")
        sh("ip", "-n", i, "route", "add", "default", "via", "100.64.81.1")
        sh("ip", "-n", i, "-6", "route", "add", "default", "via", "fd81:ff::1")
        for prefix in ("198.51.100.0/24", "203.0.113.0/24", "169.254.169.254/32"):
            sh("ip", "-n", h, "route", "add", prefix, "via", "100.64.81.2")
        sh("ip", "-n", h, "-6", "route", "add", "2001:db8::/32", "via", "fd81:ff::2")
        sh("ip", "-n", h, "route", "add", "blackhole", SINK)
        for name, ns in self.ns.items():
            self.threads[name] = progrun.NetnsThread(f"/run/netns/{ns}")

        from skyguard.datapath.datapath import Datapath

        ht = self.threads["h"]
        self.dp = ht.call(Datapath, self.pin_dir, "tc", self.defines)
        ht.call(self.dp.apply_policy, policy())
        for vm in VMS:
            ht.call(self.dp.attach, self.iface(vm))
        self.dns = DnsStandIn(ht)
        steering.install([self.iface(vm) for vm in VMS], PROXY_PORT, netns=h)
        return self

    def close(self):
        if self.dns is not None:
            self.dns.close()
        if self.dp is not None:
            self.threads["h"].call(self.dp.detach_all)
            self.threads["h"].call(self.dp.close)
        for t in self.threads.values():
            t.close()
        for ns in self.ns.values():
            sh("ip", "netns", "del", ns, check=False)
        sh("rm", "-rf", str(self.pin_dir))

    # -- acting as a VM ---------------------------------------------------------------------------

    def raw_sender(self, vm: str):
        """An AF_PACKET socket on the VM's eth0: `send(frame)` is what the VM puts on the wire."""
        def make():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            s.bind(("eth0", 0))
            return s
        return self.threads[vm].call(make)

    def socket(self, where: str, family, kind):
        return self.threads[where].call(socket.socket, family, kind)

    def run(self, where: str, *cmd, check=False):
        return sh("ip", "netns", "exec", self.ns[where], *cmd, check=check)

    def drops(self) -> dict:
        """{(zone, reason): packets} from the datapath's counters (both directions)."""
        out: dict = {}
        for d in self.threads["h"].call(self.dp.counters)["drops"]:
            out[(d["zone"], d["reason"])] = out.get((d["zone"], d["reason"]), 0) + d["packets"]
        return out


def settle(seconds: float = 0.3):
    """Let frames written to a veth cross it and reach sniffers (nothing is asserted on time)."""
    time.sleep(seconds)


def eventually(predicate, within: float = ANSWER_WAIT_S) -> bool:
    """Poll predicate() until it holds or `within` seconds passed: for what must arrive (a frame
    at a sniffer, a counted drop), which on a loaded machine may take seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
