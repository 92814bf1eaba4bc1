"""DNS rebinding (issue 15): public names made to point inside, and records outside the question's
CNAME chain. The resolver is fed real upstream replies built with dnslib; what the VM would get
is parsed back from the bytes released."""

from __future__ import annotations

import ipaddress

import pytest
from dnslib import AAAA, CNAME, NS, QTYPE, RR, A, DNSRecord

from skyguard.dns import rebinding
from skyguard.dns.interfaces import PolicyDirectory
from skyguard.dns.resolver import DnsPolicyResolver
from skyguard.parts import MemoryLog
from skyguard.policy.parse import parse_policy

POLICY = """
apiVersion: skyguard/v1
kind: Policy
metadata: {name: rebind}
zones:
  apps:
    workloads:
      - {name: web1, interface: sg-web1, mac: "02:00:00:00:01:01", addresses: [10.1.0.2]}
rules:
  - {name: public, from: apps, to: {fqdns: ["**.example.test"]}, ports: [tcp/443]}
  - {name: intranet, from: apps, to: {fqdns: [wiki.corp.test, both.example.test], allow_private: true},
     ports: [tcp/443]}
  - {name: lab-net, from: apps, to: {fqdns: [lab.example.test], cidrs: [192.168.7.0/24]}, ports: [tcp/22]}
dns: {upstreams: [192.0.2.53]}
"""

VM = "10.1.0.2"


class Learner:
    def __init__(self):
        self.calls = []

    def learn(self, zone, rule_name, ips, ttl):
        self.calls.append((rule_name, sorted(str(i) for i in ips)))


def resolve(name, *records, qtype="A", host_addresses=()):
    policy = parse_policy(POLICY, source="rebind.yaml")
    learner, log = Learner(), MemoryLog()
    resolver = DnsPolicyResolver(policy, PolicyDirectory(policy), learner, log=log,
                                 host_addresses=host_addresses)
    d = resolver.decide(DNSRecord.question(name, qtype).pack(), VM, now=1.0)
    assert d.action == "forward", d.reason
    reply = DNSRecord.parse(d.upstream_query).reply()
    for section, rr in records:
        {"an": reply.add_answer, "ns": reply.add_auth, "ar": reply.add_ar}[section](rr)
    answer = resolver.answer(d, reply.pack(), now=1.0, wall=1000.0)
    return answer, DNSRecord.parse(answer.reply), learner, log


def address_rr(name, address):
    ip = ipaddress.ip_address(address)
    if ip.version == 6:
        return RR(name, QTYPE.AAAA, rdata=AAAA(list(ip.packed)), ttl=60)
    return RR(name, QTYPE.A, rdata=A(address), ttl=60)


# What a public name may not resolve to. On main only loopback, link-local, multicast, the
# unspecified and v4-mapped addresses were stripped: every "private" row here was learned.
STRIPPED = [
    ("10.0.0.5", "private"), ("172.16.9.9", "private"), ("172.31.255.1", "private"),
    ("192.168.1.1", "private"), ("100.64.0.1", "private"), ("100.127.255.254", "private"),
    ("198.18.0.9", "private"), ("fd00::1", "private"), ("fc12:3456::1", "private"),
    ("64:ff9b::10.0.0.1", "private"), ("64:ff9b::192.168.0.1", "private"),
    ("64:ff9b:1::1", "private"), ("2002:c0a8:0101::1", "private"), ("2002:0a00:0001::1", "private"),
    ("127.0.0.1", "forbidden"), ("169.254.169.254", "forbidden"), ("0.0.0.0", "forbidden"),
    ("240.0.0.1", "forbidden"), ("::1", "forbidden"), ("fe80::1", "forbidden"),
    ("::ffff:10.0.0.1", "forbidden"), ("::10.0.0.1", "forbidden"), ("ff02::1", "forbidden"),
    ("64:ff9b::127.0.0.1", "forbidden"), ("64:ff9b::169.254.169.254", "forbidden"),
    ("2002:7f00:0001::1", "forbidden"), ("2002:a9fe:a9fe::1", "forbidden"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "forbidden"),  # Teredo
]
PUBLIC = ["203.0.113.9", "192.0.2.1", "8.8.8.8", "100.63.255.255", "100.128.0.1", "172.32.0.1",
          "2001:db8:203::9", "2606:4700::1111", "64:ff9b::203.0.113.9", "2002:cb00:7109::1",
          "fe00::1"]


