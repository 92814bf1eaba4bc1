"""What the lab builds from a policy: its workloads (name, zone, interface, MAC, addresses).

TEMPORARY: `_read_lab_topology` is a minimal private reader of only `zones:` that stands in until
skyguard/policy/parse.py (`load_policy(path) -> Policy`) is merged; the lead replaces its body with
`load_policy(path).workloads()` plus `check_lab_constraints`. It is not a policy parser: rules,
DNS and the rest are not read. Lab-specific checks (addresses that would collide with the lab's
own plumbing, interface name length) stay here either way.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from skyguard.errors import PolicyError
from skyguard.lab.addressing import RESERVED_FOR_LAB, UPLINK_HOST
from skyguard.policy.model import Workload

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")  # IFNAMSIZ: 15 characters at most
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_LAB_NAMES = ("host", "internet")  # namespaces the lab itself uses


def _line_of(node, key) -> int | None:
    """1-based line of `key` in a ruamel mapping or of item `key` in a sequence, if known."""
    try:
        if isinstance(key, int):
            return node.lc.item(key)[0] + 1
        return node.lc.key(key)[0] + 1
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


class _Problems:
    def __init__(self, path: Path):
        self.path = path
        self.items: list[str] = []

    def add(self, line: int | None, key: str, message: str) -> None:
        where = f"{self.path}:{line}" if line else f"{self.path}"
        self.items.append(f"{where}: {key}: {message}")


def _read_lab_topology(path) -> list[Workload]:
    """TEMPORARY (see module doc). Read the workloads of the policy at `path`.

    Raises PolicyError listing every problem as "file:line: key: what is wrong and how to fix it".
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError([f"{path}: cannot read the policy file ({e.__class__.__name__}: "
                           f"{getattr(e, 'strerror', None) or e}); give an existing YAML file"]) from None
    try:
        doc = YAML(typ="rt").load(text)
    except MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise PolicyError([f"{path}:{line}: (yaml): {e.problem}; fix the YAML syntax"]) from None
    except YAMLError as e:
        raise PolicyError([f"{path}: (yaml): {e}; fix the YAML syntax"]) from None

    problems = _Problems(path)
    if not isinstance(doc, dict):
        problems.add(1, "(top)", "the policy must be a mapping with apiVersion, kind, zones, ...")
        raise PolicyError(problems.items)
    zones = doc.get("zones")
    if not isinstance(zones, dict) or not zones:
        problems.add(_line_of(doc, "zones"), "zones",
                     "missing or empty; give a mapping of zone name -> {workloads: [...]}")
        raise PolicyError(problems.items)

    workloads: list[Workload] = []
    seen: dict[str, dict[str, str]] = {"name": {}, "interface": {}, "mac": {}, "address": {}}

    def unique(kind: str, value: str, key: str, line) -> None:
        if value in seen[kind]:
            problems.add(line, key, f"{kind} {value!r} is already used by {seen[kind][value]}; "
                                    f"every workload needs its own")
        else:
            seen[kind][value] = key

    for zone_name, zone in zones.items():
        zkey = f"zones.{zone_name}"
        if not isinstance(zone_name, str) or not _NAME.match(zone_name):
            problems.add(_line_of(zones, zone_name), zkey,
                         "zone names are lower-case letters, digits, '-' and '_' (at most 32)")
            continue
        if not isinstance(zone, dict) or not isinstance(zone.get("workloads"), list):
            problems.add(_line_of(zones, zone_name), f"{zkey}.workloads",
                         "missing; give a list of workloads (name, interface, mac, addresses)")
            continue
        items = zone["workloads"]
        for index, item in enumerate(items):
            wkey = f"{zkey}.workloads[{index}]"
            wline = _line_of(items, index)
            if not isinstance(item, dict):
                problems.add(wline, wkey, "a workload is a mapping with name, interface, mac, addresses")
                continue
            before = len(problems.items)
            for required in ("name", "interface", "mac", "addresses"):
                if required not in item:
                    problems.add(wline, f"{wkey}.{required}", "missing; every workload needs it")
            unknown = set(item) - {"name", "interface", "mac", "addresses"}
            for key in sorted(unknown, key=str):
                problems.add(_line_of(item, key), f"{wkey}.{key}",
                             "unknown key; a workload has name, interface, mac, addresses")
            if len(problems.items) > before:
                continue
            name, ifname, mac, addrs = item["name"], item["interface"], item["mac"], item["addresses"]
            if not isinstance(name, str) or not _NAME.match(name) or name in _LAB_NAMES:
                problems.add(_line_of(item, "name"), f"{wkey}.name",
                             f"{name!r} is not usable: lower-case letters, digits, '-' and '_' (at "
                             f"most 32), and not 'host' or 'internet' (the lab uses those)")
            else:
                unique("name", name, f"{wkey}.name", _line_of(item, "name"))
            if not isinstance(ifname, str) or not _IFNAME.match(ifname) or ifname in ("lo", UPLINK_HOST):
                problems.add(_line_of(item, "interface"), f"{wkey}.interface",
                             f"{ifname!r} is not an interface name: at most 15 letters, digits, "
                             f"'.', '-', '_' (not 'lo' or '{UPLINK_HOST}')")
            else:
                unique("interface", ifname, f"{wkey}.interface", _line_of(item, "interface"))
            mac_text = str(mac).lower() if isinstance(mac, str) else None
            if mac_text is None or not _MAC.match(mac_text):
                problems.add(_line_of(item, "mac"), f"{wkey}.mac",
                             f"{mac!r} is not a MAC address; write six hex pairs like "
                             f"\"02:00:00:00:01:02\" (quoted)")
            elif int(mac_text[:2], 16) & 1 or mac_text == "00:00:00:00:00:00":
                problems.add(_line_of(item, "mac"), f"{wkey}.mac",
                             f"{mac_text} is multicast or zero; use a unicast, locally administered "
                             f"MAC such as 02:..")
            else:
                unique("mac", mac_text, f"{wkey}.mac", _line_of(item, "mac"))
            parsed = []
            if not isinstance(addrs, list) or not addrs:
                problems.add(_line_of(item, "addresses"), f"{wkey}.addresses",
                             "give a non-empty list of IPv4/IPv6 addresses")
                addrs = []
            for ai, text in enumerate(addrs):
                akey = f"{wkey}.addresses[{ai}]"
                aline = _line_of(addrs, ai) or _line_of(item, "addresses")
                try:
                    addr = ipaddress.ip_address(str(text))
                except ValueError:
                    problems.add(aline, akey, f"{text!r} is not an IP address (no prefix length)")
                    continue
                clash = next((n for n in RESERVED_FOR_LAB if n.version == addr.version and addr in n),
                             None)
                if clash is not None:
                    problems.add(aline, akey, f"{addr} is inside {clash}, which the lab itself uses "
                                              f"or which is not a unicast host address; pick "
                                              f"another (e.g. 10.x or fd00::/8)")
                    continue
                unique("address", str(addr), akey, aline)
                parsed.append(addr)
            if len(problems.items) == before:
                workloads.append(Workload(name=name, zone=zone_name, interface=ifname,
                                          mac=mac_text, addresses=tuple(parsed)))
    if problems.items:
        raise PolicyError(problems.items)
    return workloads


def read_workloads(path) -> list[Workload]:
    """The one entry the lab uses to read a policy (switch its body to load_policy when merged)."""
    return _read_lab_topology(path)
