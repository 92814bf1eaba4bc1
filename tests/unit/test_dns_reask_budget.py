"""The re-ask budget: a query that reaches the upstream without a never-seen name (a name asked
again once its cached answer expired, or with another type) carries the VM's choice among what it
knows, and is charged for it; past the budget the VM is answered from its expired cache entry
(serve-stale) or with no records, and nothing more leaves. Through the policy engine with simulated time,
then through the real proxy with a real DNS client."""

from __future__ import annotations

import dataclasses
import math
import random
import time

from dnslib import EDNS0, QTYPE, RCODE, RR, A, DNSRecord

from skyguard.dns import tunnel, wire
from skyguard.dns.server import Upstream
from skyguard.dns.tunnel import TunnelDetector
from skyguard.policy.model import Destination, DnsConfig, PortRange, Rule
from support.client_waits import ANSWER_WAIT_S
from tests.unit.test_dns_answer_cache import ask
from tests.unit.test_dns_resolver import VM_IP, make_policy, make_resolver, upstream_reply
from tests.unit.test_dns_server import FakeUpstream, Proxy, policy


def run(resolver, queries):
    """Feed (time, name, qtype) queries; the upstream answers A records with TTL 0.
    (upstream queries, bits of choice they carried, replies by rcode, stale answers)."""
    known: set = set()
    sent, bits, rcodes, stale = 0, 0.0, {}, 0
    for now, name, qtype in queries:
        d = ask(resolver, name, now, qtype=qtype)
        if d.action == "forward":
            if not d.cached:
                sent += 1
                # what the upstream learns: which of the (name, type) it could have been asked
                bits += math.log2(max(2, len(known))) if (name, qtype) in known else 0
                known.add((name, qtype))
                reply = upstream_reply(d.upstream_query, [RR(name, QTYPE.A, rdata=A("203.0.113.7"), ttl=0)])
            else:
                reply = d.cached
                stale += "stale" in d.reason
            rcode = DNSRecord.parse(resolver.answer(d, reply, now=now).reply).header.rcode
        else:
            rcode = DNSRecord.parse(d.reply).header.rcode
        rcodes[rcode] = rcodes.get(rcode, 0) + 1
    return sent, bits, rcodes, stale


def wildcard_policy(**kw):
    """The resolver tests' policy, and a rule the VM's attacker wants: any name under .test (so
    any base domain it registers)."""
    p = make_policy(**kw)
    anything = Rule("tun", "allow", ("auth",), Destination(fqdns=("**.test",)), (PortRange("tcp", 443, 443),))
    return dataclasses.replace(p, rules=p.rules + (anything,))


def test_a_vm_re_asking_names_in_a_chosen_order_is_answered_stale_past_its_budget():
    # The repeated-name tunnel: 64 names (4 under each of 16 bases it controls) the VM resolved
    # once, re-asked in an order the payload picks as fast as their answers expire (TTL 0,
    # floored to min_ttl 5 s). Before: every round reached the upstream, log2(64!) bits each,
    # ~35 KB in 10 minutes. Now the re-asks stop at the budget and the VM is still answered,
    # from its expired entries.
    resolver, _, _ = make_resolver(wildcard_policy(min_ttl=5))
    resolver.detector = TunnelDetector()
    names = [f"{a}.x{b}q.test" for a in "abcd" for b in "abcdefghijklmnop"]
    rng = random.Random(1)
    queries, now = [], 0.0
    while now < 600:
        for name in rng.sample(names, len(names)):
            queries.append((now, name, "A"))
            now += 0.01
        now += 5.01
    sent, bits, rcodes, stale = run(resolver, queries)
    assert bits / 8 < tunnel.REASK_BUDGET_BYTES
    assert rcodes == {RCODE.NOERROR: len(queries)}  # every query answered
    assert stale > len(queries) / 2
    assert resolver.metrics.registry.get_sample_value(
        "skyguard_dns_reasks_over_budget_total", {"zone": "auth", "action": "block"}) == stale


