"""A host's member record, signed: the part of it `fleet policy push` (rollout.py) and `fleet
status` (admin.py) rely on, and the one check both make before taking it as the host's word.

Whoever can write the store can write any member record: "host3 enforces revision 7" for a host
that never applied it, or refusals it never made. So each host signs, with its log key (the key
`fleet identity` prints and `fleet trust` pins; it signs its checkpoints and alerts too), a note
of what it reports, published beside the record's plain fields as `signed`:

    skyguard.fleet/member/v1
    {"member": "host3", "refusals": [...], "revision": 7, "sha256": "3f0c...", "time": 1712345678.5}

(the revision and its policy hash the host runs, its last refusals (follower.py), and when it
signed: its heartbeat). The header keeps a member note from being taken for a checkpoint or an
alert the same key signs. open_member checks a record against the host keys known where the
check runs (HostKeys: those an operator pinned in that state dir, and its own):

- UNVERIFIED: no host key of that member is known there, or the record carries no note;
- FORGED: a note that key did not sign, signed for another member, or plain fields that say
  otherwise than the note (the revision, hash, refusals, name or heartbeat changed);
- STALE (fresh()): signed earlier than what the check has seen of that host already, or more
  than CLOCK_SKEW_S before the moment it needs (the push's start; for `fleet status`, MAX_AGE_S
  ago): an old signed record put back, which whoever copied one can do, or a clock behind.

Only a MemberReport counts: none of the others is ever a host enforcing a push. The rest of a
record (programs, log size, the admin's note of the policy it runs) is shown as it is.

Not here: publishing the record (agent.py), what a push makes of a report (rollout.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from skyguard.tlog.checkpoint import Signer, Verifier
from skyguard.tlog.errors import BadLogInput, VerificationError

HEADER = "skyguard.fleet/member/v1"
UNVERIFIED, FORGED, STALE = "unverified", "forged", "stale"
# How far the admin's clock and a host's may differ: a record signed this long before the push
# (or before MAX_AGE_S ago) may still be the host's latest. Keep hosts on NTP.
CLOCK_SKEW_S = 30.0
# A live host signs its record anew every period (agent.py, 2 s); one whose agent stopped keeps
# it at most its lease's TTL (agent.LEASE_TTL_S). Older (past the skew): put back, or a host
# that stopped reporting (its daemon not answering).
MAX_AGE_S = 10.0
SIGNED = ("revision", "sha256", "refusals")   # of the record's `policy`, as follower.report gives it


class RecordDoubt(ValueError):
    """Why a member record is not taken as its host's word: `kind` UNVERIFIED, FORGED or STALE."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class MemberReport:
    """What a host signed of its member record."""

    member: str
    time: float
    revision: int
    sha256: str | None
    refusals: list = field(default_factory=list)
    key: str = "pinned here"   # which key vouches for it: "pinned here" or "this host"


@dataclass(frozen=True)
class HostKeys:
    """The host keys a check trusts: `pinned` by member name (`fleet trust`), and `own`, the key
    of the host whose state dir it is (its own record, whatever name it runs under)."""

    pinned: dict[str, Verifier] = field(default_factory=dict)
    own: Verifier | None = None


def sign_member(signer: Signer, name: str, policy: dict, when: float) -> str:
    """The note by which a host's log key signs its member record (`policy`: follower.report)."""
    statement = {"member": name, "time": when, **{k: policy.get(k) for k in SIGNED}}
    return signer.sign(f"{HEADER}\n{json.dumps(statement, sort_keys=True)}\n")


def open_member(name: str, record: dict, keys: HostKeys) -> MemberReport:
    """What the host `name` signed of its member record `record` (a JSON object), if a key in
    `keys` for it did, and the plain fields say the same; RecordDoubt else."""
    key, which = keys.pinned.get(name), "pinned here"
    note = record.get("signed")
    if key is None:
        key, which = keys.own, "this host"
        if key is None or not _signed_by(note, key):
            raise RecordDoubt(UNVERIFIED, f"no host key of {name} is pinned here (`skyguard fleet trust`): "
                                          f"its member record is unverified")
    if note is None:
        raise RecordDoubt(UNVERIFIED, f"its member record carries no signature by {name}'s host key "
                                      f"(made up, or its agent is older than this command)")
    try:
        text = key.verify(note)
        head, line, end = text.split("\n") if text.count("\n") == 2 else ("", "", "x")
        if head != HEADER or end:
            raise ValueError
        signed = json.loads(line)
        report = MemberReport(signed["member"], signed["time"], signed["revision"], signed["sha256"],
                              signed["refusals"], which)
        if not _well_formed(report):
            raise ValueError
    except (BadLogInput, VerificationError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise RecordDoubt(FORGED, f"its member record is not signed by {name}'s host key "
                                  f"{'known as this host' if which == 'this host' else 'pinned here'}") from None
    if report.member != name:
        raise RecordDoubt(FORGED, f"its member record carries {str(report.member)[:64]!r}'s record, signed by "
                                  f"{name}'s host key for that member")
    policy = record.get("policy")
    plain = {k: policy.get(k) for k in SIGNED} if isinstance(policy, dict) else None
    if plain != {k: getattr(report, k) for k in SIGNED} or record.get("name", name) != name \
            or record.get("heartbeat", report.time) != report.time:
        raise RecordDoubt(FORGED, f"its member record says otherwise than {name}'s host key signed (it signed "
                                  f"revision {report.revision}, {str(report.sha256)[:12]})")
    return report


def fresh(report: MemberReport, since: float, seen: float | None = None, what: str = "this push",
          allowed: float = 0.0) -> None:
    """RecordDoubt (STALE) if `report` was signed before `seen` (the time of one of its records
    seen already), or more than `allowed` + CLOCK_SKEW_S seconds before `since` (`what` names
    that moment)."""
    if seen is not None and report.time < seen:
        raise RecordDoubt(STALE, f"its member record was signed {seen - report.time:.0f} s before one it showed "
                                 f"already: an old record put back")
    if report.time < since - allowed - CLOCK_SKEW_S:
        raise RecordDoubt(STALE, f"its member record was signed {since - report.time:.0f} s before {what}: an old "
                                 f"record put back, or its host stopped reporting (or its clock is behind)")


def _signed_by(note, key: Verifier) -> bool:
    try:
        key.verify(note)
        return True
    except (BadLogInput, VerificationError):
        return False


def _well_formed(report: MemberReport) -> bool:
    return (isinstance(report.member, str) and type(report.revision) is int and report.revision >= 0
            and isinstance(report.time, (int, float)) and not isinstance(report.time, bool)
            and math.isfinite(report.time) and (report.sha256 is None or isinstance(report.sha256, str))
            and isinstance(report.refusals, list))
