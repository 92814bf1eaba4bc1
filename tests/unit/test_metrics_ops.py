"""The operator files in ops/: alert rules pass `promtool check rules` and fire (or stay quiet) as
their unit tests say (`promtool test rules`), the example prometheus.yml is valid, and every query
of the Grafana dashboard parses and names only metrics that skyguard's parts export.
"""

import json
import re
import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from skyguard import config
from skyguard.metrics import DaemonCollector, DatapathCollector

OPS = config.REPO_ROOT / "ops"
RULES = OPS / "prometheus" / "skyguard-rules.yml"
DASHBOARD = OPS / "grafana" / "skyguard-dashboard.json"
ALERTS = {"SkyguardDaemonDown", "SkyguardDropsSpiking", "SkyguardDnsTunnellingDetected", "SkyguardTamperEvent",
          "SkyguardRingBufferLosses", "SkyguardLogCheckpointStale", "SkyguardLogFilesystemFillingUp",
          "SkyguardLogRefusingEntries", "SkyguardLogWriteStalled", "SkyguardSessionRecordingStalled"}


def promtool(*args, cwd=None, stdin=None):
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: apt-get install prometheus (scripts/setup does)"
    proc = subprocess.run([exe, *args], cwd=cwd, input=stdin, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


class OneOfEverything:
    """A datapath source with one row of each kind, so every datapath family is exposed."""

    cleanup_failures = 0

    def counters(self):
        return {"traffic": [{"zone": "auth", "direction": "egress", "verdict": "allow", "packets": 1, "bytes": 1}],
                "drops": [{"zone": "auth", "direction": "egress", "reason": "no_rule", "packets": 1, "bytes": 1}],
                "events_lost": 0}

    def flows(self):
        return []

    def active_flows_by_zone(self):
        per_zone = {}
        for row in self.flows():
            per_zone[row["zone"]] = per_zone.get(row["zone"], 0) + 1
        return per_zone

    def attached(self):
        return {}

    def occupancy(self):
        return {"sg_ct": 0}

    def learned(self):
        return {}


def exported_names() -> set[str]:
    """Every sample name skyguard can expose: this part's collectors and the other parts' metrics."""
    from skyguard.admin.proxy import AdminMetrics
    from skyguard.console.proxy import ConsoleMetrics
    from skyguard.credproxy.interfaces import CredentialMetrics

    registry = CollectorRegistry()
    registry.register(DatapathCollector(OneOfEverything(), None))
    registry.register(DaemonCollector(lambda: {"started_at": 1.0, "policy": {"name": "p", "sha256": "0" * 64},
                                               "log": {"size": 1, "checkpointed_size": 1, "bytes": 1,
                                                       "checkpoint_age_s": 1.0, "filesystem_free_bytes": 1,
                                                       "reserve_bytes": 1, "refused_entries": 0, "refusing": None,
                                                       "write_wait_s": 0.0, "queued_entries": 0,
                                                       "stall_refused_entries": 0}}))
    AdminMetrics(registry)
    ConsoleMetrics(registry)
    CredentialMetrics(registry)
    try:
        from skyguard.dns.metrics import DnsMetrics
    except ImportError:
        DnsMetrics = None  # the DNS part is merged separately; its names are checked once it is
    names = {"up"}
    if DnsMetrics is not None:
        DnsMetrics(registry)
    else:
        names |= {"skyguard_dns_queries_total", "skyguard_dns_learned_ips_total",
                  "skyguard_dns_tunnel_detections_total", "skyguard_dns_latency_seconds_bucket"}
    # Labelled metrics with no child yet expose no sample: touch one child of each to see its names.
    text = generate_latest(registry).decode()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names |= {s.name for s in family.samples}
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
    return names


def test_rules_pass_promtool_check():
    out = promtool("check", "rules", str(RULES))
    assert "SUCCESS" in out


def test_rules_cover_every_required_alert():
    text = RULES.read_text()
    found = set(re.findall(r"alert:\s*(\w+)", text))
    assert ALERTS <= found, ALERTS - found


def test_alerts_fire_as_their_unit_tests_say():
    out = promtool("test", "rules", "skyguard-rules.test.yml", cwd=RULES.parent)
    assert "SUCCESS" in out
    tested = set(re.findall(r"alertname:\s*(\w+)", (RULES.parent / "skyguard-rules.test.yml").read_text()))
    assert ALERTS <= tested, f"alerts without a promtool unit test: {ALERTS - tested}"


def test_example_prometheus_config_is_valid():
    promtool("check", "config", str(RULES.parent / "prometheus.yml"))


def test_rules_name_only_exported_metrics():
    names = exported_names()
    for expr in re.findall(r"expr:\s*\|?\s*\n?((?:.|\n)*?)(?=\n\s+(?:for|labels):)", RULES.read_text()):
        for metric in re.findall(r"\bskyguard_[a-z0-9_]+\b|\bup\b(?=\{)", expr):
            assert metric in names, f"{RULES.name} uses {metric}, which nothing exports"


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", ())]


def test_dashboard_is_valid_json_with_panels_for_each_concern():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"]
    exprs = " ".join(e for _t, e in dashboard_queries())
    for metric in ("skyguard_packets_total", "skyguard_bytes_total", "skyguard_drops_total",
                   "skyguard_active_flows", "skyguard_dns_queries_total", "skyguard_dns_tunnel_detections_total",
                   "skyguard_dns_learned_ips_total", "skyguard_credential_swaps_total",
                   "skyguard_ringbuf_events_lost_total", "skyguard_log_entries", "skyguard_log_size_bytes",
                   "skyguard_log_checkpoint_age_seconds", "skyguard_programs_attached",
                   "skyguard_tamper_events_total", "skyguard_map_entries"):
        assert metric in exprs, f"no dashboard panel shows {metric}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_name_only_exported_metrics():
    names = exported_names()
    for title, expr in dashboard_queries():
        for metric in re.findall(r"\b([a-z_][a-z0-9_]*)\s*\{", expr):
            assert metric in names, f"panel {title!r} queries {metric}, which nothing exports"


def test_dashboard_queries_parse(tmp_path):
    # promtool has no bare "parse this query"; recording rules are parsed with the full PromQL parser.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{i}",
         "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$zone", ".*")}
        for i, (_title, expr) in enumerate(dashboard_queries())]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    promtool("check", "rules", str(path))


@pytest.mark.parametrize("bad", ["rate(skyguard_drops_total[5m]", "sum by (zone skyguard_packets_total"])
def test_the_parse_check_catches_a_broken_query(tmp_path, bad):
    path = tmp_path / "bad.yml"
    path.write_text(json.dumps({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": bad}]}]}))
    proc = subprocess.run([shutil.which("promtool"), "check", "rules", str(path)], capture_output=True)
    assert proc.returncode != 0
