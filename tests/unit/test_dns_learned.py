"""Learned DNS state that outlives the policy it was learned under, and its bounds per VM.

The learner here is the datapath's rule check without the kernel (a rule it does not know is an
error, as in Datapath.learn), so a stale entry that reached it would fail the test the way it
failed `skyguard up` after a policy edit.
"""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from dnslib import QTYPE, RR, A, DNSRecord

from skyguard.dns import learned
from skyguard.dns.interfaces import PolicyDirectory
from skyguard.dns.learned import LearnedStore
from skyguard.dns.resolver import DnsPolicyResolver
from skyguard.errors import BadInput
from skyguard.parts import MemoryLog
from skyguard.policy.parse import parse_policy

POLICY = """
apiVersion: skyguard/v1
kind: Policy
metadata: {name: learned}
zones:
  apps:
    workloads:
      - {name: web1, interface: sg-web1, mac: "02:00:00:00:01:01", addresses: [10.1.0.2]}
      - {name: web2, interface: sg-web2, mac: "02:00:00:00:01:02", addresses: [10.1.0.3]}
  db:
    workloads:
      - {name: db1, interface: sg-db1, mac: "02:00:00:00:02:01", addresses: [10.2.0.2]}
rules:
  - {name: updates, from: [apps, db], to: {fqdns: ["deb.debian.test", "*.cdn.test"]}, ports: [tcp/443]}
  - {name: github, from: apps, to: {fqdns: [api.github.test]}, ports: [tcp/443]}
dns: {upstreams: [192.0.2.53]}
"""


def policy(text=POLICY):
    return parse_policy(text, source="test.yaml")


class StrictLearner:
    """Datapath.learn's checks: the rule must exist with FQDNs and name the zone as a source."""

    def __init__(self, pol):
        self.rules = {r.name: r for r in pol.rules}
        self.calls = []

    def learn(self, zone, rule_name, ips, ttl):
        rule = self.rules.get(rule_name)
        if rule is None or not rule.to.fqdns:
            raise BadInput(f"rule {rule_name!r} does not exist or has no fqdns: nothing to learn for it")
        if zone not in rule.from_zones:
            raise BadInput(f"zone {zone!r} is not a source of rule {rule_name!r}")
        self.calls.append((zone, rule_name, sorted(str(i) for i in ips)))


def saved(tmp_path):
    store = LearnedStore(tmp_path / learned.FILE_NAME)
    store.add("apps", "github", "api.github.test", ["203.0.113.5"], 2000.0, workload="web1")
    store.add("apps", "updates", "deb.debian.test", ["203.0.113.7"], 2000.0, workload="web2")
    store.add("db", "updates", "x.cdn.test", ["203.0.113.8"], 2000.0, workload="db1")
    store.save(1000.0)
    return tmp_path / learned.FILE_NAME


@pytest.mark.parametrize("edit, reason", [
    (lambda t: t.replace("  - {name: github, from: apps, to: {fqdns: [api.github.test]}, ports: [tcp/443]}\n", ""),
     "rule-gone"),
    (lambda t: t.replace("name: github", "name: gh"), "rule-gone"),
    (lambda t: t.replace("fqdns: [api.github.test]", "cidrs: [203.0.113.0/24]"), "rule-gone"),
    (lambda t: t.replace("api.github.test]", "api.gitlab.test]"), "name-not-in-rule"),
    (lambda t: t.replace("from: apps, to: {fqdns: [api", "from: db, to: {fqdns: [api"), "zone-not-in-rule"),
    (lambda t: t.replace("{name: web1, interface: sg-web1", "{name: web9, interface: sg-web1"),
     "workload-gone"),
])
def test_a_restart_under_an_edited_policy_drops_what_it_no_longer_backs(tmp_path, edit, reason):
    path = saved(tmp_path)
    new = policy(edit(POLICY))
    store = LearnedStore(path)
    store.load()
    learner = StrictLearner(new)
    result = store.relearn(learner, 1000.0, new)  # raised BadInput on main for a gone rule
    assert result.dropped == {reason: 1}
    assert result.relearned == 2
    assert ("apps", "updates", ["203.0.113.7"]) in learner.calls
    store.save(1000.0)  # the file no longer holds the dropped entry
    again = LearnedStore(path)
    again.load()
    assert again.count() == 2


def test_a_zone_gone_drops_its_entries_and_the_rest_is_relearned(tmp_path):
    path = saved(tmp_path)
    text = POLICY.replace("""  db:
    workloads:
      - {name: db1, interface: sg-db1, mac: "02:00:00:00:02:01", addresses: [10.2.0.2]}
""", "").replace("from: [apps, db]", "from: [apps]")
    new = policy(text)
    store = LearnedStore(path)
    store.load()
    result = store.relearn(StrictLearner(new), 1000.0, new)
    assert result == learned.Relearned(2, {"zone-gone": 1})


def test_what_the_learner_still_refuses_is_dropped_and_counted_never_raised(tmp_path):
    path = saved(tmp_path)
    store = LearnedStore(path)
    store.load()
    old_style = StrictLearner(policy(POLICY.replace("name: github", "name: gh")))
    result = store.relearn(old_style, 1000.0)  # no policy given: the learner is the judge
    assert result.relearned == 2 and result.dropped == {"refused": 1}
    assert not store.answered("api.github.test", "203.0.113.5", 1000.0)


