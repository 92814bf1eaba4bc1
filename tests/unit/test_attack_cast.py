"""The attack arena's cast (skyguard/attack.py): the addresses, MACs, interfaces and zones the kill
chain, the evasion corpus and the sniffers aim at come from the policy the arena enforces, so a
readdressed default policy moves the attacks with it and one without a role fails naming it.
Root-free: no lab is built."""

from __future__ import annotations

import pytest

from skyguard import config
from skyguard.attack import ATTACKER, DIRECTORY, HOLDER, RADIUS, Arena, evasion_corpus, kill_chain, read_cast
from skyguard.errors import SkyguardError

DEFAULT = config.DEFAULT_POLICY.read_text()


def _policy(tmp_path, text: str):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def _readdressed(tmp_path):
    """The default policy with the directory, RADIUS and sandbox zones moved, MACs, an interface and
    the sandbox's zone name changed, and another placeholder."""
    text = (DEFAULT.replace("10.10.2.", "10.77.2.").replace("fd00:10:2::", "fd00:77:2::")
            .replace("10.10.1.2", "10.77.1.2").replace("fd00:10:5::2", "fd00:77:5::2")
            .replace('"02:00:00:00:02:02"', '"02:00:00:00:77:02"').replace('"02:00:00:00:05:02"', '"02:00:00:00:77:05"')
            .replace("interface: sg-agent1", "interface: sg-evil")
            .replace("sg-placeholder-github-7f3a", "sg-placeholder-other-1234")
            .replace("  sandbox:", "  quarantine:").replace("from: sandbox", "from: quarantine"))
    assert text.count("10.77.2.2") and text.count("quarantine") == 3  # the edits really happened
    return _policy(tmp_path, text)


def test_default_cast_is_the_default_policy():
    cast = read_cast()
    assert cast.policy.source == str(config.DEFAULT_POLICY)
    assert (cast.v4(DIRECTORY), cast.v6(DIRECTORY)) == ("10.10.2.2", "fd00:10:2::2")
    assert cast.attacker.zone == "sandbox" and cast.attacker.interface == "sg-agent1"
    assert ATTACKER not in cast.bystanders() and set(cast.zone_heads()) <= set(cast.bystanders())


def test_readdressed_policy_moves_every_attack(tmp_path):
    cast = read_cast(_readdressed(tmp_path))
    chain = kill_chain(cast)
    argv = [word for attack in chain + evasion_corpus(cast) for word in attack.argv]
    # nothing aims at the old addresses, MAC or placeholder any more
    stale = {"10.10.2.2", "fd00:10:2::2", "10.10.1.2", "02:00:00:00:02:02", "sg-placeholder-github-7f3a"}
    assert not [w for w in argv if any(s in w for s in stale)]
    assert "10.77.2.2" in argv and "fd00:77:2::2" in argv and "02:00:00:00:77:02" in argv
    spoof = next(a for a in chain if a.argv[0] == "spoof-ip-mac")
    assert spoof.argv[1:4] == ["02:00:00:00:77:02", "10.77.2.2", "10.77.1.2"]
    assert any("Bearer sg-placeholder-other-1234" in w for w in argv)
    assert {a.vm for a in chain} == {ATTACKER, HOLDER}
    assert cast.attacker.zone == "quarantine" and cast.attacker.interface == "sg-evil"
    assert cast.attacker.mac == "02:00:00:00:77:05"


def test_arena_reads_one_policy_for_lab_daemon_and_cast(tmp_path):
    path = _readdressed(tmp_path)
    arena = Arena(workdir=tmp_path / "arena", policy_path=path)
    assert arena.policy_path == path and arena.cast.v4(RADIUS) == "10.77.1.2"


@pytest.mark.parametrize("edit, named", [
    (lambda t: t.replace("name: dc1", "name: dc9"), "'dc1'"),
    (lambda t: t.replace('addresses: [10.10.2.2, "fd00:10:2::2"]', "addresses: [10.10.2.2]"), "IPv6 address for 'dc1'"),
])
def test_a_policy_without_a_role_fails_naming_it(tmp_path, edit, named):
    path = _policy(tmp_path, edit(DEFAULT))
    with pytest.raises(SkyguardError, match=named) as raised:
        kill_chain(read_cast(path))
    assert str(path) in str(raised.value)
    # the arena builds its chain when it is set up: it fails there, before any lab or work folder
    with pytest.raises(SkyguardError, match=f"^the attack arena needs .*{named}"):
        Arena(workdir=tmp_path / "arena", policy_path=path)
    assert not (tmp_path / "arena").exists()
