"""The DNS proxy end to end in namespaces of its own (prefix dnx-): a "vm" with a veth to a
"host" where the proxy and its nftables steering run, and an "upstream" running a small dnslib
authoritative server. Queries are made with dig from inside the vm, to an arbitrary address.

The proxy and the upstream run in threads of this process that entered their namespace with
setns(2) (only that thread moves; sockets are bound to the namespace they are created in), so
the test can look at the learner's calls directly.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import fcntl
import ipaddress
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from dnslib import AAAA, CNAME, QTYPE, RD, RR, TXT, A
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer

from skyguard.dns import steering
from skyguard.dns.interfaces import PolicyDirectory
from skyguard.dns.learned import FILE_NAME, LearnedStore
from skyguard.dns.resolver import DnsPolicyResolver
from skyguard.dns.server import DnsServer, Upstream
from skyguard.dns.service import DnsProxy
from skyguard.errors import BadInput, DnsError
from skyguard.parts import MemoryLog
from skyguard.policy.model import Destination, DnsConfig, Policy, PortRange, Rule, TunnelDetection, Workload, Zone
from skyguard.policy.parse import parse_policy
from support.client_waits import dig_argv

SUFFIX = uuid.uuid4().hex[:5]
NS_VM, NS_HOST, NS_UP = f"dnx-vm-{SUFFIX}", f"dnx-host-{SUFFIX}", f"dnx-up-{SUFFIX}"
VM_IF = f"dnxv{SUFFIX}"  # host side of the vm's veth: what the policy and steering name
UP_IF = f"dnxu{SUFFIX}"
VM_IP, HOST_IP, UP_HOST_IP, UP_IP = "10.99.1.2", "10.99.1.1", "10.99.2.1", "10.99.2.53"
FOREIGN_RESOLVER = "198.51.100.99"  # nobody owns it: only the steering can answer
FOREIGN_RESOLVER6 = "2001:db8::99"
VM_IP6, HOST_IP6 = "fd99:1::2", "fd99:1::1"
PROXY_PORT = 23053
LEARN_DELAY = 0.3  # the recording learner takes this long, to make the ordering observable

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def sh(*args: str, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


def in_ns(ns: str, *args: str, check=True) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *args, check=check)


def delete_namespaces():
    for ns in (NS_VM, NS_HOST, NS_UP):
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def namespaces(root):
    delete_namespaces()
    try:
        for ns in (NS_VM, NS_HOST, NS_UP):
            sh("ip", "netns", "add", ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", VM_IF, "netns", NS_HOST, "type", "veth", "peer", "name", "eth0",
           "netns", NS_VM)
        sh("ip", "link", "add", UP_IF, "netns", NS_HOST, "type", "veth", "peer", "name", "eth0",
           "netns", NS_UP)
        in_ns(NS_HOST, "ip", "addr", "add", f"{HOST_IP}/24", "dev", VM_IF)
        in_ns(NS_HOST, "ip", "addr", "add", f"{HOST_IP6}/64", "dev", VM_IF, "nodad")
        in_ns(NS_HOST, "ip", "addr", "add", f"{UP_HOST_IP}/24", "dev", UP_IF)
        in_ns(NS_HOST, "ip", "link", "set", VM_IF, "up")
        in_ns(NS_HOST, "ip", "link", "set", UP_IF, "up")
        in_ns(NS_VM, "ip", "addr", "add", f"{VM_IP}/24", "dev", "eth0")
        in_ns(NS_VM, "ip", "link", "set", "eth0", "up")
        in_ns(NS_VM, "ip", "route", "add", "default", "via", HOST_IP)
        in_ns(NS_VM, "ip", "addr", "add", f"{VM_IP6}/64", "dev", "eth0", "nodad")
        in_ns(NS_VM, "ip", "-6", "route", "add", "default", "via", HOST_IP6)
        in_ns(NS_UP, "ip", "addr", "add", f"{UP_IP}/24", "dev", "eth0")
        in_ns(NS_UP, "ip", "link", "set", "eth0", "up")
        yield
    finally:
        delete_namespaces()


class LabAuthority(BaseResolver):
    """Answers every name under .test with an A and AAAA derived from the name, plus a few
    special names the tests need. Counts the queries it gets per name: a TXT query for
    `<name>.count.stats` (asked directly, not through the proxy) answers how many came for name."""

    seen: Counter = Counter()  # one for the UDP and the TCP server

    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        if name.endswith(".count.stats"):
            count = self.seen[name.removesuffix(".count.stats")]
            reply.add_answer(RR(name, QTYPE.TXT, rdata=TXT(str(count)), ttl=0))
            return reply
        self.seen[name] += 1
        if name.startswith("long.") and name.endswith(".cache.test"):
            reply.add_answer(RR(name, QTYPE.A, rdata=A("203.0.113.60"), ttl=60))
        elif name == "alias.test":
            reply.add_answer(RR("alias.test", QTYPE.CNAME, rdata=CNAME("hop.test"), ttl=60))
            reply.add_answer(RR("hop.test", QTYPE.CNAME, rdata=CNAME("target.test"), ttl=60))
            reply.add_answer(RR("target.test", QTYPE.A, rdata=A("203.0.113.77"), ttl=60))
        elif name == "rebind.test":
            reply.add_answer(RR(name, QTYPE.A, rdata=A("127.0.0.1"), ttl=60))
            reply.add_answer(RR(name, QTYPE.A, rdata=A("169.254.169.254"), ttl=60))
            reply.add_answer(RR(name, QTYPE.A, rdata=A("203.0.113.9"), ttl=60))
        elif name in ("inside.test", "intranet.test"):  # a public name answering inside
            for address in ("10.0.0.5", "100.64.0.9", "192.168.1.1", "203.0.113.10"):
                reply.add_answer(RR(name, QTYPE.A, rdata=A(address), ttl=60))
            for address in ("64:ff9b::a00:5", "2002:c0a8:101::1", "fd00::5", "2001:db8:203::10"):
                reply.add_answer(RR(name, QTYPE.AAAA, rdata=AAAA(address), ttl=60))
        elif name == "extra.test":  # records for other names: cache poison for the VM
            reply.add_answer(RR("extra.test", QTYPE.A, rdata=A("203.0.113.30"), ttl=60))
            reply.add_answer(RR("bank.test", QTYPE.A, rdata=A("203.0.113.66"), ttl=60))
            reply.add_ar(RR("ns.bank.test", QTYPE.A, rdata=A("203.0.113.67"), ttl=60))
        elif name == "oddclass.test":  # addresses of another class: not for the VM (nor the datapath)
            reply.add_answer(RR(name, QTYPE.A, rdata=A("203.0.113.40"), ttl=60))
            reply.add_answer(RR(name, QTYPE.A, rclass=3, rdata=A("203.0.113.41"), ttl=60))  # CHAOS
            reply.add_answer(RR(name, QTYPE.A, rclass=4, rdata=A("203.0.113.42"), ttl=60))  # Hesiod
        elif name == "badlength.test":  # an A of 5 octets: which 4 would the VM read?
            reply.add_answer(RR(name, QTYPE.A, rdata=A("203.0.113.44"), ttl=60))
            reply.add_answer(RR(name, QTYPE.A, rdata=RD(bytes([203, 0, 113, 45, 7])), ttl=60))
        elif name == "hugettl.test":  # RFC 2181 section 8: a TTL with the top bit set means 0
            reply.add_answer(RR(name, QTYPE.A, rdata=A("203.0.113.46"), ttl=0x80000E10))
        elif name == "big.test" and qtype == "TXT":
            for i in range(8):
                reply.add_answer(RR(name, QTYPE.TXT, rdata=TXT(f"{i}" * 200), ttl=60))
        elif name.endswith(".test"):
            n = sum(name.encode()) % 250 + 1
            if qtype in ("A", "ANY"):
                reply.add_answer(RR(name, QTYPE.A, rdata=A(f"203.0.113.{n}"), ttl=1))
            if qtype in ("AAAA", "ANY"):
                reply.add_answer(RR(name, QTYPE.AAAA, rdata=AAAA(f"2001:db8:203::{n:x}"), ttl=1))
        else:
            reply.header.rcode = 3
        return reply


class SmallUdpHandler(DNSHandler):
    udplen = 512  # like a classic server: big answers over UDP come back truncated


def serve_upstream() -> None:
    """Entry point of the upstream process (run inside NS_UP): UDP and TCP on UP_IP:53."""
    logger = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data")
    servers = [DNSServer(LabAuthority(), address=UP_IP, port=53, tcp=tcp,
                         handler=SmallUdpHandler, logger=logger) for tcp in (False, True)]
    for server in servers:
        server.start_thread()
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin


@pytest.fixture(scope="module")
def upstream(namespaces):
    # A process of its own, not a thread of pytest: it must not share a GIL with the proxy
    # under test, or a busy machine shows up as upstream timeouts.
    tests = Path(__file__).resolve().parents[1]  # tests/: this module imports support.client_waits
    env = dict(os.environ, PYTHONPATH=os.pathsep.join((str(tests.parent), str(tests))))
    process = subprocess.Popen(["ip", "netns", "exec", NS_UP, sys.executable, __file__,
                                "--serve-upstream", UP_IP], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout.readline().strip() == "ready", "the upstream did not start"
        yield
    finally:
        process.stdin.close()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class RecordingLearner:
    def __init__(self):
        self.calls = []
        self.delay = LEARN_DELAY

    def learn(self, zone, rule_name, ips, ttl):
        time.sleep(self.delay)  # the answer must wait for us
        self.calls.append({"zone": zone, "rule": rule_name, "ips": sorted(str(i) for i in ips),
                           "ttl": ttl, "done_at": time.monotonic()})


def make_policy():
    vm = Workload("vm1", "apps", VM_IF, "02:00:00:00:09:01", (ipaddress.ip_address(VM_IP), ipaddress.ip_address(VM_IP6)))
    rules = (
        Rule("web", "allow", ("apps",), Destination(fqdns=("allowed.test", "alias.test",
                                                            "rebind.test", "big.test",
                                                            "inside.test", "extra.test", "oddclass.test",
                                                            "badlength.test", "hugettl.test", "ptype.test")),
             (PortRange("tcp", 443, 443),)),
        Rule("intranet", "allow", ("apps",), Destination(fqdns=("intranet.test",),
                                                         allow_private=True),
             (PortRange("tcp", 443, 443),)),
        Rule("quiet-base", "allow", ("apps",), Destination(fqdns=("**.quiet.test",)),
             (PortRange("tcp", 443, 443),)),
        Rule("tunnel-base", "allow", ("apps",), Destination(fqdns=("**.tun.test",)),
             (PortRange("tcp", 443, 443),)),
    )
    dns = DnsConfig((UP_IP,), "refused", 5, 3600, TunnelDetection("block"))
    return Policy("dnx", {"apps": Zone("apps", (vm,))}, {}, rules, dns)


class ProxyThread:
    """The proxy's event loop in a thread that lives in the host namespace."""

    def __init__(self, state_dir):
        self.state_dir = state_dir
        self.learner = RecordingLearner()
        self.log = MemoryLog()
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.relearned = 0
        self.error = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            enter_netns(NS_HOST)
            asyncio.set_event_loop(self.loop)
            policy = make_policy()
            store = LearnedStore(self.state_dir / FILE_NAME)
            store.load()
            self.relearned = store.relearn(self.learner, time.time()).relearned
            resolver = DnsPolicyResolver(policy, PolicyDirectory(policy), self.learner,
                                         log=self.log, store=store,
                                         host_addresses=[HOST_IP, UP_HOST_IP])
            self.server = DnsServer(resolver, [Upstream(UP_IP)],
                                    listen=[("0.0.0.0", PROXY_PORT), ("::", PROXY_PORT)])
            self.loop.run_until_complete(self.server.start())
        except Exception as e:  # reported by start()
            self.error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self):
        self.thread.start()
        assert self._ready.wait(60), "the DNS proxy did not start within 60 s"
        assert self.error is None, self.error
        return self

    def stop(self):
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dnx-state")


