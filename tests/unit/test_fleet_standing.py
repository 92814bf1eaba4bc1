"""How a host stands against the fleet's newest revision (skyguard/fleet/standing.py), by what it
signed of its member record: enforcing it, refusing it (whatever its number: a rollback under
the revision it runs is a refusal of the newest), behind, newer, not named; and which of its
refusals `fleet status` shows: those of later revisions than the one it runs, never an older
record put back. Then the count an agent exports, only of records signed by a key it knows."""

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from skyguard.fleet.report import HostKeys, MemberReport, sign_member
from skyguard.fleet.standing import (
    BEHIND,
    ENFORCING,
    NEWER,
    NO_POLICY,
    NOT_NAMED,
    REFUSING,
    Newest,
    refusing_newest,
    standing,
)
from skyguard.tlog.checkpoint import Signer

NOW = 1_700_000_000.0
A, B, C = "a" * 64, "b" * 64, "c" * 64
NEWEST = Newest(8, A)


def refusal(revision, sha256, reason="rollback", when=NOW - 42):
    return {"revision": revision, "sha256": sha256, "reason": reason, "problem": "why", "time": when}


def report(revision=7, sha256=B, refusals=()):
    return MemberReport("h1", NOW - 1, revision, sha256, list(refusals))


CASES = [
    ("runs the newest", report(8, A), NEWEST, ENFORCING, []),
    ("refused it: does not load", report(refusals=[refusal(8, A, "invalid")]), NEWEST, REFUSING, [(8, True)]),
    ("refused it as a rollback under the revision it runs", report(8, B, [refusal(8, A)]), NEWEST, REFUSING,
     [(8, True)]),
    ("refused it though it runs a higher one", report(9, B, [refusal(8, A)]), NEWEST, REFUSING, [(8, True)]),
    ("an older record put back: not shown", report(refusals=[refusal(3, C)]), NEWEST, BEHIND, []),
    ("a later one, not the newest (an unsigned claim)", report(refusals=[refusal(99, C, "unsigned")]), NEWEST,
     BEHIND, [(99, False)]),
    ("the one it runs, refused once: not shown", report(7, B, [refusal(7, B, "apply_failed")]), NEWEST, BEHIND, []),
    ("not named by the newest", report(), Newest(8, A, ("h2",)), NOT_NAMED, []),
    ("runs one newer than any the keys given signed", report(9, C), NEWEST, NEWER, []),
    ("no newest revision known", report(refusals=[refusal(8, A)]), None, NO_POLICY, [(8, False)]),
    ("refusals of the wrong shape", report(refusals=["x", {"revision": True}, {"revision": 8.0, "sha256": A}]),
     NEWEST, BEHIND, []),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_standing(case):
    _, signed, newest, state, shown = case
    got = standing("h1", signed, newest, NOW)
    assert got["state"] == state, got
    assert [(r["revision"], r["newest"]) for r in got["refused"]] == shown, got
    assert got["enforces"] == {"revision": signed.revision, "sha256": signed.sha256}


def test_a_refusal_says_when_and_an_older_agent_s_says_it_did_not():
    told, untold = standing("h1", report(refusals=[refusal(8, A, "not_admin"), refusal(9, C, when=None)]), NEWEST,
                            NOW)["refused"]
    assert (told["reason"], told["time"], told["age_s"]) == ("not_admin", NOW - 42, 42.0)
    assert (untold["time"], untold["age_s"]) == (None, None)


def test_an_agent_counts_only_records_a_key_it_knows_signed():
    h1, mallory = (Signer("h1-1.skyguard/log", Ed25519PrivateKey.generate()) for _ in range(2))

    def record(signer, name="h1", when=NOW):
        policy = {"revision": 7, "sha256": B, "refusals": [refusal(8, A)]}
        return json.loads(json.dumps({"name": name, "heartbeat": when, "policy": policy,
                                      "signed": sign_member(signer, name, policy, when)}))
    keys = HostKeys({"h1": h1.verifier, "h2": h1.verifier})
    records = {"h1": record(h1), "h2": record(mallory, "h2"), "h3": record(h1, "h3"), "h4": "not a record"}
    assert refusing_newest(records, NEWEST, keys, NOW) == ["h1"]
    assert refusing_newest({"h1": record(h1, when=NOW - 3600)}, NEWEST, keys, NOW) == []   # stale
    assert refusing_newest(records, None, keys, NOW) == []
