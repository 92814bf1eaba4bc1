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

import difflib
import hashlib
import ipaddress
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from skyguard.errors import PolicyError
from skyguard.policy import fqdn
from skyguard.policy.model import (
    ALL_ZONES,
    AdminSsh,
    Credential,
    Destination,
    DnsConfig,
    Injection,
    Policy,
    PortRange,
    Rule,
    SshOperator,
    TlsTermination,
    TunnelDetection,
    Workload,
    Zone,
)

API_VERSION = "skyguard/v1"
KIND = "Policy"
MAX_FILE_BYTES = 4 * 1024 * 1024  # a policy is hand-written; anything bigger is a mistake or an attack
MAX_IFNAME = 15  # IFNAMSIZ - 1: the kernel's limit on interface (and our namespace) names
MAX_EXTENSION_NODES = 10_000  # x- extension keys are copied into Policy.extra; aliases can multiply them
MIN_PLACEHOLDER = 16  # long enough that a placeholder never occurs in traffic by chance

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")  # zones, workloads, networks, rules
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}$")
PORT_RE = re.compile(r"^(tcp|udp)/(\d{1,5})(?:-(\d{1,5}))?$")
SECRET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Placeholders are matched inside HTTP headers and bodies: visible ASCII that no encoding mangles.
PLACEHOLDER_RE = re.compile(r"^[A-Za-z0-9._~+/=-]+$")
HEADER_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token

# The placeholder is not a secret, but a user who mistakes the field pastes a real token into it:
# messages about credentials therefore never quote the placeholder's value.


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a policy file: where (file, 1-based line, key path) and what."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "key": self.key, "message": self.message}


def load_policy(path: str | Path) -> Policy:
    """Read, parse and validate the policy file at `path`. Raises PolicyError (nothing loaded)."""
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
    return parse_policy_bytes(data, source=shown)


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
    document = _load_yaml(text, source)
    checker = _Checker(source)
    policy = checker.policy(document, digest)
    if checker.problems:
        raise PolicyError(sorted(checker.problems, key=lambda p: (p.line or 0, p.key)))
    return policy


def _load_yaml(text: str, source: str):
    yaml = YAML(typ="rt")  # round-trip mode keeps line numbers for every key and item
    yaml.allow_duplicate_keys = False
    try:
        if "*" in text:  # only aliases can inflate a key; composing costs a second parse
            _refuse_complex_keys(YAML(typ="rt").compose_all(text), source)
        documents = list(yaml.load_all(text))
    except TypeError:
        # ruamel cannot hash a list or mapping used as a key inside another key.
        raise PolicyError([Problem(source, None, "", "a mapping key is a list or mapping; keys are "
                                   "plain names")]) from None
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        duplicate = re.match(r'found duplicate key "(.*?)" with value', e.problem or "")
        if duplicate:
            # ruamel's own message quotes both values; we name only the key.
            raise PolicyError([Problem(source, line, duplicate.group(1), "is given twice in the same "
                                       "mapping; keep one (YAML would silently drop the first)")]) from None
        message = " ".join(x for x in (e.context, e.problem) if x)
        raise PolicyError([Problem(source, line, "", f"not valid YAML: {message}")]) from None
    except YAMLError as e:
        raise PolicyError([Problem(source, None, "", f"not valid YAML: {e}")]) from None
    documents = [d for d in documents if d is not None]
    if len(documents) != 1:
        found = "is empty" if not documents else f"holds {len(documents)} YAML documents"
        raise PolicyError([Problem(source, 1 if documents else None, "",
                                   f"{found}; a policy file holds exactly one")])
    return documents[0]


def _refuse_complex_keys(documents, source: str) -> None:
    """Refuse mapping keys that are lists or mappings (`? [a, b]: x`) before ruamel constructs
    them: it turns such keys into nested tuples, which an alias chain inflates to billions of
    items. The walk is over the composed node graph, where an alias is one shared node."""
    from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode

    seen: set[int] = set()
    stack = [d for d in documents if d is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, MappingNode):
            for key, value in node.value:
                if not isinstance(key, ScalarNode):
                    raise PolicyError([Problem(source, key.start_mark.line + 1, "",
                                               "a mapping key is a list or mapping; keys are plain "
                                               "names")])
                stack.append(value)


