"""The canonical form round-trips (it is a valid policy that parses to the same thing), ignores
what does not change meaning, and `diff_policies` reports what a reviewer needs to see."""

import json
from pathlib import Path

import pytest

from skyguard.policy.canonical import policy_to_dict, summary_line
from skyguard.policy.diff import diff_policies, format_diff
from skyguard.policy.parse import load_policy, parse_policy

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted([REPO / "policies" / "keysystems.yaml", *(REPO / "policies" / "examples").glob("*.yaml")])
DEFAULT = REPO / "policies" / "keysystems.yaml"


def without_lines(policy):
    return [r.__class__(**{**r.__dict__, "line": 0}) for r in policy.rules]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_canonical_form_round_trips(path):
    policy = load_policy(path)
    canonical = policy_to_dict(policy)
    again = parse_policy(json.dumps(canonical), source="canonical.json")  # JSON is YAML
    assert policy_to_dict(again) == canonical
    assert again.zones == policy.zones and again.networks == policy.networks
    assert without_lines(again) == without_lines(policy)
    assert (again.dns, again.credentials, again.tls_termination, again.admin_ssh) == (
        policy.dns, policy.credentials, policy.tls_termination, policy.admin_ssh)


def test_comments_order_and_spelling_do_not_change_the_canonical_form():
    text = DEFAULT.read_text()
    respelt = (text.replace("tcp/389", "TCP/389").replace('"deb.debian.test"', '"Deb.Debian.Test."')
               .replace("  refuse_with: refused\n", "") + "\n# a trailing comment\n")
    assert policy_to_dict(parse_policy(respelt)) == policy_to_dict(load_policy(DEFAULT))
    assert parse_policy(respelt).sha256 != load_policy(DEFAULT).sha256  # the hash is of the bytes


def test_identical_policies_have_no_diff():
    policy = load_policy(DEFAULT)
    result = diff_policies(policy, load_policy(DEFAULT))
    assert result.empty and format_diff(result) == "no changes"


def test_diff_names_added_removed_and_changed_things():
    old = load_policy(DEFAULT)
    text = DEFAULT.read_text()
    text = text.replace("ports: [udp/514, tcp/6514]", "ports: [udp/514]")  # syslog changed
    text = text.replace("  - name: sdn-to-github\n", "  - name: sdn-to-gitlab\n")  # renamed
    text = text.replace("""      - name: dc2
        interface: sg-dc2
        mac: "02:00:00:00:02:03"
        addresses: [10.10.2.3, "fd00:10:2::3"]
""", "")  # workload removed
    text = text.replace("min_ttl: 5", "min_ttl: 30")
    new = parse_policy(text, source="new.yaml")
    changes = {(c.kind, c.name, c.status): c for c in diff_policies(old, new).changes}
    assert set(changes) == {
        ("rule", "syslog", "changed"), ("rule", "sdn-to-github", "removed"),
        ("rule", "sdn-to-gitlab", "added"), ("workload", "dc2", "removed"),
        ("zone", "directory", "changed"), ("setting", "dns", "changed"),
    }
    assert changes[("rule", "syslog", "changed")].fields == {"ports": (["udp/514", "tcp/6514"], ["udp/514"])}
    text_out = format_diff(diff_policies(old, new))
    assert "~ rule syslog:\n    ports: [udp/514, tcp/6514] -> [udp/514]" in text_out
    assert "- workload dc2" in text_out and "+ rule sdn-to-gitlab" in text_out
    as_json = diff_policies(old, new).to_dict()
    json.dumps(as_json)  # plain data only
    assert as_json["old_sha256"] == old.sha256 and as_json["new_sha256"] == new.sha256


def test_moving_a_rule_is_not_a_change():
    text = DEFAULT.read_text()
    block_start = text.index("  - name: no-metadata")
    block_end = text.index("  - name: sandbox-never-corp")
    moved = text[:block_start] + text[block_end:text.index("\ndns:")] + "\n" + text[block_start:block_end] \
        + text[text.index("\ndns:"):]
    moved_policy = parse_policy(moved)
    assert [r.name for r in moved_policy.rules][-1] == "no-metadata"
    assert diff_policies(load_policy(DEFAULT), moved_policy).empty


def test_summary_line():
    policy = load_policy(DEFAULT)
    assert summary_line(policy) == f"keysystems: 5 zones, 7 workloads, 10 rules, sha256 {policy.sha256}"


CONSOLE_AND_APPS = """
identity: {issuer: "https://idp.test", client_id: skyguard, client_secret: idp-client-secret}
apps:
  - {name: wiki, workload: vfw1, port: 443, host: wiki.apps.test, listen: "0.0.0.0:8443", certificate: wiki-tls,
     users: [alice]}
admin:
  console:
    listen: "0.0.0.0:5999"
    web: "0.0.0.0:5980"
    web_app: wiki
    targets:
      - {name: dc1-desktop, workload: dc1, protocol: vnc, port: 5901, credential: dc1-vnc, clipboard: to_vm}
      - {name: dc2-rdp, workload: dc2, protocol: rdp, port: 3389, credential: dc2-rdp, recording: false}
    operators: [{name: alice, may_access: [directory]}]
    groups: [{name: admins, may_access: "*"}]
"""


def test_apps_identity_and_consoles_round_trip_and_diff():
    """policy show --json and policy diff carry identity:, apps: and admin.console."""
    policy = parse_policy(DEFAULT.read_text() + CONSOLE_AND_APPS)
    canonical = policy_to_dict(policy)
    again = parse_policy(json.dumps(canonical), source="canonical.json")
    assert policy_to_dict(again) == canonical
    assert (again.identity, again.apps, again.admin_console) == (policy.identity, policy.apps, policy.admin_console)
    changed = parse_policy(DEFAULT.read_text() + CONSOLE_AND_APPS.replace("clipboard: to_vm", "clipboard: none")
                           .replace("users: [alice]", "users: [alice, bob]").replace('"0.0.0.0:5999"', '"0.0.0.0:5998"'))
    text = format_diff(diff_policies(policy, changed))
    assert "~ console_target dc1-desktop:\n    clipboard: to_vm -> none" in text
    assert "~ app wiki:\n    users: [alice] -> [alice, bob]" in text
    assert "~ setting admin.console:\n    listen: 0.0.0.0:5999 -> 0.0.0.0:5998" in text


def test_a_credentials_inject_change_reads_as_yaml_would_say_it():
    # It printed `{body: False, format: Bearer {secret}, ...}`: Python's False, and a format that
    # reads as a nested mapping.
    policy = parse_policy(DEFAULT.read_text())
    changed = parse_policy(DEFAULT.read_text().replace('format: "Bearer {secret}"', 'format: "token {secret}"'))
    text = format_diff(diff_policies(policy, changed))
    assert 'format: "Bearer {secret}"' in text and 'format: "token {secret}"' in text
    assert "body: false" in text and "False" not in text
