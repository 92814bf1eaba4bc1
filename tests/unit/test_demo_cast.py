"""`skyguard demo`'s cast (skyguard/demo.py): the addresses, names, placeholder and sealed-store
names its scenario uses come from the policy the demo hands the lab and the daemon, so a
readdressed or renamed policy moves every step with it, and one without a role the demo needs
fails naming the role and the file before anything is built. Root-free: no lab is built."""

from __future__ import annotations

import shutil
import tempfile

import pytest

from skyguard import config
from skyguard.demo import ATTACKER, DIRECTORY, FIREWALL, HOLDER, RADIUS, Demo, listeners, tls_keys
from skyguard.errors import SkyguardError
from skyguard.lab.addressing import addresses_for_name

DEFAULT = config.DEFAULT_POLICY.read_text()
# Everything of the default policy the scenario aims at or provisions (and that _renamed moves).
STALE = ("10.10.2.2", "fd00:10:2::2", "10.10.4.2", "192.0.2.10", "api.github.test", "deb.debian.test",
         "pythonhosted.test", "sg-placeholder-github-7f3a", str(addresses_for_name("api.github.test")[0]))


def _policy(tmp_path, text: str):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def _renamed(tmp_path):
    """The default policy with the directory, firewall and syslog collector readdressed, the
    credential's host, secret and placeholder, the other update host, the sandbox's package domain,
    the TLS key's store name and the zones renamed."""
    text = (DEFAULT.replace("10.10.2.", "10.77.2.").replace("fd00:10:2::", "fd00:77:2::")
            .replace("10.10.4.2", "10.77.4.2").replace("192.0.2.10/32", "192.0.2.11/32")
            .replace("api.github.test", "api.forge.test").replace("deb.debian.test", "mirror.debian.test")
            .replace("pythonhosted.test", "wheels.test").replace("sg-placeholder-github-7f3a", "sg-placeholder-forge-1234")
            .replace("secret: github", "secret: forge").replace("certificate: sdnctl1", "certificate: sdn-tls")
            .replace("  sandbox:", "  quarantine:").replace("from: sandbox", "from: quarantine")
            .replace("  sdn:", "  netctl:").replace("from: sdn", "from: netctl").replace("[firewall, sdn]", "[firewall, netctl]")
            .replace("directory, sdn,", "directory, netctl,")
            .replace("zones: [sdn]", "zones: [netctl]"))
    assert text.count("10.77.2.2") and text.count("api.forge.test") == 2 and text.count("netctl") == 6
    return _policy(tmp_path, text)


@pytest.fixture
def tmpdir_only_here(tmp_path, monkeypatch):
    """Temporary folders Demo makes land in a folder of this test (to see whether it made any)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _demo(path=None) -> Demo:
    demo = Demo(policy_path=path)
    shutil.rmtree(demo.workdir)  # its (empty) temporary folder: nothing runs here
    return demo


def _words(demo: Demo) -> list[str]:
    return [w for s in demo.steps for w in [s.title, *s.argv, *(w for cmd in s.setup for w in cmd)]]


def test_default_demo_plays_the_default_policy(tmpdir_only_here):
    demo = _demo()
    assert demo.policy_path == config.DEFAULT_POLICY and demo.cast.policy.source == str(config.DEFAULT_POLICY)
    words = _words(demo)
    assert all(s in " ".join(words) for s in STALE)  # what the renamed policy must move, really used
    assert {s.vm for s in demo.steps} == {ATTACKER, RADIUS, HOLDER, FIREWALL}
    assert listeners() == [(DIRECTORY, 389), (FIREWALL, 830)]
    assert tls_keys(demo.cast) == [("sdnctl1", "sdnctl1.test")] and demo.cast.credential.secret == "github"


def test_renamed_policy_moves_every_step(tmp_path, tmpdir_only_here):
    path = _renamed(tmp_path)
    demo = _demo(path)
    assert demo.policy_path == path  # the lab, the daemon and the cast read this one file
    words = _words(demo)
    assert not [w for w in words if any(s in w for s in STALE)]  # nothing aims at the old policy
    steps = {s.title: s for s in demo.steps}
    assert steps["RADIUS server looks a user up in the directory (LDAP)"].argv[-2:] == ["10.77.2.2", "389"]
    assert steps["same over IPv6"].argv[-2:] == ["fd00:77:2::2", "389"]
    assert steps["SDN controller pushes config to the firewall (NETCONF)"].argv[-2:] == ["10.77.4.2", "830"]
    assert steps["authentication server ships logs to the syslog collector"].argv[-2:] == ["192.0.2.11", "514"]
    assert steps["SDN controller resolves api.forge.test (allowed by name)"].argv[-1] == "api.forge.test"
    assert steps["SDN controller calls the learned address over HTTPS"].argv[-2] == str(addresses_for_name("api.forge.test")[0])
    assert steps["sandboxed agent tunnels data out in DNS names under an allowed domain"].argv[-1] == "files.wheels.test"
    swap = steps["SDN controller calls GitHub with its placeholder token (credential swap)"].argv
    leak = steps["the placeholder sent to another allowed host (exfiltration attempt)"].argv
    assert swap[-2:] == ["Authorization: Bearer sg-placeholder-forge-1234", "https://api.forge.test/"]
    assert leak[-2:] == ["Authorization: Bearer sg-placeholder-forge-1234", "https://mirror.debian.test/"]
    spoof = steps["sandboxed agent spoofs the directory's address"]
    assert spoof.argv[-3:] == ["192.0.2.11", "514", "10.77.2.2"] and spoof.setup[0][3] == "10.77.2.2/32"
    assert demo.cast.credential.secret == "forge" and tls_keys(demo.cast) == [("sdn-tls", "sdnctl1.test")]


@pytest.mark.parametrize("edit, named", [
    (lambda t: t.replace("name: dc1", "name: dc9"), "workload 'dc1'"),
    (lambda t: t.replace("name: vfw1", "name: vfw9"), "workload 'vfw1'"),
    (lambda t: t.replace('addresses: [10.10.2.2, "fd00:10:2::2"]', 'addresses: ["fd00:10:2::2"]'), "IPv4 address for 'dc1'"),
    (lambda t: t.replace('addresses: [10.10.2.2, "fd00:10:2::2"]', "addresses: [10.10.2.2]"), "IPv6 address for 'dc1'"),
    (lambda t: t.replace("zones: [sdn]", "zones: [firewall]"), "credential with a destination for zone 'sdn'"),
    (lambda t: t.replace("logging", "logs"), "network 'logging'"),
    (lambda t: t.replace('"deb.debian.test", ', ""), "allowed host name for 'sdnctl1'"),
    (lambda t: t.replace('"**.pythonhosted.test"', '"files.pythonhosted.test"'), "wildcard name .* for 'agent1'"),
])
def test_a_policy_without_a_role_fails_naming_it_before_anything_is_built(tmp_path, tmpdir_only_here, edit, named):
    text = edit(DEFAULT)
    assert text != DEFAULT
    path = _policy(tmp_path, text)
    with pytest.raises(SkyguardError, match=f"^skyguard demo needs .*{named}") as raised:
        Demo(policy_path=path)
    assert str(path) in str(raised.value)
    assert not list(tmpdir_only_here.iterdir())  # no work folder, so no state, no lab, no daemon