@pytest.fixture(scope="module")
def proxy(upstream, state_dir):
    steering.install([VM_IF], PROXY_PORT, netns=NS_HOST)
    running = ProxyThread(state_dir).start()
    yield running
    running.stop()
    steering.remove(netns=NS_HOST)


# dig sends its question once (a second try would be a second query: the learner's calls, the
# log and the caches the tests count would change) and waits support.client_waits.ANSWER_WAIT_S
# for the answer: a bound against a hang, not a timing. On a loaded machine an answer may wait
# seconds (the proxy, a thread of this process, not scheduled; vCPUs stolen by the hypervisor; a
# new address's fsync queued behind other writers): with 5 s, twice at load ~9, a test failed as
# "no answer". A query that is lost still fails, and no_answer_report() says where it went.
def dig(*args: str, server: str = FOREIGN_RESOLVER) -> tuple[str, str]:
    started, steal = time.monotonic(), stolen_ticks()
    out = in_ns(NS_VM, *dig_argv(f"@{server}", *args), check=False)
    status = re.findall(r"status: (\w+)", out.stdout)
    if status:
        return status[-1], out.stdout
    report = no_answer_report(time.monotonic() - started, stolen_ticks() - steal)
    print(f"dig {' '.join(args)}: {out.stdout}{report}")  # shown with a failure, also where only the status is asserted
    return "NO-ANSWER", out.stdout + report


