"""What a push tells the operator of each host (skyguard/fleet/rollout.py): from the host's member
record, whatever shape whoever writes the store gave it, the outcome of a push of revision 7:
enforcing, refused with the host's reason, superseded by a newer push, or still waiting (and why).
The refused record is named by the revision and hash it claims (signing.claimed), read unverified."""

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from skyguard.fleet.rollout import ENFORCING, REFUSED, SUPERSEDED, WAITING, host_result
from skyguard.fleet.signing import claimed, sign_policy
from skyguard.tlog.checkpoint import Signer

SHA = "a" * 64
OTHER = "b" * 64


def record(revision=6, sha256=OTHER, refusals=None, **policy):
    return json.dumps({"name": "h1", "policy": {"revision": revision, "sha256": sha256,
                                                "refusals": refusals or [], **policy}}).encode()


def refusal(reason, revision=7, sha256=SHA, problem="why"):
    return {"revision": revision, "sha256": sha256, "reason": reason, "problem": problem}


@pytest.mark.parametrize("description,value,outcome,detail", [
    ("no member record", None, WAITING, "not a member of the fleet"),
    ("not JSON", b"[" * 100_000, WAITING, "not a host's report"),
    ("no policy", b'{"name": "h1"}', WAITING, "not a host's report"),
    ("runs the pushed one", record(7, SHA), ENFORCING, "enforces revision 7"),
    ("revision true, not 7", record(True, SHA), WAITING, "runs revision ?"),
    ("revision infinite", b'{"policy": {"revision": 1e400, "sha256": "x"}}', WAITING, "runs revision ?"),
    ("runs the one before", record(6), WAITING, "runs revision 6"),
    ("refused as a rollback", record(7, refusals=[refusal("rollback", problem="revision 7 is not newer")]),
     REFUSED, "refused it (rollback): revision 7 is not newer"),
    ("refused: not signed by its admin key", record(refusals=[refusal("not_admin")]), REFUSED, "(not_admin)"),
    ("the swap failed: it tries again", record(refusals=[refusal("apply_failed")]), WAITING, "tries again"),
    ("a refusal of another record", record(refusals=[refusal("rollback", 7, OTHER), refusal("invalid", 6)]),
     WAITING, "runs revision 6"),
    ("a newer push runs", record(8), SUPERSEDED, "runs revision 8, newer"),
    ("revision 7 with another policy", record(7, OTHER), WAITING, "with another policy"),
    ("refusals of the wrong shape", record(refusals=["x", {"revision": True}]), WAITING, "runs revision 6"),
])
def test_a_host_s_outcome_is_read_from_its_member_record(description, value, outcome, detail):
    result = host_result(value, 7, SHA)
    assert (result.outcome, detail in result.detail) == (outcome, True), (description, result)


def test_a_refusal_reported_is_bounded():
    result = host_result(record(refusals=[refusal("r" * 1000, problem="p" * 10_000)]), 7, SHA)
    assert result.outcome == REFUSED and len(result.reason) == 40 and len(result.problem) == 500


def test_a_refused_record_is_named_by_what_it_claims_signed_or_not():
    foreign = sign_policy("x: 1\n", 7, Signer("skyguard-admin", Ed25519PrivateKey.generate()))
    assert claimed(foreign.to_json()) == (7, foreign.sha256)
    assert claimed(b'{"note": "revision 99999999999999999999999\\nsha256 zz\\n"}') == (None, None)
    assert claimed(b"[" * 100_000) == claimed(b'{"note": 5}') == claimed(b"[]") == (None, None)
