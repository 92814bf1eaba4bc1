"""Reading the lab's workloads from a policy: the default works, bad input names file:line:key."""

import pytest

from skyguard import config
from skyguard.errors import PolicyError
from skyguard.lab.topology import read_workloads

HEAD = "apiVersion: skyguard/v1\nkind: Policy\nzones:\n  auth:\n    workloads:\n"


def workload(name="r1", interface="sg-r1", mac='"02:00:00:00:01:02"', addresses="[10.10.1.2]"):
    return (f"      - name: {name}\n        interface: {interface}\n        mac: {mac}\n"
            f"        addresses: {addresses}\n")


def test_default_policy_has_seven_workloads():
    workloads = read_workloads(config.DEFAULT_POLICY)
    assert [w.name for w in workloads] == ["radius1", "tacacs1", "dc1", "dc2", "sdnctl1", "vfw1", "agent1"]
    assert workloads[0].interface == "sg-radius1" and workloads[0].mac == "02:00:00:00:01:02"
    assert [str(a) for a in workloads[0].addresses] == ["10.10.1.2", "fd00:10:1::2"]


@pytest.mark.parametrize("text, expected", [
    (HEAD + workload(mac='"02:00:00:00:01:zz"'), ":8: zones.auth.workloads[0].mac"),
    (HEAD + workload(mac='"01:00:00:00:01:02"'), ":8: zones.auth.workloads[0].mac"),
    (HEAD + workload(interface="sg-much-too-long-name"), ":7: zones.auth.workloads[0].interface"),
    (HEAD + workload(name="host"), ":6: zones.auth.workloads[0].name"),
    (HEAD + workload(addresses="[10.10.1.2/24]"), ":9: zones.auth.workloads[0].addresses[0]"),
    (HEAD + workload(addresses="[192.0.2.9]"), ":9: zones.auth.workloads[0].addresses[0]"),
    (HEAD + workload(addresses="[]"), ":9: zones.auth.workloads[0].addresses"),
    (HEAD + workload() + workload(name="r2", interface="sg-r2", mac='"02:00:00:00:01:03"'),
     ":13: zones.auth.workloads[1].addresses[0]"),
    (HEAD + "      - name: r1\n        interface: sg-r1\n", ":6: zones.auth.workloads[0].mac"),
    (HEAD + workload() + "        color: red\n", ":10: zones.auth.workloads[0].color"),
    ("apiVersion: skyguard/v1\nkind: Policy\n", "zones"),
    ("zones:\n  auth: [\n", ":3: (yaml)"),
])
def test_bad_input_names_file_line_and_key(tmp_path, text, expected):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        read_workloads(path)
    assert f"{path}{expected}" in str(info.value) or (expected == "zones" and "zones" in str(info.value))


def test_every_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + workload(mac='"zz"', addresses="[nope]"))
    with pytest.raises(PolicyError) as info:
        read_workloads(path)
    assert len(info.value.problems) == 2


def test_missing_file_says_so(tmp_path):
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        read_workloads(tmp_path / "absent.yaml")
