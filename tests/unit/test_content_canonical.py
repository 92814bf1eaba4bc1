"""The `content:` section in `policy show` (its table and --json) and `policy diff`: the canonical
form written as YAML parses back to the same content policy, and a changed rule or setting is
named by the diff."""

from __future__ import annotations

import dataclasses
import io
import json

from click.testing import CliRunner
from ruamel.yaml import YAML

from skyguard.cli.policy import policy as policy_group
from skyguard.policy.canonical import policy_to_dict
from skyguard.policy.diff import diff_policies, format_diff
from skyguard.policy.parse import load_policy, parse_policy

HEAD = """apiVersion: skyguard/v1
kind: Policy
metadata: {name: t}
zones:
  web:
    workloads:
      - {name: web1, interface: sg-w1, mac: "02:00:00:00:01:02", addresses: [10.0.1.2]}
  db:
    workloads:
      - {name: db1, interface: sg-d1, mac: "02:00:00:00:02:02", addresses: [10.0.2.2]}
"""
CONTENT = """content:
  clamd: {socket: /run/test/clamd.sock, timeout: 3, max_file_bytes: 4MiB}
  max_inspect_bytes: 8MiB
  rules:
    - name: no-malware
      description: dropped by the canonical form, like comments
      zones: ["*"]
      block: {clamav: true}
    - name: web-uploads
      zones: [web]
      direction: [upload, download]
      protocols: http
      block:
        mime_types: [application/zip, "Application/X-*"]
        max_size: 10MB
        yara: [rules/marker.yar]
        patterns: ['AKIA[0-9A-Z]{16}']
    - name: off-switch
      zones: [db]
      protocols: [sftp]
      block: {clamav: false}
"""


def write(tmp_path, text: str, name: str = "policy.yaml"):
    (tmp_path / "rules").mkdir(exist_ok=True)
    (tmp_path / "rules" / "marker.yar").write_text('rule Marker { strings: $a = "ORION" condition: $a }\n')
    path = tmp_path / name
    path.write_text(HEAD + text)
    return path


def without_lines(content):
    return dataclasses.replace(content, rules=tuple(dataclasses.replace(r, line=0) for r in content.rules))


def test_the_canonical_form_written_as_yaml_parses_to_the_same_content(tmp_path):
    policy = load_policy(write(tmp_path, CONTENT))
    canonical = policy_to_dict(policy)
    assert canonical["content"]["clamd"] == {"socket": "/run/test/clamd.sock", "timeout": 3, "max_file_bytes": 4 << 20}
    assert canonical["content"]["max_inspect_bytes"] == 8 << 20
    first, second, third = canonical["content"]["rules"]
    assert first == {"name": "no-malware", "zones": ["web", "db"], "direction": ["upload"],
                     "protocols": ["http", "sftp"], "block": {"clamav": True}}
    assert second["block"] == {"clamav": False, "mime_types": ["application/zip", "application/x-*"],
                               "max_size": 10_000_000, "yara": [str(tmp_path / "rules" / "marker.yar")],
                               "patterns": ["AKIA[0-9A-Z]{16}"]}
    assert third["block"] == {"clamav": False}  # a block of only `clamav: false` stays a valid block

    text = io.StringIO()
    YAML(typ="safe", pure=True).dump(canonical, text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "canonical.yaml").write_text(text.getvalue())  # the YARA path does not depend on the folder
    again = load_policy(elsewhere / "canonical.yaml")
    assert without_lines(again.content) == without_lines(policy.content)
    assert policy_to_dict(again) == canonical


def test_no_rules_means_no_content_entry():
    assert "content" not in policy_to_dict(parse_policy(HEAD))


def test_policy_show_prints_a_content_rules_table_and_json(tmp_path):
    path = write(tmp_path, CONTENT)
    shown = CliRunner().invoke(policy_group, ["show", str(path)])
    assert shown.exit_code == 0, shown.output
    table = shown.output[shown.output.index("Content rules"):].splitlines()
    assert ("clamd at /run/test/clamd.sock, 3 s per scan; files over 8 MiB are refused unscanned, over 4 MiB "
            "when a clamav rule covers them") in table[0]
    assert table[1].split() == ["rule", "zones", "direction", "protocols", "blocks"]
    rows = {line.split()[0]: line for line in table[3:6]}
    assert rows["no-malware"].split()[:4] == ["no-malware", "*", "upload", "http,"]
    assert "ClamAV finds" in rows["no-malware"]
    assert "types application/zip, application/x-*; over 10000000 bytes; YARA marker.yar; 1 pattern" \
        in rows["web-uploads"]
    assert "upload, download" in rows["web-uploads"] and "(nothing)" in rows["off-switch"]

    as_json = CliRunner().invoke(policy_group, ["show", str(path), "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output)["policy"]["content"] == policy_to_dict(load_policy(path))["content"]


def test_policy_diff_names_content_rules_and_settings(tmp_path):
    old = load_policy(write(tmp_path, CONTENT, "old.yaml"))
    changed = (CONTENT.replace("max_size: 10MB", "max_size: 20MB").replace("timeout: 3", "timeout: 5")
               .replace("name: off-switch", "name: sftp-off"))
    new = load_policy(write(tmp_path, changed, "new.yaml"))
    changes = {(c.kind, c.name, c.status): c for c in diff_policies(old, new).changes}
    assert set(changes) == {("content_rule", "web-uploads", "changed"), ("content_rule", "off-switch", "removed"),
                            ("content_rule", "sftp-off", "added"), ("setting", "content", "changed")}
    assert changes[("content_rule", "web-uploads", "changed")].fields["block"][1]["max_size"] == 20_000_000
    text = format_diff(diff_policies(old, new))
    assert "+ content_rule sftp-off" in text and "~ setting content:" in text

    cli = CliRunner().invoke(policy_group, ["diff", str(tmp_path / "old.yaml"), str(tmp_path / "new.yaml"), "--json"])
    assert cli.exit_code == 0, cli.output
    assert {"kind": "content_rule", "name": "sftp-off", "status": "added"} in json.loads(cli.output)["changes"]
    assert diff_policies(old, load_policy(write(tmp_path, CONTENT, "same.yaml"))).empty
