"""The pure policy compiler (skyguard/datapath/compile.py): identities, deny-over-allow
intervals, port prefixes, and a brute-force cross-check of the LPM entries against the rules."""

from __future__ import annotations

import ipaddress
import random

import pytest

from skyguard.datapath import abi
from skyguard.datapath.compile import compile_policy, eui64_link_local, port_prefixes
from skyguard.policy.model import Destination, Policy, PortRange, Rule, Workload, Zone


def ip(x):
    return ipaddress.ip_address(x)


def net(x):
    return ipaddress.ip_network(x)


def policy(rules, networks=None):
    zones = {
        "a": Zone("a", (Workload("a1", "a", "sg-a1", "02:00:00:00:00:0a", (ip("10.0.1.1"), ip("fd00::a"))),)),
        "b": Zone("b", (Workload("b1", "b", "sg-b1", "02:00:00:00:00:0b", (ip("10.0.2.1"),)),
                        Workload("b2", "b", "sg-b2", "02:00:00:00:00:0c", (ip("10.0.2.2"),)))),
    }
    return Policy("t", zones, networks or {}, tuple(rules))


def lookup(compiled, direction, zone, remote, proto, port):
    """What the datapath would decide: longest ipcache prefix, then longest policy port prefix."""
    remote = ip(remote)
    best = None
    for prefix, ident in compiled.ipcache.items():
        if prefix.version == remote.version and remote in prefix and (best is None or prefix.prefixlen > best[0].prefixlen):
            best = (prefix, ident)
    ident = best[1] if best else 0
    zid = compiled.zone_ids[zone]
    match = None
    for e in compiled.policy:
        if (e.direction, e.zone, e.identity, e.proto) != (direction, zid, ident, proto):
            continue
        span = 1 << (16 - e.port_prefixlen)
        if e.port <= port < e.port + span and (match is None or e.port_prefixlen > match.port_prefixlen):
            match = e
    return (match.verdict, match.rule_id) if match else None


@pytest.mark.parametrize("lo,hi", [(0, 65535), (0, 0), (65535, 65535), (49152, 65535), (1, 65534), (80, 80),
                                   (8000, 8100), (1023, 1024)])
def test_port_prefixes_cover_exactly(lo, hi):
    blocks = port_prefixes(lo, hi)
    covered = set()
    for start, plen in blocks:
        size = 1 << (16 - plen)
        assert start % size == 0
        covered |= set(range(start, start + size))
    assert covered == set(range(lo, hi + 1))


def test_port_prefixes_are_minimal_for_aligned_ranges():
    assert port_prefixes(0, 65535) == [(0, 0)]
    assert port_prefixes(49152, 65535) == [(49152, 2)]
    assert port_prefixes(80, 80) == [(80, 16)]


def test_eui64_link_local():
    assert eui64_link_local("02:00:00:00:01:02") == ip("fe80::ff:fe00:102")


def test_zone_rule_allows_egress_of_source_and_ingress_of_destination():
    c = compile_policy(policy([Rule("ab", "allow", ("a",), Destination(zones=("b",)), (PortRange("tcp", 80, 80),))]))
    assert lookup(c, abi.DIR_EGRESS, "a", "10.0.2.2", 6, 80) == (abi.POLICY_ALLOW, 1)
    assert lookup(c, abi.DIR_INGRESS, "b", "10.0.1.1", 6, 80) == (abi.POLICY_ALLOW, 1)
    assert lookup(c, abi.DIR_INGRESS, "a", "10.0.2.2", 6, 80) is None  # not the other way
    assert lookup(c, abi.DIR_EGRESS, "b", "10.0.1.1", 6, 80) is None
    assert lookup(c, abi.DIR_EGRESS, "a", "10.0.2.2", 6, 81) is None
    assert lookup(c, abi.DIR_EGRESS, "a", "10.0.2.2", 17, 80) is None