# ---------------------------------------------------------------------------------------------
# Small parsers of one scalar each: public, so the CLI, tests and other parts reuse them. Each
# returns the normal form or raises ValueError with a message that completes "'<value>' ...".


def parse_port(text: Any) -> PortRange:
    """`tcp/N`, `udp/N`, `tcp/LO-HI`, `udp/LO-HI`, `icmp` or `icmpv6` (case-insensitive)."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError("is not a port; write tcp/N, udp/N, tcp/LO-HI, icmp or icmpv6")
    if isinstance(text, int):
        raise ValueError(f"has no protocol; write tcp/{text} or udp/{text}")
    lowered = text.strip().lower()
    if lowered in ("icmp", "icmpv6"):
        return PortRange(lowered)  # type: ignore[arg-type]
    if lowered.startswith(("icmp/", "icmpv6/")):
        raise ValueError("names an ICMP type; ICMP is allowed as a whole: write icmp or icmpv6")
    if lowered.isdigit():
        raise ValueError(f"has no protocol; write tcp/{lowered} or udp/{lowered}")
    match = PORT_RE.match(lowered)
    if not match:
        raise ValueError("is not a port; write tcp/N, udp/N, tcp/LO-HI, icmp or icmpv6")
    protocol, lo_text, hi_text = match.groups()
    lo = int(lo_text)
    hi = int(hi_text) if hi_text is not None else lo
    for value in (lo, hi):
        if not 1 <= value <= 65535:
            raise ValueError("is not a port (1-65535)")
    if lo > hi:
        raise ValueError(f"is an empty range; write {protocol}/{hi}-{lo}")
    return PortRange(protocol, lo, hi)  # type: ignore[arg-type]


def parse_mac(text: Any) -> str:
    """A unicast MAC address, returned as lower-case colon-separated hex."""
    if not isinstance(text, str):
        raise ValueError("is not a MAC address; quote it: \"02:00:00:00:00:01\"")
    if not MAC_RE.match(text):
        raise ValueError("is not a MAC address; write six hex bytes such as \"02:00:00:00:00:01\"")
    mac = text.lower().replace("-", ":")
    first = int(mac[:2], 16)
    if first & 1:
        raise ValueError("is a multicast or broadcast MAC; a VM's MAC is unicast (first byte even)")
    if mac == "00:00:00:00:00:00":
        raise ValueError("is the all-zero MAC; give the VM's real MAC")
    return mac


def parse_host_address(text: Any):
    """One IPv4 or IPv6 host address a workload may use as its source."""
    if not isinstance(text, str):
        raise ValueError("is not an IP address; write it as a string such as 10.0.0.2")
    if "/" in text:
        raise ValueError(f"is a network; a workload's addresses are hosts: write {text.split('/')[0]}")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError("is not an IPv4 or IPv6 address") from None
    if address.is_unspecified or address.is_multicast or address.is_loopback:
        raise ValueError("is not a usable host address (unspecified, multicast or loopback)")
    if isinstance(address, ipaddress.IPv6Address) and address.is_link_local:
        raise ValueError("is link-local; list global or unique-local addresses (link-local "
                         "addresses are derived from the MAC)")
    if isinstance(address, ipaddress.IPv4Address) and address == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError("is the broadcast address")
    return address


def parse_cidr(text: Any):
    """A network in CIDR form; a bare address means that one host (/32 or /128)."""
    if not isinstance(text, str):
        raise ValueError("is not a CIDR; write it as a string such as 10.0.0.0/8")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError("is not a CIDR such as 10.0.0.0/8 or fd00::/8") from None
    raise ValueError(f"has host bits set; did you mean {loose}?")


def parse_hostport(text: Any, *, default_port: int | None = None) -> tuple[str, int | None]:
    """`ADDR`, `ADDR:PORT` or `[V6ADDR]:PORT` with ADDR an IP address. Returns (address, port)."""
    if not isinstance(text, str):
        raise ValueError("is not an address; write it as a string such as \"192.0.2.53\" or "
                         "\"127.0.0.1:2222\"")
    host, port_text = text, None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError("is not [IPv6]:PORT")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("is not an IP address with an optional port, such as 192.0.2.53:53 or "
                         "[2001:db8::53]:53") from None
    port = default_port
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError("has an invalid port (1-65535)")
        port = int(port_text)
    return str(address), port


def format_hostport(address: str, port: int | None) -> str:
    if port is None:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


# ---------------------------------------------------------------------------------------------


def _quote(value: Any) -> str:
    # Never str() a container: through YAML aliases it may stand for a tree of billions of nodes.
    if _is_map(value):
        return "'{...}'"
    if isinstance(value, (list, tuple)):
        return "'[...]'"
    text = str(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"'{text}'"


def _is_map(node) -> bool:
    return isinstance(node, dict)


def _is_seq(node) -> bool:
    return isinstance(node, list)


def _is_int(node) -> bool:
    return isinstance(node, int) and not isinstance(node, bool)


def _type_name(node) -> str:
    if node is None:
        return "empty"
    if _is_map(node):
        return "a mapping"
    if _is_seq(node):
        return "a list"
    if isinstance(node, bool):
        return "a boolean"
    if isinstance(node, (int, float)):
        return "a number"
    if isinstance(node, str):
        return "a string"
    if type(node).__name__ == "TaggedScalar":
        return "a value with a YAML tag (remove the '!tag')"
    return f"a {type(node).__name__} value"


class _Checker:
    """Walks the YAML tree, builds model values, and records problems instead of raising.

    Each section method returns its values built from what was valid, so that later checks
    (e.g. rules naming zones) still run and report; the caller discards everything if any
    problem was recorded.
    """

    def __init__(self, source: str):
        self.source = source
        self.problems: list[Problem] = []
        self.first_fqdn_rule: tuple[str, int | None] | None = None  # (key path, line)

    # -- reporting ----------------------------------------------------------------------------

    def problem(self, line: int | None, key: str, message: str) -> None:
        self.problems.append(Problem(self.source, line, key, message))

    @staticmethod
    def line_of(container, key=None) -> int | None:
        """1-based line of container[key] (a value or list item), or of the container itself."""
        try:
            if key is None:
                return container.lc.line + 1
            if _is_seq(container):
                return container.lc.item(key)[0] + 1
            value = container.get(key)
            # An empty value's mark points past the key; the key's own line reads better.
            if value is None or _is_map(value) or _is_seq(value):
                return container.lc.key(key)[0] + 1
            return container.lc.value(key)[0] + 1
        except (AttributeError, KeyError, IndexError, TypeError):
            return getattr(getattr(container, "lc", None), "line", -1) + 1 or None

    @staticmethod
    def key_line(container, key) -> int | None:
        try:
            return container.lc.key(key)[0] + 1
        except (AttributeError, KeyError, TypeError):
            return None

    # -- shape helpers ------------------------------------------------------------------------

    def mapping(self, node, path: str, line: int | None, allowed: tuple[str, ...],
                required: tuple[str, ...] = ()) -> bool:
        """Check that node is a mapping with only `allowed` keys and every `required` one."""
        if not _is_map(node):
            self.problem(line, path, f"must be a mapping (key: value), not {_type_name(node)}")
            return False
        for key in node:
            if not isinstance(key, str):
                self.problem(self.key_line(node, key), path, f"key {_quote(key)} is not a string")
                continue
            if key not in allowed and not (path == "" and key.startswith("x-")):
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(allowed)}"
                self.problem(self.key_line(node, key), _join(path, key), f"unknown key{hint}")
        for key in required:
            if key not in node:
                self.problem(self.line_of(node) or line, _join(path, key), "is required but missing")
        return True

    def seq(self, node, path: str, line: int | None, *, non_empty: bool = False) -> bool:
        if not _is_seq(node):
            self.problem(line, path, f"must be a list, not {_type_name(node)}")
            return False
        if non_empty and not node:
            self.problem(line, path, "must not be empty")
            return False
        return True

    def name(self, node, path: str, line: int | None, what: str, *, max_length: int = 63) -> str | None:
        if not isinstance(node, str) or not node:
            self.problem(line, path, f"{what} must be a non-empty string, not {_type_name(node)}")
            return None
        if len(node) > max_length:
            self.problem(line, path, f"{_quote(node)} is {len(node)} characters; a {what} has at "
                                     f"most {max_length}")
            return None
        if not NAME_RE.match(node):
            self.problem(line, path, f"{_quote(node)} is not a valid {what} (lower-case letters, "
                                     f"digits and '-', not starting or ending with '-')")
            return None
        return node

    def scalar(self, node, parse: Callable[[Any], Any], path: str, line: int | None, *,
               quote: bool = True):
        try:
            return parse(node)
        except ValueError as e:
            shown = _quote(node) if quote else "the value"
            self.problem(line, path, f"{shown} {e}")
            return None

    def string(self, node, path: str, line: int | None, what: str) -> str | None:
        if not isinstance(node, str) or not node.strip():
            self.problem(line, path, f"{what} must be a non-empty string, not {_type_name(node)}")
            return None
        return node

    def boolean(self, node, path: str, line: int | None) -> bool | None:
        if not isinstance(node, bool):
            self.problem(line, path, f"must be true or false, not {_type_name(node)} {_quote(node)}")
            return None
        return node

    def integer(self, node, path: str, line: int | None, lo: int, hi: int) -> int | None:
        if not _is_int(node):
            self.problem(line, path, f"must be a whole number, not {_type_name(node)} {_quote(node)}")
            return None
        if not lo <= node <= hi:
            self.problem(line, path, f"{node} is out of range ({lo}-{hi})")
            return None
        return int(node)

    def zone_refs(self, node, path: str, line: int | None, zones: dict, *, allow_all: bool) -> tuple[str, ...]:
        """A list of zone names (or, where allowed, "*" alone or a single name) -> zone names."""
        items = node
        if isinstance(node, str) and allow_all:
            items = [node]
        elif not self.seq(node, path, line, non_empty=True):
            return ()
        names: list[str] = []
        for index, item in enumerate(items):
            item_path = f"{path}[{index}]" if items is node else path
            item_line = self.line_of(node, index) if items is node else line
            if item == ALL_ZONES and allow_all:
                if len(items) > 1:
                    self.problem(item_line, item_path, "'*' means every zone; list it alone")
                names.extend(zones)
                continue
            if not isinstance(item, str):
                self.problem(item_line, item_path, f"must be a zone name, not {_type_name(item)}")
                continue
            if item not in zones:
                self.problem(item_line, item_path, f"unknown zone {_quote(item)}{_hint(item, zones)}")
                continue
            names.append(item)
        return tuple(dict.fromkeys(names))

    # -- sections -----------------------------------------------------------------------------

    def policy(self, document, digest: str) -> Policy | None:
        top = ("apiVersion", "kind", "metadata", "zones", "networks", "rules", "dns", "credentials",
               "tls_termination", "admin")
        if not self.mapping(document, "", 1, top, required=("apiVersion", "kind", "metadata", "zones")):
            return None
        if "apiVersion" in document and document["apiVersion"] != API_VERSION:
            self.problem(self.line_of(document, "apiVersion"), "apiVersion",
                         f"{_quote(document['apiVersion'])} is not supported; write '{API_VERSION}'")
        if "kind" in document and document["kind"] != KIND:
            self.problem(self.line_of(document, "kind"), "kind",
                         f"{_quote(document['kind'])} is not supported; write '{KIND}'")
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
        tls = self.tls_termination(document.get("tls_termination", []),
                                   self.line_of(document, "tls_termination"), zones)
        admin = self.admin(document.get("admin"), self.line_of(document, "admin"), zones)
        extra = {}
        for key, value in document.items():
            if isinstance(key, str) and key.startswith("x-"):
                try:
                    extra[key] = _plain(value, budget=[MAX_EXTENSION_NODES])
                except ValueError:
                    self.problem(self.key_line(document, key), key,
                                 f"holds more than {MAX_EXTENSION_NODES} values (YAML aliases expand); "
                                 f"keep extensions small")
        return Policy(name=name or "", zones=zones, networks=networks, rules=tuple(rules),
                      dns=dns or DnsConfig(), credentials=credentials, tls_termination=tls,
                      admin_ssh=admin, sha256=digest, source=self.source, extra=extra)

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
        if not _is_map(node):
            self.problem(line, "zones", f"must be a mapping of zone name to zone, not {_type_name(node)}")
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
                self.problem(mac_line, f"{path}.mac", f"{_quote(mac)} is already used by {seen_macs[mac]}")
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
                                     f"{_quote(address)} is already used by {seen_addresses[address]}")
                        continue
                    seen_addresses[address] = item_path
                    addresses.append(address)
        if name and interface and mac and addresses:
            return Workload(name=name, zone=zone, interface=interface, mac=mac, addresses=tuple(addresses))
        return None

    def interface_name(self, node, path, line, seen) -> str | None:
        if not isinstance(node, str) or not node:
            self.problem(line, path, f"must be an interface name, not {_type_name(node)}")
            return None
        if len(node) > MAX_IFNAME:
            self.problem(line, path, f"{_quote(node)} is {len(node)} characters; Linux interface "
                                     f"names have at most {MAX_IFNAME}")
            return None
        if not IFNAME_RE.match(node) or node in (".", ".."):
            self.problem(line, path, f"{_quote(node)} is not a valid interface name (letters, digits, "
                                     f"'-', '_' and '.')")
            return None
        if node in seen:
            self.problem(line, path, f"{_quote(node)} is already used by {seen[node]}")
            return None
        seen[node] = path
        return node

    def networks(self, node, line) -> dict[str, tuple]:
        networks: dict[str, tuple] = {}
        if node is None:
            return networks
        if not _is_map(node):
            self.problem(line, "networks", f"must be a mapping of name to a list of CIDRs, not "
                                           f"{_type_name(node)}")
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
            self.problem(line, f"{path}.name", f"{kind} {_quote(name)} is already defined at "
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
        if "description" in node:
            self.string(node["description"], f"{path}.description", self.line_of(node, "description"),
                        "a description")
        action = "allow"
        if "action" in node:
            action = node["action"]
            if action not in ("allow", "deny"):
                self.problem(self.line_of(node, "action"), f"{path}.action",
                             f"{_quote(action)} is not an action; write allow or deny")
                action = None
        from_zones = ()
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
            if _is_seq(ports_node) and not ports_node:
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
        if name and action and from_zones and destination and ports_ok:
            return Rule(name=name, action=action, from_zones=from_zones, to=destination,
                        ports=tuple(ports), line=line or 0)
        return None

    def destination(self, node, path, line, zones, networks) -> Destination | None:
        parts = ("zones", "networks", "cidrs", "fqdns")
        if not self.mapping(node, path, line, parts):
            return None
        # With a misspelt key the typo is the problem to report, not its consequence.
        if not any(node.get(part) for part in parts) and all(key in parts for key in node):
            self.problem(line, path, "names no destination; give at least one of zones, networks, "
                                     "cidrs, fqdns")
            return None
        ok = True
        values: dict[str, tuple] = {}
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
                        self.problem(item_line, item_path, f"unknown network {_quote(item)}"
                                     f"{_hint(item, networks) if isinstance(item, str) else ''}")
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
                         f"{_quote(refuse_with)} is not refused or nxdomain")
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
                                 f"{_quote(action)} is not block, alert or off")
                else:
                    tunnel = TunnelDetection(action)
        if min_ttl is None or max_ttl is None:
            return None
        return DnsConfig(upstreams=tuple(dict.fromkeys(upstreams)), refuse_with=refuse_with,
                         min_ttl=min_ttl, max_ttl=max_ttl, tunnel_detection=tunnel)

    def credentials(self, node, line, zones) -> tuple[Credential, ...]:
        if node is None or not self.seq(node, "credentials", line):
            return ()
        result = []
        names: dict[str, str] = {}
        placeholders: list[tuple[str, str]] = []
        keys = ("name", "placeholder", "secret", "zones", "destinations", "inject", "strip_response_headers")
        required = ("name", "placeholder", "secret", "zones", "destinations", "inject")
        for index, item in enumerate(node):
            path, item_line = f"credentials[{index}]", self.line_of(node, index)
            if not self.mapping(item, path, item_line, keys, required=required):
                continue
            ok = all(key in item for key in required)
            name = None
            if "name" in item:
                name = self.unique_name(item, path, names, "credential")
            placeholder = None
            if "placeholder" in item:
                placeholder = self.placeholder(item["placeholder"], f"{path}.placeholder",
                                               self.line_of(item, "placeholder"), placeholders)
            secret = None
            if "secret" in item:
                secret = item["secret"]
                if not isinstance(secret, str) or not SECRET_NAME_RE.match(secret):
                    # Quote nothing: a user who confused the name with the value must not see
                    # the value echoed into a terminal or a CI log.
                    self.problem(self.line_of(item, "secret"), f"{path}.secret",
                                 "must be the NAME of a secret in skyguard's store (letters, digits, "
                                 "'.', '_', '-'; at most 64), never the secret itself; store the value "
                                 "with `skyguard secret set NAME`")
                    secret = None
            cred_zones = ()
            if "zones" in item:
                cred_zones = self.zone_refs(item["zones"], f"{path}.zones", self.line_of(item, "zones"),
                                            zones, allow_all=True)
            destinations: list[str] = []
            if "destinations" in item:
                d_node, d_line = item["destinations"], self.line_of(item, "destinations")
                if self.seq(d_node, f"{path}.destinations", d_line, non_empty=True):
                    for i, d in enumerate(d_node):
                        host = self.scalar(d, lambda v: fqdn.check_pattern(v, allow_wildcards=False),
                                           f"{path}.destinations[{i}]", self.line_of(d_node, i))
                        if host is None:
                            ok = False
                        elif host not in destinations:
                            destinations.append(host)
                else:
                    ok = False
            inject = None
            if "inject" in item:
                inject = self.injection(item["inject"], f"{path}.inject", self.line_of(item, "inject"))
            strip: list[str] = []
            if "strip_response_headers" in item:
                s_node, s_line = item["strip_response_headers"], self.line_of(item, "strip_response_headers")
                if self.seq(s_node, f"{path}.strip_response_headers", s_line):
                    for i, header in enumerate(s_node):
                        if not isinstance(header, str) or not HEADER_RE.match(header):
                            self.problem(self.line_of(s_node, i), f"{path}.strip_response_headers[{i}]",
                                         f"{_quote(header)} is not an HTTP header name")
                            ok = False
                        else:
                            strip.append(header)
            if ok and name and placeholder and secret and cred_zones and destinations and inject:
                result.append(Credential(name=name, placeholder=placeholder, secret=secret,
                                         zones=cred_zones, destinations=tuple(destinations),
                                         inject=inject, strip_response_headers=tuple(strip)))
        return tuple(result)

    def placeholder(self, node, path, line, seen: list[tuple[str, str]]) -> str | None:
        if not isinstance(node, str):
            self.problem(line, path, f"must be a string, not {_type_name(node)}")
            return None
        if len(node) < MIN_PLACEHOLDER:
            self.problem(line, path, f"is {len(node)} characters; a placeholder has at least "
                                     f"{MIN_PLACEHOLDER} so that it never occurs in traffic by chance")
            return None
        if not PLACEHOLDER_RE.match(node):
            self.problem(line, path, "may hold only letters, digits and . _ ~ + / = - (it is matched "
                                     "inside HTTP headers and bodies)")
            return None
        for other, other_path in seen:
            # One placeholder inside another would make the swap ambiguous.
            if node == other or node in other or other in node:
                self.problem(line, path, f"overlaps the placeholder of {other_path} (equal or one "
                                         f"contains the other); make each unique")
                return None
        seen.append((node, path))
        return node

    def injection(self, node, path, line) -> Injection | None:
        if not self.mapping(node, path, line, ("header", "body", "format", "max_occurrences")):
            return None
        header = None
        body = False
        ok = True
        if "header" in node:
            header = node["header"]
            if not isinstance(header, str) or not HEADER_RE.match(header):
                self.problem(self.line_of(node, "header"), f"{path}.header",
                             f"{_quote(header)} is not an HTTP header name")
                ok = False
        if "body" in node:
            body = self.boolean(node["body"], f"{path}.body", self.line_of(node, "body"))
            ok = ok and body is not None
        if "header" not in node and not body:
            self.problem(line, path, "injects nowhere; give `header: NAME` and/or `body: true`")
            ok = False
        fmt = "{secret}"
        if "format" in node:
            fmt = node["format"]
            fmt_line = self.line_of(node, "format")
            if not isinstance(fmt, str):
                self.problem(fmt_line, f"{path}.format", f"must be a string, not {_type_name(fmt)}")
                ok = False
            else:
                fields = _format_fields(fmt)
                if fields is None or fields != {"secret"}:
                    self.problem(fmt_line, f"{path}.format",
                                 f"{_quote(fmt)} must contain {{secret}} and no other {{field}} "
                                 f"(write literal braces as {{{{ and }}}})")
                    ok = False
        occurrences = 1
        if "max_occurrences" in node:
            occurrences = self.integer(node["max_occurrences"], f"{path}.max_occurrences",
                                       self.line_of(node, "max_occurrences"), 1, 1000)
            ok = ok and occurrences is not None
        if not ok:
            return None
        return Injection(header=header, format=fmt, body=bool(body), max_occurrences=occurrences)

    def tls_termination(self, node, line, zones) -> tuple[TlsTermination, ...]:
        if node is None or not self.seq(node, "tls_termination", line):
            return ()
        workloads = [w.name for z in zones.values() for w in z.workloads]  # ordered, for hints
        result = []
        seen: dict[tuple[str, int], str] = {}
        for index, item in enumerate(node):
            path, item_line = f"tls_termination[{index}]", self.line_of(node, index)
            if not self.mapping(item, path, item_line, ("workload", "port", "forward_to", "certificate"),
                                required=("workload", "port", "forward_to", "certificate")):
                continue
            workload = item.get("workload")
            if "workload" in item and workload not in workloads:
                self.problem(self.line_of(item, "workload"), f"{path}.workload",
                             f"unknown workload {_quote(workload)}"
                             f"{_hint(workload, workloads) if isinstance(workload, str) else ''}")
                workload = None
            port = forward_to = certificate = None
            if "port" in item:
                port = self.integer(item["port"], f"{path}.port", self.line_of(item, "port"), 1, 65535)
            if "forward_to" in item:
                forward_to = self.integer(item["forward_to"], f"{path}.forward_to",
                                          self.line_of(item, "forward_to"), 1, 65535)
            if "certificate" in item:
                certificate = item["certificate"]
                if not isinstance(certificate, str) or not SECRET_NAME_RE.match(certificate):
                    self.problem(self.line_of(item, "certificate"), f"{path}.certificate",
                                 "must be the name of a key in skyguard's key store (letters, digits, "
                                 "'.', '_', '-')")
                    certificate = None
            if workload and port:
                if (workload, port) in seen:
                    self.problem(item_line, path, f"{workload} port {port} is already terminated at "
                                                  f"{seen[(workload, port)]}")
                    continue
                seen[(workload, port)] = path
            if workload and port and forward_to and certificate:
                result.append(TlsTermination(workload, port, forward_to, certificate))
        return tuple(result)

    def admin(self, node, line, zones) -> AdminSsh | None:
        if node is None:
            return None
        if not self.mapping(node, "admin", line, ("ssh",)) or "ssh" not in node:
            return None
        ssh, ssh_line = node["ssh"], self.line_of(node, "ssh")
        keys = ("listen", "operators", "port_forwarding", "agent_forwarding", "sftp")
        if not self.mapping(ssh, "admin.ssh", ssh_line, keys, required=("operators",)):
            return None
        defaults = AdminSsh()
        listen = defaults.listen
        if "listen" in ssh:
            parsed = self.scalar(ssh["listen"], parse_hostport, "admin.ssh.listen", self.line_of(ssh, "listen"))
            if parsed is not None and parsed[1] is None:
                self.problem(self.line_of(ssh, "listen"), "admin.ssh.listen",
                             f"{_quote(ssh['listen'])} has no port; write ADDR:PORT such as 0.0.0.0:2222")
                parsed = None
            listen = format_hostport(*parsed) if parsed else None
        flags = {}
        for flag in ("port_forwarding", "agent_forwarding", "sftp"):
            flags[flag] = getattr(defaults, flag)
            if flag in ssh:
                flags[flag] = self.boolean(ssh[flag], f"admin.ssh.{flag}", self.line_of(ssh, flag))
        operators: list[SshOperator] = []
        ops_ok = True
        if "operators" in ssh:
            ops_node, ops_line = ssh["operators"], self.line_of(ssh, "operators")
            if self.seq(ops_node, "admin.ssh.operators", ops_line, non_empty=True):
                names: dict[str, str] = {}
                keys_seen: dict[str, str] = {}
                for index, item in enumerate(ops_node):
                    operator = self.operator(item, f"admin.ssh.operators[{index}]",
                                             self.line_of(ops_node, index), zones, names, keys_seen)
                    if operator:
                        operators.append(operator)
                    else:
                        ops_ok = False
            else:
                ops_ok = False
        if listen is None or any(v is None for v in flags.values()) or not ops_ok:
            return None
        return AdminSsh(listen=listen, operators=tuple(operators), **flags)

    def operator(self, node, path, line, zones, names, keys_seen) -> SshOperator | None:
        if not self.mapping(node, path, line, ("name", "public_key", "may_access"),
                            required=("name", "public_key", "may_access")):
            return None
        name = key = None
        access = ()
        if "name" in node:
            name = self.unique_name(node, path, names, "operator", max_length=32)
        if "public_key" in node:
            key_line = self.line_of(node, "public_key")
            key = self.scalar(node["public_key"], parse_ssh_public_key, f"{path}.public_key", key_line,
                              quote=False)
            if key and key in keys_seen:
                self.problem(key_line, f"{path}.public_key", f"the same key is already given to "
                                                             f"{keys_seen[key]}; one key per operator")
                key = None
            elif key:
                keys_seen[key] = path
        if "may_access" in node:
            access = self.zone_refs(node["may_access"], f"{path}.may_access",
                                    self.line_of(node, "may_access"), zones, allow_all=True)
        if name and key and access:
            return SshOperator(name=name, public_key=key, may_access=access)
        return None


def parse_ssh_public_key(text: Any) -> str:
    """An OpenSSH public key line; returns "TYPE BASE64" (the comment dropped)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    if not isinstance(text, str):
        raise ValueError("must be an OpenSSH public key line such as 'ssh-ed25519 AAAA... alice@host'")
    parts = text.strip().split()
    if len(parts) < 2:
        raise ValueError("is not an OpenSSH public key line ('ssh-ed25519 AAAA... comment')")
    try:
        key = load_ssh_public_key(f"{parts[0]} {parts[1]}".encode("ascii"))
    except (ValueError, UnicodeEncodeError) as e:
        raise ValueError(f"is not a valid OpenSSH public key ({e}); paste the whole line of the "
                         f"operator's .pub file") from None
    except UnsupportedAlgorithm as e:
        raise ValueError(f"is not a supported OpenSSH public key ({e}); use ed25519, ecdsa or rsa") from None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise ValueError(f"is an RSA key of {key.key_size} bits; use at least 2048 (or ed25519)")
    return f"{parts[0]} {parts[1]}"


def _format_fields(fmt: str) -> set[str] | None:
    try:
        return {field for _, field, _, _ in string.Formatter().parse(fmt) if field is not None}
    except ValueError:
        return None


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _hint(value: Any, known) -> str:
    known = list(known)
    close = difflib.get_close_matches(str(value), known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; known: {', '.join(known)}" if known else ""


def _plain(node, budget: list[int]):
    """ruamel's commented containers to plain dicts and lists (for Policy.extra). YAML aliases
    share nodes, so a small file can describe a huge tree ("billion laughs"): the budget counts
    every value copied and raises ValueError when it runs out."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError("extension too large")
    if _is_map(node):
        return {str(k): _plain(v, budget) for k, v in node.items()}
    if _is_seq(node):
        return [_plain(v, budget) for v in node]
    return node
