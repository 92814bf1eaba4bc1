"""What the DNS proxy does to keep its added latency low must not change what it answers or what
it reports: the question check (an octet-equal echo of the case we asked in, DNS 0x20), the per-query
metric series (names, labels, bucket semantics), and the frozen startup heap and short GIL
handover (skyguard.dns.latency, run in a child process because both are process-wide).
No timing is asserted here; bench/dns.py measures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dnslib import QTYPE, RR, A, DNSRecord
from prometheus_client import generate_latest
from test_dns_resolver import ask, make_resolver, upstream_reply

REPO = Path(__file__).resolve().parents[2]


def test_a_reply_echoing_the_question_in_another_letter_case_is_discarded_and_counted():
    # DNS 0x20: the proxy asks in a random letter case of its own and the reply must echo it
    # octet for octet (the case is part of what a blind spoofer has to guess). This replaced a
    # case-insensitive fallback, which let a spoofer ignore the case.
    resolver, learner, _ = make_resolver()
    d = ask(resolver, "deb.debian.test")
    asked = DNSRecord.parse(d.upstream_query).q.qname.label
    for other_case in ([label.swapcase() for label in asked], [b"DEB", b"Debian", b"TEST"],
                       [label.lower() for label in asked]):
        if tuple(other_case) == tuple(asked):
            continue  # the random case happened to be this one
        reply = DNSRecord.parse(upstream_reply(d.upstream_query))
        reply.q.qname = ".".join(label.decode() for label in other_case)
        reply.add_answer(RR("deb.debian.test", QTYPE.A, rdata=A("203.0.113.7")))
        assert resolver.answer(d, reply.pack()) is None
    assert resolver.metrics.mismatched._value.get() >= 2
    assert learner.calls == []
    answer = resolver.answer(d, upstream_reply(d.upstream_query, [
        RR("deb.debian.test", QTYPE.A, rdata=A("203.0.113.7"))]))
    assert answer is not None and answer.learned == ["203.0.113.7"]
    # The VM gets its own question back, in the case it asked in.
    assert DNSRecord.parse(answer.reply).q.qname.label == (b"deb", b"debian", b"test")


def test_a_reply_to_another_question_of_the_same_length_is_discarded_and_counted():
    resolver, learner, _ = make_resolver()
    d = ask(resolver, "deb.debian.test")
    for other in (DNSRecord.question("deb.debian.tesx", "A"),  # one octet of the name
                  DNSRecord.question("deb.debian.test", "AAAA")):  # the type
        other.header.id = d.upstream_id
        forged = other.reply()
        forged.add_answer(RR(str(other.q.qname), QTYPE.A, rdata=A("203.0.113.66")))
        assert resolver.answer(d, forged.pack()) is None
    assert resolver.metrics.mismatched._value.get() == 2
    assert learner.calls == []


def sample(resolver, name, labels=None):
    return resolver.metrics.registry.get_sample_value(name, labels or {})


def test_per_query_metric_series_keep_their_names_labels_and_bucket_semantics():
    resolver, _, _ = make_resolver()
    answered = 0
    for i in range(3):
        d = ask(resolver, "deb.debian.test", now=1.0)
        up = upstream_reply(d.upstream_query, [RR("deb.debian.test", QTYPE.A,
                                                  rdata=A(f"203.0.113.{i + 1}"))])
        resolver.answer(d, up, now=1.0 + 2 ** -10, wall=1000.0)  # ~0.98 ms, exact in binary
        answered += 1
    ask(resolver, "not-named.test")  # refused: answered at once, latency 0
    q = {"zone": "auth", "verdict": "allowed"}
    assert sample(resolver, "skyguard_dns_queries_total", q) == answered
    assert sample(resolver, "skyguard_dns_queries_total", {"zone": "auth", "verdict": "refused"}) == 1
    assert sample(resolver, "skyguard_dns_learned_ips_total", {"zone": "auth"}) == answered
    allowed = {"verdict": "allowed"}
    assert sample(resolver, "skyguard_dns_latency_seconds_count", allowed) == answered
    assert sample(resolver, "skyguard_dns_latency_seconds_bucket", {**allowed, "le": "0.0005"}) == 0
    assert sample(resolver, "skyguard_dns_latency_seconds_bucket", {**allowed, "le": "0.001"}) == answered
    assert sample(resolver, "skyguard_dns_latency_seconds_bucket", {**allowed, "le": "+Inf"}) == answered
    assert sample(resolver, "skyguard_dns_latency_seconds_sum", allowed) == answered * 2 ** -10
    resolver.metrics.latency.labels("probe").observe(0.001)  # on a bound: that bucket counts it
    assert sample(resolver, "skyguard_dns_latency_seconds_bucket", {"verdict": "probe", "le": "0.001"}) == 1
    assert sample(resolver, "skyguard_dns_latency_seconds_bucket", {"verdict": "probe", "le": "0.0005"}) == 0
    assert sample(resolver, "skyguard_dns_learn_seconds_count") == answered
    text = generate_latest(resolver.metrics.registry).decode()
    for family in ("skyguard_dns_queries_total", "skyguard_dns_learned_ips_total",
                   "skyguard_dns_latency_seconds_bucket", "skyguard_dns_learn_seconds_bucket"):
        assert f"\n{family}{{" in text
    assert "# TYPE skyguard_dns_latency_seconds histogram" in text
    # buckets are cumulative and end at the count
    buckets = [s for f in resolver.metrics.registry.collect() if f.name == "skyguard_dns_latency_seconds"
               for s in f.samples if s.name.endswith("_bucket") and s.labels["verdict"] == "refused"]
    values = [s.value for s in buckets]
    assert values == sorted(values) and values[-1] == 1 and buckets[-1].labels["le"] == "+Inf"


CHILD = r"""
import asyncio, gc, ipaddress, json, sys, tempfile
from skyguard.parts import MemoryLog
from skyguard.dns.latency import settle_for_latency
from skyguard.dns.service import DnsProxy
from skyguard.policy.model import Destination, DnsConfig, Policy, PortRange, Rule, Workload, Zone