def stolen_ticks() -> int:
    """Clock ticks this machine's vCPUs spent waiting for the hypervisor (/proc/stat's steal)."""
    return int(Path("/proc/stat").read_text().split("\n", 1)[0].split()[8])


def no_answer_report(seconds: float, steal: int) -> str:
    """Where a query that got no answer went (for the failure message): dig's wait, time stolen
    from the machine meanwhile, the steering's counters, UDP's counters in both namespaces."""
    steered = in_ns(NS_HOST, "nft", "list", "table", "inet", steering.TABLE, check=False).stdout
    lines = [f";; no answer after {seconds:.1f} s of dig ({steal} clock ticks stolen meanwhile); steering:"]
    lines += [line.strip() for line in steered.splitlines() if "counter" in line] or ["(no steering table)"]
    for ns in (NS_VM, NS_HOST):
        names, values = [line.split()[1:] for line in in_ns(ns, "cat", "/proc/net/snmp").stdout.splitlines()
                         if line.startswith("Udp:")]
        lines.append(f"UDP in {ns}: " + " ".join(f"{n}={v}" for n, v in zip(names, values)))
    bound = in_ns(NS_HOST, "ss", "-uanp", check=False).stdout.splitlines()  # is the proxy's listener there?
    lines += [f"UDP socket in {NS_HOST}: {line}" for line in bound[1:]] or [f"no UDP socket in {NS_HOST}"]
    return "\n" + "\n".join(lines) + "\n"


