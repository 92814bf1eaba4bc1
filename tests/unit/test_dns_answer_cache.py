"""The per-VM answer cache through the policy engine, without sockets (simulated time): a
repeated question within its TTL never reaches the upstream, yet each hit is decided, learned
and logged again under the policy in force."""

from __future__ import annotations

import dataclasses
import tracemalloc

from dnslib import CNAME, QTYPE, RCODE, RR, TXT, A, DNSRecord

from skyguard.dns import answercache, wire
from skyguard.dns.answercache import AnswerCache
from skyguard.dns.tunnel import TunnelDetector
from tests.unit.test_dns_resolver import OTHER_VM_IP, VM_IP, make_policy, make_resolver, upstream_reply


def ask(resolver, name, now, qtype="A", client=VM_IP):
    return resolver.decide(DNSRecord.question(name, qtype).pack(), client, now=now)


def resolve(resolver, name, now, ttl=0, client=VM_IP, ip="203.0.113.7", qtype="A"):
    """(decision, released reply) for one query; the upstream (if asked) answers with ttl."""
    d = ask(resolver, name, now, qtype=qtype, client=client)
    assert d.action == "forward", d.reason
    if d.cached:
        data = d.cached
    else:
        rdata = A(ip) if qtype == "A" else TXT("x")
        data = upstream_reply(d.upstream_query, [RR(name, getattr(QTYPE, qtype), rdata=rdata, ttl=ttl)])
    answer = resolver.answer(d, data, now=now, wall=1000.0 + now)
    return d, DNSRecord.parse(answer.reply)


def test_a_repeat_within_the_floored_ttl_is_answered_cached_relearned_and_aged():
    resolver, learner, log = make_resolver(make_policy(min_ttl=5))
    d, reply = resolve(resolver, "deb.debian.test", now=100.0, ttl=0)  # TTL 0: the floor, 5 s
    assert not d.cached and reply.rr[0].ttl == 5
    d, reply = resolve(resolver, "DEB.debian.test", now=102.5)  # any letter case
    assert d.cached and str(reply.q.qname) == "DEB.debian.test."
    assert reply.rr[0].ttl == 5  # aged to 3, released clamped to min_ttl as any answer
    # learned again, for as long as the released TTL says (+ grace): never an address the
    # datapath no longer holds
    assert learner.calls[-1] == ("auth", "os-updates", ["203.0.113.7"], 7)
    assert len(learner.calls) == 2 and log.entries[-1]["verdict"] == "allowed"
    assert not ask(resolver, "deb.debian.test", now=105.0).cached  # expired: upstream again
    registry = resolver.metrics.registry
    assert (registry.get_sample_value("skyguard_dns_cache_hits_total"),
            registry.get_sample_value("skyguard_dns_cache_misses_total")) == (1, 2)


def test_the_upstream_ttl_is_kept_aged_and_capped_at_max_ttl():
    resolver, _, _ = make_resolver(make_policy(min_ttl=5, max_ttl=600))
    resolve(resolver, "deb.debian.test", now=0.0, ttl=300)
    d, reply = resolve(resolver, "deb.debian.test", now=40.0)
    assert d.cached and reply.rr[0].ttl == 260
    assert not ask(resolver, "deb.debian.test", now=300.0).cached
    resolve(resolver, "www.debian.test", now=0.0, ttl=86400)  # lives max_ttl here, as released
    assert ask(resolver, "www.debian.test", now=599.0).cached
    assert not ask(resolver, "www.debian.test", now=600.0).cached


def test_a_policy_swap_applies_to_cached_names_at_once():
    resolver, learner, log = make_resolver()
    resolve(resolver, "a.cdn.test", now=0.0, ttl=300)
    policy = make_policy()
    without_cdn = dataclasses.replace(policy, rules=tuple(r for r in policy.rules if r.name != "cdn"))
    resolver.set_policy(policy)
    assert not ask(resolver, "a.cdn.test", now=1.0).cached  # a swap empties the cache
    resolve(resolver, "a.cdn.test", now=1.0, ttl=300)
    # and were an entry to outlive a swap, its hit is decided under the policy in force
    resolver.cache.clear = lambda: None
    resolver.set_policy(without_cdn)
    d = ask(resolver, "a.cdn.test", now=2.0)
    assert d.action == "reply" and d.verdict == "refused" and not d.cached
    assert DNSRecord.parse(d.reply).header.rcode == RCODE.REFUSED
    assert log.entries[-1]["verdict"] == "refused" and len(learner.calls) == 2


