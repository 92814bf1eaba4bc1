"""What a push waits for (`skyguard fleet policy push`): each host it names reporting that it
enforces the pushed revision, or that it refused it, or the wait running out.

A push names the hosts of its --hosts list; for `*`, the members of the fleet once it is stored.
A host that is no member then (down, or gone for good) is listed as absent, not waited for: the
store keeps no roster of hosts a push could trust (anyone who writes it can add one), and a host
gone for good would fail every later push. A push that names hosts waits for each, member or not.

What the hosts report is their member records (agent.py, follower.py), which whoever writes the
store can make up; each host signs what a push relies on of it with its log key (report.py). A
host counts as enforcing, or as refusing, only by what its key pinned where the push runs
signed, after the push and no earlier than what it showed before: a record no key known there
vouches for is UNVERIFIED, one its key did not sign (or changed since) FORGED, an old one put
back STALE; none of them is final, and at the deadline the host is named so. An outcome is shown
to the operator, never acted on; what a host enforces is proven by its signed log (`skyguard log
verify`) and `skyguard attest`.

The wait reads the members' records once, then follows them through a watch of their prefix (the
store's, as a host follows the policy key): a waiting push costs the store one read of every
member, and then only the records that change; it reads them all again (each POLL_S at most) only
while the watch is broken.

Not here: signing and storing the push (admin.py), printing (skyguard/cli/fleet.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import asdict, dataclass, field

from skyguard.errors import SkyguardError
from skyguard.fleet import keys
from skyguard.fleet.follower import MAX_PROBLEM, MAX_REFUSALS
from skyguard.fleet.report import FORGED, STALE, UNVERIFIED, HostKeys, RecordDoubt, fresh, open_member
from skyguard.fleet.signing import SignedPolicy, check_member_name
from skyguard.fleet.store import Compacted, Store, StoreUnavailable, load_value

log = logging.getLogger("skyguard.fleet")

POLL_S = 0.5           # how often the members' records are read again while their watch is broken
DEFAULT_WAIT_S = 60.0  # above a host's worst case: its watch re-listed (RESYNC_S, 30 s) and one report

ENFORCING, REFUSED, SUPERSEDED, WAITING, TIMED_OUT = "enforcing", "refused", "superseded", "waiting", "timed_out"
FINAL = (ENFORCING, REFUSED, SUPERSEDED)   # what waiting longer does not change
DOUBTED = (UNVERIFIED, FORGED, STALE)      # a record not taken as the host's word (report.py): kept at the deadline
RETRIED = ("apply_failed",)                # refusals a host tries again (the swap failed: a busy daemon)


@dataclass
class HostResult:
    """One host's outcome, and `detail`: what it reports, in a few words."""

    outcome: str
    detail: str
    reason: str | None = None     # a refusal's label (signing.py, follower.py)
    problem: str | None = None    # a refusal's message, as the host reported it (at most MAX_PROBLEM)
    revision: int | None = None   # the revision it reports running
    signed_at: float | None = field(default=None, compare=False)   # when it signed its record


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


def host_result(name: str, value: bytes | None, revision: int, sha256: str, host_keys: HostKeys, since: float,
                seen: float | None = None) -> HostResult:
    """The outcome of a push of (`revision`, `sha256`), started at `since` (time.time()), on the
    host `name` whose member record is `value` (None: no member record), as far as its host key
    in `host_keys` signed it, no earlier than `seen` (its newest record seen so far). Whoever writes
    the store chooses the record: any shape is an outcome, never an exception."""
    if value is None:
        return HostResult(WAITING, "not a member of the fleet (down, or not joined)")
    try:
        record = load_value(value)
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("policy"), dict):
        return HostResult(WAITING, "its member record is not a host's report")
    try:
        report = open_member(name, record, host_keys)
        fresh(report, since, seen)
    except RecordDoubt as e:
        return HostResult(e.kind, f"{e}{_claims(record['policy'], revision, sha256)}")
    running, at = report.revision, report.time
    if running == revision and report.sha256 == sha256:
        return HostResult(ENFORCING, f"enforces revision {revision}", revision=running, signed_at=at)
    for refusal in report.refusals[-MAX_REFUSALS:]:
        if not (isinstance(refusal, dict) and refusal.get("revision") == revision and refusal.get("sha256") == sha256
                and type(refusal.get("revision")) is int):
            continue
        reason = str(refusal.get("reason"))[:40]
        problem = str(refusal.get("problem"))[:MAX_PROBLEM]
        if reason in RETRIED:
            return HostResult(WAITING, f"could not apply it ({reason}), tries again: {problem}", reason, problem,
                              running, at)
        return HostResult(REFUSED, f"refused it ({reason}): {problem}", reason, problem, running, at)
    if running > revision:
        return HostResult(SUPERSEDED, f"runs revision {running}, newer (another push)", revision=running, signed_at=at)
    if running == revision:
        return HostResult(WAITING, f"runs revision {revision} with another policy (one loaded on the host?)",
                          revision=running, signed_at=at)
    return HostResult(WAITING, f"runs revision {running}", revision=running, signed_at=at)


