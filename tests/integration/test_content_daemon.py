"""Content rules through the real daemon: `skyguard up` in the lab with a content rule for the
sandbox zone and a real clamd. curl in the agent1 VM uploads over HTTPS to the lab's internet
server (pypi.sandbox.test, which the sandbox may reach), trusting the CA `skyguard ca export`
gives: EICAR gets 403 and never arrives, a clean file arrives byte-exact; the block is in the
signed log (`skyguard log show`), in `skyguard flows` and in the Prometheus exposition; and
`skyguard policy load` of the same policy without the rule lets the upload through (hot swap).

One daemon for the module (the lab is the session's). Test order matters: the swap is last.
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from daemon_support import RunningDaemon, wait_for
from prometheus_client.parser import text_string_to_metric_families

from skyguard import config
from support.content_support import EICAR, LocalClamd, harmless_bytes

VM = "agent1"
URL = "https://pypi.sandbox.test/upload"
RULE = "sandbox-uploads"
METRICS = "127.0.0.1:26011"  # loopback of the lab's host namespace
STARTUP_WAIT_S = 180  # bcc compiles the programs: slow on a loaded 2-core machine, not a hang


def _without_section(text: str, key: str) -> str:
    """The policy text minus one top-level section (its key line and the indented lines below)."""
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith(f"{key}:"):
            skipping = True
            continue
        if skipping and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        skipping = False
        out.append(line)
    return "".join(out)


@pytest.fixture(scope="module")
def daemon(lab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("content-daemon")
    clamd = LocalClamd(tmp / "clamd").start()
    # No credentials or TLS termination (their secrets and keys are not in this state dir): the
    # content rule alone makes the daemon run the proxy and steer the sandbox's HTTP(S) to it.
    bare = _without_section(_without_section(config.DEFAULT_POLICY.read_text(), "credentials"), "tls_termination")
    (tmp / "bare.yaml").write_text(bare)
    (tmp / "content.yaml").write_text(bare + f"""
content:
  clamd: {{socket: {clamd.socket}, timeout: 10}}
  max_inspect_bytes: 4MiB
  rules:
    - name: {RULE}
      zones: [sandbox]
      direction: upload
      protocols: [http]
      block: {{clamav: true}}
