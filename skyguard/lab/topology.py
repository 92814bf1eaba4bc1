"""What the lab builds from a policy: its workloads, read with the one policy parser, plus the
checks only the lab needs (addresses that would collide with the lab's own plumbing or its
internet, names the lab keeps for itself). Not a policy parser.
"""

from __future__ import annotations

from pathlib import Path

from skyguard.errors import PolicyError
from skyguard.lab.addressing import RESERVED_FOR_LAB
from skyguard.policy.model import Workload
from skyguard.policy.parse import Problem, load_policy

LAB_NAMES = ("host", "internet")  # namespaces the lab itself uses


def _line_of(text: str, needle: str) -> int:
    """The first line that mentions `needle` (the policy is already valid, so this is a pointer
    for the reader, not a parse)."""
    for number, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return number
    return 0


def read_workloads(path) -> list[Workload]:
    """The workloads of the policy at `path`, or PolicyError naming file, line and key."""
    path = Path(path)
    policy = load_policy(path)
    text = path.read_text(encoding="utf-8")
    problems = []
    for zone in policy.zones.values():
        for index, workload in enumerate(zone.workloads):
            key = f"zones.{zone.name}.workloads[{index}]"
            if workload.name in LAB_NAMES:
                problems.append(Problem(str(path), _line_of(text, f"name: {workload.name}"), f"{key}.name",
                                        f"{workload.name!r} is a name the lab uses for itself; pick another"))
            for ai, addr in enumerate(workload.addresses):
                clash = next((n for n in RESERVED_FOR_LAB if n.version == addr.version and addr in n), None)
                if clash is not None:
                    problems.append(Problem(str(path), _line_of(text, str(addr)), f"{key}.addresses[{ai}]",
                                            f"{addr} is inside {clash}, which the lab itself uses; "
                                            f"pick another (e.g. 10.x or fd00::/8)"))
    if problems:
        raise PolicyError(problems)
    return policy.workloads()
