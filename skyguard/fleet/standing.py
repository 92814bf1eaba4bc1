"""How each host stands against the fleet's newest policy revision: it enforces it, it refused
it (the revision, the host's reason, when), or neither yet; for `fleet status` (admin.py) and
the fleet agent's gauge of the hosts refusing it (agent.py).

The newest revision is the highest one an admin key signed, and of two under one number the one
stored last: for `fleet status`, among the policy key's values and the notes hosts report
beside what they run (admin.signed_revisions, what a push numbers the next one from); for an
agent, among the records it opened (follower.py). A host is taken at its word only as far as
its host key signed its member record (report.py); a record that is not (unverified, forged,
stale) stands as that, neither enforcing nor refusing.

A host's refusal is of "a later revision" when the host does not run that record and it is not
older than the one it runs: another admin's push under the revision the host runs (a rollback
refused) is one, an older record put back in the store is not. Those are shown, with the one of
the newest revision whatever its number.

Not here: reading the store (admin.py, agent.py), printing (skyguard/cli/fleet.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from skyguard.fleet.follower import MAX_PROBLEM, MAX_REFUSALS
from skyguard.fleet.report import MAX_AGE_S, HostKeys, MemberReport, RecordDoubt, fresh, open_member
from skyguard.tlog.checkpoint import Verifier
from skyguard.tlog.errors import BadLogInput

ENFORCING, REFUSING, BEHIND, NEWER, NOT_NAMED, NO_POLICY = (
    "enforcing", "refusing", "behind", "newer", "not_named", "no_fleet_policy")


@dataclass(frozen=True)
class Newest:
    """The newest revision: `signed` by an admin key known where it is read, or (False) only
    what the policy key's record claims, its signature not checked there."""

    revision: int
    sha256: str
    hosts: tuple[str, ...] = ("*",)
    signed: bool = True

    def for_host(self, name: str) -> bool:
        return "*" in self.hosts or name in self.hosts

    def to_json(self) -> dict:
        return {"revision": self.revision, "sha256": self.sha256, "hosts": list(self.hosts), "signed": self.signed}


def standing(name: str, report: MemberReport, newest: Newest | None, now: float) -> dict:
    """{state, enforces: {revision, sha256}, refused: [...]} of the host `name` by what it signed
    (`report`): `refused` holds its refusals of later revisions and of the newest, oldest first,
    each {revision, sha256, reason, problem, time, age_s, newest} (time: when the host first
    refused it, None from an agent that did not say)."""
    refused = []
    for refusal in report.refusals[-MAX_REFUSALS:]:
        if not isinstance(refusal, dict) or type(refusal.get("revision")) is not int:
            continue
        revision, sha256 = refusal["revision"], refusal.get("sha256")
        is_newest = newest is not None and (revision, sha256) == (newest.revision, newest.sha256)
        if not is_newest and (revision < report.revision or (revision, sha256) == (report.revision, report.sha256)):
            continue   # an older record, or the one it runs: nothing it refuses now
        when = refusal.get("time")
        when = float(when) if isinstance(when, (int, float)) and not isinstance(when, bool) and math.isfinite(when) \
            else None
        refused.append({"revision": revision, "sha256": str(sha256)[:64] if sha256 is not None else None,
                        "reason": str(refusal.get("reason"))[:40], "problem": str(refusal.get("problem"))[:MAX_PROBLEM],
                        "time": when, "age_s": round(now - when, 1) if when is not None else None,
                        "newest": is_newest})
    if newest is None:
        state = NO_POLICY
    elif (report.revision, report.sha256) == (newest.revision, newest.sha256):
        state = ENFORCING
    elif any(r["newest"] for r in refused):
        state = REFUSING
    elif not newest.for_host(name):
        state = NOT_NAMED
    else:
        state = NEWER if report.revision > newest.revision else BEHIND
    return {"state": state, "enforces": {"revision": report.revision, "sha256": report.sha256}, "refused": refused}


def host_keys(pins: dict[str, dict], own: Verifier | None) -> HostKeys:
    """The keys that vouch for member records: the log keys of `pins` ({peer: pin}) and `own`."""
    pinned = {}
    for peer, pin in pins.items():
        try:
            pinned[peer] = Verifier.from_vkey(pin["log_vkey"])
        except (BadLogInput, KeyError, TypeError, ValueError):
            continue
    return HostKeys(pinned, own)


def refusing_newest(records: Mapping[str, object], newest: Newest | None, keys: HostKeys, now: float) -> list[str]:
    """The members of `records` ({name: its member record}) whose record, signed by its host key
    in `keys` within MAX_AGE_S (report.py), says it refuses `newest`."""
    if newest is None:
        return []
    found = []
    for name, record in records.items():
        if not isinstance(record, dict):
            continue
        try:
            report = open_member(name, record, keys)
            fresh(report, now, what="now", allowed=MAX_AGE_S)
        except RecordDoubt:
            continue
        if standing(name, report, newest, now)["state"] == REFUSING:
            found.append(name)
    return sorted(found)
