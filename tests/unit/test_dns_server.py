"""The proxy's transport over real loopback sockets (no privileges): dnslib's client asks, small
hand-made upstreams misbehave on purpose (silent, spoofing, wrong ID first), and the proxy must
answer correctly or SERVFAIL, never hang or crash. Plus the nftables ruleset text."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import ipaddress
import json
import socket
import struct
import threading
import time

import pytest
from dnslib import QTYPE, RCODE, RR, TXT, A, DNSRecord

from skyguard.dns import server as server_module
from skyguard.dns import steering
from skyguard.dns.interfaces import PolicyDirectory
from skyguard.dns.learned import LearnedStore
from skyguard.dns.resolver import DnsPolicyResolver
from skyguard.dns.server import DnsServer, Upstream
from skyguard.errors import DnsError
from skyguard.parts import MemoryLog, new_event_loop
from skyguard.policy.model import Destination, DnsConfig, Policy, PortRange, Rule, TunnelDetection, Workload, Zone
from support.client_waits import ANSWER_WAIT_S


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    for var in ("SKYGUARD_PIN_DIR", "SKYGUARD_STATE_DIR", "SKYGUARD_RUN_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))


class Learner:
    def __init__(self):
        self.calls = []

    def learn(self, zone, rule_name, ips, ttl):
        self.calls.append((zone, rule_name, [str(i) for i in ips]))


def policy():
    me = Workload("local", "lo", "lo", "02:00:00:00:00:01", (ipaddress.ip_address("127.0.0.1"),))
    rule = Rule("web", "allow", ("lo",), Destination(fqdns=("**.test",)),
                (PortRange("tcp", 443, 443),))
    return Policy("t", {"lo": Zone("lo", (me,))}, {}, (rule,), DnsConfig(("127.0.0.1",)))


class FakeUpstream:
    """A UDP 'authoritative' on loopback whose behaviour each test picks."""

    def __init__(self, mode="honest"):
        self.mode = mode
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.spoofer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.spoofer.bind(("127.0.0.1", 0))
        self.seen = 0
        self.asked = []  # (source port, question name octets as received) per query
        threading.Thread(target=self._run, daemon=True).start()

    def _reply(self, data, ip="203.0.113.10"):
        q = DNSRecord.parse(data)
        r = q.reply()
        r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A(ip), ttl=60))
        return r.pack()

    def _run(self):
        while True:
            try:
                data, addr = self.sock.recvfrom(4096)
            except OSError:
                return
            self.seen += 1
            self.asked.append((addr[1], data[12:].split(b"\x00")[0]))  # the name's labels
            if self.mode == "silent":
                continue
            if self.mode == "slow":  # the answer takes a while: other clients ask meanwhile
                threading.Event().wait(0.3)
            if self.mode == "other-case-first":
                # right source, port and ID, the name in another letter case: a spoofer who
                # guessed the ID but not the case the proxy chose (DNS 0x20)
                bad = bytearray(self._reply(data, "203.0.113.66"))
                end = 12 + len(data[12:].split(b"\x00")[0])
                bad[12:end] = bytes(bad[12:end]).swapcase()
                self.sock.sendto(bytes(bad), addr)
            if self.mode == "wrong-ids-first":  # a blind spoofer from the upstream's own port
                for spoof_id in range(64):
                    bad = bytearray(self._reply(data, "203.0.113.66"))
                    bad[0:2] = struct.pack("!H", (data[0] << 8 | data[1]) ^ (spoof_id + 1))
                    self.sock.sendto(bytes(bad), addr)
            if self.mode == "spoof-first":
                # from another port (an off-path attacker guessing): must be ignored
                self.spoofer.sendto(self._reply(data, "203.0.113.66"), addr)
            if self.mode == "wrong-id-first":
                bad = bytearray(self._reply(data, "203.0.113.66"))
                bad[0] ^= 0xFF
                self.sock.sendto(bytes(bad), addr)
            self.sock.sendto(self._reply(data), addr)

    def close(self):
        self.sock.close()
        self.spoofer.close()


class Proxy:
    def __init__(self, upstreams, timeout=0.3, loop_factory=asyncio.new_event_loop, store=None,
                 the_policy=None):
        self.learner, self.log = Learner(), MemoryLog()
        p = the_policy or policy()
        self.resolver = DnsPolicyResolver(p, PolicyDirectory(p), self.learner, log=self.log, store=store)
        self.server = DnsServer(self.resolver, upstreams, listen=[("127.0.0.1", 0)],
                                upstream_timeout=timeout)
        self.loop = loop_factory()
        self.loop.run_until_complete(self.server.start())
        self.port = self.server.bound[0][1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def ask(self, name, tcp=False):
        return DNSRecord.parse(DNSRecord.question(name).send("127.0.0.1", self.port, tcp=tcp,
                                                             timeout=ANSWER_WAIT_S))

    def close(self):
        if not self.thread.is_alive():
            return  # closed already
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def make_proxy():
    made = []

    def make(upstreams, **kw):
        made.append(Proxy(upstreams, **kw))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


def test_udp_and_tcp_answers(make_proxy):
    up = FakeUpstream()
    proxy = make_proxy([Upstream("127.0.0.1", up.port)])
    for tcp in (False, True):
        reply = proxy.ask("www.site.test", tcp=tcp)
        assert reply.header.rcode == RCODE.NOERROR and str(reply.rr[0].rdata) == "203.0.113.10"
    assert proxy.learner.calls[0] == ("lo", "web", ["203.0.113.10"])
    up.close()


def test_silent_upstream_gives_servfail_and_is_counted(make_proxy):
    up = FakeUpstream("silent")
    proxy = make_proxy([Upstream("127.0.0.1", up.port)])
    assert proxy.ask("www.site.test").header.rcode == RCODE.SERVFAIL
    assert proxy.resolver.metrics.upstream_errors.labels("timeout")._value.get() == 1
    assert proxy.log.entries[-1]["verdict"] == "servfail"
    up.close()


def test_next_upstream_is_tried_after_a_timeout(make_proxy):
    silent, honest = FakeUpstream("silent"), FakeUpstream()
    proxy = make_proxy([Upstream("127.0.0.1", silent.port), Upstream("127.0.0.1", honest.port)])
    assert str(proxy.ask("www.site.test").rr[0].rdata) == "203.0.113.10"
    assert silent.seen == 1 and honest.seen == 1
    silent.close()
    honest.close()


@pytest.mark.parametrize("mode", ["spoof-first", "wrong-id-first"])
def test_replies_from_elsewhere_or_with_the_wrong_id_are_discarded(make_proxy, mode):
    up = FakeUpstream(mode)
    proxy = make_proxy([Upstream("127.0.0.1", up.port)])
    assert [str(rr.rdata) for rr in proxy.ask("www.site.test").rr] == ["203.0.113.10"]
    assert all("203.0.113.66" not in call[2] for call in proxy.learner.calls)
    assert proxy.resolver.metrics.mismatched._value.get() >= 1
    up.close()


def raw_query(name: str, query_id: int) -> bytes:
    q = DNSRecord.question(name)
    q.header.id = query_id
    return q.pack()


def test_a_reply_whose_question_is_in_another_letter_case_is_ignored_and_the_real_one_answers(
        make_proxy):
    # The proxy asks upstream in a letter case of its own choosing (DNS 0x20) and a reply must
    # echo it octet for octet: the case is part of what a spoofer has to guess.
    up = FakeUpstream("other-case-first")
    proxy = make_proxy([Upstream("127.0.0.1", up.port)])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(ANSWER_WAIT_S)
        query = raw_query("WwW.SiTe.test", 0x4242)
        s.sendto(query, ("127.0.0.1", proxy.port))
        data = s.recv(4096)
    reply = DNSRecord.parse(data)
    assert [str(rr.rdata) for rr in reply.rr] == ["203.0.113.10"]
    assert data[:2] == b"\x42\x42" and data[12:12 + 19] == query[12:12 + 19]  # the VM's own case
    assert all("203.0.113.66" not in call[2] for call in proxy.learner.calls)
    assert proxy.resolver.metrics.mismatched._value.get() == 1
    up.close()


def test_the_upstream_name_is_in_a_random_case_whatever_case_the_vm_asked_in(make_proxy):
    up = FakeUpstream()
    proxy = make_proxy([Upstream("127.0.0.1", up.port)])
    for i in range(8):
        assert proxy.ask(f"www.longer-name-{i}.test").header.rcode == RCODE.NOERROR
    names = [name for _, name in up.asked]
    assert [name.lower() for name in names] == \
        [DNSRecord.question(f"www.longer-name-{i}.test").pack()[12:].split(b"\x00")[0]
         for i in range(8)]
    # 20 letters each: all in lower case by chance once in 2^20
    assert sum(name != name.lower() for name in names) >= 7


def test_identical_questions_in_flight_share_one_upstream_query_each_answered_as_asked(make_proxy):
    # A VM keeping many queries for one name waiting must not multiply a spoofer's chances:
    # they are one upstream query, and every client gets the answer with its own ID and case.
    up = FakeUpstream("slow")
    proxy = make_proxy([Upstream("127.0.0.1", up.port)], timeout=2)
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    asked = [("www.same.test", 0x1111), ("WWW.Same.TEST", 0x2222), ("wWw.sAmE.tEsT", 0x3333)]
    queries = [raw_query(name, qid) for name, qid in asked]
    for client, query in zip(clients, queries):
        client.settimeout(ANSWER_WAIT_S)
        client.sendto(query, ("127.0.0.1", proxy.port))
    for client, query in zip(clients, queries):
        data = client.recv(4096)
        client.close()
        assert data[:2] == query[:2]  # its own ID
        assert data[12:12 + 15] == query[12:12 + 15]  # its own question, octet for octet
        assert [str(rr.rdata) for rr in DNSRecord.parse(data).rr] == ["203.0.113.10"]
    assert up.seen == 1
    assert len(proxy.learner.calls) == 3  # each client's answer is decided and learned on its own
    assert _on_loop(proxy, lambda: (len(proxy.server._deadlines), len(proxy.server._groups),
                                    len(proxy.server._inflight))) == (0, 0, 0)
    up.close()


def test_upstream_source_ports_rotate_and_retired_ones_close(make_proxy, monkeypatch):
    # A fixed set of sockets can be found by a UDP scan of the host (open ports send no ICMP
    # unreachable) and then serves every query for good; pooled sockets are replaced by fresh
    # ones on new random ports after ROTATE_AFTER queries (or ROTATE_SECONDS), and closed.
    monkeypatch.setattr(server_module, "UPSTREAM_POOL", 2)
    monkeypatch.setattr(server_module, "ROTATE_AFTER", 4)
    up = FakeUpstream()
    proxy = make_proxy([Upstream("127.0.0.1", up.port)])
    for i in range(40):
        assert proxy.ask(f"www.p{i}.test").header.rcode == RCODE.NOERROR
    ports = [port for port, _ in up.asked]
    assert len(set(ports)) >= 10  # 2 slots x 4 queries per socket; the kernel draws each port
    assert max(ports.count(port) for port in ports) <= 4
    still_open = _on_loop(proxy, lambda: {us.sock.getsockname()[1]
                                          for us in proxy.server._upstream_sockets})
    assert len(still_open) <= 2
    for port in set(ports) - still_open:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("0.0.0.0", port))  # free again: nothing listens there any more
    up.close()


def test_blind_spoofs_from_the_upstream_s_own_address_and_port_are_ignored(make_proxy):
    up = FakeUpstream("wrong-ids-first")
    proxy = make_proxy([Upstream("127.0.0.1", up.port)])
    assert [str(rr.rdata) for rr in proxy.ask("www.site.test").rr] == ["203.0.113.10"]
    assert all("203.0.113.66" not in call[2] for call in proxy.learner.calls)
    assert proxy.resolver.metrics.mismatched._value.get() == 64
    up.close()


def test_hostile_tcp_client_is_cut_off_and_the_proxy_keeps_serving(make_proxy):
    up = FakeUpstream()
    proxy = make_proxy([Upstream("127.0.0.1", up.port)])
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=ANSWER_WAIT_S) as s:
        s.sendall(struct.pack("!H", 60000) + b"\x00" * 100)  # claims a 60 kB query
        assert s.recv(10) == b""  # closed on us
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=ANSWER_WAIT_S) as s:
        s.sendall(struct.pack("!H", 5) + b"\x01\x02\x03\x04\x05")  # shorter than a header
        assert s.recv(10) == b""
    assert proxy.ask("www.site.test", tcp=True).header.rcode == RCODE.NOERROR
    up.close()


class BigTxtUpstream(FakeUpstream):
    def _reply(self, data, ip="203.0.113.10"):
        q = DNSRecord.parse(data)
        r = q.reply()
        r.add_answer(RR(q.q.qname, QTYPE.TXT, rdata=TXT(["x" * 250] * 80), ttl=60))  # 20 kB
        return r.pack()


def test_a_tcp_client_that_never_reads_its_answers_is_cut_off(make_proxy, monkeypatch):
    # A VM pipelines queries with big answers and never reads them. On main the proxy waited
    # forever for room to write: the connection, megabytes of buffered answers and one of the
    # VM's TCP slots were held for good (all of them, after TCP_MAX_CONNECTIONS_PER_CLIENT such
    # connections). Writing gets the same deadline as reading a query.
    monkeypatch.setattr(server_module, "TCP_READ_TIMEOUT", 0.5)
    monkeypatch.setattr(server_module, "TCP_IDLE_TIMEOUT", 0.5)
    monkeypatch.setattr(server_module, "TCP_MAX_CONNECTIONS_PER_CLIENT", 1)
    up = BigTxtUpstream()
    the_policy = dataclasses.replace(policy(), dns=DnsConfig(("127.0.0.1",), tunnel_detection=TunnelDetection("off")))
    proxy = make_proxy([Upstream("127.0.0.1", up.port)], timeout=2.0, the_policy=the_policy)
    query = DNSRecord.question("big.site.test", "TXT").pack()
    with socket.socket() as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", proxy.port))
        stalled.sendall((struct.pack("!H", len(query)) + query) * 400)  # 8 MB of answers
        deadline = time.monotonic() + 10
        while True:  # the proxy is stuck writing, then (fixed) gives up within its deadline
            try:
                reply = proxy.ask("www.site.test", tcp=True)
                break
            except (OSError, struct.error):
                assert time.monotonic() < deadline, "the stalled connection still holds the VM's slot"
                time.sleep(0.2)
        assert reply.header.rcode == RCODE.NOERROR
    up.close()


def test_close_ends_the_clients_tcp_connections(make_proxy):
    # On main close() left each open client connection's task pending on a stopped loop: the
    # client never saw the connection end, and the tasks were destroyed unfinished at garbage
    # collection (logged errors; once a CPython SystemError inside a later test's ast.parse).
    up = FakeUpstream()
    proxy = make_proxy([Upstream("127.0.0.1", up.port)])
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=ANSWER_WAIT_S) as idle:
        assert proxy.ask("www.site.test", tcp=True).header.rcode == RCODE.NOERROR
        proxy.close()
        assert idle.recv(10) == b""
    up.close()


def test_garbage_over_udp_never_kills_the_listener(make_proxy):
    up = FakeUpstream()
    proxy = make_proxy([Upstream("127.0.0.1", up.port)])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for junk in (b"", b"\xff" * 11, b"\x00" * 12 + b"\xc0\x0c\x00\x01\x00\x01", b"\xff" * 600):
            s.sendto(junk, ("127.0.0.1", proxy.port))
    assert proxy.ask("www.site.test").header.rcode == RCODE.NOERROR
    up.close()


def test_no_other_socket_can_share_the_udp_port_and_take_the_vms_queries(make_proxy):
    # On main the UDP listener set SO_REUSEADDR, so any local program (mDNS's avahi on 5353,
    # the default port, or an unprivileged user) binding the port the same way shared it, and
    # queries went to whichever socket bound last: the proxy's VMs asked it and got no answer,
    # or its answer. Sharing the port is refused now; a proxy that finds it taken fails to start.
    up = FakeUpstream()
    proxy = make_proxy([Upstream("127.0.0.1", up.port)])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as thief:
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(OSError):
            thief.bind(("127.0.0.1", proxy.port))
        assert proxy.ask("www.site.test").header.rcode == RCODE.NOERROR
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:  # e.g. avahi, first
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        taken = holder.getsockname()[1]
        server = DnsServer(proxy.resolver, [], listen=[("127.0.0.1", taken)])
        with pytest.raises(DnsError, match="cannot listen"):
            asyncio.run(server.start())
    up.close()


def test_upstream_parsing_and_errors():
    assert Upstream.parse("192.0.2.53") == Upstream("192.0.2.53", 53)
    assert Upstream.parse("192.0.2.53:5300") == Upstream("192.0.2.53", 5300)
    assert Upstream.parse("[2001:db8::53]:53") == Upstream("2001:db8::53", 53)
    assert Upstream.parse("2001:db8::53") == Upstream("2001:db8::53", 53)
    with pytest.raises(DnsError, match="not an IP address"):
        Upstream.parse("dns.example")


def test_steering_ruleset_redirects_both_protocols_from_named_interfaces_only():
    text = steering.ruleset(["sg-radius1", "sg-ad1", "sg-radius1"], 5353)
    assert 'iifname { "sg-ad1", "sg-radius1" } udp dport 53 counter redirect to :5353' in text
    assert 'iifname { "sg-ad1", "sg-radius1" } tcp dport 53 counter redirect to :5353' in text
    assert text.index("delete table inet skyguard_dns") < text.index("chain prerouting")
    closed = steering.ruleset(["sg-ad1"], None)  # before the proxy binds: port 53 dropped
    assert "redirect" not in closed
    assert 'iifname { "sg-ad1" } meta l4proto { tcp, udp } th dport 53 counter drop' in closed


@pytest.mark.parametrize("interfaces,port", [([], 5353), (['x" accept; #'], 5353),
                                             (["sg-a"], 0), (["a" * 16], 53)])
def test_steering_rejects_bad_input(interfaces, port):
    with pytest.raises(DnsError):
        steering.ruleset(interfaces, port)


def _on_loop(proxy, fn):
    """Run fn on the proxy's loop thread (its state belongs to that thread) and return its value."""
    async def call():
        return fn()
    return asyncio.run_coroutine_threadsafe(call(), proxy.loop).result(5)