def test_deny_beats_allow_whatever_the_order():
    for order in (0, 1):
        rules = [Rule("allow-all", "allow", ("a",), Destination(cidrs=(net("0.0.0.0/0"),)), ()),
                 Rule("deny-meta", "deny", ("a",), Destination(cidrs=(net("169.254.169.254/32"),)), ())]
        rules = rules if order == 0 else rules[::-1]
        c = compile_policy(policy(rules))
        deny_id = c.rule_ids["deny-meta"]
        assert lookup(c, abi.DIR_EGRESS, "a", "169.254.169.254", 6, 80) == (abi.POLICY_DENY, deny_id)
        assert lookup(c, abi.DIR_EGRESS, "a", "169.254.169.253", 6, 80)[0] == abi.POLICY_ALLOW
        # the cidr also holds zone b's addresses: allowed toward them, but b has no ingress grant
        assert lookup(c, abi.DIR_EGRESS, "a", "10.0.2.1", 6, 80)[0] == abi.POLICY_ALLOW
        assert lookup(c, abi.DIR_INGRESS, "b", "10.0.1.1", 6, 80) is None


def test_empty_ports_mean_every_protocol():
    c = compile_policy(policy([Rule("any", "allow", ("a",), Destination(zones=("b",)), ())]))
    for proto in (6, 17, 1, 58, 0):
        assert lookup(c, abi.DIR_EGRESS, "a", "10.0.2.1", proto, 12345) is not None


def test_identities_share_policy_entries():
    c = compile_policy(policy([Rule("ab", "allow", ("a",), Destination(zones=("b",)), (PortRange("tcp", 1, 1),))]))
    # b1 and b2 have the same selector set, hence the same identity
    assert c.ipcache[net("10.0.2.1/32")] == c.ipcache[net("10.0.2.2/32")]


def test_networks_expand_to_their_cidrs():
    p = policy([Rule("logs", "allow", ("a",), Destination(networks=("logging",)), (PortRange("udp", 514, 514),))],
               networks={"logging": (net("192.0.2.10/32"), net("2001:db8::10/128"))})
    c = compile_policy(p)
    assert lookup(c, abi.DIR_EGRESS, "a", "192.0.2.10", 17, 514) == (abi.POLICY_ALLOW, 1)
    assert lookup(c, abi.DIR_EGRESS, "a", "2001:db8::10", 17, 514) == (abi.POLICY_ALLOW, 1)
    assert lookup(c, abi.DIR_EGRESS, "a", "192.0.2.11", 17, 514) is None


def test_learned_identity_adds_rule_ports_for_that_zone_only():
    rules = [Rule("web", "allow", ("a",), Destination(fqdns=("x.test",)), (PortRange("tcp", 443, 443),)),
             Rule("net", "allow", ("b",), Destination(cidrs=(net("203.0.113.0/24"),)), (PortRange("tcp", 80, 80),))]
    c = compile_policy(policy(rules))
    sels = c.static_selectors_of("203.0.113.5") | {("learned", "a", "web")}
    ident, entries = c.identity_for(frozenset(sels))
    assert entries and all(e.identity == ident for e in entries)
    assert c.identity_for(frozenset(sels)) == (ident, [])  # reused
    c.ipcache[net("203.0.113.5/32")] = ident
    assert lookup(c, abi.DIR_EGRESS, "a", "203.0.113.5", 6, 443) == (abi.POLICY_ALLOW, 1)
    assert lookup(c, abi.DIR_EGRESS, "b", "203.0.113.5", 6, 443) is None
    assert lookup(c, abi.DIR_EGRESS, "b", "203.0.113.5", 6, 80) == (abi.POLICY_ALLOW, 2)


def test_random_policies_match_a_brute_force_reading_of_the_rules():
    rnd = random.Random(7)
    cidrs = [net(x) for x in ("10.0.0.0/8", "10.0.2.0/24", "10.0.2.2/32", "0.0.0.0/0", "198.51.100.0/24")]
    for _ in range(30):
        rules = []
        for i in range(rnd.randint(1, 6)):
            lo = rnd.choice([0, 1, 79, 80, 443, 1000, 65535])
            hi = rnd.choice([h for h in (80, 443, 1024, 65535) if h >= lo] or [lo])
            to = (Destination(zones=(rnd.choice("ab"),)) if rnd.random() < 0.5
                  else Destination(cidrs=(rnd.choice(cidrs),)))
            rules.append(Rule(f"r{i}", rnd.choice(["allow", "allow", "deny"]), (rnd.choice("ab"),), to,
                              (PortRange("tcp", lo, hi),)))
        p = policy(rules)
        c = compile_policy(p)
        zone_of = {str(a): w.zone for w in p.workloads() for a in w.addresses}
        for remote in ("10.0.1.1", "10.0.2.1", "10.0.2.2", "10.9.9.9", "198.51.100.1", "8.8.8.8"):
            for port in (0, 1, 79, 80, 81, 443, 1024, 1025, 65535):
                for local in "ab":
                    expect = _brute(rules, local, remote, zone_of.get(remote), port)
                    got = lookup(c, abi.DIR_EGRESS, local, remote, 6, port)
                    assert got == expect, (rules, local, remote, port)


