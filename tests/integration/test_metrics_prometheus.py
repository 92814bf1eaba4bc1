"""A real Prometheus scrapes a real `skyguard up` in the lab: the counters it stores match the
traffic the lab VMs sent (allowed pings, denied pings, a flood), the exposition passes
`promtool check metrics`, the repository's alert rules load in the server, and a flood from
thousands of source and destination addresses adds no series and no address to any label.
"""

import base64
import json
import random
import re
import shutil
import subprocess
import time

import pytest
from daemon_support import RunningDaemon

from skyguard import config
from support.client_waits import dig_argv, ping_argv
from support.metrics_support import FLOOD, PrometheusServer

EXPORTER = "127.0.0.1:26001"  # loopback of the lab's host namespace (brief's port range)
PROMETHEUS = "127.0.0.1:26090"
RULES = config.REPO_ROOT / "ops" / "prometheus" / "skyguard-rules.yml"
PING_BYTES = 98  # one ICMP echo of `ping` (56 data bytes) as a frame: 14 + 20 + 8 + 56
IP_LIKE = re.compile(r"\d+\.\d+\.\d+\.\d+|[0-9a-f]*:[0-9a-f]*:[0-9a-f:]*|\.test\b|://")


@pytest.fixture(scope="module")
def daemon(lab, tmp_path_factory):
    d = RunningDaemon(lab, tmp_path_factory.mktemp("mtx-daemon"), metrics=EXPORTER, wait_attached=True)
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


@pytest.fixture(scope="module")
def prometheus(lab, daemon, tmp_path_factory):
    p = PrometheusServer(lab, tmp_path_factory.mktemp("mtx-prometheus"), EXPORTER, PROMETHEUS, rules=RULES)
    try:
        yield p.start()
    finally:
        p.stop()


def settled(prometheus) -> None:
    """Wait for a scrape that began after now, so the next queries see everything sent before."""
    prometheus.wait_scraped_after(time.time() + 0.05)


def wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"{what} did not happen within {timeout:.0f}s")


def ping(lab, vm: str, target: str, count: int, answer: bool) -> subprocess.CompletedProcess:
    """`count` echo requests; answer: whether the test expects replies (how long ping waits for one)."""
    return lab.exec(vm, ping_argv("-q", "-c", str(count), "-i", "0.2", target, answer=answer),
                    capture_output=True, text=True, timeout=60)


def test_counters_in_prometheus_match_the_pings_sent(lab, daemon, prometheus):
    auth_out = 'skyguard_packets_total{job="skyguard",zone="auth",direction="egress",verdict=~"allow|established"}'
    denied = 'skyguard_drops_total{job="skyguard",zone="sandbox",direction="egress",reason="policy_deny"}'
    denied_bytes = 'skyguard_drop_bytes_total{job="skyguard",zone="sandbox",direction="egress",reason="policy_deny"}'
    settled(prometheus)
    before = {q: prometheus.value(q) for q in (auth_out, denied, denied_bytes)}

    allowed_pings, denied_pings = 6, 4
    ok = ping(lab, "radius1", "10.10.2.2", allowed_pings, answer=True)  # auth -> directory: icmp allowed
    assert ok.returncode == 0, ok.stdout + ok.stderr
    refused = ping(lab, "agent1", "10.10.2.2", denied_pings, answer=False)  # sandbox -> corp: deny rule
    assert refused.returncode != 0, "the sandbox reached the directory: policy not enforced"

    settled(prometheus)
    assert prometheus.value(auth_out) - before[auth_out] == allowed_pings
    assert prometheus.value(denied) - before[denied] == denied_pings
    assert prometheus.value(denied_bytes) - before[denied_bytes] == denied_pings * PING_BYTES
    # The exporter and Prometheus agree with the daemon's own status (same maps, read at scrape).
    drops = daemon.request("status")["counters"]["drops"]
    assert sum(r["packets"] for r in drops if r["zone"] == "sandbox" and r["reason"] == "policy_deny") \
        == prometheus.value(denied)


def test_every_workload_is_enforced_and_the_policy_is_named(daemon, prometheus):
    settled(prometheus)
    attached = prometheus.query('skyguard_programs_attached{job="skyguard"}')
    workloads = {w.name for w in daemon.lab_workloads()}
    assert {r[0]["workload"] for r in attached} == workloads
    assert all(r[2] == 2 for r in attached), attached
    info = prometheus.query('skyguard_policy_info{job="skyguard"}')
    assert [r[0]["name"] for r in info] == ["keysystems"]
    assert prometheus.value('skyguard_log_entries{job="skyguard"}') > 0
    assert prometheus.value('skyguard_datapath_scrape_ok{job="skyguard"}') == 1
    assert prometheus.value('skyguard_map_entries{job="skyguard"}') > 0


