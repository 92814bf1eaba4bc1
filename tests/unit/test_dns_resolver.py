"""The DNS policy engine, without sockets: dnslib-built queries in, a fake upstream built with
dnslib answering the forwarded bytes, a recording learner and log."""

from __future__ import annotations

import ipaddress
import json
import struct

import pytest
from dnslib import AAAA, CNAME, QTYPE, RCODE, RR, TXT, A, DNSRecord

from skyguard.dns.interfaces import PolicyDirectory
from skyguard.dns.learned import MAX_IPS_PER_NAME, LearnedStore
from skyguard.dns.resolver import DnsPolicyResolver, fit_udp
from skyguard.errors import DnsError, LogError
from skyguard.parts import MemoryLog
from skyguard.policy.model import Destination, DnsConfig, Policy, PortRange, Rule, TunnelDetection, Workload, Zone

VM_IP = "10.10.1.2"
OTHER_VM_IP = "10.10.2.2"


def make_policy(refuse_with="refused", tunnel="block", min_ttl=5, max_ttl=3600) -> Policy:
    radius = Workload("radius1", "auth", "sg-radius1", "02:00:00:00:01:01",
                      (ipaddress.ip_address(VM_IP),))
    sandbox = Workload("box1", "sandbox", "sg-box1", "02:00:00:00:02:01",
                       (ipaddress.ip_address(OTHER_VM_IP),))
    rules = (
        Rule("os-updates", "allow", ("auth",),
             Destination(fqdns=("deb.debian.test", "*.debian.test")), (PortRange("tcp", 443, 443),)),
        Rule("cdn", "allow", ("auth",), Destination(fqdns=("**.cdn.test",)),
             (PortRange("tcp", 80, 80),)),
        Rule("no-evil-cdn", "deny", ("auth",), Destination(fqdns=("evil.cdn.test",)), ()),
        Rule("local-svc", "allow", ("auth",),
             Destination(fqdns=("local.svc.test",), cidrs=(ipaddress.ip_network("127.0.0.0/8"),)),
             (PortRange("tcp", 8080, 8080),)),
        Rule("box-pkgs", "allow", ("sandbox",), Destination(fqdns=("pypi.sandbox.test",)),
             (PortRange("tcp", 443, 443),)),
        Rule("never-corp", "deny", ("auth",),
             Destination(cidrs=(ipaddress.ip_network("10.0.0.0/8"),)), ()),
        Rule("internet", "allow", ("auth",),
             Destination(cidrs=(ipaddress.ip_network("0.0.0.0/0"),)), (PortRange("tcp", 22, 22),)),
    )
    dns = DnsConfig(("192.0.2.53",), refuse_with, min_ttl, max_ttl, TunnelDetection(tunnel))
    zones = {"auth": Zone("auth", (radius,)), "sandbox": Zone("sandbox", (sandbox,))}
    return Policy("t", zones, {}, rules, dns)


class RecordingLearner:
    def __init__(self, fail=False):
        self.calls = []
        self.fail = fail

    def learn(self, zone, rule_name, ips, ttl):
        if self.fail:
            raise RuntimeError("map full")
        self.calls.append((zone, rule_name, sorted(str(i) for i in ips), ttl))


def make_resolver(policy=None, learner=None, store=None, host_addresses=()):
    policy = policy or make_policy()
    learner = learner if learner is not None else RecordingLearner()
    log = MemoryLog()
    resolver = DnsPolicyResolver(policy, PolicyDirectory(policy), learner, log=log, store=store,
                                 host_addresses=host_addresses)
    return resolver, learner, log


def upstream_reply(upstream_query: bytes, records=(), rcode=RCODE.NOERROR, tc=False) -> bytes:
    """What an honest upstream would answer to the bytes the proxy forwarded."""
    q = DNSRecord.parse(upstream_query)
    reply = q.reply()
    reply.header.rcode = rcode
    if tc:
        reply.header.tc = 1
    for rr in records:
        reply.add_answer(rr)
    return reply.pack()


def ask(resolver, name, qtype="A", client=VM_IP, now=100.0):
    return resolver.decide(DNSRecord.question(name, qtype).pack(), client, now=now)


