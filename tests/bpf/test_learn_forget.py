"""Datapath.forget: the DNS proxy's per-VM cap on learned entries evicts the oldest, and the
datapath closes those addresses at once (new flows), not at their TTL; another zone's or rule's
hold on the same address, a static grant and established flows stay."""

from __future__ import annotations

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