def test_the_alert_rules_load_in_prometheus_and_none_fires(prometheus):
    groups = prometheus.api("rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    for name in ("SkyguardDaemonDown", "SkyguardDropsSpiking", "SkyguardDnsTunnellingDetected", "SkyguardTamperEvent",
                 "SkyguardRingBufferLosses", "SkyguardLogCheckpointStale"):
        assert rules[name]["health"] in ("ok", "unknown"), rules[name]
    settled(prometheus)
    time.sleep(1.5)  # one evaluation (evaluation_interval 1s) after the scrape
    assert rules and all(r["health"] == "ok" for g in prometheus.api("rules")["groups"] for r in g["rules"])
    firing = [a for a in prometheus.api("alerts")["alerts"] if a["labels"]["alertname"] in
              ("SkyguardDaemonDown", "SkyguardTamperEvent", "SkyguardRingBufferLosses")]
    assert firing == []


def test_promtool_accepts_the_daemons_exposition(lab, daemon):
    text = lab.exec("host", ["curl", "-sf", f"http://{EXPORTER}/metrics"], lab_resolver=False,
                    capture_output=True, timeout=20).stdout
    assert b"skyguard_packets_total" in text
    proc = subprocess.run([shutil.which("promtool"), "check", "metrics"], input=text, capture_output=True)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def series(prometheus) -> list[dict]:
    return prometheus.api("series", **{"match[]": '{__name__=~"skyguard_.+",job="skyguard"}',
                                      "start": str(time.time() - 600)})


def dig(lab, vm: str, *args: str) -> str:
    return lab.exec(vm, dig_argv("+noall", "+comments", *args), capture_output=True, text=True, timeout=120).stdout


def test_dns_decisions_and_tunnelling_reach_prometheus(lab, daemon, prometheus, tmp_path):
    queries = 'skyguard_dns_queries_total{job="skyguard",zone="sandbox"}'
    learned_now = 'skyguard_learned_ips{job="skyguard",zone="sandbox"}'
    detections = 'skyguard_dns_tunnel_detections_total{job="skyguard",zone="sandbox"}'
    by_verdict = lambda: {r[0]["verdict"]: r[2] for r in prometheus.query(queries)}  # noqa: E731
    settled(prometheus)
    before = {q: prometheus.value(q) for q in (queries, detections)}
    verdicts_before = by_verdict()

    assert "status: NOERROR" in dig(lab, "agent1", "pypi.sandbox.test")  # allowed by name
    assert "status: REFUSED" in dig(lab, "agent1", "payroll.corp.test")  # no rule names it
    settled(prometheus)
    assert prometheus.value(queries) - before[queries] == 2
    grew = {v: n - verdicts_before.get(v, 0) for v, n in by_verdict().items() if n > verdicts_before.get(v, 0)}
    assert sorted(grew.values()) == [1, 1], f"one allowed and one refused query, by verdict: {grew}"
    assert prometheus.value(learned_now) >= 1  # the allowed answer's address is open now

    # Exfiltration in DNS names under an allowed domain: the proxy detects it and blocks.
    rng = random.Random(8)
    names = [base64.b32encode(rng.randbytes(20)).decode().lower().rstrip("=") + ".files.pythonhosted.test"
             for _ in range(60)]
    batch = tmp_path / "tunnel-queries"
    batch.write_text("".join(f"{n} A\n" for n in names))
    out = dig(lab, "agent1", "-f", str(batch))
    assert "status: REFUSED" in out, out[-2000:]
    wait_for(lambda: prometheus.value(detections) > before[detections], "tunnel detections in Prometheus")
    firing = wait_for(lambda: [a for a in prometheus.api("alerts")["alerts"]
                               if a["labels"]["alertname"] == "SkyguardDnsTunnellingDetected"
                               and a["state"] == "firing"], "the SkyguardDnsTunnellingDetected alert firing")
    assert firing[0]["labels"]["zone"] == "sandbox"


def host_mac(lab, ifname: str) -> str:
    # `ip`, not /sys/class/net: nsenter keeps the caller's sysfs, which shows the root namespace.
    link = lab.exec("host", ["ip", "-j", "link", "show", ifname], lab_resolver=False, capture_output=True,
                    text=True, check=True).stdout
    return json.loads(link)[0]["address"]