def test_the_query_type_of_a_known_name_is_charged_too():
    # One name, the payload in the type: each served type is a cache miss, so each type after
    # the first carried log2(types) bits free per expiry (and before that, any of 65,536 types).
    resolver, _, _ = make_resolver(make_policy(min_ttl=5))
    resolver.detector = TunnelDetector()
    served = sorted(wire.qtype_name(t) for t in wire.SERVED_QTYPES
                    if t not in (wire.QTYPE_ANY, wire.QTYPE_NULL, wire.QTYPE_TXT))
    rng = random.Random(2)
    queries = [(i * 0.03, "x.cdn.test", rng.choice(served)) for i in range(20_000)]
    sent, bits, rcodes, stale = run(resolver, queries)
    assert bits / 8 < tunnel.REASK_BUDGET_BYTES
    assert stale > len(queries) / 2 and rcodes == {RCODE.NOERROR: len(queries)}


def test_a_vm_refreshing_its_names_at_their_ttl_stays_within_its_budget():
    # What a busy server VM does: 20 names of two sites, each asked again every 60 s (a common
    # TTL) for 10 minutes: 200 re-asks, none answered stale or refused.
    resolver, _, _ = make_resolver(make_policy(min_ttl=5))
    resolver.detector = TunnelDetector()
    names = [f"{site}{i}.cdn.test" for site in ("api", "files") for i in range(5)] + \
        [f"mirror{i}.debian.test" for i in range(10)]
    queries = [(k * 60.0 + i * 2.0, name, "A") for k in range(10) for i, name in enumerate(names)]
    sent, _, rcodes, stale = run(resolver, queries)
    assert sent == len(queries) and stale == 0
    assert rcodes == {RCODE.NOERROR: len(queries)}


def test_under_alert_re_asks_past_the_budget_are_counted_and_forwarded():
    resolver, _, _ = make_resolver(make_policy(min_ttl=5, tunnel="alert"))
    resolver.detector = TunnelDetector()
    served = [wire.qtype_name(t) for t in sorted(wire.SERVED_QTYPES)]
    queries = [(i * 0.03, "x.cdn.test", served[i % len(served)]) for i in range(20_000)]
    sent, _, rcodes, stale = run(resolver, queries)
    assert stale == 0 and RCODE.REFUSED not in rcodes
    assert resolver.metrics.registry.get_sample_value(
        "skyguard_dns_reasks_over_budget_total", {"zone": "auth", "action": "alert"}) > 0


def test_through_the_proxy_a_vm_past_its_budget_gets_its_expired_answer(monkeypatch):
    monkeypatch.setattr(tunnel, "REASK_BUDGET_BYTES", 4.0)  # a few re-asks' worth
    upstream = FakeUpstream()
    short = dataclasses.replace(policy(), dns=DnsConfig(("127.0.0.1",), min_ttl=0, max_ttl=1))
    running = Proxy([Upstream("127.0.0.1", upstream.port)], the_policy=short)
    try:
        first = running.ask("www.site.test")
        assert first.header.rcode == RCODE.NOERROR
        for qtype in ("MX", "TXT", "SRV", "CAA", "NS", "SOA"):  # spends the budget
            q = DNSRecord.question("www.site.test", qtype)
            last = DNSRecord.parse(q.send("127.0.0.1", running.port, timeout=ANSWER_WAIT_S))
        # no earlier answer of that type: none (NODATA, so a stub asking A and AAAA uses the other)
        assert last.header.rcode == RCODE.NOERROR and not last.rr
        assert running.log.entries[-1]["verdict"] == "tunnel"
        asked = upstream.seen
        time.sleep(1.1)  # the first answer's entry expires (its lifetime is at least 1 s)
        again = running.ask("www.site.test")
        assert again.header.rcode == RCODE.NOERROR and str(again.rr[0].rdata) == "203.0.113.10"
        assert upstream.seen == asked  # answered stale: nothing reached the upstream
        assert "stale" in running.log.entries[-1]["reason"]
    finally:
        running.close()
        upstream.close()


