"""Who may reach which VM through the SSH access proxy: pure decisions, no I/O.

Target syntax (chosen because every OpenSSH user can type it, with no client configuration):

    ssh -p 2222 OPERATOR+WORKLOAD@skyguard-host          e.g. ssh -p 2222 alice+dc1@host

The operator authenticates with their own key from `admin.ssh.operators`; the part after '+'
names a workload of the policy, which the operator may reach only when its zone is in
`may_access`. The proxy then logs into the VM with skyguard's own key. This module is not the
SSH server (proxy.py) and holds no keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from skyguard.errors import AdminError, BadInput
from skyguard.policy.model import AdminSsh, Policy, SshOperator, Workload

TARGET_SEPARATOR = "+"
_SIMPLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Login:
    """An SSH user name split into who logs in and where to."""

    operator: str
    workload: str | None  # None when the user name had no '+WORKLOAD'


class AccessRefused(AdminError):
    """The operator is authenticated but may not open this session. `reason` is a short code for
    logs and metrics; the message is meant for the operator's terminal; `details` go to the log."""

    def __init__(self, reason: str, message: str, **details):
        self.reason = reason
        self.details = details
        super().__init__(message)


def parse_login(username: str) -> Login:
    """Split 'alice+dc1' into Login('alice', 'dc1'). Raises BadInput for names that are not
    plain identifiers (the user name comes from an unauthenticated client)."""
    operator, sep, workload = username.partition(TARGET_SEPARATOR)
    if not _SIMPLE_NAME.fullmatch(operator) or (sep and not _SIMPLE_NAME.fullmatch(workload)):
        raise BadInput("the SSH user name must be OPERATOR+WORKLOAD, e.g. alice+dc1")
    return Login(operator, workload if sep else None)


def find_operator(admin: AdminSsh, name: str) -> SshOperator | None:
    return next((op for op in admin.operators if op.name == name), None)


def reachable_workloads(policy: Policy, operator: SshOperator) -> list[str]:
    return [w.name for z in operator.may_access if z in policy.zones for w in policy.zones[z].workloads]


def authorize(policy: Policy, operator: SshOperator, login: Login) -> Workload:
    """The workload `operator` asked for, if policy lets them reach it; else AccessRefused with a
    message that tells the operator what they may do instead."""
    reachable = reachable_workloads(policy, operator)
    hint = ("you may reach: " + ", ".join(reachable)) if reachable else "you may reach no workload"
    if login.workload is None:
        raise AccessRefused(
            "no_target",
            f"skyguard: name the VM in the user name: ssh -p PORT {operator.name}+WORKLOAD@HOST ({hint})",
        )
    workload = policy.workload(login.workload)
    if workload is None:
        raise AccessRefused("unknown_workload",
                            f"skyguard: there is no workload named {login.workload!r} in the policy ({hint})")
    if workload.zone not in operator.may_access:
        raise AccessRefused(
            "not_allowed",
            f"skyguard: operator {operator.name} may not access {workload.name} "
            f"(zone {workload.zone} is not in their may_access; {hint})",
        )
    return workload


def workload_address(workload: Workload) -> str:
    """The address the SSH and console proxies dial for a workload: its first IPv4 address, else its first one."""
    if not workload.addresses:
        raise AccessRefused("no_address", f"skyguard: workload {workload.name} has no address in the policy")
    v4 = [a for a in workload.addresses if a.version == 4]
    return str(v4[0] if v4 else workload.addresses[0])