class Cycle:
    def __init__(self):
        self.me = self

old = Cycle()
old_id = id(old)
me = Workload("local", "lo", "lo", "02:00:00:00:00:01", (ipaddress.ip_address("127.0.0.1"),))
rule = Rule("web", "allow", ("lo",), Destination(fqdns=("**.test",)), (PortRange("tcp", 443, 443),))
policy = Policy("t", {"lo": Zone("lo", (me,))}, {}, (rule,), DnsConfig(("127.0.0.1",)))

class Learner:
    def learn(self, zone, rule_name, ips, ttl):
        pass

proxy = DnsProxy(policy, Learner(), MemoryLog(), state_dir=tempfile.mkdtemp(), port=0, steer=False,
                 host_addresses=[])
proxy.server.listen = [("127.0.0.1", 0)]
loop = asyncio.new_event_loop()
loop.run_until_complete(proxy.start())
frozen_by_start = proxy.frozen_objects
tracked = {id(o) for o in gc.get_objects()}
new = Cycle()
new_id = id(new)
del new
collected = gc.collect()
again = settle_for_latency()
loop.run_until_complete(proxy.stop())
print(json.dumps({"switch_interval": sys.getswitchinterval(), "frozen_by_start": frozen_by_start,
                  "old_out_of_reach": old_id not in tracked, "new_cycle_collected": collected >= 1, "again": again}))
"""


def test_the_service_freezes_its_startup_heap_and_later_garbage_is_still_collected(tmp_path):
    env = {"PYTHONPATH": f"{REPO}:{REPO / 'tests' / 'unit'}", "PATH": "/usr/bin:/bin",
           "SKYGUARD_STATE_DIR": str(tmp_path / "state"), "SKYGUARD_RUN_DIR": str(tmp_path / "run"),
           "SKYGUARD_PIN_DIR": str(tmp_path / "pins")}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["frozen_by_start"] > 1000  # modules, policy, metrics: the startup heap
    assert result["old_out_of_reach"]  # a startup object no collection walks any more
    assert result["new_cycle_collected"]  # garbage made after start is still collected
    assert result["again"] > 1000  # calling it again is harmless: the heap stays frozen
    # the loop waits at most this long for the GIL while another daemon thread runs Python
    assert result["switch_interval"] <= 0.0005 + 1e-9
