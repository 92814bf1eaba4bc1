"""The narrow interfaces the DNS proxy consumes from the rest of skyguard, as typing.Protocols,
plus the small adapters that build them from a Policy.

The datapath implements Learner (Datapath.learn), the signed log implements DecisionLog, and the
daemon supplies a WorkloadDirectory built from the policy. Nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from skyguard import parts
from skyguard.policy.model import IPAddress, Policy


@runtime_checkable
class Learner(Protocol):
    def learn(self, zone: str, rule_name: str, ips: list[IPAddress], ttl: int) -> None:
        """Open ips for zone's rule_name ports for ttl seconds, or longer if an earlier call
        opened them for longer (names sharing an address: open while any answer says so). Called
        synchronously before the answer is released to the VM; if it raises, the answer is
        withheld (fail closed). A learner may also have `forget(zone, rule_name, ips)`: close them
        before their TTL (a cap evicted them, the policy no longer backs them, the log refused the
        answer: learning.py); and `hold(zone, rule_name, ips, ttl)`: exactly ttl seconds more,
        shorter if need be (the longer answer was refused, or its name is no longer allowed)."""


# The DNS proxy reports each decision as record("dns", name=..., qtype=..., verdict=...), and the
# learned entries a policy no longer backs as record("dns_learned_dropped", dropped={reason: n}).
DecisionLog = parts.DecisionLog


@runtime_checkable
class WorkloadDirectory(Protocol):
    def lookup(self, source_ip: str) -> tuple[str, str] | None:
        """(workload, zone) owning source_ip, or None if the address belongs to no workload."""


class PolicyDirectory:
    """WorkloadDirectory over a Policy's workload addresses."""

    def __init__(self, policy: Policy):
        self._by_ip: dict[IPAddress, tuple[str, str]] = {}
        for workload in policy.workloads():
            for address in workload.addresses:
                self._by_ip[address] = (workload.name, workload.zone)
        # sockets report addresses in canonical text: one dict lookup on the hot path
        self._by_text = {str(a): v for a, v in self._by_ip.items()}

    def lookup(self, source_ip: str) -> tuple[str, str] | None:
        hit = self._by_text.get(source_ip)
        if hit is not None:
            return hit
        try:
            address = ipaddress.ip_address(source_ip.split("%", 1)[0])
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return self._by_ip.get(address)


class MultiLearner:
    """Fans learn() out to several learners in order; the first failure stops the answer."""

    def __init__(self, learners: Iterable[Learner]):
        self._learners = list(learners)

    def learn(self, zone, rule_name, ips, ttl) -> None:
        for learner in self._learners:
            learner.learn(zone, rule_name, ips, ttl)
