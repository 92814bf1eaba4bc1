"""hypothesis strategies for skyguard policies nobody hand-wrote: valid ones, and near-valid ones
(one mutation away from valid) for checking that `policy validate` and `skyguard up` agree.

Shared by tests/unit/test_policygen.py (the generator against the parser, root-free),
tests/integration/test_lifecycle.py (the daemon driven through an operator's actions) and
tests/fuzz/test_lifecycle_long.py (the same, long). Each imports it after putting tests/ on
sys.path (they live in different folders and pytest puts only each test's own folder there).

A policy is generated over a *topology*: the lab VMs (name, interface, MAC, addresses) that exist
as namespaces while the daemon runs. Every policy of one lifecycle run keeps those VMs (so probes
between them mean something) and regroups them into other zones under other rules; it may add
"phantom" workloads whose interfaces do not exist. Policies are plain dicts (what the YAML says)
rendered with to_yaml; the parser is the judge of what they mean.

What is generated is valid by construction, within what the lab can build: workload addresses
stay out of the lab's own ranges (skyguard/lab/addressing.py RESERVED_FOR_LAB), interface names
avoid the lab's, DNS upstreams are the lab's resolver, the SSH listener binds addresses the lab
host has. Ports lean on PROBE_PORTS, so that probes land inside, outside and on the edges of
rules.
"""

from __future__ import annotations

import copy
import io
import ipaddress
from dataclasses import dataclass

from hypothesis import strategies as st
from ruamel.yaml import YAML

from skyguard.policy.model import SYNTHETIC_RULES

# TCP and UDP echo: every lab VM listens on these (the lifecycle test starts the listeners), and
# the lab internet's echo servers answer on them. Probes use only these ports.
PROBE_PORTS = (7, 514, 5001, 6514)
# Addresses of the lab internet that echo (documentation ranges minus the names' range, where
# DNS-learned addresses live: probes there would depend on what was learned).
INTERNET_PROBE_V4 = ("192.0.2.10", "192.0.2.77", "198.51.100.7", "198.51.100.200")
INTERNET_PROBE_V6 = ("2001:db8::10", "2001:db8::77", "2001:db8:1::9", "2001:db8:51::200")
# CIDRs a rule may name: the probed internet addresses' edges, the VMs' own space, everything.
CIDR_POOL = ("0.0.0.0/0", "::/0", "192.0.2.0/24", "192.0.2.0/28", "198.51.100.0/24", "198.51.100.0/25",
             "198.51.100.128/25", "198.51.100.7/32", "2001:db8::/32", "2001:db8::/64", "2001:db8:1::/48",
             "10.0.0.0/8", "10.0.0.0/16", "172.16.0.0/12", "192.168.0.0/16", "fd00::/8", "fd00:1::/32",
             "169.254.169.254/32", "203.0.113.0/25")
DNS_UPSTREAMS = ("192.0.2.53", "192.0.2.53:53", "2001:db8::53", "[2001:db8::53]:53")
SSH_LISTEN_HOSTS = ("0.0.0.0", "127.0.0.1", "[::]", "100.64.0.1")
# Names in the sealed store that credentials and tls_termination may refer to; the lifecycle test
# sets and removes them.
SECRET_NAMES = ("cred-a", "cred-b", "cred.c")
CERT_NAMES = ("tls-a", "tls_b")
TLS_PORTS = (443, 993, 8443)  # never a probe port: terminated ports are steered to skyguard
RESERVED_IFNAMES = {"lo", "eth0", "lab-uplink", "all", "default"}
LAB_NAMES = {"host", "internet"}


