"""The fleet agent: one host's membership in a fleet of skyguard hosts sharing a store (etcd).

It runs on the daemon's event loop as a part (start / stop / set_policy, skyguard/parts.py) and
does three things, each a task that survives the store going away:
- membership: a lease, and under it `members/<name>`: this host's status (policy hash, revision
  and its signed note, the last policies refused, log size and root, heartbeat, programs
  attached, store health, cosignatures given, received and held, alerts) and its keys (log
  verifier key, witness key), refreshed every period, and soon after a policy is applied or
  refused (a push waits on it); what a push and `fleet status` rely on of it (revision, hash,
  refusals, heartbeat) signed with its log key (report.py);
- policy (follower.py): list `policy`, then watch it; apply what an admin signed for this host,
  newer than what runs, through the daemon's hot swap; report what it refuses;
- witnessing: publish this log's latest checkpoint with consistency proofs from the sizes each
  peer last cosigned (its cosignatures in the store, and the size its member record says it
  holds: a witness stopped before its cosignature reached the store needs a proof from that
  one); cosign every peer's checkpoint through the durable Witness (skyguard/tlog/cosign.py),
  and put its cosignature back when deleted from the store; collect peers' cosignatures of this
  log into the state dir, where `skyguard log verify --witnesses N` finds them; and count the
  members (pinned here, and itself) whose signed record says they refuse the newest revision
  (standing.py), a gauge.

Fail closed and keep enforcing: when the store is unreachable nothing changes locally; the agent
logs `fleet_store_lost` once, reports it (metric, status) and retries. A refused policy or a peer
that presents a rewritten log is a log entry, a metric and an alert key in the store; never an
exception that stops the agent.

Not here: the store protocol (etcd.py), signatures (signing.py, tlog/cosign.py), the split-view
check against other witnesses' cosignatures (witnessing.py), the checkpoint this host publishes
(publisher.py), the peers' keys pinned (peers.py): a member no operator pinned here is not
witnessed, and its cosignatures count for nothing (unless first-sight pinning is on).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from skyguard.errors import SkyguardError
from skyguard.fleet import keys
from skyguard.fleet.alerts import AlertBook, alert_value, clear_requests, republish_alerts
from skyguard.fleet.follower import PolicyFollower
from skyguard.fleet.peers import PeerPins, by_operator, fingerprint
from skyguard.fleet.publisher import CheckpointPublisher
from skyguard.fleet.report import sign_member
from skyguard.fleet.seen import SeenCosignatures
from skyguard.fleet.signing import check_member_name
from skyguard.fleet.standing import Newest, host_keys, refusing_newest
from skyguard.fleet.store import FleetError, Store, StoreUnavailable, load_value
from skyguard.fleet.witnessing import origin_rival, peer_keys, proofs_attested, unproven_witnesses
from skyguard.timeouts import within
from skyguard.tlog.checkpoint import Checkpoint, Verifier, parse_and_verify
from skyguard.tlog.cosign import (
    COSIGNED_DIR,
    Cosigner,
    CosignerVerifier,
    Stale,
    Tamper,
    Unproven,
    Witness,
    load_or_create_witness_key,
    remove_cosigned,
    write_cosigned,
)
from skyguard.tlog.errors import BadLogInput, VerificationError

log = logging.getLogger("skyguard.fleet")

# Heartbeat, checkpoint publication and cosigning round (SKYGUARD_FLEET_PERIOD: tests, benches).
PERIOD_S = float(os.environ.get("SKYGUARD_FLEET_PERIOD", "2.0"))
LEASE_TTL_S = 10       # a host silent this long drops out of `members/`
FLEET_DIR = "fleet"    # under the state dir: applied policy, witness state, cosignatures, peers


async def run_forever(make: Callable[[], Awaitable[None]], label: str, pause: float,
                      failed: Callable[[str, BaseException], None]) -> None:
    """Run the coroutine `make()` gives; when it raises, report it and start it again after
    `pause` (the fleet's period). A task that ended for good on one bad record from the store
    would leave the host heartbeating "ok" with its policy watch or witnessing dead."""
    while True:
        try:
            await make()
            return
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug or a record nobody foresaw: logged, reported, restarted
            log.exception("fleet %s task failed; restarting it in %.0fs", label, pause)
            failed(label, error)
        await asyncio.sleep(pause)


class FleetAgent:
    """One host in the fleet. `apply(text, source) -> policy sha256` hot-swaps a policy (blocking:
    run in a worker thread); `local_status() -> dict` gives {policy: {name, sha256},
    programs: n}; `record(kind, **fields)` writes to the signed log (must not block)."""

    def __init__(self, store: Store, name: str, state_dir: Path, admins: list[Verifier],
                 apply: Callable[[str, str], str], local_status: Callable[[], dict],
                 record: Callable[..., None], registry=None, period: float = PERIOD_S,
                 log_dir: Path | None = None, head_note: Callable[[], str | None] | None = None,
                 max_peer_labels: int | None = None, trust_first_use: bool = False, max_alerts: int | None = None,
                 max_first_sight_pins: int | None = None):
        from skyguard.fleet.metrics import MAX_PEER_LABELS, FleetMetrics
        from skyguard.tlog.hostkey import host_signer

        self.store, self.name, self.admins = store, name, admins
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / FLEET_DIR
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.apply_hook, self.local_status, self.record = apply, local_status, record
        self.period = period
        self.log_dir = Path(log_dir or self.state_dir / "log")
        self.log_signer = host_signer(self.state_dir)   # signs the proofs it publishes (witnessing.py)
        self.log_vkey = self.log_signer.verifier.vkey()
        self.publisher = CheckpointPublisher(self.log_dir, self.log_signer, head_note)
        self.metrics = FleetMetrics(registry, max_peer_labels or MAX_PEER_LABELS, known=lambda p: p in self.pins.all())
        self.pins = PeerPins(self.state_dir, trust_first_use, max_first_sight_pins, self.metrics.pins_dropped.inc,
                             lambda peer, pin: self._forget(peer, pin["origin"]))
        self.cosigner = Cosigner(f"{name}.skyguard/witness", load_or_create_witness_key(self.state_dir))
        self.witness = Witness(self.dir / "witness", self.cosigner)
        self.members: set[str] = set()          # the store's members (not this host) last round
        self.report_soon = asyncio.Event()      # set: publish the member record now, not at the period's end
        self.follower = PolicyFollower(store, name, self.dir, admins, apply, local_status, record, self.metrics,
                                       period, self._store_state, self.report_soon.set)
        self.store_ok: bool | None = None
        self.lease = 0
        self.given = 0
        self.received: dict[str, int] = {}      # witness name -> largest size it cosigned here
        self.held: dict[str, int] = {}          # peer -> the size of its log this witness last cosigned
        # peer -> the first refusal, as published; kept in the state dir with the clearings known
        self.book = AlertBook(self.state_dir, name, lambda peer: by_operator(self.pins.all().get(peer)),
                              self.metrics.alerts_dropped.inc, max_alerts)
        for peer in self.book.records:
            self.metrics.set_alert(peer, True)
        self.stale: dict[str, str] = {}         # peer -> why its checkpoint shown now is stale
        self.fresh: dict[str, float] = {}       # peer -> when it last showed a checkpoint not stale
        self._given: dict[str, bytes] = {}      # peer -> this witness's cosignature as last put in the store
        self.seen = SeenCosignatures(self.state_dir, self.metrics.vanished.inc)
        self.unverified: dict[str, list] = {}   # peer -> other witnesses not proven consistent
        self._tasks: list[asyncio.Task] = []

    @property
    def refused(self) -> dict[str, str]:
        """reason -> the last policy refused for it (follower.py)."""
        return self.follower.refused

    @property
    def alerts(self) -> dict[str, str]:
        """peer -> the refusal this host holds against it, as reported."""
        return {peer: f"{peer}: {a.get('problem')}" for peer, a in self.book.records.items()}

    # ---- lifecycle (skyguard/parts.py) ------------------------------------------------------

    async def start(self) -> None:
        for make, label in ((self._membership, "members"), (self.follower.run, "policy"),
                            (self._witnessing, "witness")):
            self._tasks.append(asyncio.create_task(run_forever(make, label, self.period, self._task_failed),
                                                   name=f"fleet-{label}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:   # the daemon's shutdown must not wait on a stuck task
            _, stuck = await asyncio.wait(self._tasks, timeout=5)
            if stuck:
                log.warning("fleet tasks still running at stop: %s", ", ".join(t.get_name() for t in stuck))
        self._tasks.clear()
        if self.lease:
            try:
                await within(self.store.revoke(self.lease), 2)
            except (TimeoutError, FleetError):
                pass   # the lease expires by itself
        await self.store.close()

    async def set_policy(self, policy) -> None:
        """A policy loaded locally (`skyguard policy load`): reported as is; the fleet's revision
        stays what it was, so the next pushed revision replaces it."""

    def _task_failed(self, label: str, error: BaseException) -> None:
        self.record("fleet_task_failed", member=self.name, task=label, problem=f"{type(error).__name__}: {error}"[:300])

    # ---- store health -----------------------------------------------------------------------

    def _store_state(self, ok: bool, problem: str = "") -> None:
        if ok == self.store_ok:
            return
        if ok:
            if self.store_ok is False:
                self.record("fleet_store_back", member=self.name)
            log.info("fleet store reachable")
        else:
            self.record("fleet_store_lost", member=self.name, problem=problem[:300])
            log.warning("fleet store unreachable (%s); enforcing what this host has", problem)
        self.store_ok = ok
        self.metrics.store_up.set(1 if ok else 0)

    # ---- membership -------------------------------------------------------------------------

    def status(self) -> dict:
        local = self.local_status() or {}
        head = self.publisher.head()
        now, policy = time.time(), self.follower.report(local)
        return {"name": self.name, "origin": head.get("origin"), "log_vkey": self.log_vkey,
                "witness_vkey": self.cosigner.verifier.vkey(), "heartbeat": now, "policy": policy,
                "signed": sign_member(self.log_signer, self.name, policy, now),   # what a push counts (report.py)
                "log": {"size": head.get("size"), "root": head.get("root")},
                "programs": local.get("programs"), "store": "ok" if self.store_ok else "unreachable",
                "cosignatures": {"given": self.given, "received": dict(self.received), "held": dict(self.held)},
                "alerts": sorted(self.alerts.values())[-20:], "refused": dict(self.refused),
                **dict(zip(("alert_notes", "cleared_notes"), self.book.notes(self.log_signer))),
                "stale": dict(sorted(self.stale.items())[:20]),
                "unverified": {peer: w for peer, w in sorted(self.unverified.items()) if w}}

    async def _membership(self) -> None:
        while True:
            self.report_soon.clear()   # what it asks for is in this report
            try:
                if not self.lease or not await self.store.keep_alive(self.lease):
                    self.lease = await self.store.grant_lease(LEASE_TTL_S)
                status = await asyncio.to_thread(self.status)
                status["store"] = "ok"
                await self.store.put(keys.member(self.name), json.dumps(status).encode(), lease=self.lease)
                self._store_state(True)
            except StoreUnavailable as e:
                self._store_state(False, str(e))
            except FleetError as e:
                log.warning("fleet membership: %s", e)
                self.lease = 0
            except SkyguardError as e:   # the daemon did not answer for its status: try again
                log.warning("fleet membership: %s", e)
            await self._next_report()

    async def _next_report(self) -> None:
        """Until the period is over, or sooner once a policy was applied or refused (a push waits
        for the hosts' reports); never within a quarter period of the last report, so that
        records written to the store one after another make no storm of reports."""
        await asyncio.sleep(self.period / 4)
        try:
            async with asyncio.timeout(self.period * 3 / 4):
                await self.report_soon.wait()
        except TimeoutError:
            if asyncio.current_task().cancelling():   # a stop that raced the timer
                raise asyncio.CancelledError from None

    # ---- witnessing -------------------------------------------------------------------------

    async def _witnessing(self) -> None:
        while True:
            try:
                await self._witness_round()
            except StoreUnavailable as e:
                self._store_state(False, str(e))
            except SkyguardError as e:
                log.warning("fleet witnessing: %s", e)
            await asyncio.sleep(self.period)

    async def _witness_round(self) -> None:
        # 1. Cosignatures of this log: verified, kept for `log verify --witnesses`.
        cosignatures: dict[str, list] = {}   # log name -> its cosignatures, listed once a round
        for item in (await self.store.get_prefix(keys.COSIGNATURES))[0]:
            cosignatures.setdefault(item.key[len(keys.COSIGNATURES):].partition("/")[0], []).append(item)
        items = cosignatures.get(self.name, [])
        members, _ = await self.store.get_prefix(keys.MEMBERS)
        peers, records = {}, {}
        for item in members:
            try:
                record = load_value(item.value)
                peer = check_member_name(record["name"])
            except (ValueError, KeyError, TypeError, SkyguardError):
                continue
            if item.key == keys.member(peer):
                records[peer] = record
                if peer != self.name:
                    peers[peer] = record
        sizes = set(self.received.values())   # a witness's size offered a proof even if deleted from the store
        for peer, record in peers.items():   # and one whose cosignature never reached it (stopped first)
            held = _field(_field(record, "cosignatures"), "held").get(self.name)
            if peer in self.pins.all() and type(held) is int and held > 0:
                sizes.add(held)
        for item in items:
            witness_name = item.key.rsplit("/", 1)[-1]
            # The key pinned here (first sight: once its checkpoint is seen), not what the store says today.
            record = self.pins.all().get(witness_name)
            if not record:
                continue
            try:
                cosigned = load_value(item.value)["note"]
                checkpoint, _ = CosignerVerifier.from_vkey(record["witness_vkey"]).verify(cosigned)
                parse_and_verify(cosigned, Verifier.from_vkey(self.log_vkey))
            except (ValueError, KeyError, TypeError, BadLogInput, VerificationError):
                continue
            sizes.add(checkpoint.size)
            if checkpoint.size >= self.received.get(witness_name, -1):
                if checkpoint.size != self.received.get(witness_name):
                    await asyncio.to_thread(write_cosigned, self.state_dir / COSIGNED_DIR,
                                            witness_name, cosigned)
                self.received[witness_name] = checkpoint.size
        self.metrics.received.set(len(self.received))
        # 2. This log's checkpoint, with proofs for the witnesses; again when whoever writes the
        # store replaced it (an old one put back would leave the witnesses nothing to cosign).
        checkpoints = {item.key: item for item in (await self.store.get_prefix(keys.CHECKPOINTS))[0]}
        stored = checkpoints.get(keys.checkpoint(self.name))
        published = self.publisher.published
        if published is not None and (stored is None or stored.value != published[2]):
            log.warning("fleet: this host's published checkpoint was replaced or deleted in the store; "
                        "publishing it again")
            self.publisher.forget()
        mine = await asyncio.to_thread(self.publisher.value, sizes)
        if mine is not None:
            try:
                await self.store.put(keys.checkpoint(self.name), mine)
            except FleetError:
                self.publisher.forget()   # publish it again next round
                raise
        # 3. This host's alerts: those an operator cleared dropped, the others in the store again
        # if whoever writes it deleted one.
        for peer, request in await asyncio.to_thread(clear_requests, self.state_dir):
            await self._clear_alert(peer)
            request.unlink(missing_ok=True)
        await republish_alerts(self.store, self.name, self.book.records, self.log_signer)
        learnt = [self.book.learn(peer, record.get("cleared_notes"), pin.get("log_vkey"))
                  for peer, record in peers.items() if (pin := self.pins.all().get(peer)) and by_operator(pin)]
        if any(learnt):   # clearings pinned peers signed: kept, whatever the store holds later
            await asyncio.to_thread(self.book.keep)
        # 4. Cosign each peer's checkpoint (those pinned here: metrics.round counts the others).
        self.members = set(peers)
        for peer, record in sorted(peers.items()):
            await self._cosign_peer(peer, record, checkpoints.get(keys.checkpoint(peer)),
                                    cosignatures.get(peer, []),
                                    origin_rival(peer, record, peers, self.pins.all(), self.publisher.head().get("origin")))
        now = time.time()
        self.metrics.round(peers)
        self._count_refusing(records, now)
        for peer, seen in self.fresh.items():   # kept when a peer leaves: it resumes, not restarts
            if peer in peers:
                self.metrics.set_fresh_age(peer, round(now - seen, 1))
            elif self.metrics.forget(peer, peer in self.alerts):
                self.unverified.pop(peer, None)

    async def _cosign_peer(self, peer: str, record: dict, item, cosignatures: list,
                           rival: str | None = None) -> None:
        """Cosign the checkpoint `item` (the store's record under checkpoints/<peer>) if it
        extends what this witness cosigned of that log and what the others did (`cosignatures`:
        the store's records under cosignatures/<peer>/)."""
        if item is None or not (self.pins.first_sight or peer in self.pins.all()):
            return
        if not peer_keys(record):   # never pinned: peers.json holds only short printable text
            if peer in self.pins.all() and any(record.get(name) is not None for name in
                                              ("origin", "log_vkey", "witness_vkey")):
                await self._tamper(peer, None, f"peer {peer} now presents an origin or keys that "
                                               f"are not short printable text")
            return   # else not (yet) a log to witness: no checkpoint of its own so far
        try:
            if rival:
                raise Tamper(rival)   # before pinning: a contested origin binds no key here
            published = load_value(item.value)
            note = published["note"]
            proofs = published.get("proofs") or {}
            changed = self.pins.check(peer, record, self.members)
            if changed:
                raise Tamper(changed)
            if peer not in self.pins.all():
                return   # first sight past its cap: not pinned, not witnessed (nothing kept of it)
            verifier = Verifier.from_vkey(record["log_vkey"])
            checkpoint = parse_and_verify(note, verifier, origin=record["origin"])
            self.fresh.setdefault(peer, time.time())   # the age of a peer stale from the start
            last = self.witness.state(checkpoint.origin)
            if last is not None:
                self.held[peer] = last.size   # reported: the log offers a proof from it (_witness_round)
            if last is not None and last.log_vkey != record["log_vkey"] and by_operator(self.pins.all().get(peer)):
                self._forget(peer, last.origin, unpinned=False)   # an operator's rotation
                self.record("fleet_witness_restarted", peer=peer, origin=last.origin, old_size=last.size,
                            old_key=fingerprint(last.log_vkey), new_key=fingerprint(record["log_vkey"]))
                log.warning("fleet: %s's keys were pinned anew; its witness record starts again (the old key %s "
                            "had size %d cosigned)", peer, fingerprint(last.log_vkey), last.size)
                last = None   # its next checkpoint is cosigned as a first one
            self.witness.refuse_older(checkpoint, last)
            # Against a split view: what every other witness cosigned of this log (witnessing.py).
            attested = proofs_attested(published.get("proofs_note"), verifier, checkpoint, proofs)
            # Those seen before count too: whoever writes the store can delete one (seen.py).
            others = self.seen.merge(peer, cosignatures, self.pins.all(), self.name, verifier, checkpoint.origin)
            unproven = unproven_witnesses(others, self.pins.all(), self.name, verifier, checkpoint, proofs, attested)
            self._unproven(peer, unproven)
            again = last is not None and last.size == checkpoint.size and last.root == checkpoint.hash
            if again and self._kept(peer, cosignatures, checkpoint):
                self._fresh(peer)
                return   # already cosigned, and in the store (what it leaves unproven is reported)
            if unproven and not again:
                return   # cosigned only once proven consistent with what they cosigned
            proof = None
            if not again and last is not None and str(last.size) in proofs:
                proof = [base64.b64decode(h) for h in proofs[str(last.size)]]
            cosigned, checkpoint = await asyncio.to_thread(self.witness.cosign, note, record["log_vkey"], proof,
                                                           None, attested)
            self.held[peer] = checkpoint.size
        except Tamper as e:
            await self._tamper(peer, record.get("origin"), str(e))
            return
        except Stale as e:
            self._stale(peer, str(e))
            return
        except Unproven:   # a proof changed on the way: this witness's own cosignature unproven
            self._unproven(peer, [self.name])
            return
        except (ValueError, KeyError, TypeError, BadLogInput, VerificationError) as e:
            log.debug("not cosigning %s yet: %s", peer, e)
            return
        self._fresh(peer)
        if again:   # as alerts are: whoever writes the store cannot erase what this witness vouched for
            log.warning("fleet: this host's cosignature of %s is gone or changed in the store; publishing it again", peer)
        value = json.dumps({"note": cosigned, "size": checkpoint.size}).encode()
        await self.store.put(keys.cosignature(peer, self.name), value)
        self._given[peer] = value
        if not again:
            self.given += 1
            self.metrics.given.inc()

    def _count_refusing(self, records: dict[str, dict], now: float) -> None:
        signed = self.follower.newest
        newest = Newest(signed.revision, signed.sha256, signed.hosts) if signed else None
        pinned = {peer: pin for peer, pin in self.pins.all().items() if by_operator(pin)}
        refusing = refusing_newest(records, newest, host_keys(pinned, self.log_signer.verifier), now)
        self.metrics.newest.set(newest.revision if newest else 0)
        self.metrics.refusing.set(len(refusing))

    def _forget(self, peer: str, origin: str, unpinned: bool = True) -> None:
        """Drop what this witness kept of `peer`: its first-sight pin dropped (peers.py: its member
        gone), so members made up one after another leave nothing behind; or (not `unpinned`) its
        keys pinned anew by an operator, a rotation: its record starts again, its pin stays."""
        if not unpinned or not any(other.get("origin") == origin for other in self.pins.all().values()):
            self.witness.forget(origin)
        self.seen.forget(peer)
        for kept in (self._given, self.stale, self.unverified, self.held,
                     *((self.received, self.fresh) if unpinned else ())):
            kept.pop(peer, None)
        if unpinned:
            remove_cosigned(self.state_dir / COSIGNED_DIR, peer)
            self.metrics.forget(peer, peer in self.alerts)

    def _kept(self, peer: str, cosignatures: list, checkpoint: Checkpoint) -> bool:
        """Whether the store (`cosignatures`: its records of `peer`'s log) holds this witness's
        cosignature of `checkpoint`, the one it last cosigned."""
        stored = next((i.value for i in cosignatures if i.key == keys.cosignature(peer, self.name)), None)
        if stored is None or stored == self._given.get(peer):
            return stored is not None
        try:
            cosigned, _ = self.cosigner.verifier.verify(load_value(stored)["note"])
        except (ValueError, KeyError, TypeError, BadLogInput, VerificationError):
            return False
        if (cosigned.size, cosigned.hash) != (checkpoint.size, checkpoint.hash):
            return False
        self._given[peer] = stored
        return True

    def _unproven(self, peer: str, witnesses: list[str]) -> None:
        """Other witnesses' cosignatures of `peer`'s log not proven consistent with the checkpoint
        shown here: nothing is cosigned meanwhile; logged when it changes, and a gauge."""
        if self.unverified.get(peer, []) != witnesses:
            if witnesses:
                log.warning("fleet: %s's checkpoint is not proven consistent with what %s cosigned; "
                            "not cosigning it until the log shows a proof", peer, ", ".join(witnesses))
            self.unverified[peer] = witnesses
        self.metrics.set_unverified(peer, len(witnesses))

    def _fresh(self, peer: str) -> None:
        self.fresh[peer] = time.time()
        if self.stale.pop(peer, None) is not None:
            log.info("fleet: %s presents a current checkpoint again", peer)

    def _stale(self, peer: str, problem: str) -> None:
        """An old checkpoint of a peer (replayed in the store, or a log cut that has not signed
        past the cut yet): not cosigned, no alert. Counted and logged once per checkpoint shown;
        skyguard_fleet_peer_checkpoint_age_seconds shows an operator how long it lasts."""
        if self.stale.get(peer) == problem:
            return
        self.stale[peer] = problem
        self.metrics.count_stale(peer)
        log.warning("fleet: not cosigning %s: %s", peer, problem)

    async def _clear_alert(self, peer: str) -> None:
        if peer not in self.book.records:
            log.warning("fleet: asked to clear an alert on %s, but this host has none", peer)
            return
        await self.store.delete(keys.alert(peer, self.name))   # FleetError: the request stays
        alert = self.book.clear(peer) or {}
        self.metrics.set_alert(peer, False)
        self.record("fleet_alert_cleared", peer=peer, problem=str(alert.get("problem"))[:500])
        log.warning("fleet: the alert on %s was cleared by an operator", peer)
        await asyncio.to_thread(self.book.keep)

    async def _tamper(self, peer: str, origin: str | None, problem: str) -> None:
        """Once per peer: every later checkpoint of a rewritten log is refused the same way
        (the witness state never moves), and one alert says so."""
        if peer in self.book.records or peer in self.book.evicted:
            log.debug("still refusing %s: %s", peer, problem)
            return
        alert = {"witness": self.name, "peer": peer, "origin": origin, "problem": problem, "time": time.time()}
        dropped = self.book.add(peer, alert)   # over the limit: the oldest (on unpinned peers first) go
        self.metrics.count_tamper(peer)
        self.metrics.set_alert(peer, True)
        for gone in dropped:
            self.metrics.set_alert(gone, False)
        self.record("tamper", source="fleet_witness", peer=peer, origin=origin or "", problem=problem[:500],
                    action="cosignature refused")
        log.error("fleet: refusing to cosign %s: %s", peer, problem)
        try:   # kept here (a restart, a deleted key in the store) beside the signed log entry
            await asyncio.to_thread(self.book.keep)
        except OSError as e:
            log.error("fleet: cannot keep the alert on %s in the state dir: %s", peer, e)
        try:
            for gone in dropped:
                await self.store.delete(keys.alert(gone, self.name))
            if peer not in dropped:
                await self.store.put(keys.alert(peer, self.name), alert_value(self.log_signer, alert))
        except FleetError:
            pass   # recorded locally; the store gets it at the next witness round


def _field(record: dict, name: str) -> dict:
    """record[name] when it is an object, else {}: a peer's record holds what whoever writes the
    store put there."""
    value = record.get(name) if isinstance(record, dict) else None
    return value if isinstance(value, dict) else {}
