"""What a push waits for (`skyguard fleet policy push`): each host it names reporting that it
enforces the pushed revision, or that it refused it, or the wait running out.

A push names the hosts of its --hosts list; for `*`, the members of the fleet once it is stored.
A host that is no member then (down, or gone for good) is listed as absent, not waited for: the
store keeps no roster of hosts a push could trust (anyone who writes it can add one), and a host
gone for good would fail every later push. A push that names hosts waits for each, member or not.

What the hosts report is their member records (agent.py, follower.py), which are unsigned:
whoever writes the store can make one up. So an outcome here is what a host (or the store) says,
shown to the operator and never acted on; that a host enforces a policy is proven by its signed
log (`skyguard log verify`) and `skyguard attest`.

Not here: signing and storing the push (admin.py), printing (skyguard/cli/fleet.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from skyguard.errors import SkyguardError
from skyguard.fleet import keys
from skyguard.fleet.follower import MAX_PROBLEM, MAX_REFUSALS
from skyguard.fleet.signing import SignedPolicy, check_member_name
from skyguard.fleet.store import Store, StoreUnavailable, load_value

POLL_S = 0.5           # how often the members' records are read while waiting
DEFAULT_WAIT_S = 60.0  # above a host's worst case: its watch re-listed (RESYNC_S, 30 s) and one report

ENFORCING, REFUSED, SUPERSEDED, WAITING, TIMED_OUT = "enforcing", "refused", "superseded", "waiting", "timed_out"
FINAL = (ENFORCING, REFUSED, SUPERSEDED)   # what waiting longer does not change
RETRIED = ("apply_failed",)                # refusals a host tries again (the swap failed: a busy daemon)


@dataclass
class HostResult:
    """One host's outcome, and `detail`: what it reports, in a few words."""

    outcome: str
    detail: str
    reason: str | None = None     # a refusal's label (signing.py, follower.py)
    problem: str | None = None    # a refusal's message, as the host reported it (at most MAX_PROBLEM)
    revision: int | None = None   # the revision it reports running


@dataclass
class Rollout:
    revision: int
    sha256: str
    named: list[str] = field(default_factory=list)    # the hosts waited for
    results: dict[str, HostResult] = field(default_factory=dict)
    absent: list[str] = field(default_factory=list)   # `*`: hosts with a checkpoint, but no member record
    waited_s: float = 0.0

    @property
    def enforcing(self) -> list[str]:
        return [name for name, r in self.results.items() if r.outcome == ENFORCING]

    @property
    def failed(self) -> dict[str, HostResult]:
        return {name: r for name, r in self.results.items() if r.outcome != ENFORCING}

    @property
    def ok(self) -> bool:
        """Every host named enforces it, and there was one at least."""
        return bool(self.named) and len(self.enforcing) == len(self.named)

    def to_json(self) -> dict:
        return {"results": {name: {k: v for k, v in asdict(r).items() if v is not None}
                            for name, r in sorted(self.results.items())},
                "absent": self.absent, "enforcing": len(self.enforcing), "named": len(self.named),
                "waited_s": round(self.waited_s, 1), "ok": self.ok}


def host_result(value: bytes | None, revision: int, sha256: str) -> HostResult:
    """The outcome of a push of (`revision`, `sha256`) on the host whose member record is
    `value` (None: no member record). Whoever writes the store chooses the record: any shape is
    an outcome, never an exception."""
    if value is None:
        return HostResult(WAITING, "not a member of the fleet (down, or not joined)")
    try:
        record = load_value(value)
    except ValueError:
        record = None
    policy = record.get("policy") if isinstance(record, dict) else None
    if not isinstance(policy, dict):
        return HostResult(WAITING, "its member record is not a host's report")
    running = policy.get("revision") if type(policy.get("revision")) is int else None
    if running == revision and policy.get("sha256") == sha256:
        return HostResult(ENFORCING, f"enforces revision {revision}", revision=running)
    refusals = policy.get("refusals")
    for refusal in refusals[-MAX_REFUSALS:] if isinstance(refusals, list) else []:
        if not (isinstance(refusal, dict) and refusal.get("revision") == revision and refusal.get("sha256") == sha256
                and type(refusal.get("revision")) is int):
            continue
        reason = str(refusal.get("reason"))[:40]
        problem = str(refusal.get("problem"))[:MAX_PROBLEM]
        if reason in RETRIED:
            return HostResult(WAITING, f"could not apply it ({reason}), tries again: {problem}", reason, problem, running)
        return HostResult(REFUSED, f"refused it ({reason}): {problem}", reason, problem, running)
    if running is not None and running > revision:
        return HostResult(SUPERSEDED, f"runs revision {running}, newer (another push)", revision=running)
    if running == revision:
        return HostResult(WAITING, f"runs revision {revision} with another policy (one loaded on the host?)",
                          revision=running)
    return HostResult(WAITING, f"runs revision {running if running is not None else '?'}", revision=running)


async def _members(store: Store) -> dict[str, bytes]:
    items, _ = await store.get_prefix(keys.MEMBERS)
    return {item.key[len(keys.MEMBERS):]: item.value for item in items}


def _member_name(name: str) -> bool:
    try:
        check_member_name(name)
        return True
    except SkyguardError:
        return False


async def wait_for_hosts(store: Store, signed: SignedPolicy, timeout: float,
                         changed: Callable[[str, HostResult, Rollout], None] = lambda *_: None) -> Rollout:
    """Read the members' records every POLL_S until each host `signed` names has a final outcome,
    or `timeout` seconds; `changed(name, result, rollout)` is called as a host's outcome or
    detail changes (progress). A store that does not answer meanwhile is tried again until the
    deadline. Hosts still waiting then are TIMED_OUT (not told to `changed`)."""
    started = time.monotonic()
    rollout = Rollout(signed.revision, signed.sha256)
    members: dict[str, bytes] = {}
    unreachable = None
    try:
        members = await _members(store)
    except StoreUnavailable as e:
        unreachable = str(e)
    if signed.hosts == ("*",):
        names = sorted(name for name in members if _member_name(name))
        try:
            published, _ = await store.get_prefix(keys.CHECKPOINTS)
            known = {item.key[len(keys.CHECKPOINTS):] for item in published}
            rollout.absent = sorted(name for name in known - set(members) if _member_name(name))
        except StoreUnavailable:
            pass   # only shown
    else:
        names = list(dict.fromkeys(signed.hosts))
    rollout.named = names
    while True:
        for name in names:
            result = host_result(members.get(name), signed.revision, signed.sha256)
            if unreachable is not None and result.outcome not in FINAL:
                result.detail = f"{result.detail}; the store does not answer ({unreachable})"
            if rollout.results.get(name) != result:
                rollout.results[name] = result
                changed(name, result, rollout)
        remaining = timeout - (time.monotonic() - started)
        if all(r.outcome in FINAL for r in rollout.results.values()) or remaining <= 0:
            break
        await asyncio.sleep(min(POLL_S, remaining))
        try:
            members, unreachable = await _members(store), None
        except StoreUnavailable as e:
            unreachable = str(e)
    for result in rollout.results.values():
        if result.outcome == WAITING:
            result.outcome = TIMED_OUT
    rollout.waited_s = time.monotonic() - started
    return rollout
