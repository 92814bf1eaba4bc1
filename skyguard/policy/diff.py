"""What changes between two policies, by name: zones, workloads, networks, rules, credentials,
TLS terminations, operators, keys VMs may use, and the DNS, SSH and key custody settings.

It compares canonical forms (canonical.py), so reordering keys, spelling a port in upper case or
adding comments is not a change; moving a rule in the list is not a change either, because the
semantics do not depend on order (deny beats allow). It says nothing about what a change does to
live flows; the daemon decides that when it swaps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from skyguard.policy.canonical import policy_to_dict
from skyguard.policy.model import Policy


@dataclass(frozen=True)
class Change:
    """One named thing that differs. `fields` maps each changed field to (old, new)."""

    kind: str  # "zone", "workload", "network", "rule", "credential", "tls", "operator", "key", "setting"
    name: str
    status: str  # "added", "removed", "changed"
    fields: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out: dict = {"kind": self.kind, "name": self.name, "status": self.status}
        if self.fields:
            out["fields"] = {k: {"old": old, "new": new} for k, (old, new) in self.fields.items()}
        return out


@dataclass(frozen=True)
class PolicyDiff:
    old_sha256: str
    new_sha256: str
    changes: tuple[Change, ...]

    @property
    def empty(self) -> bool:
        return not self.changes

    def to_dict(self) -> dict:
        return {"old_sha256": self.old_sha256, "new_sha256": self.new_sha256,
                "changes": [c.to_dict() for c in self.changes]}


def _named(items: list[dict], key: str = "name") -> dict[str, dict]:
    return {str(item[key]): item for item in items}


def _compare(kind: str, old: dict[str, dict], new: dict[str, dict]) -> list[Change]:
    changes = []
    for name in old:
        if name not in new:
            changes.append(Change(kind, name, "removed"))
    for name, item in new.items():
        if name not in old:
            changes.append(Change(kind, name, "added"))
        elif item != old[name]:
            keys = list(dict.fromkeys([*old[name], *item]))
            fields = {k: (old[name].get(k), item.get(k)) for k in keys if old[name].get(k) != item.get(k)}
            changes.append(Change(kind, name, "changed", fields))
    return changes


def _workloads(doc: dict) -> dict[str, dict]:
    return {w["name"]: {"zone": zone, **w} for zone, z in doc["zones"].items() for w in z["workloads"]}


def _settings(doc: dict) -> dict[str, dict]:
    out = {"metadata": doc["metadata"], "dns": doc["dns"]}
    admin = doc.get("admin", {})
    if "ssh" in admin:
        out["admin.ssh"] = {k: v for k, v in admin["ssh"].items() if k != "operators"}
    if "console" in admin:  # its targets are compared one by one (kind console_target)
        out["admin.console"] = {k: v for k, v in admin["console"].items() if k != "targets"}
    if "identity" in doc:
        out["identity"] = doc["identity"]
    if "content" in doc:  # its rules are compared one by one (kind content_rule)
        out["content"] = {k: v for k, v in doc["content"].items() if k != "rules"}
    if "keys" in doc:  # each key's grant is compared one by one (kind key)
        out["keys"] = {k: v for k, v in doc["keys"].items() if k != "keys"}
    extra = {k: v for k, v in doc.items() if k.startswith("x-")}
    if extra:
        out["extensions"] = extra
    return out


def diff_policies(old: Policy, new: Policy) -> PolicyDiff:
    a, b = policy_to_dict(old), policy_to_dict(new)
    changes: list[Change] = []
    changes += _compare("zone", {z: {"workloads": sorted(w["name"] for w in v["workloads"])}
                                 for z, v in a["zones"].items()},
                        {z: {"workloads": sorted(w["name"] for w in v["workloads"])}
                         for z, v in b["zones"].items()})
    changes += _compare("workload", _workloads(a), _workloads(b))
    changes += _compare("network", {k: {"cidrs": v} for k, v in a["networks"].items()},
                        {k: {"cidrs": v} for k, v in b["networks"].items()})
    changes += _compare("rule", _named(a["rules"]), _named(b["rules"]))
    changes += _compare("credential", _named(a["credentials"]), _named(b["credentials"]))
    tls_key = lambda items: {f"{t['workload']}:{t['port']}": t for t in items}  # noqa: E731
    changes += _compare("tls", tls_key(a["tls_termination"]), tls_key(b["tls_termination"]))
    operators = lambda doc: _named(doc.get("admin", {}).get("ssh", {}).get("operators", []))  # noqa: E731
    changes += _compare("operator", operators(a), operators(b))
    content_rules = lambda doc: _named(doc.get("content", {}).get("rules", []))  # noqa: E731
    changes += _compare("content_rule", content_rules(a), content_rules(b))
    key_grants = lambda doc: _named(doc.get("keys", {}).get("keys", []))  # noqa: E731
    changes += _compare("key", key_grants(a), key_grants(b))
    targets = lambda doc: _named(doc.get("admin", {}).get("console", {}).get("targets", []))  # noqa: E731
    changes += _compare("console_target", targets(a), targets(b))
    changes += _compare("app", _named(a.get("apps", [])), _named(b.get("apps", [])))
    changes += _compare("setting", _settings(a), _settings(b))
    return PolicyDiff(old.sha256, new.sha256, tuple(changes))


SYMBOL = {"added": "+", "removed": "-", "changed": "~"}


def format_diff(diff: PolicyDiff) -> str:
    """Human-readable lines: `+ rule new-rule`, `- workload dc2`, `~ rule x: ports [..] -> [..]`."""
    if diff.empty:
        return "no changes"
    lines = []
    for change in diff.changes:
        head = f"{SYMBOL[change.status]} {change.kind} {change.name}"
        if not change.fields:
            lines.append(head)
            continue
        lines.append(f"{head}:")
        for key, (old, new) in change.fields.items():
            lines.append(f"    {key}: {_short(old)} -> {_short(new)}")
    return "\n".join(lines)


def _short(value) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and (not value or value != value.strip() or any(c in value for c in '{}[],"')):
        return json.dumps(value)  # quoted as YAML would need it: `Bearer {secret}` is not a mapping
    return str(value)
