"""The fleet agent's Prometheus metrics (labels: refusal reason, peer member name; both bounded
by the fleet, never an address)."""

from __future__ import annotations


class FleetMetrics:
    def __init__(self, registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        registry = registry if registry is not None else CollectorRegistry()
        self.store_up = Gauge("skyguard_fleet_store_up", "1 while the fleet store (etcd) answers",
                              registry=registry)
        self.revision = Gauge("skyguard_fleet_policy_revision", "Revision of the fleet policy applied",
                              registry=registry)
        self.refused = Counter("skyguard_fleet_policy_refused", "Pushed policies refused, by reason",
                               ["reason"], registry=registry)
        self.given = Counter("skyguard_fleet_cosignatures_given", "Peer checkpoints this host cosigned",
                             registry=registry)
        self.received = Gauge("skyguard_fleet_witnesses", "Peers that cosigned this host's log",
                              registry=registry)
        self.tamper = Counter("skyguard_fleet_witness_tamper", "Peer checkpoints refused as "
                              "rewritten or forked history (a tamper event)", ["peer"], registry=registry)
        self.stale = Counter("skyguard_fleet_witness_stale", "Peer checkpoints refused as older than "
                             "the one already cosigned (a replayed checkpoint, no tamper event)", ["peer"],
                             registry=registry)
        self.fresh_age = Gauge("skyguard_fleet_peer_checkpoint_age_seconds", "Seconds since the peer last "
                               "presented a checkpoint this host cosigned or had cosigned (grows while "
                               "it presents only stale ones)", ["peer"], registry=registry)
        self.unverified = Gauge("skyguard_fleet_witness_unverified", "Other witnesses' cosignatures of "
                                "the peer's log not proven consistent with its checkpoint shown here "
                                "(nothing cosigned meanwhile)", ["peer"], registry=registry)
        self.alert = Gauge("skyguard_fleet_witness_alert", "1 for each peer this host raised a tamper "
                           "alert on (kept in the state dir: across restarts, whatever the store holds)",
                           ["peer"], registry=registry)

    def forget(self, peer: str) -> bool:
        """A peer that left the fleet: its per-peer gauges go (True if it had them); the counters
        and the alert gauge stay."""
        try:
            self.fresh_age.remove(peer)
        except KeyError:
            return False
        try:
            self.unverified.remove(peer)
        except KeyError:
            pass
        return True
