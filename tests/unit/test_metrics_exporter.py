"""The exporter served over real HTTP from a scripted datapath source: values, help text, bounded
labels, scrape-time reads, failure isolation, and `promtool check metrics` on the exposition.

The datapath here is a stand-in object with the Datapath reading methods (the real one is
exercised by tests/integration/test_metrics_prometheus.py against the running daemon).
"""

import shutil
import subprocess
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from skyguard import config
from skyguard.errors import BadInput, DaemonError
from skyguard.metrics import DaemonCollector, DatapathCollector, MetricsExporter, log_facts, parse_address
from skyguard.policy.parse import load_policy

POLICY = load_policy(config.DEFAULT_POLICY)


class ScriptedDatapath:
    """Returns what a test sets; counts how often it was read (to prove reads happen on scrape)."""

    def __init__(self):
        self.reads = 0
        self.traffic = [
            {"zone": "auth", "direction": "egress", "verdict": "allow", "packets": 7, "bytes": 700},
            {"zone": "auth", "direction": "ingress", "verdict": "established", "packets": 5, "bytes": 500},
            {"zone": "sandbox", "direction": "egress", "verdict": "drop", "packets": 3, "bytes": 180},
        ]
        self.drops = [{"zone": "sandbox", "direction": "egress", "reason": "no_rule", "packets": 3, "bytes": 180}]
        self.events_lost = 2
        self.flow_rows = [{"zone": "auth", "src": "10.10.1.2", "dst": "10.10.2.2"}] * 4
        self.programs = {"sg-radius1": {"xdp": {"id": 1, "name": "sg_from_vm"},
                                        "tc_egress": {"id": 2, "name": "sg_to_vm"}}}

    def counters(self):
        self.reads += 1
        return {"traffic": self.traffic, "drops": self.drops, "events_lost": self.events_lost}

    def flows(self):
        return self.flow_rows

    def active_flows_by_zone(self):
        per_zone = {}
        for row in self.flows():
            per_zone[row["zone"]] = per_zone.get(row["zone"], 0) + 1
        return per_zone

    def attached(self):
        return self.programs

    def occupancy(self):
        return {"sg_ct": len(self.flow_rows), "sg_policy": 40}

    def learned(self):
        far, gone = time.monotonic_ns() + 60 * 10**9, time.monotonic_ns() - 1
        return {"203.0.113.7": {"sandbox/sandbox-packages": far},
                "203.0.113.8": {"sandbox/sandbox-packages": far, "sdn/os-updates": gone},
                "203.0.113.9": {"sdn/sdn-to-github": far, "auth/os-updates": far}}


