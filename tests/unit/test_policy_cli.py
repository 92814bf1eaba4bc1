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
