"""Prometheus metrics of skyguard: collectors that read the datapath and the daemon at scrape time,
and the HTTP exporter that serves them (SPEC.md section 7).

Wiring in the daemon (one place):

    registry = CollectorRegistry()          # also handed to the DNS, credential and SSH proxies
    exporter = MetricsExporter(registry, daemon_sources(daemon), address="127.0.0.1:9464")
    exporter.start()  ...  exporter.stop()

Not here: the other parts' own counters (they register them in the registry they are given).
"""

from skyguard.metrics.exporter import (  # noqa: F401
    DaemonCollector,
    DatapathCollector,
    MetricsExporter,
    daemon_facts,
    daemon_sources,
    log_facts,
    parse_address,
)
