"""Policy YAML to the validated values of model.py, with every problem named by file, line and key.

The parser collects ALL problems of a file before giving up, so a user fixes a file in one pass,
and it returns nothing at all from a file with any problem (PolicyError carries the list): there
is no such thing as a partially loaded policy. Unknown keys are errors (typo protection), with a
"did you mean" hint. This module only reads and checks; it does not compile rules into map entries
(the datapath's compiler does) and it does not talk to the daemon.

Key paths in messages use the YAML's own names with 0-based list indexes, as jq would:
`rules[3].ports[1]`, `zones.auth.workloads[0].mac`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from skyguard.errors import PolicyError
from skyguard.policy import fqdn
from skyguard.policy.access import AccessSections
from skyguard.policy.apps import AppsSections
from skyguard.policy.checker import did_you_mean, is_map, is_seq, plain, quoted, type_name
from skyguard.policy.content import ContentSection
from skyguard.policy.keys import KeysSection
from skyguard.policy.model import (
    SYNTHETIC_RULES,
    Destination,
    DnsConfig,
    Policy,
    PortRange,
    Rule,
    TunnelDetection,
    Workload,
    Zone,
)
from skyguard.policy.source import Problem, load_yaml
from skyguard.policy.values import (  # noqa: F401 - the scalar parsers are public here too
    IFNAME_RE,
    format_hostport,
    parse_cidr,
    parse_host_address,
    parse_hostport,
    parse_mac,
    parse_port,
    parse_ssh_public_key,
)

API_VERSION = "skyguard/v1"
KIND = "Policy"
MAX_FILE_BYTES = 4 * 1024 * 1024  # a policy is hand-written; anything bigger is a mistake or an attack
MAX_IFNAME = 15  # IFNAMSIZ - 1: the kernel's limit on interface (and our namespace) names
MAX_EXTENSION_NODES = 10_000  # x- extension keys are copied into Policy.extra; aliases can multiply them


def load_policy(path: str | Path) -> Policy:
    """Read, parse and validate the policy file at `path`. Raises PolicyError (nothing loaded)."""
    return parse_policy_bytes(read_policy_file(path), source=str(path))


def read_policy_file(path: str | Path) -> bytes:
    """The policy file's bytes as every command hashes them (no newline translation), within
    MAX_FILE_BYTES. Raises PolicyError."""
    path = Path(path)
    shown = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise PolicyError([Problem(shown, None, "", f"is {size} bytes; a policy file is at most "
                                       f"{MAX_FILE_BYTES} bytes")])
        data = path.read_bytes()
    except FileNotFoundError:
        raise PolicyError([Problem(shown, None, "", "no such file; check the path")]) from None
    except IsADirectoryError:
        raise PolicyError([Problem(shown, None, "", "is a directory; give a policy YAML file")]) from None
    except OSError as e:
        raise PolicyError([Problem(shown, None, "", f"cannot be read: {e.strerror}")]) from None
    return data


def parse_policy(text: str, source: str = "<string>") -> Policy:
    """Parse and validate policy YAML given as text. Raises PolicyError (nothing loaded)."""
    return parse_policy_bytes(text.encode("utf-8"), source=source)


def parse_policy_bytes(data: bytes, source: str = "<bytes>") -> Policy:
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PolicyError([Problem(source, line, "", "is not valid UTF-8; save the file as UTF-8")]) from None
    document = load_yaml(text, source)
    checker = _Checker(source)
    policy = checker.policy(document, digest)
    if checker.problems:
        raise PolicyError(sorted(checker.problems, key=lambda p: (p.line or 0, p.key)))
    return policy


class _Checker(AccessSections, ContentSection, KeysSection, AppsSections):
    """Walks the YAML tree, builds model values, and records problems instead of raising.

    Each section method returns its values built from what was valid, so that later checks
    (e.g. rules naming zones) still run and report; the caller discards everything if any
    problem was recorded. The shape helpers are CheckerBase's (checker.py); credentials,
    tls_termination and admin are AccessSections' (access.py).
    """

    def __init__(self, source: str):
        super().__init__(source)
        self.first_fqdn_rule: tuple[str, int | None] | None = None  # (key path, line)

    def policy(self, document, digest: str) -> Policy | None:
        top = ("apiVersion", "kind", "metadata", "zones", "networks", "rules", "dns", "credentials",
               "tls_termination", "admin",
               "content", "keys", "identity", "apps")
        if not self.mapping(document, "", 1, top, required=("apiVersion", "kind", "metadata", "zones")):
            return None
        if "apiVersion" in document and document["apiVersion"] != API_VERSION:
            self.problem(self.line_of(document, "apiVersion"), "apiVersion",
                         f"{quoted(document['apiVersion'])} is not supported; write '{API_VERSION}'")
        if "kind" in document and document["kind"] != KIND:
            self.problem(self.line_of(document, "kind"), "kind",
                         f"{quoted(document['kind'])} is not supported; write '{KIND}'")
        # A missing required section was reported above; skip it rather than report it twice.
        name = None
        if "metadata" in document:
            name = self.metadata(document["metadata"], self.line_of(document, "metadata"))
        zones: dict[str, Zone] = {}
        if "zones" in document:
            zones = self.zones(document["zones"], self.line_of(document, "zones"))
        networks = self.networks(document.get("networks", {}), self.line_of(document, "networks"))
        rules = self.rules(document.get("rules", []), self.line_of(document, "rules"), zones, networks)
        dns = self.dns(document.get("dns", {}), self.line_of(document, "dns"))
        if dns is not None and not dns.upstreams and self.first_fqdn_rule:
            where = self.line_of(document, "dns") if "dns" in document else self.first_fqdn_rule[1]
            self.problem(where, "dns.upstreams",
                         f"is empty but {self.first_fqdn_rule[0]} names domains; add the resolver "
                         f"allowed queries go to, e.g. dns: {{upstreams: [\"192.0.2.53\"]}}")
        credentials = self.credentials(document.get("credentials", []),
                                       self.line_of(document, "credentials"), zones)
        keys = self.keys(document.get("keys"), self.line_of(document, "keys"), zones)
        cred_node = document.get("credentials")
        certified = [i for i, item in enumerate(cred_node) if is_map(item) and "client_certificate" in item] \
            if keys is None and is_seq(cred_node) else []
        if certified:  # a credential names a key, but nothing says where keys live
            self.problem(self.line_of(cred_node, certified[0]), f"credentials[{certified[0]}].client_certificate",
                         "names a key but the policy has no `keys:` section saying where keys live")
        tls = self.tls_termination(document.get("tls_termination", []),
                                   self.line_of(document, "tls_termination"), zones)
        admin = self.admin(document.get("admin"), self.line_of(document, "admin"), zones)
        content = self.content(document.get("content"), self.line_of(document, "content"), zones)
        identity = self.identity(document.get("identity"), self.line_of(document, "identity"))
        apps = self.apps(document.get("apps", []), self.line_of(document, "apps"), zones, identity,
                         "identity" in document)
        extra = {}
        for key, value in document.items():
            if isinstance(key, str) and key.startswith("x-"):
                try:
                    extra[key] = plain(value, budget=[MAX_EXTENSION_NODES])
                except ValueError:
                    self.problem(self.key_line(document, key), key,
                                 f"holds more than {MAX_EXTENSION_NODES} values (YAML aliases expand); "
                                 f"keep extensions small")
        return Policy(name=name or "", zones=zones, networks=networks, rules=tuple(rules),
                      dns=dns or DnsConfig(), credentials=credentials, tls_termination=tls,
                      admin_ssh=admin, admin_console=self.console, content=content, sha256=digest,
                      source=self.source, extra=extra, keys=keys, identity=identity, apps=apps)

    def metadata(self, node, line) -> str | None:
        if not self.mapping(node, "metadata", line, ("name", "description"), required=("name",)):
            return None
        if "description" in node:
            self.string(node["description"], "metadata.description", self.line_of(node, "description"),
                        "a description")
        if "name" not in node:
            return None
        return self.name(node["name"], "metadata.name", self.line_of(node, "name"), "policy name")

    def zones(self, node, line) -> dict[str, Zone]:
        zones: dict[str, Zone] = {}
        if not is_map(node):
            self.problem(line, "zones", f"must be a mapping of zone name to zone, not {type_name(node)}")
            return zones
        if not node:
            self.problem(line, "zones", "must name at least one zone")
            return zones
        seen_workloads: dict[str, str] = {}
        seen_interfaces: dict[str, str] = {}
        seen_macs: dict[str, str] = {}
        seen_addresses: dict[Any, str] = {}
        for zone_name, zone_node in node.items():
            path = f"zones.{zone_name}"
            zone_line = self.key_line(node, zone_name)
            valid_name = self.name(zone_name, path, zone_line, "zone name")
            if not self.mapping(zone_node, path, zone_line, ("workloads", "description"),
                                required=("workloads",)):
                continue
            if "description" in zone_node:
                self.string(zone_node["description"], f"{path}.description",
                            self.line_of(zone_node, "description"), "a description")
            workloads_node = zone_node.get("workloads")
            workloads: list[Workload] = []
            wl_line = self.line_of(zone_node, "workloads")
            if "workloads" in zone_node and self.seq(workloads_node, f"{path}.workloads", wl_line):
                for index, item in enumerate(workloads_node):
                    workload = self.workload(item, f"{path}.workloads[{index}]",
                                             self.line_of(workloads_node, index), str(zone_name),
                                             seen_workloads, seen_interfaces, seen_macs, seen_addresses)
                    if workload:
                        workloads.append(workload)
            if valid_name:
                zones[valid_name] = Zone(valid_name, tuple(workloads))
        return zones

    def workload(self, node, path, line, zone, seen_workloads, seen_interfaces, seen_macs,
                 seen_addresses) -> Workload | None:
        if not self.mapping(node, path, line, ("name", "interface", "mac", "addresses", "description"),
                            required=("name", "interface", "mac", "addresses")):
            return None
        name = interface = mac = None
        if "name" in node:
            # Workload names become lab namespace names: the interface-name limit applies.
            name = self.unique_name(node, path, seen_workloads, "workload", max_length=MAX_IFNAME,
                                    scope=" across zones")
        if "interface" in node:
            interface = self.interface_name(node["interface"], f"{path}.interface",
                                            self.line_of(node, "interface"), seen_interfaces)
        if "mac" in node:
            mac_line = self.line_of(node, "mac")
            mac = self.scalar(node["mac"], parse_mac, f"{path}.mac", mac_line)
            if mac and mac in seen_macs:
                self.problem(mac_line, f"{path}.mac", f"{quoted(mac)} is already used by {seen_macs[mac]}")
                mac = None
            elif mac:
                seen_macs[mac] = path
        addresses = []
        if "addresses" in node:
            addr_node = node["addresses"]
            addr_path = f"{path}.addresses"
            if self.seq(addr_node, addr_path, self.line_of(node, "addresses"), non_empty=True):
                for index, item in enumerate(addr_node):
                    item_path, item_line = f"{addr_path}[{index}]", self.line_of(addr_node, index)
                    address = self.scalar(item, parse_host_address, item_path, item_line)
                    if address is None:
                        continue
                    if address in seen_addresses:
                        self.problem(item_line, item_path,
                                     f"{quoted(address)} is already used by {seen_addresses[address]}")
                        continue
                    seen_addresses[address] = item_path
                    addresses.append(address)
        if name and interface and mac and addresses:
            return Workload(name=name, zone=zone, interface=interface, mac=mac, addresses=tuple(addresses))
        return None

    def interface_name(self, node, path, line, seen) -> str | None:
        if not isinstance(node, str) or not node:
            self.problem(line, path, f"must be an interface name, not {type_name(node)}")
            return None
        if len(node) > MAX_IFNAME:
            self.problem(line, path, f"{quoted(node)} is {len(node)} characters; Linux interface "
                                     f"names have at most {MAX_IFNAME}")
            return None
        if not IFNAME_RE.match(node) or node in (".", ".."):
            self.problem(line, path, f"{quoted(node)} is not a valid interface name (letters, digits, "
                                     f"'-', '_' and '.')")
            return None
        if node in seen:
            self.problem(line, path, f"{quoted(node)} is already used by {seen[node]}")
            return None
        seen[node] = path
        return node

    def networks(self, node, line) -> dict[str, tuple]:
        networks: dict[str, tuple] = {}
        if node is None:
            return networks
        if not is_map(node):
            self.problem(line, "networks", f"must be a mapping of name to a list of CIDRs, not "
                                           f"{type_name(node)}")
            return networks
        for net_name, cidrs_node in node.items():
            path = f"networks.{net_name}"
            net_line = self.line_of(node, net_name)
            valid = self.name(net_name, path, self.key_line(node, net_name), "network name")
            if not self.seq(cidrs_node, path, net_line, non_empty=True):
                continue
            cidrs = [self.scalar(item, parse_cidr, f"{path}[{i}]", self.line_of(cidrs_node, i))
                     for i, item in enumerate(cidrs_node)]
            if valid and all(c is not None for c in cidrs):
                networks[valid] = tuple(dict.fromkeys(cidrs))
        return networks

    def rules(self, node, line, zones, networks) -> list[Rule]:
        rules: list[Rule] = []
        if node is None:
            return rules
        if not self.seq(node, "rules", line):
            return rules
        seen: dict[str, str] = {}
        for index, item in enumerate(node):
            path, item_line = f"rules[{index}]", self.line_of(node, index)
            rule = self.rule(item, path, item_line, zones, networks, seen)
            if rule:
                rules.append(rule)
        return rules

    def unique_name(self, node, path, seen: dict, kind: str, scope: str = "", **limits) -> str | None:
        """`node["name"]` checked as a `kind` name and unique among `seen` (name -> where it was
        defined, updated here); None (and a problem) when invalid or already defined."""
        line = self.line_of(node, "name")
        name = self.name(node["name"], f"{path}.name", line, f"{kind} name", **limits)
        if name and name in seen:
            self.problem(line, f"{path}.name", f"{kind} {quoted(name)} is already defined at "
                                               f"{seen[name]}; {kind} names are unique{scope}")
            return None
        if name:
            seen[name] = path
        return name

    def rule(self, node, path, line, zones, networks, seen) -> Rule | None:
        if not self.mapping(node, path, line, ("name", "description", "action", "from", "to", "ports"),
                            required=("name", "from", "to")):
            return None
        name = None
        if "name" in node:
            name = self.unique_name(node, path, seen, "rule")
            if name in SYNTHETIC_RULES:
                self.problem(self.line_of(node, "name"), f"{path}.name",
                             f"{quoted(name)} is the name of a rule skyguard adds itself (one of "
                             f"{', '.join(SYNTHETIC_RULES)}); choose another name")
        if "description" in node:
            self.string(node["description"], f"{path}.description", self.line_of(node, "description"),
                        "a description")
        action: Any = "allow"  # "allow" | "deny", or None when invalid
        if "action" in node:
            action = node["action"]
            if action not in ("allow", "deny"):
                self.problem(self.line_of(node, "action"), f"{path}.action",
                             f"{quoted(action)} is not an action; write allow or deny")
                action = None
        from_zones: tuple[str, ...] = ()
        if "from" in node:
            from_zones = self.zone_refs(node["from"], f"{path}.from", self.line_of(node, "from"), zones,
                                        allow_all=True)
        destination = None
        if "to" in node:
            destination = self.destination(node["to"], f"{path}.to", self.line_of(node, "to"), zones,
                                           networks)
        ports: list[PortRange] = []
        ports_ok = True
        if "ports" in node:
            ports_node = node["ports"]
            ports_line = self.line_of(node, "ports")
            if is_seq(ports_node) and not ports_node:
                self.problem(ports_line, f"{path}.ports", "is empty; omit `ports` to mean every port")
                ports_ok = False
            elif self.seq(ports_node, f"{path}.ports", ports_line):
                for i, item in enumerate(ports_node):
                    port = self.scalar(item, parse_port, f"{path}.ports[{i}]", self.line_of(ports_node, i))
                    if port is None:
                        ports_ok = False
                    elif port not in ports:
                        ports.append(port)
            else:
                ports_ok = False
        if action == "deny" and destination and destination.allow_private:
            self.problem(self.line_of(node["to"], "allow_private"), f"{path}.to.allow_private",
                         "means nothing on a deny rule (its names are refused); remove it")
            destination = None
        if name and action and from_zones and destination and ports_ok:
            return Rule(name=name, action=action, from_zones=from_zones, to=destination,
                        ports=tuple(ports), line=line or 0)
        return None

    def destination(self, node, path, line, zones, networks) -> Destination | None:
        parts = ("zones", "networks", "cidrs", "fqdns")
        if not self.mapping(node, path, line, parts + ("allow_private",)):
            return None
        # With a misspelt key the typo is the problem to report, not its consequence.
        if not any(node.get(part) for part in parts) and \
                all(key in parts or key == "allow_private" for key in node):
            self.problem(line, path, "names no destination; give at least one of zones, networks, "
                                     "cidrs, fqdns")
            return None
        ok = True
        values: dict[str, Any] = {}
        for part in parts:
            if part not in node:
                continue
            part_node, part_path, part_line = node[part], f"{path}.{part}", self.line_of(node, part)
            if part == "zones":
                refs = self.zone_refs(part_node, part_path, part_line, zones, allow_all=False)
                ok = ok and len(refs) > 0
                values[part] = refs
                continue
            if not self.seq(part_node, part_path, part_line, non_empty=True):
                ok = False
                continue
            items = []
            for i, item in enumerate(part_node):
                item_path, item_line = f"{part_path}[{i}]", self.line_of(part_node, i)
                if part == "networks":
                    if not isinstance(item, str) or item not in networks:
                        self.problem(item_line, item_path, f"unknown network {quoted(item)}"
                                     f"{did_you_mean(item, networks) if isinstance(item, str) else ''}")
                        value = None
                    else:
                        value = item
                elif part == "cidrs":
                    value = self.scalar(item, parse_cidr, item_path, item_line)
                else:
                    value = self.scalar(item, fqdn.check_pattern, item_path, item_line)
                    if self.first_fqdn_rule is None:
                        self.first_fqdn_rule = (part_path, item_line)
                if value is None:
                    ok = False
                elif value not in items:
                    items.append(value)
            values[part] = tuple(items)
        if "allow_private" in node:
            ap_line = self.line_of(node, "allow_private")
            allow_private = self.boolean(node["allow_private"], f"{path}.allow_private", ap_line)
            if allow_private and not node.get("fqdns"):
                self.problem(ap_line, f"{path}.allow_private", "applies to the names in fqdns, and "
                             "this destination has none; name private networks in cidrs instead")
                allow_private = None
            ok = ok and allow_private is not None
            values["allow_private"] = bool(allow_private)
        return Destination(**values) if ok else None

    def dns(self, node, line) -> DnsConfig | None:
        if node is None:
            return DnsConfig()
        keys = ("upstreams", "refuse_with", "min_ttl", "max_ttl", "tunnel_detection")
        if not self.mapping(node, "dns", line, keys):
            return None
        defaults = DnsConfig()
        upstreams: list[str] = []
        if "upstreams" in node:
            up_node, up_line = node["upstreams"], self.line_of(node, "upstreams")
            if self.seq(up_node, "dns.upstreams", up_line):
                for i, item in enumerate(up_node):
                    parsed = self.scalar(item, parse_hostport, f"dns.upstreams[{i}]", self.line_of(up_node, i))
                    if parsed is not None:
                        upstreams.append(format_hostport(*parsed))
        refuse_with = node.get("refuse_with", defaults.refuse_with)
        if refuse_with not in ("refused", "nxdomain"):
            self.problem(self.line_of(node, "refuse_with"), "dns.refuse_with",
                         f"{quoted(refuse_with)} is not refused or nxdomain")
        min_ttl = defaults.min_ttl
        max_ttl = defaults.max_ttl
        if "min_ttl" in node:
            min_ttl = self.integer(node["min_ttl"], "dns.min_ttl", self.line_of(node, "min_ttl"), 0, 2**31 - 1)
        if "max_ttl" in node:
            max_ttl = self.integer(node["max_ttl"], "dns.max_ttl", self.line_of(node, "max_ttl"), 0, 2**31 - 1)
        if min_ttl is not None and max_ttl is not None and min_ttl > max_ttl:
            self.problem(self.line_of(node, "min_ttl") if "min_ttl" in node else line, "dns.min_ttl",
                         f"{min_ttl} is above max_ttl {max_ttl}")
        tunnel = defaults.tunnel_detection
        if "tunnel_detection" in node:
            td_node, td_line = node["tunnel_detection"], self.line_of(node, "tunnel_detection")
            if self.mapping(td_node, "dns.tunnel_detection", td_line, ("action",)):
                action = td_node.get("action", tunnel.action)
                if action not in ("block", "alert", "off"):
                    self.problem(self.line_of(td_node, "action"), "dns.tunnel_detection.action",
                                 f"{quoted(action)} is not block, alert or off")
                else:
                    tunnel = TunnelDetection(action)
        if min_ttl is None or max_ttl is None:
            return None
        return DnsConfig(upstreams=tuple(dict.fromkeys(upstreams)), refuse_with=refuse_with,
                         min_ttl=min_ttl, max_ttl=max_ttl, tunnel_detection=tunnel)
