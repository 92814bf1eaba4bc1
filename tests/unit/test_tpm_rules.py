"""The TPM alert rules (ops/prometheus/skyguard-tpm-rules.yml): promtool accepts them, they fire as
their promtool unit tests say, and they name only metrics the continuous-attestation part exports.
"""

import re
import shutil
import subprocess

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from skyguard import config
from skyguard.tpm.monitor import TpmMetrics

RULES = config.REPO_ROOT / "ops" / "prometheus" / "skyguard-tpm-rules.yml"
ALERTS = {"SkyguardMeasuredStateOutsideReference", "SkyguardTpmQuotesStale"}


def promtool(*args, cwd=None):
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: apt-get install prometheus (scripts/setup does)"
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_rules_pass_promtool_and_fire_as_tested():
    assert "SUCCESS" in promtool("check", "rules", str(RULES))
    assert "SUCCESS" in promtool("test", "rules", "skyguard-tpm-rules.test.yml", cwd=RULES.parent)
    tested = set(re.findall(r"alertname:\s*(\w+)", (RULES.parent / "skyguard-tpm-rules.test.yml").read_text()))
    assert ALERTS <= set(re.findall(r"alert:\s*(\w+)", RULES.read_text())) and ALERTS <= tested


def test_the_example_prometheus_config_loads_the_tpm_rules():
    assert "skyguard-tpm-rules.yml" in (RULES.parent / "prometheus.yml").read_text()
    promtool("check", "config", str(RULES.parent / "prometheus.yml"))


def test_rules_name_only_metrics_the_monitor_exports():
    registry = CollectorRegistry()
    TpmMetrics(registry)
    names = set()
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        names |= {family.name} | {s.name for s in family.samples}
    used = set(re.findall(r"\bskyguard_[a-z0-9_]+\b", "\n".join(re.findall(r"expr:(.*)", RULES.read_text()))))
    assert used and used <= names, used - names