""")
    # Waited for generously (as long as answering status and attaching every workload could each take).
    d = RunningDaemon(lab, tmp, policy_path=tmp / "content.yaml", metrics=METRICS, wait_attached=True,
                      ready_timeout=2 * STARTUP_WAIT_S)
    d.env["SKYGUARD_LAB_DIR"] = str(lab.lab_dir.parent)  # the daemon trusts this lab's CA upstream
    d.tmp = tmp
    d.clamd_socket = clamd.socket
    try:
        d.start()
        assert d.status()["parts"]["credentials"] == "running", d.log_tail()
        # The VM trusts skyguard's CA as an operator exports it, and the lab's (for after the swap).
        exported = d.cli("ca", "export", check=True).stdout
        (tmp / "trust.pem").write_text(exported + lab.ca_cert.read_text())
        yield d
    finally:
        d.cleanup()
        clamd.stop()


def upload(lab, daemon, data: bytes) -> tuple[int, bytes]:
    path = daemon.tmp / "upload.bin"
    path.write_bytes(data)
    out = lab.exec(VM, ["curl", "-sS", "--max-time", "60", "--cacert", str(daemon.tmp / "trust.pem"),
                        "--data-binary", f"@{path}", "-H", "Content-Type: application/octet-stream",
                        "-w", "\n%{http_code}", URL], capture_output=True, timeout=90)
    body, _, code = out.stdout.rpartition(b"\n")
    assert code.isdigit(), out.stderr
    return int(code), body


def arrived(lab) -> list[bytes]:
    """Bodies of the uploads the lab's internet server received (from the proxy or, after the
    swap, from the VM itself)."""
    if not lab.requests_log.exists():
        return []
    bodies = []
    for line in lab.requests_log.read_text().splitlines():
        record = json.loads(line)
        if record.get("path") == "/upload" and record.get("sni") == "pypi.sandbox.test":
            bodies.append(base64.b64decode(record["body_base64"]) if "body_base64" in record
                          else record.get("body", "").encode())
    return bodies


def metric(lab, name: str, **labels) -> float:
    """One sample's value (summed over the labels not given) from the daemon's exposition."""
    text = lab.exec("host", ["curl", "-sf", f"http://{METRICS}/metrics"], lab_resolver=False, capture_output=True,
                    text=True, timeout=30, check=True).stdout
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def judged(lab, verdict: str) -> float:
    """skyguard_content_decisions_total for the sandbox."""
    return metric(lab, "skyguard_content_decisions_total", zone="sandbox", rule=RULE if verdict == "blocked" else "-",
                  protocol="http", verdict=verdict)


def test_eicar_upload_is_refused_logged_counted_and_shown_in_flows(lab, daemon):
    before, blocked = len(arrived(lab)), judged(lab, "blocked")
    code, body = upload(lab, daemon, EICAR)
    assert code == 403, body
    answer = json.loads(body)
    assert (answer["error"], answer["rule"], answer["engine"]) == ("content_blocked", RULE, "clamav")
    assert len(arrived(lab)) == before  # the internet never got it

    digest = hashlib.sha256(EICAR).hexdigest()
    entry = wait_for(lambda: [e for e in daemon.log_entries("content_blocked") if e["sha256"] == digest],
                     30, "the block in the signed log")[-1]
    assert (entry["zone"], entry["workload"], entry["rule"], entry["protocol"], entry["direction"]) == (
        "sandbox", VM, RULE, "http", "upload")
    assert (entry["destination"], entry["size"]) == ("pypi.sandbox.test", len(EICAR))

    flows = daemon.cli("flows", "--json", check=True)
    shown = [r for r in json.loads(flows.stdout)["records"] if r["type"] == "content_blocked"]
    assert shown and shown[-1]["sha256"] == digest and shown[-1]["verdict"] == "deny"
    text = daemon.cli("flows", "--zone", "sandbox", check=True).stdout
    assert f"BLOCK  FILE  sandbox/{VM} -> pypi.sandbox.test  http upload {len(EICAR)} bytes" in text

    assert judged(lab, "blocked") == blocked + 1


def test_a_clean_file_arrives_byte_exact(lab, daemon):
    data = harmless_bytes(300_000)
    before, allowed = len(arrived(lab)), judged(lab, "allowed")
    code, body = upload(lab, daemon, data)
    assert code == 200, body
    assert arrived(lab)[before:] == [data]
    assert judged(lab, "allowed") == allowed + 1


def test_a_clamd_without_alert_exceeds_max_degrades_the_part_and_refuses_uploads(lab, daemon):
    """clamd as Debian ships it (AlertExceedsMax off) answers clean for what it skips past its
    limits: the part says so at once (status, log, metric) and refuses every upload the clamav
    rule covers until a clamd that flags them is in place."""
    lax = LocalClamd(daemon.tmp / "lax-clamd", alert_exceeds_max=False).start()
    good = daemon.tmp / "content.yaml"
    try:
        (daemon.tmp / "lax.yaml").write_text(good.read_text().replace(daemon.clamd_socket, lax.socket))
        out = daemon.cli("policy", "load", str(daemon.tmp / "lax.yaml"), "--json", check=True)
        problem = json.loads(out.stdout)["part_problems"]["credentials"]
        assert problem["state"] == "degraded" and "set `AlertExceedsMax yes`" in problem["problem"], problem
        assert daemon.status()["parts"]["credentials"] == "degraded"
        assert any("AlertExceedsMax" in e["error"] for e in daemon.log_entries("part_degraded"))
        assert metric(lab, "skyguard_content_clamd_unusable") == 1
        before = len(arrived(lab))
        code, body = upload(lab, daemon, b"harmless words\n")
        assert code == 403 and "AlertExceedsMax" in json.loads(body)["reason"], body
        assert len(arrived(lab)) == before
    finally:
        out = daemon.cli("policy", "load", str(good), "--json", check=True)
        lax.stop()
    assert not json.loads(out.stdout)["part_problems"]
    assert metric(lab, "skyguard_content_clamd_unusable") == 0
    code, body = upload(lab, daemon, b"harmless words\n")
    assert code == 200, body


def test_loading_the_policy_without_the_rule_lets_the_upload_through(lab, daemon):
    out = daemon.cli("policy", "load", str(daemon.tmp / "bare.yaml"), "--json", check=True)
    assert not json.loads(out.stdout)["part_problems"]
    assert daemon.status()["parts"]["credentials"] == "not needed"  # no rule: no proxy, no steering
    before = len(arrived(lab))
    code, body = upload(lab, daemon, EICAR)
    assert code == 200, body
    assert arrived(lab)[before:] == [EICAR]
