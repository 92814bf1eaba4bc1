"""The fleet agent's Prometheus metrics (labels: refusal reason, peer member name; never an
address).

Per-peer series are bounded: anyone who can write the store can add members, each of which would
otherwise get its own series on every host (memory, and every scrape). A peer gets them only once
pinned here (its keys taken at first sight), and only while fewer than `max_peers` have them; the
others are counted (skyguard_fleet_peers_unlabelled now, skyguard_fleet_peer_labels_refused_total
ever) and logged at most once a minute; their tamper and stale events count under the one label
value UNLABELLED, which no member name can take, and so do the alerts this host holds on them.

Members of the store whose keys no operator pinned here (peers.py) are not witnessed: counted
(skyguard_fleet_peers_unpinned now, skyguard_fleet_unpinned_members_total ever) and named in a log
line at most once a minute.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge

log = logging.getLogger("skyguard.fleet")

# Peers given per-peer series (SKYGUARD_FLEET_MAX_PEER_LABELS): a fleet larger than this shows its
# other peers only in the counts of UNLABELLED; each peer costs five series.
MAX_PEER_LABELS = int(os.environ.get("SKYGUARD_FLEET_MAX_PEER_LABELS", "256"))
UNLABELLED = "_unlabelled"   # member names start with a letter or digit (signing.check_member_name)
REFUSED_LOG_S = 60.0


class FleetMetrics:
    """`known(peer)`: whether the peer's keys are pinned here (only those are labelled)."""

    def __init__(self, registry=None, max_peers: int = MAX_PEER_LABELS,
                 known: Callable[[str], bool] = lambda peer: True):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        registry = registry if registry is not None else CollectorRegistry()
        self.max_peers, self.known = max_peers, known
        self.labelled: set[str] = set()
        self._refused: set[str] = set()        # peers of the last round refused series
        self._alerted: set[str] = set()        # unlabelled peers this host holds an alert on
        self._logged = -REFUSED_LOG_S
        self._unpinned: set[str] = set()       # members of the last round not pinned here
        self._unpinned_logged = -REFUSED_LOG_S
        self.store_up = Gauge("skyguard_fleet_store_up", "1 while the fleet store (etcd) answers",
                              registry=registry)
        self.revision = Gauge("skyguard_fleet_policy_revision", "Revision of the fleet policy applied",
                              registry=registry)
        self.newest = Gauge("skyguard_fleet_policy_newest_revision", "Newest fleet policy revision an admin key "
                            "signed that this host saw in the store (applied or refused)", registry=registry)
        self.refusing = Gauge("skyguard_fleet_hosts_refusing_newest_policy", "Fleet members (this host, and those "
                              "whose host key an operator pinned here) whose signed member record says they refused "
                              "the newest policy revision (`skyguard fleet status` names them, with why)",
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
                           "alert on (kept in the state dir: across restarts, whatever the store holds); "
                           f"peer=\"{UNLABELLED}\": how many on peers without series", ["peer"], registry=registry)
        self.vanished = Counter("skyguard_fleet_cosignatures_vanished", "Other witnesses' cosignatures this "
                                "host saw that are gone from the store (or older there): still held against "
                                "what the log shows", registry=registry)
        self.unlabelled = Gauge("skyguard_fleet_peers_unlabelled", "Peers in the store given no per-peer "
                                "series: not pinned here, or over the cap (SKYGUARD_FLEET_MAX_PEER_LABELS)",
                                registry=registry)
        self.labels_refused = Counter("skyguard_fleet_peer_labels_refused", "Peers refused per-peer series "
                                      "(each counted when it appears)", registry=registry)
        self.unpinned = Gauge("skyguard_fleet_peers_unpinned", "Members in the store whose keys are not pinned "
                              "here (`skyguard fleet trust`): not witnessed, their cosignatures and alerts "
                              "count for nothing", registry=registry)
        self.unpinned_seen = Counter("skyguard_fleet_unpinned_members", "Members not pinned here seen in the "
                                     "store (each counted when it appears)", registry=registry)
        self.alerts_dropped = Counter("skyguard_fleet_alerts_dropped", "Alerts this host dropped over its cap "
                                      "(SKYGUARD_FLEET_MAX_ALERTS; those on unpinned peers first): still in the "
                                      "signed log", registry=registry)
        self.pins_dropped = Counter("skyguard_fleet_first_sight_pins_dropped", "First-sight pins dropped or "
                                    "refused over their cap (SKYGUARD_FLEET_MAX_FIRST_SIGHT_PINS)", registry=registry)

    def label(self, peer: str) -> str | None:
        """The peer's own label value, if it has (or may now take) series; else None."""
        if peer in self.labelled:
            return peer
        if len(self.labelled) < self.max_peers and self.known(peer):
            self.labelled.add(peer)
            return peer
        return None

    def round(self, peers: Iterable[str]) -> None:
        """Once per witness round, with the store's current peers: each pinned one takes series
        while there is room; the others are counted and logged."""
        peers = sorted(peers)
        unpinned = self._unpinned = _counted({peer for peer in peers if not self.known(peer)}, self._unpinned,
                                             self.unpinned_seen, self.unpinned)
        if unpinned and time.monotonic() - self._unpinned_logged >= REFUSED_LOG_S:
            self._unpinned_logged = time.monotonic()
            log.warning("fleet: %d members in the store are not pinned here, so not witnessed and their "
                        "cosignatures and alerts count for nothing (`skyguard fleet trust` pins one): %s",
                        len(unpinned), ", ".join(sorted(unpinned)[:5]) + (", ..." if len(unpinned) > 5 else ""))
        refused = self._refused = _counted({peer for peer in peers if self.label(peer) is None}, self._refused,
                                           self.labels_refused, self.unlabelled)
        if refused and time.monotonic() - self._logged >= REFUSED_LOG_S:
            self._logged = time.monotonic()
            log.warning("fleet: %d peers get no metric series of their own (not pinned here, or over "
                        "the %d allowed: SKYGUARD_FLEET_MAX_PEER_LABELS); they count under peer=%s",
                        len(refused), self.max_peers, UNLABELLED)

    def count_tamper(self, peer: str) -> None:
        self.tamper.labels(peer=self.label(peer) or UNLABELLED).inc()

    def count_stale(self, peer: str) -> None:
        self.stale.labels(peer=self.label(peer) or UNLABELLED).inc()

    def set_fresh_age(self, peer: str, seconds: float) -> None:
        if self.label(peer):
            self.fresh_age.labels(peer=peer).set(seconds)

    def set_unverified(self, peer: str, witnesses: int) -> None:
        if self.label(peer):
            self.unverified.labels(peer=peer).set(witnesses)

    def set_alert(self, peer: str, raised: bool) -> None:
        if self.label(peer):
            self.alert.labels(peer=peer).set(1 if raised else 0)
            return
        (self._alerted.add if raised else self._alerted.discard)(peer)
        self.alert.labels(peer=UNLABELLED).set(len(self._alerted))

    def forget(self, peer: str, alerted: bool) -> bool:
        """A peer that left the fleet: its gauges go (True if it had them), and unless this host
        holds an alert on it, its counters and its place among the labelled peers too (a fleet
        that replaces its hosts does not fill the cap with hosts long gone)."""
        had = False
        for gauge in (self.fresh_age, self.unverified):
            try:
                gauge.remove(peer)
                had = True
            except KeyError:
                pass
        if not alerted and peer in self.labelled:
            for series in (self.tamper, self.stale, self.alert):
                try:
                    series.remove(peer)
                except KeyError:
                    pass
            self.labelled.discard(peer)
        return had


def _counted(now: set, before: set, appeared: Counter, gauge: Gauge) -> set:
    """`now`, after counting those not in `before` (each once, when it appears) and setting
    `gauge` to how many there are."""
    appeared.inc(len(now - before))
    gauge.set(len(now))
    return now
