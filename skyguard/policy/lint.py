"""Warnings about valid policies that probably do not do what their author meant. A warning never
makes a policy invalid: `policy validate` and `up` accept exactly the same files; validate and
`policy load` print these beside their answer.

Not here: errors (parse.py and checker.py refuse those), anything about the running system.
"""

from __future__ import annotations

from dataclasses import dataclass

from skyguard.policy.model import Policy


@dataclass(frozen=True)
class PolicyWarning:
    line: int  # where the rule starts in the file (0: unknown)
    rule: str
    message: str

    def to_dict(self) -> dict:
        return {"line": self.line, "rule": self.rule, "message": self.message}


def policy_warnings(policy: Policy) -> list[PolicyWarning]:
    """Every warning, in rule order."""
    return _network_holds_workloads(policy)


def _network_holds_workloads(policy: Policy) -> list[PolicyWarning]:
    """An allow rule to a network or CIDR that holds a workload's address lets traffic leave its
    source zones toward that workload, but the workload's own interface admits only what a rule
    naming its zone allows (bpf/README.md: ingress checks `from A to {zones: [B]}`), so that
    traffic is dropped there as `no_rule`. Deny rules need no warning: they deny at the source."""
    found = []
    for rule in policy.rules:
        if rule.action != "allow":
            continue
        named = [(name, net) for name in rule.to.networks for net in policy.networks[name]]
        named += [(str(net), net) for net in rule.to.cidrs]
        # "anywhere" (0.0.0.0/0, ::/0) is the outside world: it holds every workload, meant or not
        named = [(name, net) for name, net in named if net.prefixlen]
        held: dict[str, list[tuple]] = {}  # zone -> (network name, address, workload), per workload
        for workload in policy.workloads():
            if workload.zone in rule.to.zones:
                continue
            hit = next(((name, address, workload.name) for address in workload.addresses for name, net in named
                        if address.version == net.version and address in net), None)
            if hit is not None:
                held.setdefault(workload.zone, []).append(hit)
        for zone, hits in held.items():  # one warning per zone: a /8 may hold a hundred VMs
            name, address, workload = hits[0]
            others = f" and {len(hits) - 1} more of its workloads" if len(hits) > 1 else ""
            found.append(PolicyWarning(rule.line, rule.name, (
                f"rule {rule.name!r}: {name} holds {address}, the address of workload {workload!r}{others} "
                f"(zone {zone!r}); the rule lets traffic leave toward them, but a workload admits only "
                f"what a rule to its zone allows, so it is dropped there (add {zone!r} to the rule's "
                f"`to: zones:` if it should arrive)")))
    return found