def answers(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        if line and not line.startswith(";"):
            parts = line.split()
            if len(parts) >= 5 and parts[3] in ("A", "AAAA"):
                out.append(parts[4])
    return out


def test_allowed_name_is_answered_from_the_address_asked_after_learning(proxy):
    status, text = dig("allowed.test")
    answered_at = time.monotonic()
    assert status == "NOERROR", text
    # dig discards replies from any address but the one it asked; this one was accepted
    assert f"SERVER: {FOREIGN_RESOLVER}#53" in text
    ips = answers(text)
    assert len(ips) == 1 and ipaddress.ip_address(ips[0]) in ipaddress.ip_network("203.0.113.0/24")
    call = next(c for c in proxy.learner.calls if c["ips"] == ips)
    assert call["zone"] == "apps" and call["rule"] == "web"
    assert call["ttl"] >= 5  # upstream said 1: clamped to min_ttl (+ grace)
    assert call["done_at"] < answered_at  # the datapath held the IP before the VM had it
    entry = next(e for e in proxy.log.entries if e["name"] == "allowed.test")
    assert entry["verdict"] == "allowed" and entry["workload"] == "vm1" and entry["ips"] == ips


def test_refused_name(proxy):
    status, text = dig("forbidden.test")
    assert status == "REFUSED", text
    assert any(e["name"] == "forbidden.test" and e["verdict"] == "refused"
               for e in proxy.log.entries)


def test_tcp_works(proxy):
    status, text = dig("+tcp", "allowed.test", "AAAA")
    assert status == "NOERROR", text
    assert answers(text) and ":" in answers(text)[0]


def test_ipv6_query_to_a_foreign_address_is_answered_from_it(proxy):
    for extra in ((), ("+tcp",)):
        status, text = dig(*extra, "allowed.test", "AAAA", server=FOREIGN_RESOLVER6)
        assert status == "NOERROR", text
        assert f"SERVER: {FOREIGN_RESOLVER6}#53" in text
    assert any(e["client"] == VM_IP6 and e["workload"] == "vm1" for e in proxy.log.entries)


def test_cname_chain_learns_the_final_address(proxy):
    status, text = dig("alias.test")
    assert status == "NOERROR" and "203.0.113.77" in answers(text)
    assert any(c["ips"] == ["203.0.113.77"] for c in proxy.learner.calls)


def test_rebinding_addresses_are_stripped(proxy):
    status, text = dig("rebind.test")
    assert status == "NOERROR"
    assert answers(text) == ["203.0.113.9"]


def test_private_addresses_behind_public_names_are_stripped_unless_the_rule_allows(proxy):
    # On main every private, CGNAT, NAT64- and 6to4-wrapped and ULA address here was learned.
    status, text = dig("inside.test", "ANY")
    assert status == "NOERROR", text
    assert sorted(answers(text)) == ["2001:db8:203::10", "203.0.113.10"]
    entry = [e for e in proxy.log.entries if e["name"] == "inside.test"][-1]
    assert len(entry["rebinding_stripped"]) == 6
    status, text = dig("intranet.test", "ANY")  # the rule says allow_private
    assert sorted(answers(text)) == sorted(["10.0.0.5", "100.64.0.9", "192.168.1.1", "203.0.113.10",
                                            "64:ff9b::a00:5", "2002:c0a8:101::1", "fd00::5",
                                            "2001:db8:203::10"])
    assert proxy.learner.calls[-1]["rule"] == "intranet"


def test_records_for_other_names_are_stripped(proxy):
    status, text = dig("extra.test")
    assert status == "NOERROR", text
    assert answers(text) == ["203.0.113.30"]
    assert "bank.test" not in text  # neither in the answer nor in the additional section


def test_addresses_of_another_class_or_length_never_reach_the_vm(proxy):
    # The datapath learns only IN addresses of 4 or 16 octets: any other A or AAAA record the VM
    # got would be an address it holds that the datapath never opened (or one read differently).
    status, text = dig("oddclass.test")
    assert status == "NOERROR", text
    assert "203.0.113.41" not in text and "203.0.113.42" not in text and "ANSWER: 1," in text, text
    assert answers(text) == ["203.0.113.40"] and proxy.learner.calls[-1]["ips"] == ["203.0.113.40"]
    status, text = dig("badlength.test")
    assert status == "SERVFAIL" and "203.0.113.4" not in text, text
    entry = [e for e in proxy.log.entries if e["name"] == "badlength.test"][-1]
    assert entry["verdict"] == "servfail" and "5 octets" in entry["reason"], entry


def test_a_ttl_with_the_top_bit_set_is_read_as_zero(proxy):
    status, text = dig("hugettl.test")
    assert status == "NOERROR", text
    [line] = [line.split() for line in text.splitlines() if line.startswith("hugettl.test.")]
    assert line[4] == "203.0.113.46" and int(line[1]) == 5, line  # 0, raised to the policy's min_ttl
    call = proxy.learner.calls[-1]
    assert call["ips"] == ["203.0.113.46"] and call["ttl"] < 60, call  # held for 5 s and the grace


def test_private_use_query_types_are_refused(proxy):
    # RFC 6895: types 65280-65534 carry whatever two private parties agree on, as NULL does;
    # no public name serves them, and the type itself reaches the upstream: refused (wire.SERVED_QTYPES).
    status, text = dig("ptype.test", "TYPE65400")
    assert status == "REFUSED", text
    entry = proxy.log.entries[-1]
    assert entry["verdict"] == "refused" and entry["reason"] == "query type TYPE65400 is not served", entry


def test_truncated_upstream_falls_back_to_tcp_and_client_gets_tc(proxy):
    # dig first gets TC over UDP from us, retries over TCP, and gets everything
    status, text = dig("big.test", "TXT")
    assert status == "NOERROR", text
    assert text.count("TXT\t") + text.count("TXT ") >= 8 or text.count('"0000') == 1
    assert "Truncated, retrying in TCP mode" in text


def test_tunnelling_burst_is_blocked_while_ordinary_names_work(proxy, tmp_path):
    proxy.learner.delay = 0  # 60 answers: ordering is tested above
    rng = random.Random(5)
    names = [base64.b32encode(bytes(rng.randrange(256) for _ in range(8))).decode().lower()
             .rstrip("=") + ".x.tun.test" for _ in range(60)]
    batch = tmp_path / "queries"
    batch.write_text("".join(f"{n} A\n" for n in names))
    out = in_ns(NS_VM, *dig_argv(f"@{FOREIGN_RESOLVER}", "+noall", "+comments", "-f", str(batch)),
                check=False).stdout
    statuses = re.findall(r"status: (\w+)", out)
    assert len(statuses) == 60
    assert statuses[0] == "NOERROR"  # the policy allows the base: it is detection that stops it
    first_block = statuses.index("REFUSED")
    assert first_block < 40
    assert set(statuses[first_block:]) == {"REFUSED"}
    assert any(e["verdict"] == "tunnel" and e["tunnel"]["parts"] for e in proxy.log.entries)
    status, _ = dig("allowed.test")
    assert status == "NOERROR"


def test_letters_only_tunnel_names_are_refused(proxy):
    # Issue 15's quiet tunnel: 40 letters of a 16-letter alphabet per label, no digits. On main
    # each such name scored 0.38 (long label only) and was answered.
    rng = random.Random(11)
    for _ in range(3):
        label = "".join("abcdefghijklmnop"[rng.randrange(16)] for _ in range(40))
        status, text = dig(f"{label}.quiet.test")
        assert status == "REFUSED", text
    entry = [e for e in proxy.log.entries if e["name"].endswith(".quiet.test")][0]
    assert entry["verdict"] == "tunnel" and "alphabet" in entry["tunnel"]["parts"]


def test_steering_is_idempotent_and_counts(proxy):
    assert dig("allowed.test")[0] == "NOERROR"
    assert re.search(r"udp dport 53 counter packets [1-9]", steering.installed(netns=NS_HOST))
    steering.install([VM_IF], PROXY_PORT, netns=NS_HOST)  # again: still one table, two rules
    listing = steering.installed(netns=NS_HOST)
    assert listing.count("redirect to :23053") == 2
    status, text = dig("allowed.test")
    assert status == "NOERROR"


def test_restart_relearns_what_was_learned(proxy, state_dir):
    dig("alias.test")
    proxy.stop()
    restarted = ProxyThread(state_dir).start()
    try:
        assert restarted.relearned >= 1
        assert any("203.0.113.77" in c["ips"] and c["rule"] == "web"
                   for c in restarted.learner.calls)
        status, _ = dig("allowed.test")
        assert status == "NOERROR"
    finally:
        restarted.stop()
        proxy.server = None  # already stopped


def test_proxy_down_means_no_answer(upstream, state_dir):
    # steering in place but nothing listening: the query is not answered by anyone (fail closed)
    steering.install([VM_IF], PROXY_PORT, netns=NS_HOST)
    try:
        status, _ = dig("allowed.test")
        assert status == "NO-ANSWER"
    finally:
        steering.remove(netns=NS_HOST)
    assert steering.installed(netns=NS_HOST) == ""


# ---- the whole DnsProxy part (what the daemon runs) over policies parsed from YAML ----------

SERVICE_PORT = PROXY_PORT + 1


def yaml_policy(rules: str = "", dns: str | None = f"dns: {{upstreams: [{UP_IP}]}}") -> Policy:
    text = f"""apiVersion: skyguard/v1
kind: Policy
metadata: {{name: dnx}}
zones:
  apps:
    workloads:
      - {{name: vm1, interface: {VM_IF}, mac: "02:00:00:00:09:01", addresses: [{VM_IP}, "{VM_IP6}"]}}
rules:
  - {{name: ping, from: apps, to: {{cidrs: [203.0.113.0/24]}}, ports: [icmp]}}
{rules}{dns + chr(10) if dns else ""}"""
    return parse_policy(text, source="dnx.yaml")


class StrictLearner(RecordingLearner):
    """Datapath.learn's own check: learning for a rule the policy lacks is an error."""

    def __init__(self, policy):
        super().__init__()
        self.delay = 0
        self.rules = {r.name for r in policy.rules if r.to.fqdns}

    def learn(self, zone, rule_name, ips, ttl):
        if rule_name not in self.rules:
            raise BadInput(f"rule {rule_name!r} does not exist or has no fqdns: nothing to learn for it")
        super().learn(zone, rule_name, ips, ttl)


FLUSH_CONNTRACK = "from pyroute2 import Conntrack\nct = Conntrack()\ntry:\n    ct.flush()\nfinally:\n    ct.close()"


class ServiceThread:
    """A DnsProxy (listeners, steering, learned state) on an event loop in the host namespace."""

    def __init__(self, policy, state_dir):
        self.policy = policy
        self.learner = StrictLearner(policy)
        self.log = MemoryLog()
        self.loop = asyncio.new_event_loop()
        self.proxy = None
        self.error = None
        self._ready = threading.Event()
        self.state_dir = state_dir
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            enter_netns(NS_HOST)
            asyncio.set_event_loop(self.loop)
            self.proxy = DnsProxy(self.policy, self.learner, self.log, state_dir=self.state_dir,
                                  port=SERVICE_PORT, netns=NS_HOST,
                                  host_addresses=[HOST_IP, UP_HOST_IP])
            self.loop.run_until_complete(self.proxy.start())
        except Exception as e:  # reported by start()
            self.error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def swap(self, policy):
        """Hot swap on the proxy's loop, as the daemon does; the learner follows the policy."""
        async def run():
            self.learner.rules = {r.name for r in policy.rules if r.to.fqdns}
            return await self.proxy.set_policy(policy)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def __enter__(self):
        # Each service starts with the host namespace's conntrack empty: a query whose flow (same
        # ports) the kernel still remembers from an earlier test, NATed to a proxy that is gone,
        # skips the new steering's redirect and is refused (seen: the redirect's counters at 0,
        # the listener bound, dig "connection refused").
        in_ns(NS_HOST, sys.executable, "-c", FLUSH_CONNTRACK)
        self.thread.start()
        # A busy machine can take a while to install the steering; querying before start() has
        # returned would see no answer and blame the proxy.
        assert self._ready.wait(60), "the DNS proxy did not start within 60 s"
        if self.error is not None:
            self.thread.join(10)
            raise self.error
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.proxy.stop(remove_steering=True), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.mark.parametrize("dns, rcode", [(None, "REFUSED"), ("dns: {refuse_with: nxdomain}", "NXDOMAIN")])
def test_a_policy_without_dns_upstreams_runs_and_answers_every_query_per_refuse_with(
        upstream, tmp_path, dns, rcode):
    # On main the proxy would not start: "no dns.upstreams in the policy".
    with ServiceThread(yaml_policy(dns=dns), tmp_path) as service:
        for args in (("allowed.test",), ("+tcp", "allowed.test", "AAAA")):
            status, text = dig(*args)
            assert status == rcode, text
        status, text = dig("allowed.test", server=FOREIGN_RESOLVER6)
        assert status == rcode, text
        logged = [e for e in service.log.entries if e.get("name") == "allowed.test"]
        assert len(logged) == 3 and {e["verdict"] for e in logged} == {"refused"}
        assert service.learner.calls == []
        # and a hot swap to a policy with upstreams starts forwarding, and back again
        service.swap(
            yaml_policy("  - {name: web, from: apps, to: {fqdns: [allowed.test]}, ports: [tcp/443]}\n"))
        assert dig("allowed.test")[0] == "NOERROR"
        service.swap(yaml_policy(dns=dns))
        assert dig("allowed.test")[0] == rcode


def test_a_restart_with_an_edited_policy_drops_learned_state_of_removed_rules(upstream, tmp_path):
    web = "  - {name: web, from: apps, to: {fqdns: [allowed.test, alias.test]}, ports: [tcp/443]}\n"
    with ServiceThread(yaml_policy(web), tmp_path) as service:
        assert dig("allowed.test")[0] == "NOERROR"
        assert dig("alias.test")[0] == "NOERROR"
        assert [c["rule"] for c in service.learner.calls] == ["web", "web"]
    # The operator renames the rule and restarts: on main, start() failed with the learner's
    # "rule 'web' does not exist" for every later run until the state file was deleted.
    renamed = yaml_policy(web.replace("name: web", "name: www"))
    with ServiceThread(renamed, tmp_path) as service:
        assert service.proxy.relearned == 0 and service.proxy.dropped == {"rule-gone": 2}
        assert service.proxy.metrics.learned_dropped.labels("rule-gone")._value.get() == 2
        status, text = dig("allowed.test")
        assert status == "NOERROR", text
        assert [c["rule"] for c in service.learner.calls] == ["www"]
        # hot swap: the rule that names alias.test goes; so does what was learned under it
        dropped = service.swap(yaml_policy(
            web.replace("name: web", "name: www").replace(", alias.test", "")))
        assert dropped == {}  # alias.test was learned under `web` only, dropped at the start
        dropped = service.swap(yaml_policy(
            "  - {name: other, from: apps, to: {fqdns: [x.test]}, ports: [tcp/443]}\n"))
        assert dropped == {"rule-gone": 1}
        assert not service.proxy.store.answered("allowed.test", answers(text)[0], time.time())


def upstream_count(name: str) -> int:
    """Queries the upstream got for name (asked of it directly, from its own namespace)."""
    out = in_ns(NS_UP, *dig_argv(f"@{UP_IP}", "+short", f"{name}.count.stats", "TXT"))
    return int(out.stdout.strip().strip('"'))


def test_a_repeated_question_is_answered_from_the_vms_cache_until_its_ttl_or_a_policy_change(
        upstream, tmp_path):
    # On main every repeat went upstream: a VM choosing among names it had resolved already
    # under a base it controls (TTL 0 answers) sent log2(names) bits per query, uncounted.
    rule = "  - {name: c, from: apps, to: {fqdns: ['**.cache.test']}, ports: [tcp/443]}\n"
    dns = f"dns: {{upstreams: [{UP_IP}], min_ttl: 1}}"
    with ServiceThread(yaml_policy(rule, dns=dns), tmp_path) as service:
        for args in (("long.a.cache.test",), ("LONG.a.Cache.test",), ("+tcp", "long.a.cache.test")):
            status, text = dig(*args)
            assert status == "NOERROR" and answers(text) == ["203.0.113.60"], text
        assert upstream_count("long.a.cache.test") == 1
        # each hit was decided and learned again: the datapath holds what the VM gets
        assert [c["ips"] for c in service.learner.calls] == [["203.0.113.60"]] * 3
        metrics = service.proxy.metrics.registry
        assert metrics.get_sample_value("skyguard_dns_cache_hits_total") == 2
        # TTL 1 (the floor here): after it, the question goes upstream again
        assert dig("short.cache.test")[0] == "NOERROR"
        time.sleep(2.5)
        assert dig("short.cache.test")[0] == "NOERROR"
        assert upstream_count("short.cache.test") == 2
        # the rule goes: the cached name is refused at once, and nothing went upstream
        service.swap(yaml_policy(dns=dns))
        assert dig("long.a.cache.test")[0] == "REFUSED"
        assert upstream_count("long.a.cache.test") == 1



def flock_waiters(path: Path) -> int:
    """How many lock requests wait on the file at `path` (the kernel's /proc/locks)."""
    st = path.stat()
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    return sum(1 for line in Path("/proc/locks").read_text().splitlines() if "->" in line and inode in line)


def test_a_swap_waiting_for_nft_holds_up_no_query(upstream, tmp_path, monkeypatch):
    """A hot swap re-installs the steering with nft, which may take its time (a busy host,
    another program holding the ruleset). Here nft waits for a lock the test holds: meanwhile
    the VM's queries are answered (the table in place still steers them), and the swap ends
    once nft may go on."""
    gate, bin_dir = tmp_path / "nft.gate", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nft").write_text(f'#!/bin/sh\nflock {gate} true\nexec {shutil.which("nft")} "$@"\n')
    (bin_dir / "nft").chmod(0o755)
    web = "  - {name: web, from: apps, to: {fqdns: [allowed.test, alias.test]}, ports: [tcp/443]}\n"
    with ServiceThread(yaml_policy(web), tmp_path) as service:
        lock = os.open(gate, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        service.learner.rules = {"web"}
        swapping = asyncio.run_coroutine_threadsafe(service.proxy.set_policy(yaml_policy(web.replace(", alias.test", ""))),
                                                    service.loop)
        try:
            while not flock_waiters(gate):  # nft waits (bounded by the test's timeout)
                assert not swapping.done(), swapping.result()
                time.sleep(0.01)
            status, text = dig("allowed.test")
            assert status == "NOERROR" and not swapping.done(), text
        finally:
            os.close(lock)
        assert swapping.result(30) == {}
        assert dig("alias.test")[0] == "REFUSED"  # the new policy, steered by the new table


class PortHolder:
    """Something else of the host holds the proxy's UDP port in the host namespace (mDNS's
    avahi holds 5353, the default): the proxy cannot bind."""

    def __init__(self, port):
        self.sock = None
        done = threading.Event()

        def hold():
            enter_netns(NS_HOST)  # this thread only; the socket stays in the namespace
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind(("0.0.0.0", port))
            done.set()

        threading.Thread(target=hold, daemon=True).start()
        assert done.wait(10)

    def close(self):
        self.sock.close()


def test_a_proxy_that_cannot_start_leaves_vm_dns_unanswered_not_routed(upstream, tmp_path):
    # The host routes (as a VM host does) and the upstream knows the way back: a query the
    # steering does not catch reaches the real resolver. On main a proxy that failed to bind
    # its port had installed no steering, so the VM's queries to any resolver were routed
    # there and answered unchecked: a name no rule allows resolved.
    in_ns(NS_HOST, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    in_ns(NS_UP, "ip", "route", "replace", "default", "via", UP_HOST_IP)
    holder = PortHolder(SERVICE_PORT)
    try:
        with pytest.raises(DnsError, match="cannot listen"), ServiceThread(yaml_policy(), tmp_path):
            pass
        for extra in ((), ("+tcp",)):  # no answer must come: listened for SILENCE_WAIT_S
            out = in_ns(NS_VM, *dig_argv(f"@{UP_IP}", *extra, "forbidden.test", answer=False), check=False).stdout
            assert "status:" not in out, out
    finally:
        holder.close()
        steering.remove(netns=NS_HOST)
        in_ns(NS_UP, "ip", "route", "del", "default", check=False)
        in_ns(NS_HOST, "sysctl", "-qw", "net.ipv4.ip_forward=0")


if __name__ == "__main__" and sys.argv[1:2] == ["--serve-upstream"]:
    UP_IP = sys.argv[2]
    serve_upstream()
