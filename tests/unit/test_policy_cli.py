"""`skyguard policy validate | show | diff` as a user runs them: the real entry point in a
subprocess, checking exit codes (0 ok, 2 bad input), what goes to stdout and stderr, and --json."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "policies" / "keysystems.yaml"
DATA = Path(__file__).parent / "data"


def skyguard(*args):
    return subprocess.run([sys.executable, "-m", "skyguard.cli.main", "policy", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)


def test_validate_prints_a_summary():
    out = skyguard("validate", DEFAULT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("keysystems: 5 zones, 7 workloads, 10 rules, sha256 ")


def test_validate_json():
    out = skyguard("validate", DEFAULT, "--json")
    assert out.returncode == 0
    doc = json.loads(out.stdout)
    assert doc["valid"] is True and doc["rules"] == 10 and len(doc["sha256"]) == 64


def test_validate_lists_every_problem_and_exits_2():
    path = DATA / "many-problems.yaml"
    out = skyguard("validate", path)
    assert out.returncode == 2
    problem_lines = [line for line in out.stderr.splitlines() if line.startswith(f"{path}:")]
    expected = [line for line in path.read_text().splitlines() if line.startswith("# expect:")]
    assert len(problem_lines) == len(expected) > 20
    assert f"{path}:24: rules[0].ports[0]: 'tcp/70000' is not a port (1-65535)" in problem_lines
    assert f"{len(expected)} problems; nothing loaded" in out.stderr
    assert out.stdout == ""


def test_validate_json_on_errors_exits_2():
    out = skyguard("validate", DATA / "one-bad-rule.yaml", "--json")
    assert out.returncode == 2
    doc = json.loads(out.stdout)
    assert doc["valid"] is False
    assert doc["problems"] == [{"file": str(DATA / "one-bad-rule.yaml"), "line": 22, "key": "rules[7].ports[0]",
                                "message": "'tcp/65536' is not a port (1-65535)"}]


def test_validate_missing_file_exits_2():
    out = skyguard("validate", "/nonexistent/policy.yaml")
    assert out.returncode == 2 and "no such file" in out.stderr


def test_show_prints_tables():
    out = skyguard("show", DEFAULT)
    assert out.returncode == 0, out.stderr
    assert "radius1   sg-radius1" in out.stdout
    assert "no-metadata" in out.stdout and "169.254.169.254/32" in out.stdout
    assert "sandbox-packages" in out.stdout and "**.pythonhosted.test" in out.stdout


def test_show_json_is_the_canonical_policy():
    out = skyguard("show", DEFAULT, "--json")
    assert out.returncode == 0
    doc = json.loads(out.stdout)
    assert doc["policy"]["apiVersion"] == "skyguard/v1"
    assert [r["name"] for r in doc["policy"]["rules"]][0] == "auth-to-directory"
    assert doc["summary"]["workloads"] == 7


def test_show_bad_file_exits_2_with_its_problems():
    out = skyguard("show", DATA / "one-bad-rule.yaml")
    assert out.returncode == 2 and "rules[7].ports[0]" in out.stderr


def test_diff(tmp_path):
    new = tmp_path / "new.yaml"
    new.write_text(DEFAULT.read_text().replace("ports: [udp/514, tcp/6514]", "ports: [udp/514]"))
    out = skyguard("diff", DEFAULT, new)
    assert out.returncode == 0
    assert out.stdout.strip() == "~ rule syslog:\n    ports: [udp/514, tcp/6514] -> [udp/514]"
    doc = json.loads(skyguard("diff", DEFAULT, new, "--json").stdout)
    assert doc["changes"] == [{"kind": "rule", "name": "syslog", "status": "changed",
                               "fields": {"ports": {"old": ["udp/514", "tcp/6514"], "new": ["udp/514"]}}}]


@pytest.mark.parametrize("command", [[], ["validate"], ["show"], ["diff"]])
def test_help_has_examples(command):
    out = skyguard(*command, "--help")
    assert out.returncode == 0 and "Examples:" in out.stdout


@pytest.mark.parametrize("path", sorted((REPO / "policies" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_show_every_example(path):
    out = skyguard("show", path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(path.stem + ":")


def test_validate_names_the_line_when_the_yaml_library_itself_fails(tmp_path):
    path = tmp_path / "comment.yaml"
    path.write_text("#\n&a #\na")  # ruamel: NotImplementedError "overlap in comment"
    out = skyguard("validate", path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{path}:2: not valid YAML" in out.stderr


NETWORK_HOLDS_A_WORKLOAD = """\
apiVersion: skyguard/v1
kind: Policy
metadata: {name: office}
zones:
  printers:
    workloads:
      - {name: p1, interface: sg-p1, mac: "02:00:00:00:01:02", addresses: [10.77.1.2]}
  kiosks:
    workloads:
      - {name: ka, interface: sg-ka, mac: "02:00:00:00:02:02", addresses: [10.77.2.2, "fd00:77::2"]}
