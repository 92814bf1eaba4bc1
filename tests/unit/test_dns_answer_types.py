"""Which addresses of an upstream answer the proxy learns: only those of the type the VM asked
for (A for an A question, AAAA for AAAA, both for ANY), only for names in the question's CNAME
chain, and nothing for any other question type. The proxy runs on loopback with a real dnslib
client asking it; the upstream is a small UDP server that answers every question with the same
hostile mix of records, built with dnslib."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import struct
import threading

import pytest
from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, TXT, A, DNSRecord
from dnslib.dns import RD

from skyguard.dns.server import Upstream
from skyguard.policy.model import Destination, Rule
from support.client_waits import ANSWER_WAIT_S
from tests.unit.test_dns_server import Proxy, policy

V4_NAME, V4_CHAIN, V4_OTHER = "203.0.113.51", "203.0.113.50", "203.0.113.99"
V6_NAME, V6_CHAIN, V6_OTHER = "2001:db8::51", "2001:db8::50", "2001:db8::99"


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    for var in ("SKYGUARD_PIN_DIR", "SKYGUARD_STATE_DIR", "SKYGUARD_RUN_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))


class EveryTypeUpstream:
    """Whatever is asked, answers the asked type plus A and AAAA records for the name, for a
    CNAME target of it, and for a name outside the chain."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.queries = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _reply(self, data: bytes) -> bytes:
        q = DNSRecord.parse(data)
        name = q.q.qname
        r = q.reply()
        if q.q.qtype == QTYPE.TXT:
            r.add_answer(RR(name, QTYPE.TXT, rdata=TXT("v=spf1 -all"), ttl=60))
        if q.q.qtype == QTYPE.MX:
            r.add_answer(RR(name, QTYPE.MX, rdata=MX("mail.site.test"), ttl=60))
        r.add_answer(RR(name, QTYPE.CNAME, rdata=CNAME("cdn.site.test"), ttl=60))
        r.add_answer(RR(name, QTYPE.A, rdata=A(V4_NAME), ttl=60))
        r.add_answer(RR(name, QTYPE.AAAA, rdata=AAAA(V6_NAME), ttl=60))
        r.add_answer(RR("cdn.site.test", QTYPE.A, rdata=A(V4_CHAIN), ttl=60))
        r.add_answer(RR("cdn.site.test", QTYPE.AAAA, rdata=AAAA(V6_CHAIN), ttl=60))
        r.add_answer(RR("bank.site.test", QTYPE.A, rdata=A(V4_OTHER), ttl=60))
        r.add_answer(RR("bank.site.test", QTYPE.AAAA, rdata=AAAA(V6_OTHER), ttl=60))
        return r.pack()

    def _run(self):
        while True:
            try:
                data, addr = self.sock.recvfrom(4096)
            except OSError:
                return
            self.queries += 1
            self.sock.sendto(self._reply(data), addr)

    def close(self):
        self.sock.close()


@pytest.fixture
def proxy():
    upstream = EveryTypeUpstream()
    running = Proxy([Upstream("127.0.0.1", upstream.port)], timeout=2.0)
    yield running
    running.close()
    upstream.close()


def ask(proxy, name: str, qtype: str) -> DNSRecord:
    return DNSRecord.parse(DNSRecord.question(name, qtype).send("127.0.0.1", proxy.port, timeout=ANSWER_WAIT_S))


def learned(proxy) -> set[str]:
    return {ip for _, _, ips in proxy.learner.calls for ip in ips}


def released(reply: DNSRecord) -> set[str]:
    return {str(ipaddress.ip_address(str(rr.rdata))) for rr in reply.rr + reply.ar
            if rr.rtype in (QTYPE.A, QTYPE.AAAA)}


# qtype asked -> the addresses it may open (and the VM may see)
CASES = {
    "A": {V4_NAME, V4_CHAIN},
    "AAAA": {V6_NAME, V6_CHAIN},
    "ANY": {V4_NAME, V4_CHAIN, V6_NAME, V6_CHAIN},  # every type asked: what A + AAAA would give
    "TXT": set(),
    "MX": set(),
    "CNAME": set(),
}


@pytest.mark.parametrize("qtype", CASES)
def test_only_addresses_of_the_type_asked_in_the_cname_chain_are_learned(proxy, qtype):
    # On main a TXT or MX question answered with A/AAAA records opened those addresses, and an
    # A question opened the AAAA records of its answer.
    reply = ask(proxy, "www.site.test", qtype)
    assert reply.header.rcode == RCODE.NOERROR
    assert learned(proxy) == CASES[qtype]
    # never release an address the datapath does not hold
    assert released(reply) == CASES[qtype]
    if qtype == "TXT":
        assert [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.TXT] == ['"v=spf1 -all"']
    entry = proxy.log.entries[-1]
    assert sorted(entry.get("ips", [])) == sorted(CASES[qtype])