def test_allowed_name_is_forwarded_then_learned_before_release_with_clamped_ttl():
    resolver, learner, log = make_resolver(make_policy(min_ttl=30, max_ttl=600))
    query = DNSRecord.question("deb.debian.test", "A")
    d = resolver.decide(query.pack(), VM_IP, now=1.0)
    assert d.action == "forward" and d.zone == "auth" and d.workload == "radius1"
    # random upstream ID, same question
    assert DNSRecord.parse(d.upstream_query).q.qname == "deb.debian.test"
    up = upstream_reply(d.upstream_query, [RR("deb.debian.test", QTYPE.A, rdata=A("203.0.113.7"),
                                              ttl=5)])
    answer = resolver.answer(d, up, now=1.001, wall=1000.0)
    released = DNSRecord.parse(answer.reply)
    assert released.header.id == query.header.id
    assert [str(rr.rdata) for rr in released.rr] == ["203.0.113.7"]
    assert released.rr[0].ttl == 30  # clamped up to min_ttl
    assert learner.calls == [("auth", "os-updates", ["203.0.113.7"], 32)]  # + grace
    assert log.entries[-1]["verdict"] == "allowed" and log.entries[-1]["ips"] == ["203.0.113.7"]


def test_max_ttl_clamps_down():
    resolver, learner, _ = make_resolver(make_policy(max_ttl=60))
    d = ask(resolver, "deb.debian.test")
    up = upstream_reply(d.upstream_query, [RR("deb.debian.test", QTYPE.A, rdata=A("203.0.113.7"),
                                              ttl=86400)])
    assert DNSRecord.parse(resolver.answer(d, up).reply).rr[0].ttl == 60


@pytest.mark.parametrize("name,verdict,rule", [
    ("deb.debian.test", "allowed", "os-updates"),
    ("DEB.Debian.TEST.", "allowed", "os-updates"),
    ("security.debian.test", "allowed", "os-updates"),   # *. is one label
    ("a.b.debian.test", "refused", None),                # ... not two
    ("debian.test", "refused", None),
    ("x.cdn.test", "allowed", "cdn"),                    # **. is one or more labels
    ("x.y.z.cdn.test", "allowed", "cdn"),
    ("cdn.test", "refused", None),
    ("evil.cdn.test", "denied", None),                   # deny beats allow whatever the order
    ("pypi.sandbox.test", "refused", None),              # another zone's rule
    ("deb.debian.test.evil.test", "refused", None),
])
def test_wildcards_deny_and_zones(name, verdict, rule):
    resolver, _, log = make_resolver()
    d = ask(resolver, name)
    assert d.verdict == verdict
    if verdict == "allowed":
        assert d.rules[0].name == rule
    else:
        reply = DNSRecord.parse(d.reply)
        assert reply.header.rcode == RCODE.REFUSED
        assert log.entries[-1]["verdict"] == verdict and log.entries[-1]["zone"] == "auth"


def test_refuse_with_nxdomain():
    resolver, _, _ = make_resolver(make_policy(refuse_with="nxdomain"))
    assert DNSRecord.parse(ask(resolver, "other.test").reply).header.rcode == RCODE.NXDOMAIN


def test_unknown_client_is_refused_and_logged():
    resolver, _, log = make_resolver()
    d = ask(resolver, "deb.debian.test", client="10.99.99.99")
    assert d.verdict == "unknown-client"
    assert DNSRecord.parse(d.reply).header.rcode == RCODE.REFUSED


def test_cname_chain_inside_answer_is_followed_and_only_chain_addresses_learned():
    resolver, learner, _ = make_resolver()
    d = ask(resolver, "www.cdn.test", "ANY")  # ANY: both the A and the AAAA may be learned
    up = upstream_reply(d.upstream_query, [
        RR("www.cdn.test", QTYPE.CNAME, rdata=CNAME("edge.provider.test"), ttl=300),
        RR("edge.provider.test", QTYPE.CNAME, rdata=CNAME("e1.provider.test"), ttl=300),
        RR("e1.provider.test", QTYPE.A, rdata=A("203.0.113.20"), ttl=300),
        RR("e1.provider.test", QTYPE.AAAA, rdata=AAAA("2001:db8:203::20"), ttl=300),
        RR("unrelated.test", QTYPE.A, rdata=A("203.0.113.99"), ttl=300),
    ])
    answer = resolver.answer(d, up)
    assert sorted(answer.learned) == ["2001:db8:203::20", "203.0.113.20"]
    assert learner.calls[0][2] == ["2001:db8:203::20", "203.0.113.20"]


