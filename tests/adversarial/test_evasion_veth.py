"""The evasion corpus through real veths: agent1 (sandbox) crafts each frame with scapy inside its
namespace and sends it to the host side of its interface, addressed to the real gateway MAC so the
host would route it on to dc1 if skyguard let it pass. Sniffers in every other VM and in the lab
internet count what of it arrives: nothing may; each case's drop reason must be counted."""

from __future__ import annotations

from skyguard.attack import evasion_corpus


def test_evasion_frames_through_real_veths_deliver_nothing(attack_lab):
    result = attack_lab.play(evasion_corpus())
    report = [(a.title, a.sent, a.counted) for a in result["attacks"]]
    assert all(a.sent > 0 for a in result["attacks"]), report
    assert {k: v for k, v in result["sniffed"].items() if v["frames"]} == {}, result["sniffed"]
    assert [r for a, r in zip(result["attacks"], report) if not a.blocked] == [], report
    assert result["legit"]["failed"] == 0, result["legit"]
