"""Crash and restart under load: SIGKILL the daemon CRASHES times while the compromised VM floods a
denied port and a legitimate session runs; 0 denied packets delivered, the established allowed
flow continues (no failed round trip), and `skyguard log verify` passes after every restart.
The fuzz tier repeats this 100 times (tests/fuzz/test_crash_long.py)."""

from __future__ import annotations

from skyguard.attack import crash_under_load

CRASHES = 2  # ~20 s each; the fuzz tier's 100 are the long run


def test_sigkill_under_load_lets_nothing_through_and_loses_nothing(attack_lab):
    result = crash_under_load(attack_lab, CRASHES)
    assert result["log_verify_failures"] == [], result["log_verify_failures"]
    assert result["delivered"] == 0, result
    assert result["denied_dropped"] > 1000, result  # the flood really flowed through the restarts
    assert result["legit"]["failed"] == 0 and result["legit"]["ok"] > 20, result["legit"]
