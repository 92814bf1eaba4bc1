"""The seams between the credential proxy and the rest of skyguard: where secrets come from,
where decisions are recorded, and the Prometheus counters.

Not the store (skyguard/custody/store.py) nor the signed log (skyguard/tlog/): the proxy codes
against the two protocols below, and tests plug in the small in-memory versions defined here.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter

from skyguard import parts
from skyguard.content.record import ContentMetrics
from skyguard.errors import CredentialError

# Metric results: the only values the `result` label takes (bounded cardinality).
SWAPPED = "swapped"
PASSED = "passed"
BLOCKED_EXFILTRATION = "blocked_exfiltration"
BLOCKED_CONTENT = "blocked_content"
BLOCKED_PROTOCOL = "blocked_protocol"  # malformed, smuggling, upgrades: not tied to a credential
LOG_REFUSED = "log_refused"  # not forwarded: the signed log refused its entry (disk full or stalled)
RESULTS = (SWAPPED, PASSED, BLOCKED_EXFILTRATION, BLOCKED_CONTENT, BLOCKED_PROTOCOL, LOG_REFUSED)
NO_CREDENTIAL = "-"  # credential label when a decision concerns no credential


@runtime_checkable
class SecretSource(Protocol):
    """Anything that returns a secret's bytes by name (the sealed store implements it).

    Must raise (any exception; CredentialError preferred) when the name is unknown; the proxy
    then fails closed for that credential."""

    def get(self, name: str) -> bytes: ...


# Receives one record(kind, **fields) per swap, block and termination (kinds "credential",
# "tls_termination", "content_blocked"). Fields never hold a secret value.
DecisionLog = parts.DecisionLog


class MemorySecretSource:
    """A dict-backed SecretSource for tests, the benchmark and the demo. Its repr shows names only."""

    def __init__(self, secrets: dict[str, bytes] | None = None):
        self._secrets = dict(secrets or {})

    def get(self, name: str) -> bytes:
        try:
            return self._secrets[name]
        except KeyError:
            raise CredentialError(
                f"secret {name!r} is not in the store; add it with `skyguard secret set {name}`"
            ) from None

    def set(self, name: str, value: bytes) -> None:
        self._secrets[name] = value

    def __repr__(self) -> str:
        return f"MemorySecretSource(names={sorted(self._secrets)})"


class CredentialMetrics:
    """skyguard_credential_* counters, registered in the registry the daemon passes in."""

    def __init__(self, registry: CollectorRegistry | None = None):
        registry = registry if registry is not None else CollectorRegistry()
        self.registry = registry
        self.swaps = Counter(
            "skyguard_credential_swaps",
            "Requests seen by the credential proxy, by credential and result.",
            ["credential", "result"],
            registry=registry,
        )
        self.terminations = Counter(
            "skyguard_tls_terminations",
            "TLS connections terminated for a workload's service, by workload and result.",
            ["workload", "result"],
            registry=registry,
        )
        # skyguard_content_decisions: counted by the content filter of every proxy on this registry.
        self.content = ContentMetrics(registry)
        # (credential, result) -> its child counter: labels() costs more than the count itself,
        # once per request. Bounded: credentials come from policies, results from a fixed set.
        self._swap_children: dict[tuple[str, str], Counter] = {}

    def count(self, credential: str | None, result: str) -> None:
        key = (credential or NO_CREDENTIAL, result)
        child = self._swap_children.get(key)
        if child is None:
            child = self._swap_children[key] = self.swaps.labels(*key)
        child.inc()
