"""What a content decision leaves behind: one decision-log entry per block (`content_blocked`)
and the Prometheus counter skyguard_content_decisions_total (SFTP at the access proxy:
skyguard_admin_sftp_content_decisions_total) by zone, rule, protocol and verdict; beside it the
gauge skyguard_content_clamd_unusable (skyguard_admin_sftp_content_clamd_unusable), 1 while files
under clamav rules are refused because clamd is down or does not flag what it skips.

Entries carry who (zone, workload), what rule and engine, which protocol and destination, the
size and SHA-256 of the content: never the content, never a file name's bytes beyond a bound.
Labels are bounded: zones and rules come from the policy, verdicts and protocols are fixed words.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: `skyguard flows` (every CLI command) imports this module
    from collections.abc import Callable

    from prometheus_client import CollectorRegistry

    from skyguard.content.inspector import ContentEngine, ContentVerdict

KIND = "content_blocked"
MAX_LOGGED_NAME = 253


class ContentMetrics:
    """The counter and clamd gauge of one part that judges content. The credential proxy (HTTP)
    counts in skyguard_content_decisions_total; the SSH access proxy (SFTP) in its own family with
    the same labels, skyguard_admin_sftp_content_decisions_total (and its gauge likewise): each
    daemon part has its own registry, and one family exported twice is a duplicate in the scrape."""

    def __init__(self, registry: CollectorRegistry | None = None, name: str = "skyguard_content_decisions",
                 what: str = "Files judged by the content filter"):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        registry = registry if registry is not None else CollectorRegistry()
        self.decisions = Counter(
            name, f"{what}, by zone, rule (- when allowed), protocol and verdict.",
            ["zone", "rule", "protocol", "verdict"],
            registry=registry)
        self.clamd_unusable = Gauge(
            name.removesuffix("_decisions") + "_clamd_unusable",
            "1 while files under clamav rules are refused unscanned because clamd is down or does not "
            "flag what it skips past its limits (AlertExceedsMax); the part's status says which.",
            registry=registry)
        self._engine: Callable[[], ContentEngine | None] = lambda: None
        self.clamd_unusable.set_function(self._clamd_unusable)

    def follow(self, engine: Callable[[], ContentEngine | None]) -> None:
        """Read clamd's state from whatever `engine()` returns at scrape time (the part's
        current ContentEngine, replaced with each policy)."""
        self._engine = engine

    def _clamd_unusable(self) -> float:
        engine = self._engine()
        return 1.0 if engine is not None and engine.clamd is not None and engine.clamd.problem else 0.0

    def count(self, zone: str | None, protocol: str, verdict: ContentVerdict) -> None:
        self.decisions.labels(zone or "-", verdict.rule or "-", protocol,
                              "blocked" if verdict.blocked else "allowed").inc()


def record_block(decision_log, verdict: ContentVerdict, *, zone: str | None, workload: str | None, protocol: str,
                 direction: str, destination: str | None, **extra) -> None:
    """Writes a block's entry (kind content_blocked) to the decision log, for every protocol alike."""
    decision_log.record(KIND, zone=zone, workload=workload, rule=verdict.rule, engine=verdict.engine,
                        protocol=protocol, direction=direction,
                        destination=(destination or "-")[:MAX_LOGGED_NAME], size=verdict.size,
                        sha256=verdict.sha256, mime=verdict.mime, reason=verdict.reason, **extra)


# How far back `skyguard flows` looks in the signed log for blocks: the newest entries only, as
# the flow records it shows beside them are the newest few thousand (a full history is
# `skyguard log show --type content_blocked`).
RECENT_LOG_ENTRIES = 200_000


def blocks_in_log(log_dir, start: int | None = None) -> tuple[list[dict], int]:
    """The content_blocked entries of the signed log in `log_dir` from index `start` (default:
    the last RECENT_LOG_ENTRIES), oldest first, each with its log `index`; and the index to
    start from next time. Reads the log directory; writes nothing."""
    from skyguard.tlog import entries
    from skyguard.tlog.store import LogReader

    reader = LogReader(log_dir)
    size = reader.size
    first = max(0, size - RECENT_LOG_ENTRIES) if start is None else start
    marker = b'"' + KIND.encode() + b'"'
    found = []
    for index, payload in reader.entries(first):
        if index >= size:
            break
        if marker in payload:  # cheap test first: most entries are flows and DNS answers
            try:
                record = entries.decode(payload)
            except ValueError:
                continue
            if record.get("type") == KIND:
                found.append({**record, "index": index})
    return found, max(size, first)