def _brute(rules, local, remote, remote_zone, port):
    matching = []
    for i, r in enumerate(rules, start=1):
        if local not in r.from_zones or not any(pr.lo <= port <= pr.hi for pr in r.ports):
            continue
        if remote_zone in r.to.zones or any(ip(remote) in c for c in r.to.cidrs):
            matching.append((r.action, i))
    if any(a == "deny" for a, _ in matching):
        return (abi.POLICY_DENY, min(i for a, i in matching if a == "deny"))
    if matching:
        return (abi.POLICY_ALLOW, min(i for _, i in matching))
    return None


def test_only_this_host_reaches_ssh_of_zones_operators_may_access():
    from dataclasses import replace

    from skyguard.policy.model import AdminSsh, SshOperator

    p = replace(policy([]), admin_ssh=AdminSsh(operators=(SshOperator("alice", "ssh-ed25519 AAAA", ("b",)),)))
    c = compile_policy(p, host_addresses=["169.254.1.1"])
    tcp = abi.IPPROTO["tcp"]
    assert lookup(c, abi.DIR_INGRESS, "b", "169.254.1.1", tcp, 22) == (abi.POLICY_ALLOW, c.rule_ids["admin-ssh"])
    assert lookup(c, abi.DIR_INGRESS, "b", "169.254.1.1", tcp, 23) is None
    assert lookup(c, abi.DIR_INGRESS, "a", "169.254.1.1", tcp, 22) is None  # no operator may access a
    assert lookup(c, abi.DIR_INGRESS, "b", "10.0.1.1", tcp, 22) is None  # another VM may not
    without_admin = compile_policy(policy([]), host_addresses=["169.254.1.1"])
    assert lookup(without_admin, abi.DIR_INGRESS, "b", "169.254.1.1", tcp, 22) is None


def test_only_this_host_reaches_a_terminated_workloads_forward_to_port():
    """skyguard's TLS terminator carries the plaintext to forward_to from the host: the host (and
    no one else) gets exactly that port in that workload's zone; a zone's rule to it stays as it was."""
    from dataclasses import replace

    from skyguard.policy.model import TlsTermination

    terminated = (TlsTermination("b1", 443, 8080, "b1-tls"),)
    c = compile_policy(replace(policy([]), tls_termination=terminated), host_addresses=["169.254.1.1", "fd00:ff::1"])
    tcp = abi.IPPROTO["tcp"]
    for host in ("169.254.1.1", "fd00:ff::1"):
        assert lookup(c, abi.DIR_INGRESS, "b", host, tcp, 8080) == (abi.POLICY_ALLOW, c.rule_ids["tls-termination"])
        assert lookup(c, abi.DIR_INGRESS, "b", host, tcp, 443) is None  # the TLS port is the terminator's own
        assert lookup(c, abi.DIR_INGRESS, "b", host, tcp, 8081) is None
        assert lookup(c, abi.DIR_INGRESS, "b", host, abi.IPPROTO["udp"], 8080) is None
        assert lookup(c, abi.DIR_INGRESS, "a", host, tcp, 8080) is None  # another zone's workloads
    assert lookup(c, abi.DIR_INGRESS, "b", "10.0.1.1", tcp, 8080) is None  # another VM may not
    assert lookup(c, abi.DIR_INGRESS, "b", "192.0.2.7", tcp, 8080) is None  # nor the internet
    assert lookup(compile_policy(policy([]), host_addresses=["169.254.1.1"]),
                  abi.DIR_INGRESS, "b", "169.254.1.1", tcp, 8080) is None  # nor the host without the entry
    rule = Rule("a-to-b", "allow", ("a",), Destination(zones=("b",)), (PortRange("tcp", 8080, 8080),))
    with_rule = compile_policy(replace(policy([rule]), tls_termination=terminated), host_addresses=["169.254.1.1"])
    assert lookup(with_rule, abi.DIR_INGRESS, "b", "10.0.1.1", tcp, 8080) == (abi.POLICY_ALLOW, with_rule.rule_ids["a-to-b"])
