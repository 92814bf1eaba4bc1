"""A host's side of signed policy distribution, the fleet agent's policy task (agent.py): list the
store's `policy` key, then watch it; each change is opened (signing.py) and, if signed by an admin
key, meant for this host and newer than what runs, applied through the daemon's hot swap. The last
applied policy (note and text) is kept in the state dir, so a restarted host goes back to it
before the store answers. Compaction, a lost member, a closed stream: re-list, then watch again.

A record refused (unsigned, foreign-signed, not newer than what runs, invalid here, or the swap
failed) is a log entry, a metric, and one of the last few refusals this host reports in its
member record (`report`): each with the revision and policy hash the record claims (read without
checking its signature), the reason, the problem (bounded) and when it was first refused. That is
how `fleet policy push` learns that a host refused what it pushed (rollout.py), and `fleet
status` which host refuses the newest revision (standing.py), as signed by this host's log key
with the rest of what it reports (report.py); a refusal is shown to an operator, never acted on.
The follower also keeps the newest revision an admin key signed that it saw in the store
(`newest`, whether applied or refused), against which the agent counts the hosts refusing it.

Not here: the store protocol (etcd.py), signatures and the apply decision (signing.py), the member
record and the other tasks (agent.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from skyguard import fsutil
from skyguard.errors import PolicyError, SkyguardError
from skyguard.fleet import keys
from skyguard.fleet.signing import PolicyRefused, SignedPolicy, claimed, decide, open_policy
from skyguard.fleet.store import Compacted, FleetError, Store, StoreUnavailable
from skyguard.tlog.checkpoint import Verifier

log = logging.getLogger("skyguard.fleet")

RESYNC_S = 30.0        # a watch is re-listed at least this often (a backstop: etcd.py leaves a silent one in seconds)
MAX_REFUSALS = 4       # refusals reported in the member record, newest last: a push looks for its own among them
MAX_PROBLEM = 500      # characters of a refusal's problem logged and reported


class PolicyFollower:
    """The policy this host runs for the fleet (`revision`, `applied`: its signed note and text),
    kept in `fleet_dir`. `apply`, `local_status` and `record` are the agent's hooks (agent.py);
    `store_state(ok, problem)` reports the store's health, `changed()` asks for the member
    record to be published soon (a push waits on it)."""

    def __init__(self, store: Store, name: str, fleet_dir: Path, admins: list[Verifier],
                 apply: Callable[[str, str], str], local_status: Callable[[], dict], record: Callable[..., None],
                 metrics, period: float, store_state: Callable[..., None], changed: Callable[[], None]):
        self.store, self.name, self.admins = store, name, admins
        self.path = Path(fleet_dir) / "policy.json"
        self.apply_hook, self.local_status, self.record = apply, local_status, record
        self.metrics, self.period = metrics, period
        self.store_state, self.changed = store_state, changed
        self.revision: int = 0
        self.applied: SignedPolicy | None = None   # its note reported: a push counts the revision with it
        self.refused: dict[str, str] = {}          # last refusal per reason
        self.refusals: list[dict] = []             # the last MAX_REFUSALS records refused, newest last
        self.newest: SignedPolicy | None = None    # the highest revision an admin signed seen (ties: the last)
        self._applying = asyncio.Lock()
        self._load_applied()

    def report(self, local: dict) -> dict:
        """The member record's `policy`: what runs (`local`: the daemon's status) and what was refused."""
        running = local.get("policy") or {}
        return {"revision": self.revision, "sha256": running.get("sha256"), "name": running.get("name"),
                "fleet_sha256": self.applied and self.applied.sha256, "note": self.applied and self.applied.note,
                "refusals": list(self.refusals)}

    def _load_applied(self) -> None:
        if not self.path.exists():
            return
        try:
            signed = open_policy(fsutil.read_regular_file(self.path), self.admins)
        except (OSError, PolicyRefused) as e:   # an edited file, or the admin keys changed: start from zero
            log.error("the applied fleet policy kept in %s is not valid any more: %s", self.path, e)
            return
        self.revision, self.applied = signed.revision, signed
        self.newest = signed

    async def _restore_applied(self) -> None:
        """After a restart the daemon runs its --policy file; the fleet's last applied policy,
        kept here, is put back before anything else (the store may not answer)."""
        signed = self.applied
        if signed is None:
            return
        try:
            running = ((await asyncio.to_thread(self.local_status) or {}).get("policy") or {}).get("sha256")
        except SkyguardError as e:
            log.warning("fleet: cannot read the running policy (%s); applying the kept one", e)
            running = None
        if running != signed.sha256:
            await self._apply(signed, restoring=True)

    async def _handle(self, value: bytes | None) -> None:
        if value is None:
            return   # deleting the policy key changes nothing: a host keeps enforcing what it has
        try:
            signed = open_policy(value, self.admins)
            if self.newest is None or signed.revision >= self.newest.revision:
                self.newest = signed
            if not decide(signed, self.name, self.revision, self.applied.sha256 if self.applied else None):
                return
        except PolicyRefused as e:
            self._refuse(e, *claimed(value))
            return
        await self._apply(signed)

    def _refuse(self, e: PolicyRefused, revision: int | None, sha256: str | None) -> None:
        # Bounded: the message quotes the record (its signers' names), which whoever writes the
        # store chooses; whole, it could exceed a log entry's size (the refusal would never be
        # logged) or the store's request size (this host's status would stop being published).
        problem = str(e)[:MAX_PROBLEM]
        refusal = {"revision": revision, "sha256": sha256, "reason": e.reason, "problem": problem}
        if not any(all(r.get(k) == v for k, v in refusal.items()) for r in self.refusals):
            # the record it claims to be, refused anew or for another reason: when is now
            self.refusals = [r for r in self.refusals if (r["revision"], r["sha256"]) != (revision, sha256)]
            self.refusals = [*self.refusals, {**refusal, "time": time.time()}][-MAX_REFUSALS:]
            self.changed()
        if self.refused.get(e.reason) == problem:
            return   # the same record seen again (re-list): reported once
        self.refused[e.reason] = problem
        self.metrics.refused.labels(reason=e.reason).inc()
        self.record("fleet_policy_refused", member=self.name, reason=e.reason, problem=problem)
        log.warning("fleet policy refused (%s): %s:%s", e.reason, e.reason, problem)

    async def _apply(self, signed: SignedPolicy, restoring: bool = False) -> None:
        async with self._applying:
            if not restoring and signed.revision <= self.revision:
                return
            source = f"fleet revision {signed.revision}"
            try:
                await asyncio.to_thread(self.apply_hook, signed.text, source)
            except PolicyError as e:   # an invalid policy is refused; the running one stays
                self._refuse(PolicyRefused("invalid", f"revision {signed.revision} does not load: {e}"),
                             signed.revision, signed.sha256)
                return
            except Exception as e:   # the swap failed (daemon busy, a part): retried at the next list
                self._refuse(PolicyRefused("apply_failed", f"revision {signed.revision} not applied: {e}"),
                             signed.revision, signed.sha256)
                return
            fsutil.write_private(self.path, signed.to_json())
            self.revision, self.applied = signed.revision, signed
            self.metrics.revision.set(signed.revision)
            self.record("fleet_policy_applied", member=self.name, revision=signed.revision,
                        sha256=signed.sha256, restored=restoring)
            log.info("fleet policy revision %d applied (%s)", signed.revision, signed.sha256[:12])
            self.changed()

    async def run(self) -> None:
        """List, then watch; on any loss of the watch (compaction, member gone, silence) list again."""
        # Not in the agent's start(): the daemon's hot swap reconciles its parts, the agent among them.
        await self._restore_applied()
        backoff = 0.2
        while True:
            try:
                item, revision = await self.store.get(keys.POLICY)
                self.store_state(True)
                await self._handle(item.value if item else None)
                backoff = 0.2
                async with asyncio.timeout(RESYNC_S):
                    async for changes in _watch(self.store, keys.POLICY, revision):
                        for change in changes:
                            if change.key == keys.POLICY:
                                await self._handle(change.value)
            except TimeoutError:
                if asyncio.current_task().cancelling():   # a stop that raced the resync timer
                    raise asyncio.CancelledError from None
                continue
            except _WatchLost as e:   # one member went away: the next list finds another
                log.info("fleet policy watch lost (%s); listing again", e.__cause__ or e)
            except Compacted as e:
                log.info("fleet policy watch: %s; listing again", e)
                continue
            except StoreUnavailable as e:
                self.store_state(False, str(e))
            except SkyguardError as e:
                log.warning("fleet policy watch: %s", e)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.period)


class _WatchLost(FleetError):
    """The watch stream ended (its member went away): not the store being unreachable."""


async def _watch(store: Store, prefix: str, revision: int):
    try:
        async for changes in store.watch_prefix(prefix, revision):
            yield changes
    except StoreUnavailable as e:
        raise _WatchLost("watch stream ended") from e
