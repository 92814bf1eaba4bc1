"""Datapath.forget: the DNS proxy's per-VM cap on learned entries evicts the oldest, and the
datapath closes those addresses at once (new flows), not at their TTL; another zone's or rule's
hold on the same address, a static grant and established flows stay."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP
from test_verdicts import ALLOW, DROP, OUT, e_from, v4


def test_forget_closes_an_evicted_address_now_and_keeps_the_rest(h):
    ip, kept = "203.0.113.91", "203.0.113.92"
    h.worker.call(h.dp.learn, "web", "web-updates", [ip, kept], 600)
    syn = e_from("w1") / IP(src=v4("w1"), dst=ip) / TCP(sport=45000, dport=443, flags="S")
    assert h.run(bytes(syn), "w1", OUT) == ALLOW  # opens a flow before the eviction
    assert h.worker.call(h.dp.forget, "web", "web-updates", [ip]) == 1
    new = e_from("w1") / IP(src=v4("w1"), dst=ip) / TCP(sport=45001, dport=443, flags="S")
    assert h.run(bytes(new), "w1", OUT) == DROP("no_rule")
    established = e_from("w1") / IP(src=v4("w1"), dst=ip) / TCP(sport=45000, dport=443, flags="A")
    assert h.run(bytes(established), "w1", OUT) == ALLOW
    other = e_from("w1") / IP(src=v4("w1"), dst=kept) / TCP(sport=45002, dport=443, flags="S")
    assert h.run(bytes(other), "w1", OUT) == ALLOW
    assert h.worker.call(h.dp.forget, "web", "web-updates", [ip]) == 0  # already gone: nothing to do
    assert ip not in h.worker.call(h.dp.learned) and kept in h.worker.call(h.dp.learned)


@pytest.mark.parametrize("edit", ["name-not-in-rule", "name-denied"])
def test_a_hot_swap_that_stops_backing_a_name_closes_its_learned_address_now(h, tmp_path, edit):
    # The operator takes evil.example.test out of the rule (or adds a deny rule for it) because
    # the VM abuses it. On main the DNS proxy dropped its learned entry, but the datapath kept
    # the address open for new flows until the answer's TTL (up to dns.max_ttl, an hour).
    import asyncio
    import dataclasses

    from bpf_support import make_policy
    from dnslib import QTYPE, RR, A, DNSRecord

    from skyguard.dns.service import DnsProxy
    from skyguard.parts import MemoryLog
    from skyguard.policy.model import Destination, DnsConfig, PortRange, Rule, TunnelDetection

    def policy(fqdns, deny=()):
        rules = [Rule("web-updates", "allow", ("web",), Destination(fqdns=fqdns), (PortRange("tcp", 443, 443),))]
        if deny:
            rules.append(Rule("no-evil", "deny", ("web",), Destination(fqdns=deny), ()))
        dns = DnsConfig(("192.0.2.53",), "refused", 5, 3600, TunnelDetection("off"))
        return dataclasses.replace(make_policy(extra_rules=rules, drop_rules=("web-updates",)), dns=dns)

    before = policy(("deb.example.test", "*.example.test"))
    after = policy(("deb.example.test",)) if edit == "name-not-in-rule" else \
        policy(("deb.example.test", "*.example.test"), deny=("evil.example.test",))
    h.apply(before)
    proxy = DnsProxy(before, h.dp, MemoryLog(), state_dir=tmp_path, steer=False, host_addresses=[])

    def ask(name):
        d = proxy.resolver.decide(DNSRecord.question(name, "A").pack(), v4("w1"))
        assert d.action == "forward", d.reason
        return d

    def answer(d, address):
        reply = DNSRecord.parse(d.upstream_query).reply()
        reply.add_answer(RR(d.name, QTYPE.A, rdata=A(address), ttl=600))
        return proxy.resolver.answer(d, reply.pack()).learned

    def resolve(name, address):
        assert answer(ask(name), address) == [address]

    evil, deb = "203.0.113.93", "203.0.113.94"
    h.worker.call(resolve, "evil.example.test", evil)
    h.worker.call(resolve, "deb.example.test", deb)
    syn = lambda ip, port: e_from("w1") / IP(src=v4("w1"), dst=ip) / TCP(sport=port, dport=443, flags="S")  # noqa: E731
    assert h.run(bytes(syn(evil, 45100)), "w1", OUT) == ALLOW
    in_flight = ask("evil.example.test")  # the VM keeps a query upstream across the swap
    # the daemon's order: the datapath's generation first, then every part
    h.apply(after)
    dropped = h.worker.call(lambda: asyncio.run(proxy.set_policy(after)))
    assert dropped == {edit: 1}
    assert proxy.resolver.decide(DNSRecord.question("evil.example.test", "A").pack(), v4("w1")).action == "reply"
    assert h.run(bytes(syn(evil, 45101)), "w1", OUT) == DROP("no_rule")
    assert h.worker.call(answer, in_flight, evil) == []  # its answer does not reopen it
    assert h.run(bytes(syn(evil, 45103)), "w1", OUT) == DROP("no_rule")
    assert h.run(bytes(syn(deb, 45102)), "w1", OUT) == ALLOW  # what the policy still backs stays
    assert evil not in h.worker.call(h.dp.learned)


def test_an_address_the_host_gains_before_a_hot_swap_is_never_learned(h, tmp_path, netns):
    # The host's own addresses are rebinding targets (a name answering with one would open the
    # host's services to the VM). On main the DNS proxy read them once at its start, while the
    # datapath re-reads them at every swap: an address added since (a new workload's gateway
    # address on its host-side interface) was learned like any public address.
    import asyncio
    import dataclasses
    import subprocess

    from bpf_support import IFACES, make_policy
    from dnslib import QTYPE, RR, A, DNSRecord

    from skyguard.dns.service import DnsProxy
    from skyguard.parts import MemoryLog
    from skyguard.policy.model import DnsConfig, TunnelDetection

    dns = DnsConfig(("192.0.2.53",), "refused", 5, 3600, TunnelDetection("off"))
    policy = dataclasses.replace(make_policy(), dns=dns)
    proxy = h.worker.call(lambda: DnsProxy(policy, h.dp, MemoryLog(), state_dir=tmp_path, steer=False))
    gained = "203.0.113.251"
    subprocess.run(["ip", "-n", netns, "addr", "add", f"{gained}/32", "dev", IFACES["x1"]], check=True)
    try:
        h.apply(policy)
        h.worker.call(lambda: asyncio.run(proxy.set_policy(policy)))

        def resolve():
            d = proxy.resolver.decide(DNSRecord.question("deb.example.test", "A").pack(), v4("w1"))
            assert d.action == "forward", d.reason
            reply = DNSRecord.parse(d.upstream_query).reply()
            reply.add_answer(RR(d.name, QTYPE.A, rdata=A(gained), ttl=600))
            return proxy.resolver.answer(d, reply.pack())

        answer = h.worker.call(resolve)
        assert answer.learned == [] and answer.stripped == [gained]
        assert gained not in h.worker.call(h.dp.learned)
        syn = e_from("w1") / IP(src=v4("w1"), dst=gained) / TCP(sport=45200, dport=443, flags="S")
        assert h.run(bytes(syn), "w1", OUT) != ALLOW
    finally:
        subprocess.run(["ip", "-n", netns, "addr", "del", f"{gained}/32", "dev", IFACES["x1"]])