# The daemon runs the proxy on uvloop (whose timers have whole-ms resolution), tests elsewhere on
# the stock loop: the deadline sweep is checked on both.
LOOPS = pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, new_event_loop],
                                ids=["asyncio", "service-loop"])


@LOOPS
def test_every_unanswered_query_times_out_once_and_nothing_stays_waiting(make_proxy, loop_factory):
    # One deadline sweep serves all queries in flight: queries sent at different moments must
    # each get their SERVFAIL, once, and leave no deadline behind.
    up = FakeUpstream("silent")
    proxy = make_proxy([Upstream("127.0.0.1", up.port)], timeout=0.2, loop_factory=loop_factory)
    results, threads = [], []
    for i in range(6):
        t = threading.Thread(target=lambda i=i: results.append(proxy.ask(f"www.s{i}.test")))
        threads.append(t)
        t.start()
        threading.Event().wait(0.03)  # staggered: the deadlines differ
    for t in threads:
        t.join(10)
    assert sorted(r.header.rcode for r in results) == [RCODE.SERVFAIL] * 6
    assert proxy.resolver.metrics.upstream_errors.labels("timeout")._value.get() == 6
    assert up.seen == 6
    assert _on_loop(proxy, lambda: len(proxy.server._deadlines)) == 0
    up.close()


