"""Who may open which console target: pure decisions, no I/O.

An operator (or a member of a group the identity-aware proxy vouches for) may open a target when
the target's workload is in a zone their `admin.console` grant lists. Refusals reuse the SSH
door's AccessRefused (a reason code for logs and metrics, a message for the operator).
"""

from __future__ import annotations

from skyguard.admin.access import AccessRefused
from skyguard.policy.console import ConsoleTarget
from skyguard.policy.model import Policy, Workload


def reachable_targets(policy: Policy, operator: str, groups: tuple[str, ...] = ()) -> list[ConsoleTarget]:
    console = policy.admin_console
    if console is None:
        return []
    zones = console.zones_of(operator, groups)
    return [t for t in console.targets if (w := policy.workload(t.workload)) is not None and w.zone in zones]


def authorize(policy: Policy, operator: str, groups: tuple[str, ...], target_name: str) -> tuple[ConsoleTarget, Workload]:
    """The target and its workload if `operator` may open it now; else AccessRefused."""
    console = policy.admin_console
    target = console.target(target_name) if console is not None else None
    if target is None:
        raise AccessRefused("unknown_target", f"skyguard: there is no console target named {target_name!r}")
    workload = policy.workload(target.workload)
    if workload is None or workload.zone not in console.zones_of(operator, groups):
        # The same words whether the zone or the operator is unknown: no probing of the policy.
        raise AccessRefused("not_allowed", f"skyguard: {operator} may not open the console {target_name}",
                            zone=workload.zone if workload else None)
    return target, workload