def _ssh_keys() -> list[str]:
    """Deterministic, distinct ed25519 public keys (a key per operator; the parser checks them)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    keys = []
    for i in range(4):
        public = Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32).public_key()
        keys.append(public.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode() + f" op{i}@lab")
    return keys


SSH_KEYS = _ssh_keys()


@dataclass(frozen=True)
class Vm:
    """One lab VM: a workload that exists as a namespace while the test runs."""

    name: str
    interface: str
    mac: str
    addresses: tuple[str, ...]

    def workload(self) -> dict:
        return {"name": self.name, "interface": self.interface, "mac": self.mac,
                "addresses": list(self.addresses)}


# ---- small values -----------------------------------------------------------------------------

_name = st.from_regex(r"[a-z][a-z0-9]{0,5}(-[a-z0-9]{1,4})?", fullmatch=True)


@st.composite
def _unique_names(draw, n: int, taken: frozenset = frozenset(), max_len: int = 15) -> list[str]:
    out: list[str] = []
    for i in range(n):
        name = draw(_name)
        k = 0
        while name in out or name in taken:  # made unique without redrawing (keeps examples small)
            name, k = f"{name[:max_len - 5].rstrip('-')}-{i}x{k}", k + 1
        out.append(name[:max_len])
    return out


@st.composite
def _mac(draw) -> str:
    octets = draw(st.lists(st.integers(0, 255), min_size=6, max_size=6))
    octets[0] &= 0xFE  # unicast
    if not any(octets):
        octets[5] = 1
    sep = draw(st.sampled_from([":", ":", "-"]))
    text = sep.join(f"{o:02x}" for o in octets)
    return text.upper() if draw(st.booleans()) and sep == ":" else text


@st.composite
def _v4(draw) -> str:
    space = draw(st.sampled_from(["10", "172", "192"]))
    a, b, c = draw(st.integers(0, 255)), draw(st.integers(0, 255)), draw(st.integers(1, 254))
    if space == "10":
        return f"10.{a}.{b}.{c}"
    if space == "172":
        return f"172.{16 + a % 16}.{b}.{c}"
    return f"192.168.{b}.{c}"


@st.composite
def _v6(draw) -> str:
    groups = draw(st.lists(st.integers(0, 0xFFFF), min_size=3, max_size=3))
    if groups[0] == 0x64:  # fd64::/64 is the lab's uplink
        groups[0] = 0x65
    host = draw(st.integers(1, 0xFFFF))
    return str(ipaddress.ip_address(f"fd00:{groups[0]:x}:{groups[1]:x}:{groups[2]:x}::{host:x}"))


@st.composite
def topologies(draw, min_vms: int = 1, max_vms: int = 4) -> list[Vm]:
    """The lab VMs of one run: unique names, interfaces, MACs and addresses, v4 and/or v6."""
    n = draw(st.integers(min_vms, max_vms))
    names = draw(_unique_names(n, frozenset(LAB_NAMES)))
    vms: list[Vm] = []
    seen_if, seen_mac, seen_addr = set(RESERVED_IFNAMES), set(), set()
    for name in names:
        iface = draw(st.sampled_from([f"sg-{name}", f"vm_{name}", f"{name}.0", f"tap-{name}"]))[:15]
        if iface in seen_if:
            iface = f"if{len(seen_if)}-{name}"[:15]
        mac = draw(_mac())
        if mac.lower().replace("-", ":") in seen_mac:
            mac = f"02:00:5e:00:77:{len(seen_mac):02x}"
        family = draw(st.sampled_from(["4", "6", "46", "46", "446"]))
        addrs = []
        for f in family:
            addr = draw(_v4() if f == "4" else _v6())
            if addr in seen_addr:
                n_seen = len(seen_addr)
                addr = f"10.254.{n_seen}.{n_seen + 1}" if f == "4" else f"fd00:fe::{n_seen + 1:x}"
            seen_addr.add(addr)
            addrs.append(addr)
        seen_if.add(iface)
        seen_mac.add(mac.lower().replace("-", ":"))
        vms.append(Vm(name, iface, mac, tuple(addrs)))
    return vms


# ---- rules ------------------------------------------------------------------------------------

@st.composite
def _port(draw) -> str:
    kind = draw(st.sampled_from(["single", "single", "range", "icmp", "icmpv6", "any"]))
    if kind in ("icmp", "icmpv6"):
        return kind if draw(st.booleans()) else kind.upper()
    proto = draw(st.sampled_from(["tcp", "tcp", "udp"]))
    near = st.sampled_from([p + d for p in PROBE_PORTS for d in (-1, 0, 0, 1)])
    if kind == "single":
        return f"{proto}/{draw(near)}"
    if kind == "any":
        return f"{proto}/{draw(st.integers(1, 65535))}"
    lo = draw(st.one_of(near, st.integers(1, 65535)))
    hi = draw(st.one_of(near, st.integers(lo, 65535)))
    lo, hi = min(lo, hi), max(lo, hi)
    return f"{proto}/{lo}-{hi}" if lo != hi else f"{proto}/{lo}"


_label = st.from_regex(r"[a-z0-9]([a-z0-9_-]{0,6}[a-z0-9])?", fullmatch=True)


@st.composite
def fqdn_patterns(draw) -> str:
    base = ".".join(draw(st.lists(_label, min_size=1, max_size=2))) + ".test"
    head = draw(st.sampled_from(["", "", "*.", "**."]))
    text = head + base
    if draw(st.integers(0, 9)) == 0:
        text = text.upper().replace("*", "*") + "."  # case and the trailing dot do not matter
    return text


@st.composite
def _rule(draw, name: str, zones: list[str], networks: list[str]) -> dict:
    rule: dict = {"name": name}
    if draw(st.integers(0, 3)) == 0:
        rule["action"] = "deny"
    elif draw(st.booleans()):
        rule["action"] = "allow"
    frm = draw(st.sampled_from(["star", "one", "list"]))
    if frm == "star":
        rule["from"] = "*"
    elif frm == "one":
        rule["from"] = draw(st.sampled_from(zones))
    else:
        rule["from"] = draw(st.lists(st.sampled_from(zones), min_size=1, max_size=len(zones), unique=True))
    to: dict = {}
    parts = draw(st.sets(st.sampled_from(["zones", "networks", "cidrs", "fqdns"]), min_size=1, max_size=3))
    if "networks" in parts and not networks:
        parts = (parts - {"networks"}) or {"zones"}
    if "zones" in parts:
        to["zones"] = draw(st.lists(st.sampled_from(zones), min_size=1, max_size=len(zones), unique=True))
    if "networks" in parts:
        to["networks"] = draw(st.lists(st.sampled_from(networks), min_size=1, max_size=2, unique=True))
    if "cidrs" in parts:
        to["cidrs"] = draw(st.lists(st.sampled_from(CIDR_POOL), min_size=1, max_size=3, unique=True))
    if "fqdns" in parts:
        to["fqdns"] = draw(st.lists(fqdn_patterns(), min_size=1, max_size=3))
    rule["to"] = to
    if draw(st.integers(0, 5)) > 0:
        rule["ports"] = draw(st.lists(_port(), min_size=1, max_size=4))
    if draw(st.integers(0, 7)) == 0:
        rule["description"] = "generated"
    return rule


# ---- whole policies ---------------------------------------------------------------------------

@st.composite
def policies(draw, topology: list[Vm], *, phantoms: bool = True, max_rules: int = 8) -> dict:
    """One valid policy over `topology` (every VM a workload, in zones drawn here)."""
    n_zones = draw(st.integers(1, max(1, min(4, len(topology) + 1))))
    zone_names = draw(_unique_names(n_zones, max_len=20))
    members: dict[str, list[dict]] = {z: [] for z in zone_names}
    for i, vm in enumerate(topology):
        zone = zone_names[i] if i < n_zones and draw(st.booleans()) else draw(st.sampled_from(zone_names))
        members[zone].append(vm.workload())
    if phantoms and draw(st.integers(0, 3)) == 0:
        taken = {vm.name for vm in topology} | LAB_NAMES
        macs = {vm.mac.lower().replace("-", ":") for vm in topology}
        addrs = {a for vm in topology for a in vm.addresses}
        name = draw(_unique_names(1, frozenset(taken), max_len=11))[0]
        mac = draw(_mac())
        addr = draw(_v4())
        if mac.lower().replace("-", ":") not in macs and addr not in addrs:
            # A VM not running (yet): its interface does not exist.
            members[draw(st.sampled_from(zone_names))].append(
                {"name": name, "interface": f"ph-{name}", "mac": mac, "addresses": [addr]})
    doc: dict = {"apiVersion": "skyguard/v1", "kind": "Policy",
                 "metadata": {"name": draw(_name)}}
    doc["zones"] = {z: {"workloads": ws} for z, ws in members.items()}
    networks: dict[str, list[str]] = {}
    for net in draw(_unique_names(draw(st.integers(0, 2)))):
        networks[net] = draw(st.lists(st.sampled_from(CIDR_POOL), min_size=1, max_size=3, unique=True))
    if networks:
        doc["networks"] = networks
    n_rules = draw(st.integers(0, max_rules))
    rule_names = draw(_unique_names(n_rules, frozenset(SYNTHETIC_RULES), max_len=30))
    rules = [draw(_rule(name, zone_names, list(networks))) for name in rule_names]
    if rules or draw(st.booleans()):
        doc["rules"] = rules
    has_fqdns = any("fqdns" in r["to"] for r in rules)
    if has_fqdns or draw(st.booleans()):
        dns: dict = {}
        if has_fqdns or draw(st.booleans()):
            dns["upstreams"] = draw(st.lists(st.sampled_from(DNS_UPSTREAMS), min_size=1, max_size=2, unique=True))
        if draw(st.booleans()):
            dns["refuse_with"] = draw(st.sampled_from(["refused", "nxdomain"]))
        if draw(st.booleans()):
            lo = draw(st.integers(0, 60))
            dns["min_ttl"], dns["max_ttl"] = lo, draw(st.integers(lo, 7200))
        if draw(st.booleans()):
            dns["tunnel_detection"] = {"action": draw(st.sampled_from(["block", "alert", "off"]))}
        doc["dns"] = dns
    if draw(st.integers(0, 2)) == 0:
        doc["credentials"] = draw(_credentials(zone_names))
    workloads = [w["name"] for ws in members.values() for w in ws]
    if draw(st.integers(0, 3)) == 0:
        doc["tls_termination"] = draw(_terminations(workloads))
    if draw(st.integers(0, 2)) == 0:
        doc["admin"] = {"ssh": draw(_admin_ssh(zone_names))}
    return doc


@st.composite
def _credentials(draw, zones: list[str]) -> list[dict]:
    n = draw(st.integers(1, 2))
    names = draw(_unique_names(n))
    out = []
    for i, name in enumerate(names):
        tail = draw(st.from_regex(r"[A-Za-z0-9]{12}", fullmatch=True))
        cred = {"name": name, "placeholder": f"sgph{i:02d}-{tail}",  # equal length: never nested
                "secret": draw(st.sampled_from(SECRET_NAMES)),
                "zones": "*" if draw(st.booleans()) else draw(st.lists(st.sampled_from(zones), min_size=1,
                                                                       max_size=len(zones), unique=True)),
                "destinations": draw(st.lists(st.sampled_from(["api.cred.test", "git.cred.test", "x.test"]),
                                              min_size=1, max_size=2, unique=True))}
        if draw(st.booleans()):
            cred["inject"] = {"header": "Authorization", "format": "Bearer {secret}"}
        else:
            cred["inject"] = {"body": True, "max_occurrences": draw(st.integers(1, 3))}
        if draw(st.integers(0, 3)) == 0:
            cred["strip_response_headers"] = ["Set-Cookie"]
        out.append(cred)
    return out


@st.composite
def _terminations(draw, workloads: list[str]) -> list[dict]:
    pairs = draw(st.lists(st.tuples(st.sampled_from(workloads), st.sampled_from(TLS_PORTS)),
                          min_size=1, max_size=2, unique=True))
    return [{"workload": w, "port": p, "forward_to": draw(st.sampled_from([8080, 8000])),
             "certificate": draw(st.sampled_from(CERT_NAMES))} for w, p in pairs]


@st.composite
def _admin_ssh(draw, zones: list[str]) -> dict:
    n = draw(st.integers(1, 3))
    names = draw(_unique_names(n))
    keys = draw(st.permutations(SSH_KEYS))
    ssh: dict = {"operators": [{"name": name, "public_key": keys[i],
                                "may_access": "*" if draw(st.booleans()) else
                                draw(st.lists(st.sampled_from(zones), min_size=1, max_size=len(zones), unique=True))}
                               for i, name in enumerate(names)]}
    if draw(st.integers(0, 3)) > 0:
        ssh["listen"] = f"{draw(st.sampled_from(SSH_LISTEN_HOSTS))}:{draw(st.integers(2200, 2299))}"
    for flag in ("port_forwarding", "agent_forwarding", "sftp"):
        if draw(st.integers(0, 3)) == 0:
            ssh[flag] = draw(st.booleans())
    return ssh


def to_yaml(doc: dict) -> str:
    out = io.StringIO()
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.dump(doc, out)
    return out.getvalue()


# ---- near-valid policies: one mutation ---------------------------------------------------------

def _workloads(doc):
    return [w for z in doc["zones"].values() for w in z["workloads"]]


# name -> (applies(doc), mutate(doc, draw)). Every one of these makes the policy invalid; the
# agreement tests also run mutations that may leave it valid (see MAYBE_VALID).
def _m_drop_required(doc, draw):
    key = draw(st.sampled_from(["apiVersion", "kind", "metadata", "zones"]))
    del doc[key]


def _m_unknown_key(doc, draw):
    where = draw(st.sampled_from(["top", "zone", "workload", "rule"]))
    if where == "rule" and doc.get("rules"):
        doc["rules"][0]["prots"] = ["tcp/7"]
    elif where == "workload":
        _workloads(doc)[0]["adresses"] = ["10.9.9.9"]
    elif where == "zone":
        next(iter(doc["zones"].values()))["workload"] = []
    else:
        doc["rule"] = []


def _m_duplicate(doc, draw):
    ws = _workloads(doc)
    what = draw(st.sampled_from(["interface", "mac", "address", "name"]))
    copy_of = ws[0]
    extra = {"name": "dupe", "interface": "dupe0", "mac": "02:de:ad:be:ef:01", "addresses": ["10.250.250.250"]}
    if what == "interface":
        extra["interface"] = copy_of["interface"]
    elif what == "mac":
        extra["mac"] = copy_of["mac"]
    elif what == "address":
        extra["addresses"] = [copy_of["addresses"][0]]
    else:
        extra["name"] = copy_of["name"]
    next(iter(doc["zones"].values()))["workloads"].append(extra)


def _m_bad_scalar(doc, draw):
    w = _workloads(doc)[0]
    bad = draw(st.sampled_from(["mac-multicast", "mac-zero", "addr-net", "addr-loopback", "addr-junk",
                                "iface-long", "iface-slash", "name-upper", "name-long"]))
    if bad == "mac-multicast":
        w["mac"] = "01:00:5e:00:00:01"
    elif bad == "mac-zero":
        w["mac"] = "00:00:00:00:00:00"
    elif bad == "addr-net":
        w["addresses"] = ["10.1.0.0/16"]
    elif bad == "addr-loopback":
        w["addresses"] = ["127.0.0.1"]
    elif bad == "addr-junk":
        w["addresses"] = ["10.1.1"]
    elif bad == "iface-long":
        w["interface"] = "a-very-long-ifname"
    elif bad == "iface-slash":
        w["interface"] = "sg/vm"
    elif bad == "name-upper":
        w["name"] = "VM1"
    else:
        w["name"] = "a" * 16


def _m_bad_port(doc, draw):
    port = draw(st.sampled_from(["tcp/0", "tcp/65536", "udp/70000", "tcp/9-3", "sctp/5", "7", "icmp/8", ""]))
    rules = doc.setdefault("rules", [])
    zone = next(iter(doc["zones"]))
    rules.append({"name": "bad-port", "from": zone, "to": {"cidrs": ["10.0.0.0/8"]}, "ports": [port]})


def _m_bad_reference(doc, draw):
    zone = next(iter(doc["zones"]))
    what = draw(st.sampled_from(["from", "to-zone", "network", "star-list", "cidr-host-bits", "fqdn-star"]))
    rule: dict = {"name": "bad-ref", "from": zone, "to": {"zones": [zone]}}
    if what == "from":
        rule["from"] = "no-such-zone"
    elif what == "to-zone":
        rule["to"] = {"zones": ["no-such-zone"]}
    elif what == "network":
        rule["to"] = {"networks": ["no-such-net"]}
    elif what == "star-list":
        rule["from"] = ["*", zone]
    elif what == "cidr-host-bits":
        rule["to"] = {"cidrs": ["10.1.2.3/8"]}
    else:
        rule["to"] = {"fqdns": ["*"]}
        doc.setdefault("dns", {})["upstreams"] = ["192.0.2.53"]
    doc.setdefault("rules", []).append(rule)


def _m_fqdn_without_upstreams(doc, draw):
    zone = next(iter(doc["zones"]))
    doc.setdefault("rules", []).append({"name": "needs-dns", "from": zone, "to": {"fqdns": ["a.test"]}})
    dns = doc.get("dns") or {}
    dns.pop("upstreams", None)
    if draw(st.booleans()):
        doc["dns"] = dns
    else:
        doc.pop("dns", None)


def _m_duplicate_rule(doc, draw):
    zone = next(iter(doc["zones"]))
    rule = {"name": "twice", "from": zone, "to": {"zones": [zone]}}
    doc.setdefault("rules", []).extend([rule, dict(rule)])


def _m_bad_dns(doc, draw):
    what = draw(st.sampled_from(["ttl-order", "refuse", "upstream", "tunnel"]))
    dns = doc.setdefault("dns", {})
    if what == "ttl-order":
        dns["min_ttl"], dns["max_ttl"] = 100, 10
    elif what == "refuse":
        dns["refuse_with"] = "drop"
    elif what == "upstream":
        dns["upstreams"] = ["resolver.example"]
    else:
        dns["tunnel_detection"] = {"action": "kill"}


def _m_bad_credential(doc, draw):
    zone = next(iter(doc["zones"]))
    cred = {"name": "c1", "placeholder": "sg-placeholder-0123456789", "secret": "cred-a", "zones": [zone],
            "destinations": ["api.cred.test"], "inject": {"header": "Authorization"}}
    what = draw(st.sampled_from(["short", "secret-value", "wildcard", "no-inject", "format", "zone"]))
    if what == "short":
        cred["placeholder"] = "sg-short"
    elif what == "secret-value":
        cred["secret"] = "ghp_this is a token value!"
    elif what == "wildcard":
        cred["destinations"] = ["*.cred.test"]
    elif what == "no-inject":
        cred["inject"] = {}
    elif what == "format":
        cred["inject"] = {"header": "Authorization", "format": "Bearer {token}"}
    else:
        cred["zones"] = ["no-such-zone"]
    doc["credentials"] = [cred]


def _m_bad_admin(doc, draw):
    zone = next(iter(doc["zones"]))
    op = {"name": "alice", "public_key": SSH_KEYS[0], "may_access": [zone]}
    what = draw(st.sampled_from(["listen", "key", "same-key", "no-operators", "tls-workload"]))
    if what == "listen":
        doc["admin"] = {"ssh": {"listen": "0.0.0.0", "operators": [op]}}
    elif what == "key":
        doc["admin"] = {"ssh": {"operators": [dict(op, public_key="ssh-ed25519 AAAAnotakey")]}}
    elif what == "same-key":
        doc["admin"] = {"ssh": {"operators": [op, dict(op, name="bob")]}}
    elif what == "no-operators":
        doc["admin"] = {"ssh": {"operators": []}}
    else:
        doc["tls_termination"] = [{"workload": "no-such-vm", "port": 443, "forward_to": 8080,
                                   "certificate": "tls-a"}]


INVALIDATING = {
    "drop-required": _m_drop_required, "unknown-key": _m_unknown_key, "duplicate": _m_duplicate,
    "bad-scalar": _m_bad_scalar, "bad-port": _m_bad_port, "bad-reference": _m_bad_reference,
    "fqdn-without-upstreams": _m_fqdn_without_upstreams, "duplicate-rule": _m_duplicate_rule,
    "bad-dns": _m_bad_dns, "bad-credential": _m_bad_credential, "bad-admin": _m_bad_admin,
}


def _m_drop_optional(doc, draw):
    keys = [k for k in ("networks", "rules", "dns", "credentials", "tls_termination", "admin") if k in doc]
    if keys:
        key = draw(st.sampled_from(keys))
        if key == "networks" and any("networks" in r["to"] for r in doc.get("rules", [])):
            key = "rules" if "rules" in doc else key
        del doc[key]


def _m_empty_dns(doc, draw):
    if not any("fqdns" in r["to"] for r in doc.get("rules", [])):
        doc["dns"] = draw(st.sampled_from([{}, None, {"refuse_with": "nxdomain"}]))


# Mutations that leave a valid policy valid (or not: that is for validate to say, and up to agree).
MAYBE_VALID = {"drop-optional": _m_drop_optional, "empty-dns": _m_empty_dns}


@st.composite
def mutants(draw, doc: dict, *, maybe_valid: bool = True) -> tuple[str, str]:
    """(mutation name, YAML text) one mutation away from `doc`."""
    table = dict(INVALIDATING, **(MAYBE_VALID if maybe_valid else {}))
    name = draw(st.sampled_from(sorted(table)))
    mutated = copy.deepcopy(doc)
    table[name](mutated, draw)
    return name, to_yaml(mutated)


def dns_names(doc: dict) -> list[str]:
    """Query names worth asking: instances of the policy's FQDN patterns and a name none names."""
    out = ["nobody-names-this.test"]
    for rule in doc.get("rules") or []:
        for pattern in rule["to"].get("fqdns", []):
            p = pattern.lower().rstrip(".")
            if p.startswith("**."):
                out += ["a." + p[3:], "b.c." + p[3:]]
            elif p.startswith("*."):
                out += ["w." + p[2:], "x.y." + p[2:]]
            else:
                out.append(p)
    return sorted(set(out))