def test_a_policy_swap_leaves_a_vm_past_its_budget_its_earlier_answers():
    # Found in an operator trial: a swap emptied the cache, so a VM past its re-ask budget was
    # refused every name it knew (no earlier answer to serve) until the budget's window passed.
    resolver, _, _ = make_resolver(make_policy(min_ttl=5))
    resolver.detector = TunnelDetector()
    served = sorted(wire.qtype_name(t) for t in wire.SERVED_QTYPES
                    if t not in (wire.QTYPE_ANY, wire.QTYPE_NULL, wire.QTYPE_TXT))
    _, _, _, stale = run(resolver, [(i * 0.03, "x.cdn.test", served[i % len(served)]) for i in range(9_000)])
    assert stale  # past the budget
    run(resolver, [(280.0, "deb.debian.test", "A")])  # a name never asked: charged as such
    resolver.set_policy(make_policy(min_ttl=5))
    sent, _, rcodes, stale = run(resolver, [(290.0, "deb.debian.test", "A"), (291.0, "x.cdn.test", "MX")])
    assert sent == 0 and stale == 2 and rcodes == {RCODE.NOERROR: 2}


def test_the_type_and_flags_of_a_never_seen_name_are_charged_with_it():
    # Found in review: a never-seen name was charged its letters only, so the type (27 served)
    # and the RD/CD/EDNS bits it was asked with (8 choices) went out free: one-letter names
    # under 16 bases, 60 a minute, carried ~530 B in 10 minutes past both budgets (the names'
    # budget is 400 B). Now the names' budget charges the whole query: name, type and flags.
    resolver, _, _ = make_resolver(wildcard_policy(min_ttl=5))
    resolver.detector = TunnelDetector()
    types = sorted(wire.SERVED_QTYPES - {wire.QTYPE_ANY, wire.QTYPE_NULL, wire.QTYPE_TXT})
    headers = [(rd | cd, edns) for rd in (0, wire.FLAG_RD) for cd in (0, 0x0010) for edns in (False, True)]
    names = [f"{letter}.x{i}q.test" for letter in "abcdefghijklmnopqrstuvwxyz" for i in range(16)]
    rng = random.Random(3)
    bits = 0.0
    for k, name in enumerate(names):
        if k >= 600:
            break
        record = DNSRecord.question(name, wire.qtype_name(rng.choice(types)))
        flags, edns = rng.choice(headers)
        record.header.rd, record.header.cd = bool(flags & wire.FLAG_RD), bool(flags & 0x0010)
        if edns:
            record.add_ar(EDNS0(udp_len=1232))
        d = resolver.decide(record.pack(), VM_IP, now=float(k))
        if d.action == "forward" and not d.cached:
            bits += math.log2(26) + math.log2(len(types) * len(headers))
    assert bits / 8 < tunnel.VM_BUDGET_BYTES


def test_names_the_policy_refuses_cost_nothing_of_the_names_budget():
    # Found in review: a stub with search domains (Kubernetes: ndots 5, three cluster domains)
    # asks three names the policy does not name before each real one. Those were charged to the
    # names' budget although nothing of them left, so after ~20 real names every further real
    # name was a tunnel detection: 48 of 80 real queries refused for 40 names. Now refunded.
    resolver, _, _ = make_resolver(make_policy(min_ttl=5))
    resolver.detector = TunnelDetector()
    search = ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"]
    queries, now = [], 0.0
    for i in range(40):
        name = f"{['api', 'files', 'static', 'login'][i % 4]}{i}.cdn.test"
        for candidate in [f"{name}.{domain}" for domain in search] + [name]:
            queries += [(now, candidate, "A"), (now, candidate, "AAAA")]
        now += 5.0
    _, _, rcodes, _ = run(resolver, queries)
    assert rcodes == {RCODE.REFUSED: 40 * 3 * 2, RCODE.NOERROR: 40 * 2}