def _claims(policy: dict, revision: int, sha256: str) -> str:
    """What a record not taken as its host's word claims of this push, said as a claim."""
    if policy.get("revision") == revision and policy.get("sha256") == sha256:
        return f" (it claims to enforce revision {revision}: not counted)"
    return ""


async def _members(store: Store) -> tuple[dict[str, bytes], int]:
    items, revision = await store.get_prefix(keys.MEMBERS)
    return {item.key[len(keys.MEMBERS):]: item.value for item in items}, revision


def _member_name(name: str) -> bool:
    try:
        check_member_name(name)
        return True
    except SkyguardError:
        return False


async def wait_for_hosts(store: Store, signed: SignedPolicy, timeout: float, host_keys: HostKeys,
                         changed: Callable[[str, HostResult, Rollout], None] = lambda *_: None) -> Rollout:
    """Read the members' records once, then watch them (the members' prefix) until each host
    `signed` names has a final outcome, or `timeout` seconds; `changed(name, result, rollout)` is
    called as a host's outcome or detail changes (progress). A record counts only as far as the
    host's key in `host_keys` signed it (report.py), after this wait began and no earlier than
    one seen of that host before. When the watch breaks (its member gone or silent, the history
    compacted) the records are read again after POLL_S and watched from there; a store that does
    not answer meanwhile is tried again each POLL_S until the deadline. Hosts still waiting then
    are TIMED_OUT (not told to `changed`); those whose record is doubted stay so."""
    started, since = time.monotonic(), time.time()
    rollout = Rollout(signed.revision, signed.sha256)
    seen: dict[str, float] = {}   # host -> when it signed the newest record of it seen here
    members: dict[str, bytes] = {}
    watched: int | None = None    # the store revision `members` is as of; None: read them again
    unreachable = None
    try:
        members, watched = await _members(store)
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

    def update(which) -> bool:
        """The outcomes of the hosts `which` from `members`; True once every host's is final."""
        for name in which:
            result = host_result(name, members.get(name), signed.revision, signed.sha256, host_keys, since,
                                 seen.get(name))
            if result.signed_at is not None:
                seen[name] = max(result.signed_at, seen.get(name, result.signed_at))
            if unreachable is not None and result.outcome not in FINAL:
                result.detail = f"{result.detail}; the store does not answer ({unreachable})"
            if rollout.results.get(name) != result:
                rollout.results[name] = result
                changed(name, result, rollout)
        return all(r.outcome in FINAL for r in rollout.results.values())

    done = update(names)
    while not done and (remaining := timeout - (time.monotonic() - started)) > 0:
        if watched is None:   # the watch broke, or the store did not answer: read them again
            await asyncio.sleep(min(POLL_S, remaining))
            try:
                (members, watched), unreachable = await _members(store), None
            except StoreUnavailable as e:
                unreachable = str(e)
            done = update(names)
            continue
        try:
            async with asyncio.timeout(remaining), aclosing(store.watch_prefix(keys.MEMBERS, watched)) as changes:
                async for batch in changes:
                    for change in batch:
                        name = change.key[len(keys.MEMBERS):]
                        if change.value is None:
                            members.pop(name, None)
                        else:
                            members[name] = change.value
                    if done := update(sorted({c.key[len(keys.MEMBERS):] for c in batch} & set(names))):
                        break
        except TimeoutError:
            watched = None   # the deadline (the loop ends), or a call of the watch's that timed out
        except (StoreUnavailable, Compacted) as e:
            log.info("fleet push: the watch of the members' records broke (%s); reading them again", e)
            watched = None
    for result in rollout.results.values():
        if result.outcome == WAITING:
            result.outcome = TIMED_OUT
    rollout.waited_s = time.monotonic() - started
    return rollout