def test_a_flood_from_many_addresses_adds_no_series(lab, daemon, prometheus):
    gateway_mac = host_mac(lab, "sg-agent1")
    agent = next(w for w in daemon.lab_workloads() if w.name == "agent1")
    my_ip = str(next(a for a in agent.addresses if a.version == 4))
    spoof = 'skyguard_drops_total{job="skyguard",zone="sandbox",direction="egress",reason="spoof_ip"}'
    scan = 'skyguard_drops_total{job="skyguard",zone="sandbox",direction="egress",reason="no_rule"}'

    radius1 = next(w for w in daemon.lab_workloads() if w.name == "radius1")
    allowed = ["python3", "-c", FLOOD, host_mac(lab, "sg-radius1"), radius1.mac, "10.10.1.2"]
    # Warm-up: one frame of each kind, so the series their verdicts create exist before we count.
    for mode in ("spoof", "scan"):
        lab.exec("agent1", ["python3", "-c", FLOOD, gateway_mac, agent.mac, my_ip, "1", mode],
                 lab_resolver=False, check=True, timeout=60)
    for _verdict in ("allow", "established"):  # the same flow twice: a new flow, then its second packet
        lab.exec("radius1", allowed + ["1", "flows", "10.10.2.2", "88"], lab_resolver=False, check=True, timeout=60)
    settled(prometheus)
    before_series = {json.dumps(s, sort_keys=True) for s in series(prometheus)}
    assert before_series, "prometheus holds no skyguard series"
    before = {q: prometheus.value(q) for q in (spoof, scan)}

    frames = 20000  # per mode: 20k random source addresses, then 20k random destinations
    for mode in ("spoof", "scan"):
        lab.exec("agent1", ["python3", "-c", FLOOD, gateway_mac, agent.mac, my_ip, str(frames), mode],
                 lab_resolver=False, check=True, timeout=120)
    # And 4000 allowed flows (auth -> directory udp/88), each from its own source port: within
    # the 4096 live flows one VM may open (SG_CT_SHARE, bpf/lib/conntrack.h); more would be
    # refused as ct_full, which the VM's share is for.
    flows = 4000
    lab.exec("radius1", allowed + [str(flows), "flows", "10.10.2.2", "88"], lab_resolver=False, check=True,
             timeout=120)
    settled(prometheus)
    assert prometheus.value('skyguard_active_flows{job="skyguard",zone="auth"}') >= flows

    assert prometheus.value(spoof) - before[spoof] == frames
    assert prometheus.value(scan) - before[scan] == frames
    after = series(prometheus)
    new = {json.dumps(s, sort_keys=True) for s in after} - before_series
    # Idle VMs' own housekeeping (ARP, neighbour discovery: verdict "control") may first show up
    # at any moment in any zone; it is bounded like the rest and is not the flood's doing.
    new = {n for n in new if json.loads(n).get("verdict") != "control"}
    assert new == set(), f"the flood created series: {sorted(new)[:10]}"
    for s in after:
        for key, value in s.items():
            if key in ("__name__", "instance", "job", "sha256"):
                continue
            assert not IP_LIKE.search(value), f"label {key}={value!r} of {s['__name__']} looks like an address"
    exposed = int(prometheus.value('count({__name__=~"skyguard_.+",job="skyguard"})'))
    assert exposed > 0
    assert exposed < 600, f"{exposed} skyguard series: cardinality is not bounded"


def test_tampering_shows_in_prometheus_and_raises_the_alert(lab, daemon, prometheus):
    # Last in this file: it leaves one tamper event behind. Remove the to-VM program of dc2
    # behind the daemon's back; its watchdog re-attaches and counts a tamper event.
    tamper = 'skyguard_tamper_events_total{job="skyguard"}'
    settled(prometheus)
    before = prometheus.value(tamper)
    lab.exec("host", ["tc", "filter", "del", "dev", "sg-dc2", "egress"], lab_resolver=False, check=True)
    wait_for(lambda: prometheus.value(tamper) == before + 1, "skyguard_tamper_events_total rising in Prometheus")
    firing = wait_for(lambda: [a for a in prometheus.api("alerts")["alerts"]
                               if a["labels"]["alertname"] == "SkyguardTamperEvent" and a["state"] == "firing"],
                      "the SkyguardTamperEvent alert firing")
    assert firing[0]["labels"]["severity"] == "critical"
    # Re-attached: both programs are back on dc2 (the workload is enforced again).
    wait_for(lambda: [r[2] for r in prometheus.query('skyguard_programs_attached{job="skyguard",workload="dc2"}')]
             == [2], "dc2's programs re-attached")
