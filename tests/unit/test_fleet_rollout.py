"""What a push tells the operator of each host (skyguard/fleet/rollout.py): from the host's member
record, whatever shape whoever writes the store gave it, the outcome of a push of revision 7:
enforcing, refused with the host's reason, superseded by a newer push, or still waiting (and why),
only as far as the host's key pinned here signed it (report.py): else unverified, forged, or stale.
The refused record is named by the revision and hash it claims (signing.claimed), read unverified."""

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from skyguard.fleet.report import FORGED, STALE, UNVERIFIED, HostKeys, sign_member
from skyguard.fleet.rollout import ENFORCING, REFUSED, SUPERSEDED, WAITING, host_result
from skyguard.fleet.signing import claimed, sign_policy
from skyguard.tlog.checkpoint import Signer

SHA = "a" * 64
OTHER = "b" * 64
PUSHED = 1_700_000_000.0   # when the push began
H1 = Signer("h1-1.skyguard/log", Ed25519PrivateKey.generate())
MALLORY = Signer("h1-1.skyguard/log", Ed25519PrivateKey.generate())
KEYS = HostKeys({"h1": H1.verifier, "h2": H1.verifier})   # h2: the same key pinned, to replay h1's under


def record(revision=6, sha256=OTHER, refusals=None, when=PUSHED + 1, signer=H1, name="h1", plain=None, **top):
    """h1's record as its agent publishes it (signed by `signer`), then `plain` policy fields and
    `top` fields changed as whoever writes the store would."""
    policy = {"revision": revision, "sha256": sha256, "refusals": refusals or []}
    value = {"name": name, "heartbeat": when, "policy": policy,
             "signed": sign_member(signer, name, policy, when) if signer else None}
    value.update(policy=dict(policy, **(plain or {})), **top)
    return json.dumps({k: v for k, v in value.items() if v is not None}).encode()


def refusal(reason, revision=7, sha256=SHA, problem="why"):
    return {"revision": revision, "sha256": sha256, "reason": reason, "problem": problem}


# Ids by description only: the records hold signatures by keys made at import, which differ
# between xdist's workers, and workers must collect the same ids.
CASES = [
    ("no member record", None, WAITING, "not a member of the fleet"),
    ("not JSON", b"[" * 100_000, WAITING, "not a host's report"),
    ("no policy", b'{"name": "h1"}', WAITING, "not a host's report"),
    ("runs the pushed one", record(7, SHA), ENFORCING, "enforces revision 7"),
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
    # What whoever writes the store can make up: never enforcing, never a refusal.
    ("unsigned, claims it", record(7, SHA, signer=None), UNVERIFIED, "claims to enforce revision 7: not counted"),
    ("unsigned, infinite revision", b'{"policy": {"revision": 1e400, "sha256": "x"}}', UNVERIFIED, "no signature"),
    ("no key pinned for it", record(7, SHA, name="h3"), UNVERIFIED, "no host key of h3 is pinned here"),
    ("signed by another key", record(7, SHA, signer=MALLORY), FORGED, "not signed by h1's host key"),
    ("its signed record, revision changed", record(6, plain={"revision": 7, "sha256": SHA}), FORGED,
     "says otherwise than h1's host key signed (it signed revision 6"),
    ("a refusal added", record(7, plain={"refusals": [refusal("rollback")]}), FORGED, "says otherwise"),
    ("its heartbeat changed", record(7, SHA, heartbeat=PUSHED + 60), FORGED, "says otherwise"),
    ("h1's record under h2", record(7, SHA), FORGED, "carries 'h1''s record"),
    ("signed an hour before the push", record(7, SHA, when=PUSHED - 3600), STALE, "signed 3600 s before this push"),
    ("a refusal signed an hour before", record(refusals=[refusal("rollback")], when=PUSHED - 3600), STALE,
     "an old record put back"),
]


@pytest.mark.parametrize("description,value,outcome,detail", CASES, ids=[case[0] for case in CASES])
def test_a_host_s_outcome_is_read_from_what_its_key_signed(description, value, outcome, detail):
    name = {"h1's record under h2": "h2", "no key pinned for it": "h3"}.get(description, "h1")   # its key in the store
    result = host_result(name, value, 7, SHA, KEYS, PUSHED)
    assert (result.outcome, detail in result.detail) == (outcome, True), (description, result)


def test_a_record_older_than_one_seen_before_is_stale_and_this_host_s_own_key_vouches_for_it():
    assert host_result("h1", record(7, SHA), 7, SHA, KEYS, PUSHED, seen=PUSHED + 1).outcome == ENFORCING
    replayed = host_result("h1", record(7, SHA), 7, SHA, KEYS, PUSHED, seen=PUSHED + 5)
    assert replayed.outcome == STALE and "before one it showed already" in replayed.detail, replayed
    own = HostKeys({}, H1.verifier)   # run on h1, with h1's state dir: nothing of h1 pinned there
    assert host_result("h1", record(7, SHA), 7, SHA, own, PUSHED).outcome == ENFORCING
    assert host_result("h1", record(7, SHA, signer=MALLORY), 7, SHA, own, PUSHED).outcome == UNVERIFIED


def test_a_refusal_reported_is_bounded():
    result = host_result("h1", record(refusals=[refusal("r" * 1000, problem="p" * 10_000)]), 7, SHA, KEYS, PUSHED)
    assert result.outcome == REFUSED and len(result.reason) == 40 and len(result.problem) == 500


def test_a_refused_record_is_named_by_what_it_claims_signed_or_not():
    foreign = sign_policy("x: 1\n", 7, Signer("skyguard-admin", Ed25519PrivateKey.generate()))
    assert claimed(foreign.to_json()) == (7, foreign.sha256)
    assert claimed(b'{"note": "revision 99999999999999999999999\\nsha256 zz\\n"}') == (None, None)
    assert claimed(b"[" * 100_000) == claimed(b'{"note": 5}') == claimed(b"[]") == (None, None)
