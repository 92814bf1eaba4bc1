"""Reading the lab's workloads from a policy: the default works, bad input names file:line:key,
and addresses the lab keeps for itself are refused."""

import pytest

from skyguard import config
from skyguard.errors import PolicyError
from skyguard.lab.topology import read_workloads

HEAD = "apiVersion: skyguard/v1\nkind: Policy\nmetadata: {name: t}\nzones:\n  auth:\n    workloads:\n"


def workload(name="r1", interface="sg-r1", mac='"02:00:00:00:01:02"', addresses="[10.10.1.2]"):
    return (f"      - name: {name}\n        interface: {interface}\n        mac: {mac}\n"
            f"        addresses: {addresses}\n")


def test_default_policy_has_seven_workloads():
    workloads = read_workloads(config.DEFAULT_POLICY)
    assert [w.name for w in workloads] == ["radius1", "tacacs1", "dc1", "dc2", "sdnctl1", "vfw1", "agent1"]
    assert workloads[0].interface == "sg-radius1" and workloads[0].mac == "02:00:00:00:01:02"
    assert [str(a) for a in workloads[0].addresses] == ["10.10.1.2", "fd00:10:1::2"]


@pytest.mark.parametrize("text, expected", [
    (HEAD + workload(mac='"02:00:00:00:01:zz"'), ":9: zones.auth.workloads[0].mac"),
    (HEAD + workload(name="host"), ":7: zones.auth.workloads[0].name"),
    (HEAD + workload(addresses="[192.0.2.9]"), ":10: zones.auth.workloads[0].addresses[0]"),
    (HEAD + workload(addresses='[10.10.1.2, "fe80::5"]'), ":10: zones.auth.workloads[0].addresses[1]"),
])
def test_bad_input_names_file_line_and_key(tmp_path, text, expected):
    path = tmp_path / "p.yaml"
    path.write_text(text + "rules: []\n")
    with pytest.raises(PolicyError) as info:
        read_workloads(path)
    assert f"{path}{expected}" in str(info.value)
