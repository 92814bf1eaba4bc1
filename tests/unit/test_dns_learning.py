"""What an answer opens ahead of the signed log, taken back when the log refuses its queued entry
after the answer left (skyguard/dns/learning.py), and the learned store's holds under it. The log
here queues every entry as the daemon's writer does and the test settles each one."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future

import pytest
from dnslib import QTYPE, RR, A, DNSRecord

from skyguard.dns.interfaces import PolicyDirectory
from skyguard.dns.learned import LearnedStore
from skyguard.dns.resolver import DnsPolicyResolver
from skyguard.errors import LogError
from skyguard.policy.parse import parse_policy
from skyguard.tlog.errors import LogSpaceLow

POLICY = """
apiVersion: skyguard/v1
kind: Policy
metadata: {name: learning}
zones:
  apps:
    workloads:
      - {name: web1, interface: sg-web1, mac: "02:00:00:00:01:01", addresses: [10.1.0.2]}
rules:
  - {name: cdn, from: apps, to: {fqdns: ["*.cdn.test"]}, ports: [tcp/443]}
dns: {upstreams: [192.0.2.53], min_ttl: 300, max_ttl: 300}
"""
FULL = LogSpaceLow("the signed log at /x refuses new entries: its filesystem has 10 bytes free")


class QueuedLog:
    """The daemon's log as a part sees it: each entry queued, its Future settled by the test."""

    def __init__(self):
        self.entries, self.queued = [], []

    def record(self, kind, /, **fields):
        self.entries.append({"kind": kind, **fields})
        self.queued.append(Future())
        return self.queued[-1]


class Learner:
    def __init__(self):
        self.learned, self.forgotten = [], []

    def learn(self, zone, rule_name, ips, ttl):
        self.learned.append((rule_name, [str(i) for i in ips], ttl))

    def forget(self, zone, rule_name, ips):
        self.forgotten.append((rule_name, [str(i) for i in ips]))


def make():
    policy = parse_policy(POLICY, source="test.yaml")
    log, learner, store = QueuedLog(), Learner(), LearnedStore(None)
    return DnsPolicyResolver(policy, PolicyDirectory(policy), learner, log=log, store=store), log, learner, store


def resolve(resolver, name, ips, wall):
    """Ask name, answer it with ips; its entry's Future."""
    d = resolver.decide(DNSRecord.question(name, "A").pack(), "10.1.0.2")
    reply = DNSRecord.parse(d.upstream_query).reply()
    for ip in ips:
        reply.add_answer(RR(name, QTYPE.A, rdata=A(ip), ttl=300))
    assert resolver.answer(d, reply.pack(), wall=wall).learned == ips  # released, learned
    return resolver.log.queued[-1]


def test_an_answer_the_log_refuses_after_it_left_closes_only_what_it_alone_opened():
    resolver, log, learner, store = make()
    now = time.time()
    resolve(resolver, "a.cdn.test", ["203.0.113.1"], now).set_result(7)  # on record
    later = [resolve(resolver, "b.cdn.test", ["203.0.113.1", "203.0.113.2"], now + 100),  # one shared, one new
             resolve(resolver, "a.cdn.test", ["203.0.113.1"], now + 100)]  # the logged answer again, later
    learner.learned.clear()
    for queued in later:
        queued.set_exception(FULL)  # the writer refused their group
    assert learner.forgotten == [("cdn", ["203.0.113.2"])]
    # the shared address keeps what the logged answer gave it (302 s from `now`), not the refused 402
    rule, ips, ttl = learner.learned[-1]
    assert (rule, ips) == ("cdn", ["203.0.113.1"]) and 290 < ttl <= 302
    assert not store.answered("b.cdn.test", "203.0.113.1", now) and not store.answered("b.cdn.test", "203.0.113.2", now)
    assert store.answered("a.cdn.test", "203.0.113.1", now + 301) and not store.answered("a.cdn.test", "203.0.113.1", now + 303)
    assert resolver.metrics.refused_after_answer.labels("apps")._value.get() == 2
    assert resolver.metrics.unlearned.labels("apps")._value.get() == 1
    status = resolver.learning.status()
    assert status["log_refused_after_answer"] == 2 and status["unlearned"] == 1
    assert "refuses new entries" in status["last_refusal"]


@pytest.mark.parametrize("outcomes, until", [
    (("logged", "refused"), 302),  # the refused one's 50 s more are taken back
    (("refused", "logged"), 352),  # space came back between the two
])
def test_a_logged_answer_keeps_its_hold_on_an_address_a_refused_one_refreshed(outcomes, until):
    resolver, log, learner, store = make()
    now = time.time()
    queued = [resolve(resolver, "a.cdn.test", ["203.0.113.1"], now), resolve(resolver, "a.cdn.test", ["203.0.113.1"], now + 50)]
    for entry, outcome in zip(queued, outcomes):  # the writer settles them in order
        entry.set_result(3) if outcome == "logged" else entry.set_exception(LogError("the signed log failed to write"))
    assert learner.forgotten == [] and resolver.learning.status()["unlearned"] == 0
    assert store.answered("a.cdn.test", "203.0.113.1", now + until - 1)
    assert not store.answered("a.cdn.test", "203.0.113.1", now + until + 1)