def test_files_written_before_workloads_were_recorded_still_load(tmp_path):
    path = tmp_path / learned.FILE_NAME
    path.write_text('{"version":1,"entries":[{"zone":"apps","rule":"github","name":"api.github.test",'
                    '"ip":"203.0.113.5","expiry":2000.0}]}')
    store = LearnedStore(path)
    store.load()
    pol = policy()
    assert store.relearn(StrictLearner(pol), 1000.0, pol) == learned.Relearned(1, {})


class ForgettingLearner:
    def __init__(self):
        self.learned, self.forgotten = [], []

    def learn(self, zone, rule_name, ips, ttl):
        self.learned.extend(str(i) for i in ips)

    def forget(self, zone, rule_name, ips):
        self.forgotten.extend(str(i) for i in ips)


def test_learned_state_is_bounded_per_vm_the_oldest_evicted_and_counted(monkeypatch):
    monkeypatch.setattr(learned, "MAX_LEARNED_PER_WORKLOAD", 8)
    pol = policy()
    learner = ForgettingLearner()
    store = LearnedStore(None)
    resolver = DnsPolicyResolver(pol, PolicyDirectory(pol), learner, log=MemoryLog(), store=store)

    def resolve(client, name, ip):
        d = resolver.decide(DNSRecord.question(name, "A").pack(), client, now=1.0)
        reply = DNSRecord.parse(d.upstream_query).reply()
        reply.add_answer(RR(name, QTYPE.A, rdata=A(ip), ttl=300))
        assert resolver.answer(d, reply.pack(), now=1.0, wall=1000.0).learned == [ip]

    resolve("10.1.0.3", "deb.debian.test", "203.0.113.200")  # another VM of the zone
    resolve("10.1.0.3", "a.cdn.test", "203.0.113.1")  # ... sharing an address with web1 below
    for i in range(20):
        resolve("10.1.0.2", f"n{i}.cdn.test", f"203.0.113.{i + 1}")
    assert store.count("web1") == 8 and store.count("web2") == 2  # web2 keeps its own
    assert resolver.metrics.learned_evicted.labels("apps")._value.get() == 12
    assert store.answered("n19.cdn.test", "203.0.113.20", 1000.0)
    assert not store.answered("n0.cdn.test", "203.0.113.1", 1000.0)  # the oldest went first
    assert store.answered("a.cdn.test", "203.0.113.1", 1000.0)
    # the datapath may close what no entry holds any more; 203.0.113.1 is still web2's
    assert learner.forgotten == [f"203.0.113.{i}" for i in range(2, 13)]


def test_hot_swap_drops_learned_entries_of_removed_rules(tmp_path):
    from skyguard.dns.service import DnsProxy

    pol = policy()
    proxy = DnsProxy(pol, StrictLearner(pol), MemoryLog(), state_dir=tmp_path, steer=False,
                     host_addresses=[])
    proxy.store.add("apps", "github", "api.github.test", ["203.0.113.5"], 2e9, workload="web1")
    proxy.store.add("apps", "updates", "deb.debian.test", ["203.0.113.7"], 2e9, workload="web1")
    dropped = asyncio.run(proxy.set_policy(policy(POLICY.replace("name: github", "name: gh"))))
    assert dropped == {"rule-gone": 1}
    assert proxy.log.entries[-1] == {"kind": "dns_learned_dropped", "dropped": {"rule-gone": 1}}  # in the log
    assert not proxy.store.answered("api.github.test", "203.0.113.5", 0)  # no swap toward it
    assert proxy.store.answered("deb.debian.test", "203.0.113.7", 0)
    assert proxy.metrics.learned_dropped.labels("rule-gone")._value.get() == 1


def test_ips_learned_are_ip_objects():
    store = LearnedStore(None)
    store.add("apps", "updates", "deb.debian.test", ["2001:db8::7"], 2000.0)
    learner = StrictLearner(policy())
    store.relearn(learner, 1000.0)
    assert learner.calls == [("apps", "updates", [str(ipaddress.ip_address("2001:db8::7"))])]


def test_saves_asked_during_a_write_are_coalesced_and_each_waits_for_its_own_entries(tmp_path):
    # A burst of new addresses must not cost one copy of the whole state on the event loop (and
    # one fsync) per address: on main every answer with a new address took its own snapshot.
    import asyncio
    import json
    import threading

    from skyguard.dns.learned import StateWriter
    from skyguard.dns.metrics import DnsMetrics

    class CountingDisk(LearnedStore):
        def __init__(self, path):
            super().__init__(path)
            self.snapshots = 0
            self.first_write = threading.Event()

        def snapshot(self, now):
            self.snapshots += 1
            return super().snapshot(now)

        def write(self, data):
            self.first_write.wait(5)  # the first write stalls until the burst has been asked
            super().write(data)

    store = CountingDisk(tmp_path / learned.FILE_NAME)
    writer = StateWriter(store, DnsMetrics())

    async def burst():
        waiters = []
        for i in range(50):
            store.add("apps", "updates", f"n{i}.cdn.test", [f"203.0.113.{i}"], 2e9, workload="web1")
            waiters.append(asyncio.ensure_future(writer.save()))
            await asyncio.sleep(0)
        store.first_write.set()
        await asyncio.gather(*waiters)

    asyncio.run(burst())
    writer.close()
    assert store.snapshots == 2  # the write in flight, and one for everything asked meanwhile
    saved = json.loads((tmp_path / learned.FILE_NAME).read_text())["entries"]
    assert len(saved) == 50
