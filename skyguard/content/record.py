"""What a content decision leaves behind: one decision-log entry per block (`content_blocked`)
and the Prometheus counter skyguard_content_decisions_total by zone, rule and verdict.

Entries carry who (zone, workload), what rule and engine, which protocol and destination, the
size and SHA-256 of the content: never the content, never a file name's bytes beyond a bound.
Labels are bounded: zones and rules come from the policy, verdicts and protocols are fixed words.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from skyguard.content.inspector import ContentVerdict

KIND = "content_blocked"
MAX_LOGGED_NAME = 253


class ContentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.decisions = Counter(
            "skyguard_content_decisions",
            "Files judged by the content filter, by zone, rule (- when allowed), protocol and verdict.",
            ["zone", "rule", "protocol", "verdict"],
            registry=registry if registry is not None else CollectorRegistry())

    def count(self, zone: str | None, protocol: str, verdict: ContentVerdict) -> None:
        self.decisions.labels(zone or "-", verdict.rule or "-", protocol,
                              "blocked" if verdict.blocked else "allowed").inc()


def blocked_entry(verdict: ContentVerdict, *, zone: str | None, workload: str | None, protocol: str,
                  direction: str, destination: str | None, **extra) -> dict:
    """The decision-log entry of a block (its `event` field is the log entry's kind)."""
    return {"event": KIND, "zone": zone, "workload": workload, "rule": verdict.rule, "engine": verdict.engine,
            "protocol": protocol, "direction": direction,
            "destination": (destination or "-")[:MAX_LOGGED_NAME], "size": verdict.size,
            "sha256": verdict.sha256, "mime": verdict.mime, "reason": verdict.reason, **extra}