@pytest.mark.parametrize("outcomes, left", [
    (("refused", "refused"), None),  # new under two holds: gone once both are refused
    (("logged", "refused"), 1300.0),  # the logged one's expiry stays
    (("refused", "logged"), 1400.0),
    (("logged", "logged"), 1400.0),
])
def test_holds_on_a_new_entry(outcomes, left):
    store = LearnedStore(None)
    for hold, expiry in ((1, 1300.0), (2, 1400.0)):
        store.add("apps", "cdn", "a.cdn.test", ["203.0.113.1"], expiry, workload="web1", hold=hold)
    for hold, outcome in zip((1, 2), outcomes):
        store.confirm(hold) if outcome == "logged" else store.release(hold)
    entries = [e[-1] for e in store.entries(0.0)]
    assert entries == ([] if left is None else [left])
    assert store.take_evicted() == ([("apps", "cdn", "203.0.113.1")] if left is None else [])


def test_a_hold_on_an_entry_a_cap_evicted_meanwhile_releases_nothing():
    store = LearnedStore(None)
    store.add("apps", "cdn", "a.cdn.test", ["203.0.113.1"], 1300.0, workload="web1", hold=1)
    store.forget_stale(parse_policy(POLICY.replace("name: cdn", "name: other"), source="test.yaml"))
    store.take_evicted()
    store.add("apps", "cdn", "a.cdn.test", ["203.0.113.1"], 1400.0, workload="web1")  # answered again, logged
    assert store.release(1) == [] and [e[-1] for e in store.entries(0.0)] == [1400.0]


def test_the_saved_state_holds_only_answers_whose_entries_the_log_wrote():
    resolver, log, learner, store = make()
    now = time.time()
    first = resolve(resolver, "a.cdn.test", ["203.0.113.1"], now)
    assert store.snapshot(now) == [] and not store.urgent  # queued: a restart must not open it
    first.set_result(1)
    assert store.urgent  # on record: saved at once
    assert [e[-2:] for e in store.snapshot(now)] == [("203.0.113.1", now + 302)]
    later = resolve(resolver, "a.cdn.test", ["203.0.113.1"], now + 100)  # a refresh, queued
    assert [e[-1] for e in store.snapshot(now)] == [now + 302] and not store.urgent
    later.set_result(2)
    assert store.dirty and [e[-1] for e in store.snapshot(now)] == [now + 402]


def test_stopping_waits_for_queued_entries_so_the_last_save_holds_what_the_log_wrote():
    async def main():
        resolver, log, learner, store = make()
        now = time.time()
        written = resolve(resolver, "a.cdn.test", ["203.0.113.1"], now)
        threading.Thread(target=written.set_result, args=(1,)).start()  # the writer's next group commit
        await resolver.learning.drain(timeout=60)  # returns once it is settled
        saved = [e[-2] for e in store.snapshot(now)]
        resolve(resolver, "b.cdn.test", ["203.0.113.2"], now)  # its disk stalled: never settled
        await resolver.learning.drain(timeout=0.1)
        return saved, [e[-2] for e in store.snapshot(now)]

    assert asyncio.run(main()) == (["203.0.113.1"], ["203.0.113.1"])


class HoldingLearner(Learner):
    """A learner with the datapath's hold(): an exact expiry, shorter than before if need be."""

    def __init__(self):
        super().__init__()
        self.held = []

    def hold(self, zone, rule_name, ips, ttl):
        self.held.append((rule_name, [str(i) for i in ips], ttl))


def test_a_name_the_policy_stops_allowing_gives_a_shared_address_back_the_other_names_expiry():
    resolver, log, _, store = make()
    resolver.learning.learner = learner = HoldingLearner()
    now = time.time()
    resolve(resolver, "a.cdn.test", ["203.0.113.1"], now).set_result(1)
    resolve(resolver, "b.cdn.test", ["203.0.113.1"], now + 100).set_result(2)  # the datapath: 402 s from now
    denied = POLICY.replace("rules:\n", "rules:\n  - {name: no-b, action: deny, from: apps, to: {fqdns: [b.cdn.test]}}\n")
    assert store.forget_stale(parse_policy(denied, source="test.yaml")) == {"name-denied": 1}
    resolver.learning.forget_released(now + 100)
    assert learner.forgotten == []  # a.cdn.test still holds it...
    [(rule, ips, ttl)] = learner.held  # ...until a.cdn.test's answer runs out, not b.cdn.test's
    assert (rule, ips) == ("cdn", ["203.0.113.1"]) and 190 < ttl <= 202


def test_the_writer_thread_settles_an_entry_on_the_loop():
    async def main():
        resolver, log, learner, store = make()
        queued = resolve(resolver, "b.cdn.test", ["203.0.113.2"], time.time())
        threading.Thread(target=queued.set_exception, args=(FULL,)).start()
        for _ in range(500):
            await asyncio.sleep(0.01)
            if learner.forgotten:
                break
        return learner.forgotten, resolver.learning.status()

    forgotten, status = asyncio.run(main())
    assert forgotten == [("cdn", ["203.0.113.2"])] and status["log_refused_after_answer"] == 1
