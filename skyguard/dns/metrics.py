"""Prometheus metrics of the DNS proxy, registered in a registry the daemon passes in.

Labels are bounded: zone, verdict, upstream index, part name. Never a domain name or an IP.

The four series every forwarded query touches (queries, latency, learned_ips, learn_latency)
are kept by _HotFamily children here, not by prometheus_client's classes: those take a lock and
walk the buckets in Python on every call, ~5 us each when the CPU caches are cold (as they are
at 1k queries/s on a busy host), which is a fifth of the proxy's own added latency. Here an
update is a dict lookup and an integer addition by the event loop's thread, the only writer; a
scrape (another thread) reads a copy. The exposition is the same families with the same names
and labels (minus the `_created` samples).
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self):
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class _HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # first bound >= value: le semantics
        self.sum += value


class _HotFamily:
    """A labelled family whose children are cached by label values (labels() is one dict get)."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], make_child):
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self._make_child = make_child
        self.children: dict[tuple[str, ...], object] = {}

    def labels(self, *values: str):
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self.children[values] = self._make_child()
        return child

    def snapshot(self) -> list[tuple[tuple[str, ...], object]]:
        return list(self.children.items())  # one C call: safe against the loop adding a child


class _HotCollector:
    """Exposes the hot families to the registry at scrape time."""

    def __init__(self, counters: list[_HotFamily], histograms: list[_HotFamily]):
        self.counters, self.histograms = counters, histograms

    def collect(self):
        for family in self.counters:
            metric = CounterMetricFamily(family.name, family.documentation,
                                         labels=family.labelnames)
            for values, child in family.snapshot():
                metric.add_metric(list(values), child.value)
            yield metric
        for family in self.histograms:
            metric = HistogramMetricFamily(family.name, family.documentation,
                                           labels=family.labelnames)
            for values, child in family.snapshot():
                counts, total = list(child.counts), child.sum
                cumulative, buckets = 0, []
                for bound, count in zip(list(child.bounds) + [float("inf")], counts):
                    cumulative += count
                    buckets.append((floatToGoString(bound), cumulative))
                metric.add_metric(list(values), buckets, total)
            yield metric

    def describe(self):
        return []  # no samples at registration: nothing to check for duplicates against


class DnsMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.queries = _HotFamily("skyguard_dns_queries", "DNS queries by verdict",
                                  ("zone", "verdict"), _CounterChild)
        self.learned_ips = _HotFamily("skyguard_dns_learned_ips",
                                      "Addresses written to the datapath", ("zone",), _CounterChild)
        self.rebinding = Counter("skyguard_dns_rebinding_records",
                                 "Answer records stripped as rebinding", ["zone"], registry=r)
        self.detections = Counter("skyguard_dns_tunnel_detections",
                                  "Tunnelling detections by action", ["zone", "action"], registry=r)
        self.upstream_errors = Counter("skyguard_dns_upstream_errors",
                                       "Upstream failures by kind", ["kind"], registry=r)
        self.mismatched = Counter("skyguard_dns_upstream_mismatched",
                                  "Upstream replies discarded (wrong id, source or question)",
                                  registry=r)
        self.learn_failures = Counter("skyguard_dns_learn_failures",
                                      "Answers withheld because the datapath refused", registry=r)
        self.dropped = Counter("skyguard_dns_dropped", "Queries dropped unanswered by reason",
                               ["reason"], registry=r)
        latency_buckets = (.0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5)
        self.latency = _HotFamily("skyguard_dns_latency_seconds", "Query to answer time",
                                  ("verdict",), lambda: _HistogramChild(latency_buckets))
        learn_buckets = (.0001, .00025, .0005, .001, .0025, .005, .01, .05, .1)
        self._learn_latency = _HotFamily("skyguard_dns_learn_seconds",
                                         "Upstream answer to datapath entry", (),
                                         lambda: _HistogramChild(learn_buckets))
        self.learn_latency = self._learn_latency.labels()  # no labels: the one child observes
        r.register(_HotCollector([self.queries, self.learned_ips],
                                 [self.latency, self._learn_latency]))