networks:
  office: [10.77.0.0/16]
  anywhere: [0.0.0.0/0, "::/0"]
rules:
  - {name: out, from: printers, to: {networks: [anywhere]}, ports: [tcp/443]}
  - {name: to-office, from: printers, to: {networks: [office]}, ports: [icmp]}
  - {name: to-v6, from: printers, to: {cidrs: ["fd00:77::/64"]}, ports: [tcp/80]}
  - {name: both, from: printers, to: {zones: [kiosks], networks: [office]}, ports: [tcp/22]}
  - {name: deny-office, action: deny, from: kiosks, to: {networks: [office]}}
"""


def test_validate_warns_when_a_network_rule_cannot_reach_a_workload_it_holds(tmp_path):
    """A rule to a network holding a VM's address lets traffic leave toward that VM, but the VM's
    own interface admits only rules to its zone: a warning (the policy stays valid, exit 0).
    Rules that also name the zone, and deny rules, get none."""
    path = tmp_path / "office.yaml"
    path.write_text(NETWORK_HOLDS_A_WORKLOAD)
    out = skyguard("validate", path)
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning: ")]
    # to-office: zones printers and kiosks; to-v6: kiosks; both: printers (itself a network member)
    assert len(warnings) == 4, out.stderr
    assert f"{path}:16: rule 'to-office': office holds 10.77.2.2, the address of workload 'ka' (zone 'kiosks')" \
        in warnings[1]
    assert "add 'kiosks' to the rule's `to: zones:`" in warnings[1]
    assert "rule 'to-v6': fd00:77::/64 holds fd00:77::2" in warnings[2]
    assert "rule 'both': office holds 10.77.1.2, the address of workload 'p1' (zone 'printers')" in warnings[3]
    assert not any("'deny-office'" in w or "'out'" in w for w in warnings)  # "anywhere" warns of nothing
    doc = json.loads(skyguard("validate", path, "--json").stdout)
    assert doc["valid"] is True
    assert [(w["rule"], w["line"]) for w in doc["warnings"]] == [
        ("to-office", 16), ("to-office", 16), ("to-v6", 17), ("both", 18)]
    quiet = json.loads(skyguard("validate", DEFAULT, "--json").stdout)
    assert quiet["warnings"] == []


def test_a_warning_names_a_zone_once_however_many_of_its_workloads_a_network_holds():
    from skyguard.policy.lint import policy_warnings
    from skyguard.policy.parse import parse_policy

    many = NETWORK_HOLDS_A_WORKLOAD.replace(
        '      - {name: ka, interface: sg-ka, mac: "02:00:00:00:02:02", addresses: [10.77.2.2, "fd00:77::2"]}\n',
        "".join(f'      - {{name: k{i}, interface: sg-k{i}, mac: "02:00:00:00:03:{i:02x}", addresses: [10.77.3.{i}]}}\n'
                for i in range(2, 60)))
    warnings = [w for w in policy_warnings(parse_policy(many)) if w.rule == "to-office"]
    assert len(warnings) == 2  # printers, kiosks
    assert "workload 'k2' and 57 more of its workloads (zone 'kiosks')" in warnings[1].message


def test_every_command_hashes_a_crlf_policy_file_as_its_bytes(tmp_path):
    """`up` read the policy as text (CRLF turned into LF) while validate, show and policy load
    hashed the file's bytes: the hash in status and the TPM measurement then named no file.
    They all read through read_policy_file now."""
    import hashlib

    from skyguard.policy.parse import MAX_FILE_BYTES, load_policy, read_policy_file

    path = tmp_path / "crlf.yaml"
    path.write_bytes(NETWORK_HOLDS_A_WORKLOAD.replace("\n", "\r\n").encode())
    assert read_policy_file(path) == path.read_bytes()
    assert load_policy(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    shown = json.loads(skyguard("show", path, "--json").stdout)
    assert shown["sha256"] == load_policy(path).sha256
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (MAX_FILE_BYTES + 1))
    with pytest.raises(Exception, match="a policy file is at most"):
        read_policy_file(big)