def scrape(exporter) -> dict:
    """{(name, frozenset(labels)): value} of every sample, fetched over HTTP like Prometheus does."""
    with urllib.request.urlopen(exporter.url, timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


@pytest.fixture
def served():
    dp = ScriptedDatapath()
    registry = CollectorRegistry()
    facts = {"started_at": 1_700_000_000.0, "policy": {"name": POLICY.name, "sha256": POLICY.sha256},
             "log": {"size": 12, "checkpointed_size": 10, "bytes": 4096, "checkpoint_age_s": 3.5}, "tamper_events": 1}
    exporter = MetricsExporter(registry, [DatapathCollector(dp, POLICY), DaemonCollector(lambda: facts)],
                               address="127.0.0.1:0")
    exporter.start()
    try:
        yield dp, facts, exporter
    finally:
        exporter.stop()


def test_values_come_from_the_source(served):
    dp, _facts, exporter = served
    s = scrape(exporter)
    L = lambda **kw: frozenset(kw.items())  # noqa: E731
    assert s[("skyguard_packets_total", L(zone="auth", direction="egress", verdict="allow"))] == 7
    assert s[("skyguard_bytes_total", L(zone="auth", direction="ingress", verdict="established"))] == 500
    assert s[("skyguard_drops_total", L(zone="sandbox", direction="egress", reason="no_rule"))] == 3
    assert s[("skyguard_ringbuf_events_lost_total", L())] == 2
    assert s[("skyguard_active_flows", L(zone="auth"))] == 4
    assert s[("skyguard_active_flows", L(zone="directory"))] == 0  # every policy zone has a series
    assert s[("skyguard_programs_attached", L(workload="radius1", zone="auth"))] == 2
    assert s[("skyguard_programs_attached", L(workload="dc1", zone="directory"))] == 0  # unprotected shows
    assert s[("skyguard_map_entries", L(map="sg_policy"))] == 40
    assert s[("skyguard_learned_ips", L(zone="sandbox"))] == 2
    assert s[("skyguard_learned_ips", L(zone="sdn"))] == 1  # the expired selector no longer counts
    assert s[("skyguard_learned_ips", L(zone="auth"))] == 1
    assert s[("skyguard_learned_ips", L(zone="directory"))] == 0
    assert s[("skyguard_policy_info", L(name="keysystems", sha256=POLICY.sha256))] == 1
    assert s[("skyguard_log_entries", L())] == 12
    assert s[("skyguard_log_checkpointed_entries", L())] == 10
    assert s[("skyguard_log_size_bytes", L())] == 4096
    assert s[("skyguard_log_checkpoint_age_seconds", L())] == 3.5
    assert s[("skyguard_tamper_events_total", L())] == 1
    assert s[("skyguard_daemon_start_time_seconds", L())] == 1_700_000_000.0
    assert s[("skyguard_datapath_scrape_ok", L())] == 1


def test_read_at_scrape_time_not_by_a_loop(served):
    dp, facts, exporter = served
    before = dp.reads
    assert dp.reads == before  # nothing reads between scrapes
    scrape(exporter)
    assert dp.reads == before + 1
    dp.traffic = [dict(dp.traffic[0], packets=1000)]
    facts["tamper_events"] = 4
    s = scrape(exporter)
    assert s[("skyguard_packets_total", frozenset(dict(zone="auth", direction="egress", verdict="allow").items()))] == 1000
    assert s[("skyguard_tamper_events_total", frozenset())] == 4


def test_every_metric_has_help_text(served):
    _dp, _facts, exporter = served
    with urllib.request.urlopen(exporter.url, timeout=10) as reply:
        text = reply.read().decode()
    families = [f for f in text_string_to_metric_families(text) if f.name.startswith("skyguard_")]
    assert len(families) >= 14
    for f in families:
        assert len(f.documentation) > 15, f"{f.name} has no real help text"


def test_promtool_accepts_the_exposition(served):
    _dp, _facts, exporter = served
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (scripts/setup does)"
    text = exporter.render()
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_labels_stay_bounded_whatever_the_source_says(served):
    dp, _facts, exporter = served
    # A datapath (or a bug) reporting addresses or names where zones and reasons belong.
    dp.traffic = [{"zone": f"10.0.{i // 256}.{i % 256}", "direction": "egress", "verdict": "allow",
                   "packets": 1, "bytes": 60} for i in range(5000)]
    dp.drops = [{"zone": "auth", "direction": "sideways", "reason": f"evil.example/{i}", "packets": 1, "bytes": 1}
                for i in range(5000)]
    dp.flow_rows = [{"zone": f"zone-{i}", "src": f"198.51.100.{i % 256}"} for i in range(20000)]
    dp.programs = {f"tap{i}": {"xdp": {"name": "sg_from_vm"}} for i in range(300)}
    s = scrape(exporter)
    values = {v for (_name, labels) in s for (_k, v) in labels}
    assert not any("." in v or "/" in v for v in values - {POLICY.sha256}), values
    series = {k: v for k, v in s.items() if k[0] == "skyguard_packets_total"}
    assert series == {("skyguard_packets_total", frozenset(dict(zone="unknown", direction="egress",
                                                                verdict="allow").items())): 5000}
    assert s[("skyguard_drops_total", frozenset(dict(zone="auth", direction="other", reason="other").items()))] == 5000
    assert s[("skyguard_active_flows", frozenset(dict(zone="unknown").items()))] == 20000
    assert s[("skyguard_programs_attached", frozenset(dict(workload="unknown", zone="unknown").items()))] == 300
    assert len(s) < 120


def test_a_failing_datapath_does_not_break_the_scrape(served):
    dp, _facts, exporter = served

    def broken():
        raise OSError("map gone")

    dp.counters = broken
    s = scrape(exporter)
    assert s[("skyguard_datapath_scrape_ok", frozenset())] == 0
    assert s[("skyguard_daemon_scrape_ok", frozenset())] == 1
    assert s[("skyguard_tamper_events_total", frozenset())] == 1
    assert not any(k[0] == "skyguard_packets_total" for k in s)
    assert s[("skyguard_active_flows", frozenset({("zone", "auth")}))] == 4  # the other readings still show


def test_a_failing_program_listing_keeps_the_counters(served):
    dp, _facts, exporter = served

    def tc_failed():
        raise ValueError("tc printed half a JSON document")

    dp.attached = tc_failed
    s = scrape(exporter)
    assert s[("skyguard_datapath_scrape_ok", frozenset())] == 0
    assert s[("skyguard_packets_total", frozenset(dict(zone="auth", direction="egress", verdict="allow").items()))] == 7
    assert not any(k[0] == "skyguard_programs_attached" for k in s)


def test_no_datapath_yet_is_reported_not_raised():
    registry = CollectorRegistry()
    with MetricsExporter(registry, [DatapathCollector(lambda: None, lambda: None)], address="127.0.0.1:0") as ex:
        s = scrape(ex)
    assert s[("skyguard_datapath_scrape_ok", frozenset())] == 0


def test_other_parts_metrics_share_the_registry():
    registry = CollectorRegistry()
    swaps = Counter("skyguard_credential_swaps", "Requests seen by the credential proxy", ["credential", "result"],
                    registry=registry)
    swaps.labels("github", "swapped").inc(3)
    with MetricsExporter(registry, [], address="127.0.0.1:0") as ex:
        s = scrape(ex)
    assert s[("skyguard_credential_swaps_total", frozenset(dict(credential="github", result="swapped").items()))] == 3


def test_exporter_stop_frees_the_port_and_unregisters():
    registry = CollectorRegistry()
    collector = DatapathCollector(ScriptedDatapath(), POLICY)
    ex = MetricsExporter(registry, [collector], address="127.0.0.1:0").start()
    port = ex.port
    ex.stop()
    again = MetricsExporter(registry, [collector], address=f"127.0.0.1:{port}").start()  # would raise if bound
    again.stop()


def test_a_busy_port_is_a_clear_error():
    registry = CollectorRegistry()
    with MetricsExporter(registry, [], address="127.0.0.1:0") as first:
        with pytest.raises(DaemonError, match="--metrics"):
            MetricsExporter(CollectorRegistry(), [], address=first.address).start()


@pytest.mark.parametrize("bad", ["9464", "localhost:9464", "127.0.0.1:http", "127.0.0.1:70000", ""])
def test_bad_addresses_are_refused(bad):
    with pytest.raises(BadInput, match="HOST:PORT|IP address"):
        parse_address(bad)


def test_addresses():
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:26001") == ("::1", 26001)
    assert parse_address(":9464") == ("127.0.0.1", 9464)


def test_log_facts_from_a_directory(tmp_path):
    (tmp_path / "seg-0.log").write_bytes(b"x" * 100)
    (tmp_path / "checkpoints.log").write_bytes(b"y" * 20)
    facts = log_facts(tmp_path, entries=3)
    assert facts["bytes"] == 120 and facts["size"] == 3
    assert facts["checkpoint_age_s"] >= 0
    assert log_facts(tmp_path / "missing") == {}