@pytest.mark.parametrize("address", ["127.0.0.1", "169.254.169.254", "169.254.1.1", "0.0.0.0",
                                     "::1", "fe80::1", "::ffff:127.0.0.1", "224.0.0.1",
                                     "198.18.0.1"])
def test_rebinding_records_are_stripped_not_learned(address):
    resolver, learner, log = make_resolver(host_addresses=["198.18.0.1"])
    d = ask(resolver, "deb.debian.test", "ANY")  # ANY: an A and an AAAA may both be learned
    packed = ipaddress.ip_address(address).packed
    rtype, rdata = (QTYPE.AAAA, AAAA(list(packed))) if len(packed) == 16 else (QTYPE.A, A(address))
    up = upstream_reply(d.upstream_query, [
        RR("deb.debian.test", rtype, rdata=rdata, ttl=60),
        RR("deb.debian.test", QTYPE.A, rdata=A("203.0.113.8"), ttl=60)])
    answer = resolver.answer(d, up)
    released = DNSRecord.parse(answer.reply)
    assert [str(rr.rdata) for rr in released.rr] == ["203.0.113.8"]
    assert learner.calls[0][2] == ["203.0.113.8"]
    assert log.entries[-1]["rebinding_stripped"] == [str(ipaddress.ip_address(address))]


def test_rebinding_target_named_by_a_rule_cidr_is_learned():
    resolver, learner, _ = make_resolver()
    d = ask(resolver, "local.svc.test")
    up = upstream_reply(d.upstream_query, [RR("local.svc.test", QTYPE.A, rdata=A("127.0.0.5"))])
    assert resolver.answer(d, up).learned == ["127.0.0.5"]


def test_learner_failure_withholds_the_answer():
    resolver, _, log = make_resolver(learner=RecordingLearner(fail=True))
    d = ask(resolver, "deb.debian.test")
    up = upstream_reply(d.upstream_query, [RR("deb.debian.test", QTYPE.A, rdata=A("203.0.113.7"))])
    released = DNSRecord.parse(resolver.answer(d, up).reply)
    assert released.header.rcode == RCODE.SERVFAIL and not released.rr
    # the decision went on record before the datapath was asked; its failure follows it
    assert [e["verdict"] for e in log.entries] == ["allowed", "servfail"]


class RefusingLog:
    """The signed log below its reserve: every entry refused."""

    def record(self, kind, /, **fields):
        raise LogError("the log's filesystem is at its reserve")


def test_an_answer_the_log_refuses_learns_nothing_and_is_withheld(tmp_path):
    store = LearnedStore(tmp_path / "dns-learned.json")
    resolver, learner, _ = make_resolver(store=store)
    d = ask(resolver, "deb.debian.test")
    resolver.log = RefusingLog()
    up = upstream_reply(d.upstream_query, [RR("deb.debian.test", QTYPE.A, rdata=A("203.0.113.7"))])
    answer = resolver.answer(d, up)
    released = DNSRecord.parse(answer.reply)
    assert released.header.rcode == RCODE.SERVFAIL and not released.rr and not answer.persist
    assert learner.calls == [] and not store.answered("deb.debian.test", "203.0.113.7", 0.0)


def test_addresses_per_name_are_capped_and_extra_records_not_released():
    resolver, learner, _ = make_resolver()
    d = ask(resolver, "deb.debian.test")
    rrs = [RR("deb.debian.test", QTYPE.A, rdata=A(f"203.0.113.{i}")) for i in range(1, 41)]
    answer = resolver.answer(d, upstream_reply(d.upstream_query, rrs))
    assert len(answer.learned) == MAX_IPS_PER_NAME
    released = {str(rr.rdata) for rr in DNSRecord.parse(answer.reply).rr}
    assert released == set(answer.learned)


def test_replies_that_do_not_match_are_discarded():
    resolver, learner, _ = make_resolver()
    d = ask(resolver, "deb.debian.test")
    good = upstream_reply(d.upstream_query, [RR("deb.debian.test", QTYPE.A, rdata=A("203.0.113.7"))])
    wrong_id = struct.pack("!H", (d.upstream_id + 1) % 65536) + good[2:]
    assert resolver.answer(d, wrong_id) is None
    other_q = DNSRecord.question("evil.test", "A")
    other_q.header.id = d.upstream_id
    forged = other_q.reply()
    forged.add_answer(RR("evil.test", QTYPE.A, rdata=A("203.0.113.66")))
    assert resolver.answer(d, forged.pack()) is None
    assert resolver.answer(d, d.upstream_query) is None  # a query is not a reply
    assert resolver.answer(d, b"\x00") is None
    assert learner.calls == []
    assert resolver.answer(d, good).learned == ["203.0.113.7"]