@pytest.mark.parametrize("address, kind", STRIPPED)
def test_classes(address, kind):
    assert rebinding.classify(ipaddress.ip_address(address)) == kind


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_not_rebinding(address):
    assert rebinding.classify(ipaddress.ip_address(address)) == ""


def test_the_host_s_own_addresses_are_forbidden_also_inside_nat64():
    host = frozenset({ipaddress.ip_address("203.0.113.1")})
    assert rebinding.classify(ipaddress.ip_address("203.0.113.1"), host) == "forbidden"
    assert rebinding.classify(ipaddress.ip_address("64:ff9b::203.0.113.1"), host) == "forbidden"


@pytest.mark.parametrize("address, kind", STRIPPED)
def test_a_public_name_answering_inside_is_stripped_and_not_learned(address, kind):
    answer, released, learner, log = resolve(
        "www.example.test", ("an", address_rr("www.example.test", address)),
        ("an", address_rr("www.example.test", "203.0.113.8")),
        qtype="ANY" if ":" in address else "A")  # ANY: an A and an AAAA may both be learned
    assert [str(rr.rdata) for rr in released.rr] == ["203.0.113.8"]
    assert learner.calls == [("public", ["203.0.113.8"])]
    assert log.entries[-1]["rebinding_stripped"] == [str(ipaddress.ip_address(address))]


def test_allow_private_lets_the_rule_s_names_resolve_privately_but_never_to_loopback():
    answer, released, learner, _ = resolve(
        "wiki.corp.test", ("an", address_rr("wiki.corp.test", "10.20.0.5")),
        ("an", address_rr("wiki.corp.test", "fd00:20::5")),
        ("an", address_rr("wiki.corp.test", "127.0.0.1")),
        ("an", address_rr("wiki.corp.test", "169.254.169.254")), qtype="ANY")
    assert sorted(answer.learned) == ["10.20.0.5", "fd00:20::5"]
    assert answer.stripped == ["127.0.0.1", "169.254.169.254"]
    assert learner.calls == [("intranet", ["10.20.0.5", "fd00:20::5"])]


def test_a_private_address_is_learned_only_under_the_rule_that_allows_it():
    # both.example.test matches `public` (**.example.test) and `intranet` (allow_private)
    answer, _, learner, _ = resolve(
        "both.example.test", ("an", address_rr("both.example.test", "10.20.0.6")),
        ("an", address_rr("both.example.test", "203.0.113.6")))
    assert sorted(answer.learned) == ["10.20.0.6", "203.0.113.6"]
    assert sorted(learner.calls) == [("intranet", ["10.20.0.6", "203.0.113.6"]),
                                     ("public", ["203.0.113.6"])]


def test_a_private_network_the_rule_names_in_cidrs_is_learned():
    answer, _, learner, _ = resolve(
        "lab.example.test", ("an", address_rr("lab.example.test", "192.168.7.9")),
        ("an", address_rr("lab.example.test", "192.168.8.9")))
    assert answer.learned == ["192.168.7.9"] and answer.stripped == ["192.168.8.9"]
    assert learner.calls == [("lab-net", ["192.168.7.9"])]


def test_records_outside_the_question_s_cname_chain_never_reach_the_vm():
    answer, released, learner, log = resolve(
        "www.example.test",
        ("an", RR("www.example.test", QTYPE.CNAME, rdata=CNAME("edge.cdn.test"), ttl=60)),
        ("an", address_rr("edge.cdn.test", "203.0.113.20")),
        ("an", address_rr("bank.test", "203.0.113.66")),  # not in the chain: poison for a cache
        ("an", RR("other.test", QTYPE.CNAME, rdata=CNAME("www.example.test"), ttl=60)),
        ("ns", RR("cdn.test", QTYPE.NS, rdata=NS("ns1.cdn.test"), ttl=60)),
        ("ns", address_rr("ns1.cdn.test", "203.0.113.53")),
        ("ar", address_rr("ns1.cdn.test", "203.0.113.54")),
        ("ar", address_rr("mail.test", "2001:db8::25")))
    assert [(str(rr.rname), str(rr.rdata)) for rr in released.rr] == [
        ("www.example.test.", "edge.cdn.test."), ("edge.cdn.test.", "203.0.113.20")]
    assert [QTYPE[rr.rtype] for rr in released.auth] == ["NS"]  # NS kept, its glue gone
    assert released.ar == [] or all(rr.rtype == QTYPE.OPT for rr in released.ar)
    assert learner.calls == [("public", ["203.0.113.20"])]
    assert log.entries[-1]["unrelated_stripped"] == 5
