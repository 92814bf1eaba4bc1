"""Policy -> BPF map entries. Pure: no kernel, no I/O; unit-tested in tests/unit/test_compile*.py.

The model (bpf/README.md has the why):
- A *selector* is one thing a rule can name as a remote: ("zone", name), ("cidr", network), or
  ("learned", zone, rule) for addresses the DNS proxy learned for that zone's FQDN rule.
- An *identity* is a distinct set of selectors. The ipcache maps every address prefix the policy
  mentions to the identity of all selectors that contain it; since prefixes nest, the longest
  match always carries the right set.
- For every (direction, local zone, identity, protocol) we compute disjoint port intervals with
  their final verdict (deny beats allow whatever the order; allow carries the first allowing
  rule's id), merge neighbours, and split them into port prefixes for the policy LPM.
Egress (from_vm of zone A) checks a rule `from A to X` against the destination's identity;
ingress (to_vm of zone B) checks a rule `from A to {zones: [B]}` against the source's identity.
Not here: generations, ifindexes, writing maps (datapath.py).
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from dataclasses import dataclass, field

from skyguard.datapath import abi
from skyguard.errors import BadInput
from skyguard.policy.console import console_ports
from skyguard.policy.model import (
    ADMIN_SSH_RULE,
    APPS_RULE,
    CONSOLE_RULE,
    KEYS_RULE,
    TLS_TERMINATION_RULE,
    IPNetwork,
    Policy,
    PortRange,
)

Selector = tuple  # ("zone", name) | ("cidr", IPNetwork) | ("learned", zone, rule_name)

ALL_PORTS = (0, 0xFFFF)
# What a rule with no `ports:` allows: every protocol and port ("other" = proto 0 in the map).
EVERY_PROTOCOL = ("tcp", "udp", "icmp", "icmpv6", "other")


@dataclass(frozen=True)
class PolicyEntry:
    """One policy entry (before a generation is attached): single ports (prefixlen 16) go to
    sg_policy_exact, port prefixes to the sg_policy LPM."""

    direction: int
    zone: int
    identity: int
    proto: int
    port: int  # first port of the prefix, host order (written network order)
    port_prefixlen: int  # 0..16
    verdict: int  # abi.POLICY_*
    rule_id: int


@dataclass(frozen=True)
class WorkloadEntry:
    name: str
    interface: str
    zone: int
    workload: int
    mac: bytes
    addresses: tuple  # allowed source addresses, incl. the MAC's EUI-64 link-local


@dataclass
class _Grant:
    rule_id: int
    action: str
    ports: tuple[tuple[int, int, int], ...]  # (proto, lo, hi)


@dataclass
class Compiled:
    zone_ids: dict[str, int]
    rule_ids: dict[str, int]
    workloads: list[WorkloadEntry]
    identities: dict[frozenset, int]  # selector set -> identity id (>= 1)
    ipcache: dict[IPNetwork, int]  # prefix -> identity id
    policy: list[PolicyEntry]
    # selector -> [(direction, zone id, grant)]: what naming that selector as remote allows
    grants: dict[Selector, list[tuple[int, int, _Grant]]] = field(repr=False, default_factory=dict)
    static_prefixes: dict[IPNetwork, frozenset] = field(repr=False, default_factory=dict)
    _lengths: dict[int, list[int]] = field(repr=False, default_factory=dict)

    def identity_for(self, selectors: frozenset) -> tuple[int, list[PolicyEntry]]:
        """The id of this selector set, allocating one (and returning its new policy entries)
        when it is new. Used by learn(): a learned address gets static selectors + learned ones."""
        if selectors in self.identities:
            return self.identities[selectors], []
        ident = max(self.identities.values(), default=0) + 1
        self.identities[selectors] = ident
        entries = _entries_for_identity(self.grants, selectors, ident)
        self.policy.extend(entries)
        return ident, entries

    def static_selectors_of(self, ip) -> frozenset:
        """Selectors of the longest static prefix holding ip (what its ipcache entry would say)."""
        ip = ipaddress.ip_address(ip)
        for length in sorted(self._lengths.get(ip.version, []), reverse=True):
            net = ipaddress.ip_network((ip, length), strict=False)
            if net in self.static_prefixes:
                return self.static_prefixes[net]
        return frozenset()


def eui64_link_local(mac: str) -> ipaddress.IPv6Address:
    b = bytes.fromhex(mac.replace(":", ""))
    iid = bytes([b[0] ^ 0x02]) + b[1:3] + b"\xff\xfe" + b[3:6]
    return ipaddress.IPv6Address(b"\xfe\x80" + b"\x00" * 6 + iid)


def port_prefixes(lo: int, hi: int) -> list[tuple[int, int]]:
    """[lo, hi] (16-bit, inclusive) as the fewest (first port, prefix length) blocks."""
    out = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 16
        while lo + size - 1 > hi:
            size >>= 1
        out.append((lo, 16 - size.bit_length() + 1))
        lo += size
    return out


def _ports_of(ports: tuple[PortRange, ...]) -> tuple[tuple[int, int, int], ...]:
    if not ports:
        return tuple((abi.IPPROTO[p], *ALL_PORTS) for p in EVERY_PROTOCOL)
    out = []
    for pr in ports:
        if pr.protocol in ("icmp", "icmpv6"):
            out.append((abi.IPPROTO[pr.protocol], *ALL_PORTS))  # every type
        else:
            out.append((abi.IPPROTO[pr.protocol], pr.lo, pr.hi))
    return tuple(out)


def _rule_cidrs(policy: Policy, rule) -> list[IPNetwork]:
    cidrs = list(rule.to.cidrs)
    for name in rule.to.networks:
        cidrs.extend(policy.networks[name])
    return cidrs


def _build_grants(policy: Policy, zone_ids: dict[str, int], rule_ids: dict[str, int]):
    grants: dict[Selector, list] = defaultdict(list)
    for rule in policy.rules:
        grant = _Grant(rule_ids[rule.name], rule.action, _ports_of(rule.ports))
        for src in rule.from_zones:
            egress_selectors: list[Selector] = [("zone", z) for z in rule.to.zones]
            egress_selectors += [("cidr", c) for c in _rule_cidrs(policy, rule)]
            if rule.to.fqdns:
                egress_selectors.append(("learned", src, rule.name))
            for sel in egress_selectors:
                grants[sel].append((abi.DIR_EGRESS, zone_ids[src], grant))
            for dst in rule.to.zones:
                grants[("zone", src)].append((abi.DIR_INGRESS, zone_ids[dst], grant))
    return dict(grants)


def _verdict_intervals(grants: list[_Grant], proto: int) -> list[tuple[int, int, int, int]]:
    """Disjoint (lo, hi, verdict, rule_id) for one protocol, neighbours with equal outcome merged."""
    spans = [(lo, hi, g) for g in grants for (p, lo, hi) in g.ports if p == proto]
    if not spans:
        return []
    cuts = sorted({lo for lo, _, _ in spans} | {hi + 1 for _, hi, _ in spans})
    out: list[list[int]] = []
    for start, nxt in zip(cuts, cuts[1:]):
        end = nxt - 1
        covering = [g for lo, hi, g in spans if lo <= start and end <= hi]
        denies = [g.rule_id for g in covering if g.action == "deny"]
        allows = [g.rule_id for g in covering if g.action == "allow"]
        if denies:
            outcome = (abi.POLICY_DENY, min(denies))
        elif allows:
            outcome = (abi.POLICY_ALLOW, min(allows))
        else:
            continue
        if out and out[-1][1] == start - 1 and (out[-1][2], out[-1][3]) == outcome:
            out[-1][1] = end
        else:
            out.append([start, end, *outcome])
    return [(lo, hi, verdict, rule_id) for lo, hi, verdict, rule_id in out]


def _entries_for_identity(grants, selectors: frozenset, ident: int) -> list[PolicyEntry]:
    by_key: dict[tuple[int, int], list[_Grant]] = defaultdict(list)
    for sel in selectors:
        for direction, zone, grant in grants.get(sel, ()):
            by_key[(direction, zone)].append(grant)
    entries = []
    for (direction, zone), gs in sorted(by_key.items()):
        protos = sorted({p for g in gs for (p, _, _) in g.ports})
        for proto in protos:
            for lo, hi, verdict, rule_id in _verdict_intervals(gs, proto):
                for port, plen in port_prefixes(lo, hi):
                    entries.append(PolicyEntry(direction, zone, ident, proto, port, plen, verdict, rule_id))
    return entries




def _admin_zones(policy: Policy) -> list[str]:
    """Zones some operator may reach through the SSH access proxy."""
    if policy.admin_ssh is None:
        return []
    return sorted({z for op in policy.admin_ssh.operators for z in op.may_access})




def _app_ports(policy: Policy) -> list[tuple[str, int]]:
    """(zone, port) of every app of the policy (skyguard/policy/apps.py)."""
    return sorted({(policy.workload(a.workload).zone, a.port) for a in policy.apps})




def _console_ports(policy: Policy) -> list[tuple[str, int]]:
    """(zone, port) of every admin.console target (skyguard/policy/console.py)."""
    zone_of = {w.name: w.zone for w in policy.workloads()}
    return sorted((zone, port) for zone, ports in console_ports(policy.admin_console, zone_of).items()
                  for port in ports)




def _terminated_ports(policy: Policy) -> list[tuple[str, int]]:
    """(zone, forward_to) of every tls_termination entry whose workload the policy has: where
    skyguard's TLS terminator (skyguard/credproxy/termination.py) carries the plaintext to, from
    the host."""
    zone_of = {w.name: w.zone for w in policy.workloads()}
    return sorted({(zone_of[t.workload], t.forward_to) for t in policy.tls_termination if t.workload in zone_of})




def _key_zones(policy: Policy) -> list[str]:
    """Zones some key of the keys: section names (skyguard/policy/keys.py): only they reach the
    crypto proxy's port on the host (the VMs' gateway)."""
    if policy.keys is None:
        return []
    return sorted({z for grant in policy.keys.grants for z in grant.zones})


def compile_policy(policy: Policy, host_addresses=()) -> Compiled:
    """Policy -> map entries. `host_addresses` are the addresses of the host skyguard runs on:
    they get the reserved `host` selector, which the policy's admin.ssh section (and nothing else)
    lets in to tcp/22 of the zones operators may access, so only skyguard's SSH proxy reaches a
    VM's sshd (and apps, consoles, keys and TLS termination use the same way, see the synthetic
    rules below)."""
    if len(policy.zones) >= abi.MAX_ZONES:
        raise BadInput(f"policy {policy.name!r} has {len(policy.zones)} zones; the datapath counts at most "
                       f"{abi.MAX_ZONES - 1} (merge zones, or raise SG_MAX_ZONES in bpf/abi.h and abi.py)")
    zone_ids = {name: i for i, name in enumerate(policy.zones, start=1)}
    rule_ids = {rule.name: i for i, rule in enumerate(policy.rules, start=1)}
    admin_zones, app_ports = _admin_zones(policy), _app_ports(policy)
    console_targets, key_zones = _console_ports(policy), _key_zones(policy)
    terminated = _terminated_ports(policy)
    # The rules skyguard adds for its own proxies, numbered after the policy's, when in use.
    own_rules = {ADMIN_SSH_RULE: admin_zones, APPS_RULE: app_ports, CONSOLE_RULE: console_targets, KEYS_RULE: key_zones,
                 TLS_TERMINATION_RULE: terminated}
    for name, used in own_rules.items():
        if used:
            rule_ids[name] = len(rule_ids) + 1
    workloads = []
    for wid, w in enumerate(policy.workloads(), start=1):
        addrs = tuple(w.addresses) + (eui64_link_local(w.mac),)
        workloads.append(WorkloadEntry(w.name, w.interface, zone_ids[w.zone], wid,
                                       bytes.fromhex(w.mac.replace(":", "")), addrs))

    # Which selectors sit on which prefix.
    on_prefix: dict[IPNetwork, set] = defaultdict(set)
    for w in policy.workloads():
        for a in w.addresses:
            on_prefix[ipaddress.ip_network(a)].add(("zone", w.zone))
    for rule in policy.rules:
        for c in _rule_cidrs(policy, rule):
            on_prefix[c].add(("cidr", c))
    if any(own_rules.values()):
        for a in host_addresses:
            on_prefix[ipaddress.ip_network(a)].add(("host",))
    # IPv4 addresses live at ::ffff:a.b.c.d in the ipcache, which IPv6 prefixes shorter than /96
    # (::/0 above all) also cover: without an IPv4 entry of its own, an IPv4 address no IPv4
    # prefix holds would take such an IPv6 prefix's identity, so `to: {cidrs: ["::/0"]}` would open
    # all of IPv4. 0.0.0.0/0 always present (with no selectors unless a rule names it) stops the
    # longest match inside the IPv4 space. Found by tests/adversarial/test_differential.py.
    on_prefix[ipaddress.ip_network("0.0.0.0/0")]
    lengths = {4: sorted({n.prefixlen for n in on_prefix if n.version == 4}),
               6: sorted({n.prefixlen for n in on_prefix if n.version == 6})}

    # Every prefix's identity: the selectors of itself and of every prefix containing it.
    static_prefixes: dict[IPNetwork, frozenset] = {}
    for net in on_prefix:
        sels: set = set()
        for length in lengths[net.version]:
            if length > net.prefixlen:
                break
            sup = net if length == net.prefixlen else net.supernet(new_prefix=length)
            sels |= on_prefix.get(sup, set())
        static_prefixes[net] = frozenset(sels)

    grants = _build_grants(policy, zone_ids, rule_ids)
    if admin_zones:
        ssh = _Grant(rule_ids[ADMIN_SSH_RULE], "allow", ((abi.IPPROTO["tcp"], 22, 22),))
        grants[("host",)] = [(abi.DIR_INGRESS, zone_ids[z], ssh) for z in admin_zones]
    # An app's port and a console target's port (in its zone) are skyguard's proxies' alone: the
    # host may connect to them; no zone may, whatever the rules say (deny beats allow), and
    # outside addresses never get ingress anyway.
    for synthetic, ports in ((APPS_RULE, app_ports), (CONSOLE_RULE, console_targets)):
        for zone, port in ports:
            only = ((abi.IPPROTO["tcp"], port, port),)
            grants.setdefault(("host",), []).append(
                (abi.DIR_INGRESS, zone_ids[zone], _Grant(rule_ids[synthetic], "allow", only)))
            for other in policy.zones:
                grants.setdefault(("zone", other), []).append(
                    (abi.DIR_INGRESS, zone_ids[zone], _Grant(rule_ids[synthetic], "deny", only)))
    # A terminated workload's forward_to port (in its zone): the host, where the TLS terminator
    # connects from, may reach it; zones reach it only as the policy's rules say (nothing more).
    for zone, port in terminated:
        plaintext = _Grant(rule_ids[TLS_TERMINATION_RULE], "allow", ((abi.IPPROTO["tcp"], port, port),))
        grants.setdefault(("host",), []).append((abi.DIR_INGRESS, zone_ids[zone], plaintext))
    # The zones a key names reach the crypto proxy (listening on every host address, the VMs'
    # gateway among them) on keys.port, with no rule of the operator's; other zones do not unless
    # a rule says so. An operator's deny rule to those addresses still wins.
    if key_zones and policy.keys is not None:  # (key_zones implies keys: mypy cannot see it)
        port = policy.keys.port
        proxy = _Grant(rule_ids[KEYS_RULE], "allow", ((abi.IPPROTO["tcp"], port, port),))
        grants.setdefault(("host",), []).extend((abi.DIR_EGRESS, zone_ids[z], proxy) for z in key_zones)
    identities: dict[frozenset, int] = {}
    policy_entries: list[PolicyEntry] = []
    ipcache: dict[IPNetwork, int] = {}
    for net in sorted(static_prefixes, key=lambda n: (n.version, n)):
        selectors = static_prefixes[net]
        if selectors not in identities:
            identities[selectors] = len(identities) + 1
            policy_entries.extend(_entries_for_identity(grants, selectors, identities[selectors]))
        ipcache[net] = identities[selectors]
    return Compiled(zone_ids, rule_ids, workloads, identities, ipcache, policy_entries, grants,
                    static_prefixes, lengths)