def test_truncated_upstream_asks_for_tcp_and_big_answers_are_truncated_for_udp_clients():
    resolver, _, _ = make_resolver()
    d = ask(resolver, "deb.debian.test", qtype="TXT")
    assert resolver.answer(d, upstream_reply(d.upstream_query, tc=True)).truncated
    big = upstream_reply(d.upstream_query, [RR("deb.debian.test", QTYPE.TXT,
                                                rdata=TXT(["x" * 200] * 4))])
    answer = resolver.answer(d, big)
    small = DNSRecord.parse(fit_udp(d, answer.reply))
    assert small.header.tc == 1 and not small.rr


def test_upstream_nxdomain_passes_through():
    resolver, learner, _ = make_resolver()
    d = ask(resolver, "gone.debian.test")
    answer = resolver.answer(d, upstream_reply(d.upstream_query, rcode=RCODE.NXDOMAIN))
    assert DNSRecord.parse(answer.reply).header.rcode == RCODE.NXDOMAIN and learner.calls == []


def test_fail_gives_servfail_and_counts():
    resolver, _, log = make_resolver()
    d = ask(resolver, "deb.debian.test")
    reply = DNSRecord.parse(resolver.fail(d, "timeout", "no upstream answered"))
    assert reply.header.rcode == RCODE.SERVFAIL and reply.header.id == d.client_id
    assert resolver.metrics.upstream_errors.labels("timeout")._value.get() == 1


def test_learned_state_persists_and_is_relearned(tmp_path):
    store = LearnedStore(tmp_path / "dns-learned.json")
    resolver, _, _ = make_resolver(store=store)
    d = ask(resolver, "deb.debian.test")
    up = upstream_reply(d.upstream_query, [RR("deb.debian.test", QTYPE.A, rdata=A("203.0.113.7"),
                                              ttl=300)])
    answer = resolver.answer(d, up, wall=1000.0)
    assert answer.persist  # a new address: the server writes the state before it releases this
    store.save(1000.0)
    assert json.loads((tmp_path / "dns-learned.json").read_text())["entries"][0]["ip"] == "203.0.113.7"
    d = ask(resolver, "deb.debian.test")
    again = upstream_reply(d.upstream_query, [RR("deb.debian.test", QTYPE.A, rdata=A("203.0.113.7"), ttl=300)])
    assert not resolver.answer(d, again, wall=1010.0).persist  # a refresh is saved lazily

    restarted = LearnedStore(tmp_path / "dns-learned.json")
    restarted.load()
    learner = RecordingLearner()
    assert restarted.relearn(learner, now=1100.0).relearned == 1
    assert learner.calls == [("auth", "os-updates", ["203.0.113.7"], 202)]
    assert restarted.relearn(RecordingLearner(), now=5000.0).relearned == 0  # expired


def test_corrupt_learned_state_is_an_error_that_says_what_to_do(tmp_path):
    path = tmp_path / "dns-learned.json"
    path.write_text("{not json")
    with pytest.raises(DnsError, match="move it aside"):
        LearnedStore(path).load()


def test_upstream_query_carries_no_client_extras():
    resolver, _, _ = make_resolver()
    q = DNSRecord.question("deb.debian.test", "A")
    q.add_ar(RR("x.test", QTYPE.TXT, rdata=TXT("smuggled")))
    d = resolver.decide(q.pack(), VM_IP)
    assert d.action == "forward" and b"smuggled" not in d.upstream_query


def test_addresses_a_deny_rule_names_are_not_learned():
    resolver, learner, log = make_resolver()
    d = ask(resolver, "deb.debian.test")
    up = upstream_reply(d.upstream_query, [
        RR("deb.debian.test", QTYPE.A, rdata=A("10.1.2.3")),
        RR("deb.debian.test", QTYPE.A, rdata=A("203.0.113.7"))])
    answer = resolver.answer(d, up)
    assert answer.learned == ["203.0.113.7"] and answer.denied == ["10.1.2.3"]
    assert [str(rr.rdata) for rr in DNSRecord.parse(answer.reply).rr] == ["203.0.113.7"]
    assert log.entries[-1]["denied_stripped"] == ["10.1.2.3"]


