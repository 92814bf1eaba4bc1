"""The policy's `content:` section: what it accepts, and every refusal named by file, line and key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from skyguard.errors import PolicyError
from skyguard.policy.content import DEFAULT_CLAMD_SOCKET, ContentBlock
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
YARA = 'rule Marker { strings: $a = "ORION" condition: $a }\n'


def write(tmp_path, content: str):
    (tmp_path / "rules").mkdir(exist_ok=True)
    (tmp_path / "rules" / "marker.yar").write_text(YARA)
    (tmp_path / "rules" / "broken.yar").write_text("rule { nope")
    path = tmp_path / "policy.yaml"
    path.write_text(HEAD + content)
    return path


def test_a_full_section(tmp_path):
    policy = load_policy(write(tmp_path, """content:
  clamd: {socket: /run/test/clamd.sock, timeout: 3}
  max_inspect_bytes: 8MiB
  rules:
    - name: no-malware
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
"""))
    content = policy.content
    assert (content.clamd_socket, content.scan_timeout, content.max_inspect_bytes) == ("/run/test/clamd.sock", 3.0, 8 << 20)
    first, second = content.rules
    assert first.zones == ("web", "db") and first.directions == ("upload",) and first.protocols == ("http", "sftp")
    assert second.directions == ("upload", "download") and second.protocols == ("http",)
    assert second.block == ContentBlock(mime_types=("application/zip", "application/x-*"), max_size=10_000_000,
                                        yara=(str(tmp_path / "rules" / "marker.yar"),), patterns=("AKIA[0-9A-Z]{16}",))
    assert second.block.mime_blocked("application/x-dosexec") == "application/x-*"
    assert [r.name for r in content.rules_for("web", "download", "http")] == ["web-uploads"]
    assert content.rules_for("db", "upload", "sftp") == (first,)
    assert content.zones_for("sftp") == {"web", "db"}


def test_absent_means_no_rules():
    policy = parse_policy(HEAD)
    assert policy.content.rules == () and policy.content.clamd_socket == DEFAULT_CLAMD_SOCKET


BAD = [
    ("rules: []", "content.rules", "empty"),
    ("rules: [{name: r, zones: [nowhere], block: {clamav: true}}]", "content.rules[0].zones[0]", "nowhere"),
    ("rules: [{name: r, zones: [web], block: {}}]", "content.rules[0].block", "blocks nothing"),
    ("rules: [{name: r, zones: [web], block: {clamav: yes please}}]", "content.rules[0].block.clamav", ""),
    ("rules: [{name: r, zones: [web], direction: sideways, block: {clamav: true}}]", "content.rules[0].direction",
     "upload or download"),
    ("rules: [{name: r, zones: [web], protocols: [ftp], block: {clamav: true}}]", "content.rules[0].protocols", "http or sftp"),
    ("rules: [{name: r, zones: [web], block: {mime_types: [zip]}}]", "content.rules[0].block.mime_types[0]", "MIME type"),
    ("rules: [{name: r, zones: [web], block: {max_size: lots}}]", "content.rules[0].block.max_size", "not a size"),
    ("rules: [{name: r, zones: [web], block: {patterns: ['(unclosed']}}]", "content.rules[0].block.patterns[0]",
     "regular expression"),
    ("rules: [{name: r, zones: [web], block: {yara: [rules/missing.yar]}}]", "content.rules[0].block.yara[0]",
     "no YARA rules file"),
    ("rules: [{name: r, zones: [web], block: {yara: [rules/broken.yar]}}]", "content.rules[0].block.yara[0]",
     "do not compile"),
    ("rules: [{name: r, zones: [web], block: {clamav: true}}, {name: r, zones: [db], block: {clamav: true}}]",
     "content.rules[1].name", "already defined"),
    ("clamd: {socket: relative.sock}\n  rules: [{name: r, zones: [web], block: {clamav: true}}]", "content.clamd.socket",
     "absolute path"),
    ("rulez: []", "content.rulez", "rules"),
]


@pytest.mark.parametrize("section,key,words", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_refusals_name_file_line_and_key(tmp_path, section, key, words):
    path = write(tmp_path, "content:\n  " + section + "\n")
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    problems = [p for p in raised.value.problems if p.key == key]
    assert problems, [str(p) for p in raised.value.problems]
    assert words in problems[0].message
    assert str(path) in str(problems[0]) and problems[0].line >= HEAD.count("\n") + 1


def test_validate_accepts_exactly_what_up_accepts(tmp_path):
    """`policy validate` and `up` both load through load_policy: one refusal for both."""
    def validate(path):
        return subprocess.run([sys.executable, "-m", "skyguard.cli.main", "policy", "validate", str(path)],
                              capture_output=True, text=True, timeout=60)

    bad = validate(write(tmp_path, "content:\n  rules: [{name: r, zones: [web], block: {yara: [rules/broken.yar]}}]\n"))
    assert bad.returncode == 2 and "content.rules[0].block.yara[0]" in bad.stderr + bad.stdout
    good = validate(write(tmp_path, "content:\n  rules: [{name: r, zones: [web], block: {yara: [rules/marker.yar]}}]\n"))
    assert good.returncode == 0, good.stderr
