"""The kill chain of a compromised sandbox VM (agent1) against the running daemon in the lab, as
skyguard/attack.py plays it: every step blocked (nothing answered, nothing of the attacker
arrived in another VM or the internet, the expected drop reason counted at the sandbox's egress,
no neighbour table poisoned), the legitimate radius1 -> dc1 LDAP session unaffected, and the
signed log verifies afterwards."""

from __future__ import annotations

from skyguard.attack import kill_chain


def test_sniffers_see_what_gets_through(attack_lab):
    """The observers are not blind: an allowed syslog datagram from agent1 arrives and is counted."""
    assert attack_lab.sniffer_self_check() >= 3


def test_every_kill_chain_step_is_blocked_and_legit_traffic_flows(attack_lab):
    result = attack_lab.play()
    report = [(a.step, a.title, a.sent, a.answered, a.counted, a.neighbour_poisoned) for a in result["attacks"]]
    assert len(result["attacks"]) == len(kill_chain())
    assert all(a.sent > 0 for a in result["attacks"]), report
    assert {k: v for k, v in result["sniffed"].items() if v["frames"]} == {}, result["sniffed"]
    not_blocked = [r for a, r in zip(result["attacks"], report) if not a.blocked]
    assert not not_blocked, not_blocked
    assert result["legit"]["failed"] == 0 and result["legit"]["ok"] > 20, result["legit"]
    verified = attack_lab.log_verify()
    assert verified.returncode == 0, verified.stdout + verified.stderr