def test_answered_says_which_address_was_given_for_which_name_until_it_expires(tmp_path):
    # The credential proxy's check that the address a VM connected to came from DNS for the name.
    store = LearnedStore(None)
    store.add("sdn", "github", "api.github.test", ["203.0.113.5"], expiry=1000.0)
    store.add("auth", "os-updates", "deb.debian.test", ["203.0.113.7"], expiry=2000.0)
    assert store.answered("api.github.test", "203.0.113.5", now=999.0)
    assert not store.answered("api.github.test", "203.0.113.7", now=999.0)  # another name's address
    assert not store.answered("evil.test", "203.0.113.5", now=999.0)
    assert not store.answered("api.github.test", "203.0.113.5", now=1000.0)  # expired
    store.prune(now=1500.0)
    assert not store.answered("api.github.test", "203.0.113.5", now=0.0)  # pruned, index too
    assert store.answered("deb.debian.test", "203.0.113.7", now=1500.0)


@pytest.mark.parametrize("edit", ["name-gone", "name-denied", "workload-moved"])
def test_an_answer_arriving_after_a_hot_swap_is_decided_under_the_new_policy(edit):
    # A VM keeps queries for a name in flight while the operator takes the name away: on main
    # the answers that came back after the swap were learned under the old decision, reopening
    # in the datapath (for up to max_ttl) the address the swap had just closed.
    import dataclasses

    resolver, learner, log = make_resolver()
    d = ask(resolver, "mirror.debian.test")
    assert d.action == "forward"
    old = make_policy()
    if edit == "name-gone":
        rules = tuple(dataclasses.replace(r, to=Destination(fqdns=("deb.debian.test",)))
                      if r.name == "os-updates" else r for r in old.rules)
    elif edit == "name-denied":
        rules = old.rules + (Rule("no-mirror", "deny", ("auth",),
                                  Destination(fqdns=("mirror.debian.test",)), ()),)
    else:
        rules = old.rules
    zones = old.zones
    if edit == "workload-moved":  # radius1 now sits in the sandbox zone, which has no such rule
        radius = dataclasses.replace(old.zones["auth"].workloads[0], zone="sandbox")
        zones = {"auth": Zone("auth", ()),
                 "sandbox": Zone("sandbox", old.zones["sandbox"].workloads + (radius,))}
    new = dataclasses.replace(old, rules=rules, zones=zones)
    resolver.set_policy(new)
    resolver.directory = PolicyDirectory(new)  # as DnsProxy.set_policy does
    up = upstream_reply(d.upstream_query, [RR("mirror.debian.test", QTYPE.A,
                                              rdata=A("203.0.113.44"), ttl=600)])
    answer = resolver.answer(d, up)
    assert learner.calls == [] and answer.learned == []
    released = DNSRecord.parse(answer.reply)
    assert released.header.rcode == RCODE.REFUSED and not released.rr
    assert log.entries[-1]["verdict"] in ("refused", "denied")
    # what the new policy still allows, in flight across the swap, is learned as before
    d = ask(resolver, "deb.debian.test") if edit != "workload-moved" else None
    if d is not None:
        resolver.set_policy(new)
        up = upstream_reply(d.upstream_query, [RR("deb.debian.test", QTYPE.A,
                                                  rdata=A("203.0.113.45"), ttl=600)])
        assert resolver.answer(d, up).learned == ["203.0.113.45"]


def test_the_upstream_asks_in_a_random_letter_case_and_the_vm_gets_its_own_back():
    # DNS 0x20: the case upstream is the proxy's random choice, whatever the VM sent (a VM
    # colluding with a spoofer must not choose it), and the answer carries the VM's own case.
    resolver, _, _ = make_resolver()
    cases = set()
    for _ in range(16):
        resolver.cache.clear()  # each query goes upstream (a repeat would be answered cached)
        d = ask(resolver, "Deb.Debian.Test")
        asked = d.upstream_query[12:d.question.end]
        assert asked.lower() == DNSRecord.question("deb.debian.test").pack()[12:]
        cases.add(asked)
        answer = resolver.answer(d, upstream_reply(d.upstream_query, [
            RR("deb.debian.test", QTYPE.A, rdata=A("203.0.113.7"))]))
        assert answer.reply[12:d.question.end] == \
            DNSRecord.question("Deb.Debian.Test").pack()[12:]
    assert len(cases) >= 15  # 13 letters: a repeat in 16 draws has a chance of ~1.5 %