@LOOPS
def test_answered_queries_leave_no_deadline_and_a_later_timeout_still_fires(make_proxy,
                                                                           loop_factory):
    honest = FakeUpstream()
    proxy = make_proxy([Upstream("127.0.0.1", honest.port)], timeout=0.2,
                       loop_factory=loop_factory)
    for i in range(20):
        assert proxy.ask(f"www.s{i}.test").header.rcode == RCODE.NOERROR
    assert _on_loop(proxy, lambda: len(proxy.server._deadlines)) == 0
    honest.mode = "silent"  # the sweep armed by the answered queries must still time this out
    assert proxy.ask("www.late.test").header.rcode == RCODE.SERVFAIL
    assert _on_loop(proxy, lambda: len(proxy.server._deadlines)) == 0
    honest.close()


class StalledDisk(LearnedStore):
    """A learned-state file whose writes wait until the test lets them through."""

    def __init__(self, path):
        super().__init__(path)
        self.writing = threading.Event()
        self.go_on = threading.Event()

    def write(self, data):
        self.writing.set()
        assert self.go_on.wait(10)
        super().write(data)


def test_a_slow_state_write_holds_back_only_the_answer_that_waits_for_it(tmp_path):
    # A new address must be on disk before its answer leaves; the write happens off the event
    # loop, so meanwhile other queries are answered.
    upstream = FakeUpstream()
    store = StalledDisk(tmp_path / "dns-learned.json")
    proxy = Proxy([Upstream("127.0.0.1", upstream.port)], timeout=2.0, store=store)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(proxy.ask, "new.test")
            assert store.writing.wait(5)
            assert not first.done()  # held back: its address is not on disk yet
            refused = DNSRecord.question("example.invalid").send("127.0.0.1", proxy.port, timeout=ANSWER_WAIT_S)
            assert DNSRecord.parse(refused).header.rcode == RCODE.REFUSED  # the loop still answers
            assert not (tmp_path / "dns-learned.json").exists()
            store.go_on.set()
            answer = first.result(5)
        assert str(answer.rr[0].rdata) == "203.0.113.10"
        assert json.loads((tmp_path / "dns-learned.json").read_text())["entries"][0]["ip"] == "203.0.113.10"
    finally:
        store.go_on.set()
        proxy.close()
        upstream.close()
