"""Prometheus metrics of the DNS proxy, registered in a registry the daemon passes in.

Labels are bounded: zone, verdict, upstream index, part name. Never a domain name or an IP.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class DnsMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.queries = Counter("skyguard_dns_queries", "DNS queries by verdict",
                               ["zone", "verdict"], registry=r)
        self.learned_ips = Counter("skyguard_dns_learned_ips", "Addresses written to the datapath",
                                   ["zone"], registry=r)
        self.learned_evicted = Counter("skyguard_dns_learned_evicted",
                                       "Learned entries evicted because a VM reached its cap",
                                       ["zone"], registry=r)
        self.learned_dropped = Counter("skyguard_dns_learned_dropped",
                                       "Learned entries dropped because the policy no longer "
                                       "backs them", ["reason"], registry=r)
        self.rebinding = Counter("skyguard_dns_rebinding_records",
                                 "Answer records stripped as rebinding", ["zone"], registry=r)
        self.detections = Counter("skyguard_dns_tunnel_detections",
                                  "Tunnelling detections by action", ["zone", "action"], registry=r)
        self.upstream_errors = Counter("skyguard_dns_upstream_errors",
                                       "Upstream failures by kind", ["kind"], registry=r)
        self.mismatched = Counter("skyguard_dns_upstream_mismatched",
                                  "Upstream replies discarded (wrong id, source or question)",
                                  registry=r)
        self.refused_after_answer = Counter(
            "skyguard_dns_log_refused_after_answer", "Answers released before the signed log "
            "refused their entry (what only they opened is closed again)", ["zone"], registry=r)
        self.unlearned = Counter("skyguard_dns_unlearned_ips", "Addresses closed again: only answers "
                                 "whose entry the signed log refused after they left opened them",
                                 ["zone"], registry=r)
        self.learn_failures = Counter("skyguard_dns_learn_failures",
                                      "Answers withheld because the datapath refused", registry=r)
        self.cache_hits = Counter("skyguard_dns_cache_hits", "Queries answered from the "
                                  "VM's answer cache (not sent upstream)", registry=r)
        self.cache_misses = Counter("skyguard_dns_cache_misses", "Allowed queries the answer "
                                    "cache held no live answer for (sent upstream, or past the "
                                    "re-ask budget: skyguard_dns_reasks_over_budget)", registry=r)
        self.reasks_over_budget = Counter(
            "skyguard_dns_reasks_over_budget", "Queries past the VM's re-ask budget (block: "
            "answered from an expired cache entry, or refused without one)", ["zone", "action"],
            registry=r)
        self.dropped = Counter("skyguard_dns_dropped", "Queries dropped unanswered by reason",
                               ["reason"], registry=r)
        self.latency = Histogram("skyguard_dns_latency_seconds", "Query to answer time",
                                 ["verdict"], registry=r,
                                 buckets=(.0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.learn_latency = Histogram("skyguard_dns_learn_seconds",
                                       "Upstream answer to datapath entry", registry=r,
                                       buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .05, .1))
