"""The fleet's alert rules: valid, each fires as its promtool unit test says, and they name only
metrics the fleet agent exports."""

import re
import shutil
import subprocess

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from skyguard import config
from skyguard.fleet.metrics import FleetMetrics

RULES = config.REPO_ROOT / "ops" / "prometheus" / "skyguard-fleet-rules.yml"


def promtool(*args):
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: apt-get install prometheus (scripts/setup does)"
    proc = subprocess.run([exe, *args], cwd=RULES.parent, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_rules_are_valid_and_fire_as_tested():
    assert "SUCCESS" in promtool("check", "rules", RULES.name)
    assert "SUCCESS" in promtool("test", "rules", "skyguard-fleet-rules.test.yml")
    tested = set(re.findall(r"alertname:\s*(\w+)", (RULES.parent / "skyguard-fleet-rules.test.yml").read_text()))
    assert set(re.findall(r"alert:\s*(\w+)", RULES.read_text())) == tested


def test_rules_name_only_metrics_the_agent_exports():
    registry = CollectorRegistry()
    metrics = FleetMetrics(registry)
    metrics.tamper.labels(peer="p").inc()
    metrics.stale.labels(peer="p").inc()
    metrics.fresh_age.labels(peer="p").set(1)
    metrics.unverified.labels(peer="p").set(1)
    metrics.alert.labels(peer="p").set(1)
    metrics.refused.labels(reason="rollback").inc()
    metrics.refusing.set(1)
    names = set()
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        names |= {s.name for s in family.samples}
    for metric in re.findall(r"\bskyguard_[a-z0-9_]+\b", RULES.read_text()):
        assert metric in names, f"{RULES.name} uses {metric}, which the fleet agent does not export"
