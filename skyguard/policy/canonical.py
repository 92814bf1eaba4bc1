"""The canonical JSON form of a Policy: what `policy show --json` prints and `policy diff` compares.

The form is itself a valid policy document (apiVersion, kind, metadata, zones, ...) with every
default spelled out, "*" expanded, values normalised and lists de-duplicated, so parsing it again
gives the same Policy (tests check the round trip). It deliberately leaves out where the policy
came from (source, sha256, line numbers): two files that mean the same thing have the same form.
It is not a serialiser for arbitrary YAML and it keeps no comments.
"""

from __future__ import annotations

from skyguard.policy.apps import apps_to_dict
from skyguard.policy.console import console_to_dict
from skyguard.policy.content import ContentPolicy
from skyguard.policy.keys import keys_to_dict
from skyguard.policy.model import Policy, Rule
from skyguard.policy.parse import API_VERSION, KIND


def rule_to_dict(rule: Rule) -> dict:
    to: dict = {}
    if rule.to.zones:
        to["zones"] = list(rule.to.zones)
    if rule.to.networks:
        to["networks"] = list(rule.to.networks)
    if rule.to.cidrs:
        to["cidrs"] = [str(c) for c in rule.to.cidrs]
    if rule.to.fqdns:
        to["fqdns"] = list(rule.to.fqdns)
    if rule.to.allow_private:
        to["allow_private"] = True
    out = {"name": rule.name, "action": rule.action, "from": list(rule.from_zones), "to": to}
    if rule.ports:  # absent means every port; an empty list is not valid input
        out["ports"] = [str(p) for p in rule.ports]
    return out


def content_to_dict(content: ContentPolicy) -> dict:
    """The `content:` section (only written when it has rules: the parser requires some). YARA
    files are absolute paths already, so the form parses the same from any folder."""
    rules = []
    for rule in content.rules:
        block: dict = {"clamav": rule.block.clamav}  # always: `{clamav: false}` alone is a valid block
        if rule.block.mime_types:
            block["mime_types"] = list(rule.block.mime_types)
        if rule.block.max_size is not None:
            block["max_size"] = rule.block.max_size
        if rule.block.yara:
            block["yara"] = list(rule.block.yara)
        if rule.block.patterns:
            block["patterns"] = list(rule.block.patterns)
        rules.append({"name": rule.name, "zones": list(rule.zones), "direction": list(rule.directions),
                      "protocols": list(rule.protocols), "block": block})
    return {"clamd": {"socket": content.clamd_socket, "timeout": int(content.scan_timeout),
                      "max_file_bytes": content.clamd_max_file_bytes},
            "max_inspect_bytes": content.max_inspect_bytes, "rules": rules}


def policy_to_dict(policy: Policy) -> dict:
    """The policy as plain JSON-able data (str, int, bool, list, dict) in canonical form."""
    out: dict = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": policy.name},
        "zones": {
            zone.name: {"workloads": [
                {"name": w.name, "interface": w.interface, "mac": w.mac,
                 "addresses": [str(a) for a in w.addresses]}
                for w in zone.workloads
            ]}
            for zone in policy.zones.values()
        },
        "networks": {name: [str(c) for c in cidrs] for name, cidrs in policy.networks.items()},
        "rules": [rule_to_dict(r) for r in policy.rules],
        "dns": {
            "upstreams": list(policy.dns.upstreams),
            "refuse_with": policy.dns.refuse_with,
            "min_ttl": policy.dns.min_ttl,
            "max_ttl": policy.dns.max_ttl,
            "tunnel_detection": {"action": policy.dns.tunnel_detection.action},
        },
        "credentials": [],
        "tls_termination": [
            {"workload": t.workload, "port": t.port, "forward_to": t.forward_to,
             "certificate": t.certificate}
            for t in policy.tls_termination
        ],
    }
    for credential in policy.credentials:
        inject: dict = {"body": credential.inject.body, "format": credential.inject.format,
                        "max_occurrences": credential.inject.max_occurrences}
        if credential.inject.header is not None:
            inject["header"] = credential.inject.header
        entry = {"name": credential.name, "placeholder": credential.placeholder,
                 "secret": credential.secret, "zones": list(credential.zones),
                 "destinations": list(credential.destinations), "inject": inject}
        if credential.strip_response_headers:
            entry["strip_response_headers"] = list(credential.strip_response_headers)
        if credential.client_certificate:
            entry["client_certificate"] = credential.client_certificate
        out["credentials"].append(entry)
    if policy.admin_ssh is not None:
        ssh = policy.admin_ssh
        out["admin"] = {"ssh": {
            "listen": ssh.listen,
            "port_forwarding": ssh.port_forwarding,
            "agent_forwarding": ssh.agent_forwarding,
            "sftp": ssh.sftp,
            "operators": [{"name": o.name, "public_key": o.public_key, "may_access": list(o.may_access)}
                          for o in ssh.operators],
        }}
        if ssh.commands is not None:
            out["admin"]["ssh"]["commands"] = list(ssh.commands)
    if policy.admin_console is not None:
        out.setdefault("admin", {})["console"] = console_to_dict(policy.admin_console)
    out.update(apps_to_dict(policy))
    if policy.content.rules:
        out["content"] = content_to_dict(policy.content)
    if policy.keys is not None:
        out["keys"] = keys_to_dict(policy.keys)
    for key, value in policy.extra.items():
        out[key] = value
    return out


def policy_summary(policy: Policy) -> dict:
    """The counts every command prints in one line ("keysystems: 5 zones, 7 workloads, ...")."""
    return {
        "name": policy.name,
        "zones": len(policy.zones),
        "workloads": len(policy.workloads()),
        "networks": len(policy.networks),
        "rules": len(policy.rules),
        "fqdn_patterns": len({p for r in policy.rules for p in r.to.fqdns}),
        "credentials": len(policy.credentials),
        "sha256": policy.sha256,
        "source": policy.source,
    }


def summary_line(policy: Policy) -> str:
    s = policy_summary(policy)
    counts = ", ".join(_count(s[key], key[:-1]) for key in ("zones", "workloads", "rules"))
    return f"{s['name']}: {counts}, sha256 {s['sha256']}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