def test_a_cname_chain_through_a_name_a_deny_rule_names_is_refused_and_learns_nothing():
    # A deny rule naming a name beats any allow: on main an allowed name whose CNAME led to a
    # denied one (a name under an allowed wildcard pointed at it by whoever controls it) opened
    # and released the denied name's addresses under the allow rule.
    upstream = EveryTypeUpstream()
    allowing = policy()
    deny = Rule("no-cdn", "deny", ("lo",), Destination(fqdns=("cdn.site.test",)), ())
    running = Proxy([Upstream("127.0.0.1", upstream.port)], timeout=2.0,
                    the_policy=dataclasses.replace(allowing, rules=(deny, *allowing.rules)))
    try:
        assert ask(running, "cdn.site.test", "A").header.rcode == RCODE.REFUSED
        reply = ask(running, "www.site.test", "A")
        assert reply.header.rcode == RCODE.REFUSED and not reply.rr
        assert learned(running) == set()
        entry = running.log.entries[-1]
        assert entry["verdict"] == "denied" and "cdn.site.test" in entry["reason"]
        assert "no-cdn" in entry["reason"]
        assert ask(running, "www.site.test", "TXT").header.rcode == RCODE.REFUSED
    finally:
        running.close()
        upstream.close()


class BulkyUpstream(EveryTypeUpstream):
    """A tunnel's server: 500 octets of payload in whatever record type the question asks."""

    def _reply(self, data: bytes) -> bytes:
        q = DNSRecord.parse(data)
        r = q.reply()
        payload = RD(b"\x01" * 500)
        if q.q.qtype == QTYPE.TXT:
            payload = TXT(["A" * 250, "B" * 248])
        elif q.q.qtype == QTYPE.HTTPS:  # priority 1, target ".", one SvcParam of key 65000
            payload = RD(b"\x00\x01\x00" + struct.pack("!HH", 65000, 495) + b"x" * 495)
        r.add_answer(RR(q.q.qname, q.q.qtype, rdata=payload, ttl=0))
        return r.pack()


@pytest.mark.parametrize("qtype", ["TXT", "NULL", "HTTPS"])
def test_a_stream_of_bulky_answers_under_one_base_is_detected_whatever_the_record_type(qtype):
    # Command and control into a VM: the same short name asked again and again (it costs the
    # name budget nothing), the payload in the answers. On main only TXT and NULL answers were
    # measured: iodine's PRIVATE type (65399) or an HTTPS record's parameters carried the same bytes unseen.
    upstream = BulkyUpstream()
    running = Proxy([Upstream("127.0.0.1", upstream.port)], timeout=2.0)
    try:
        question = DNSRecord.question("c2.site.test", "TXT")
        question.q.qtype = QTYPE.reverse.get(qtype) or int(qtype[4:])
        rcodes = [DNSRecord.parse(question.send("127.0.0.1", running.port, tcp=True, timeout=ANSWER_WAIT_S))
                  .header.rcode for _ in range(12)]
        assert rcodes[0] == RCODE.NOERROR or qtype == "NULL"  # NULL is a signal on its own
        assert rcodes[-1] == RCODE.REFUSED
        assert running.log.entries[-1]["verdict"] == "tunnel"
    finally:
        running.close()
        upstream.close()


@pytest.mark.parametrize("qtype", [65399, 65280, 3, 60000, 249])
def test_a_query_type_real_software_does_not_ask_is_refused_before_the_upstream(qtype):
    # The type a VM picks reaches the upstream: with every one of 65,536 forwarded, a name asked
    # once carried 16 bits per query past the name budget (the answer cache keys on the type,
    # so each type was a miss). iodine's PRIVATE type (65399) was served.
    upstream = BulkyUpstream()
    running = Proxy([Upstream("127.0.0.1", upstream.port)], timeout=2.0)
    try:
        question = DNSRecord.question("c2.site.test", "A")
        question.q.qtype = qtype
        reply = DNSRecord.parse(question.send("127.0.0.1", running.port, timeout=ANSWER_WAIT_S))
        assert reply.header.rcode == RCODE.REFUSED
        assert running.log.entries[-1]["verdict"] == "refused"
        assert "is not served" in running.log.entries[-1]["reason"]
        assert upstream.queries == 0
    finally:
        running.close()
        upstream.close()