def test_a_cached_answer_whose_chain_a_deny_rule_names_is_refused_on_every_hit():
    resolver, learner, log = make_resolver()
    for now in (0.0, 1.0):
        d = ask(resolver, "img.cdn.test", now)
        assert bool(d.cached) == (now == 1.0)
        data = d.cached or upstream_reply(d.upstream_query, [
            RR("img.cdn.test", QTYPE.CNAME, rdata=CNAME("evil.cdn.test"), ttl=300),
            RR("evil.cdn.test", QTYPE.A, rdata=A("203.0.113.66"), ttl=300)])
        reply = DNSRecord.parse(resolver.answer(d, data, now=now).reply)
        assert reply.header.rcode == RCODE.REFUSED and not reply.rr
        assert log.entries[-1]["verdict"] == "denied"
    assert learner.calls == []


def test_each_vm_has_its_own_entries_and_a_bounded_lru_share(monkeypatch):
    monkeypatch.setattr(answercache, "MAX_ENTRIES_PER_VM", 4)
    resolver, _, _ = make_resolver()
    resolve(resolver, "pypi.sandbox.test", now=0.0, ttl=300, client=OTHER_VM_IP)
    for i in range(6):
        resolve(resolver, f"n{i}.cdn.test", now=float(i), ttl=300)
    assert ask(resolver, "pypi.sandbox.test", now=7.0, client=OTHER_VM_IP).cached  # untouched
    assert [bool(ask(resolver, f"n{i}.cdn.test", now=8.0).cached) for i in range(6)] == \
        [False, False, True, True, True, True]  # the oldest left first
    assert len(resolver.cache) == 5


def test_negative_and_txt_answers_are_cached_too():
    resolver, _, _ = make_resolver()
    d = ask(resolver, "gone.cdn.test", now=0.0)
    resolver.answer(d, upstream_reply(d.upstream_query, rcode=RCODE.NXDOMAIN), now=0.0)
    hit = ask(resolver, "gone.cdn.test", now=1.0)
    assert hit.cached
    assert DNSRecord.parse(resolver.answer(hit, hit.cached, now=1.0).reply).header.rcode == RCODE.NXDOMAIN
    resolve(resolver, "t.cdn.test", now=0.0, qtype="TXT", ttl=60)
    assert ask(resolver, "t.cdn.test", now=1.0, qtype="TXT").cached


def test_the_repeated_name_channel_reaches_the_upstream_once_per_name_per_ttl():
    # The review's scenario: 16 one-letter names under one wildcard base the VM resolved
    # already, picked at random at 100 queries/s, upstream answering with TTL 0. Before: every
    # query went upstream (60,000 in 10 minutes, 4 bits each). Now: at most 16 per min_ttl.
    resolver, _, _ = make_resolver(make_policy(min_ttl=5))
    resolver.detector = TunnelDetector()
    upstream = 0
    for i in range(60 * 100):  # one minute of it
        now = i / 100
        name = f"{'abcdefghijklmnop'[(i * 7919) % 16]}.cdn.test"
        d = ask(resolver, name, now)
        if d.action == "forward" and not d.cached:
            upstream += 1
            resolver.answer(d, upstream_reply(d.upstream_query, [
                RR(name, QTYPE.A, rdata=A("203.0.113.7"), ttl=0)]), now=now)
    assert upstream <= 16 * (60 // 5 + 1)


def test_the_cache_counts_what_its_entries_really_hold():
    # Found in review: an entry was counted as its reply and query octets, but kept a tuple of
    # two ints per record besides (~110 octets each), so an upstream answering with hundreds of
    # one-octet records made the cache hold ~5x what its bounds (MAX_BYTES_PER_VM, MAX_BYTES) say.
    question = DNSRecord.question("many.cdn.test", "TXT")
    reply = question.reply()
    for i in range(500):
        reply.add_answer(RR("many.cdn.test", QTYPE.TXT, rdata=TXT(""), ttl=300 + i))
    data, query = reply.pack(), question.pack()
    header, parsed = wire.parse_header(data), wire.read_question(data)
    records = wire.read_records(data, header, parsed.end)
    cache = AnswerCache()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(50):
            cache.store(("vm", "z"), (i,), data, query, records, 5, 3600, 0.0)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held <= cache.bytes * 1.25
