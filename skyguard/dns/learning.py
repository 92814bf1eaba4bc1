"""What an allowed DNS answer opens (the datapath's Learner and the learned store), and its undoing
when the signed log refuses the answer's entry after the answer left.

The resolver logs a decision before it learns (resolver.py), but it does not wait for the log's
disk: the entry is queued (the DecisionLog returns its Future) and the answer leaves at once (SPEC
section 8: the address in the map before the answer leaves, at most 1 ms added). The writer then
commits it in a group, or refuses the group (LogSpaceLow: its filesystem at the reserve; the entry
that first finds it there is always one already queued) or fails. So what an answer learns under a
queued entry is a hold in the learned store (LearnedStore.add(hold=)): once the entry is durable
the hold stands like any other; once it is refused, the hold is released. An address no other
entry holds is then closed in the datapath (Learner.forget) and leaves the store; one that another
entry holds (an earlier, logged answer) keeps it, with the expiry those entries give it (the
learner's `hold`: the datapath keeps the longest expiry any answer gave an address, so a refused
answer's longer one is taken back exactly, as is a name's the policy stops allowing). Each such
answer is counted (skyguard_dns_log_refused_after_answer, skyguard_dns_unlearned_ips), said in the
host's log and shown in status.

What stays open: the time between the answer and the refusal (the writer's next group commit,
milliseconds), and a connection the VM opened in it, which conntrack keeps.

A restart opens only what the log holds: the learned state saves an answer once its entry is
durable (learned.py; a new address is saved then, by `save`, not before the answer leaves), so a
daemon killed in between comes back without it (fail closed: the VM's next connection to it is
dropped until it asks again). Stopping waits a bound for what is queued (drain).

Not the policy (resolver.py), nor the file (learned.py). One event loop owns it: the callback
on a Future (the log writer's thread) only wakes the loop.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent import futures
from concurrent.futures import Future
from typing import Any

from skyguard.dns.learned import LearnedStore
from skyguard.dns.metrics import DnsMetrics
from skyguard.errors import LogError

log = logging.getLogger("skyguard.dns")
DRAIN_S = 2.0  # at stop, how long the queued entries of answers may take to settle (a healthy log:
# its next group commit, milliseconds; a stalled one's are left out of the saved state: fail closed)


class Learning:
    def __init__(self, learner, store: LearnedStore, metrics: DnsMetrics):
        self.learner = learner
        self.store = store
        self.metrics = metrics
        self.save: Callable[[], Coroutine[Any, Any, None]] | None = None  # writes the store (the server's StateWriter.save)
        self.refused_answers = 0  # answers released whose entry the log refused after
        self.unlearned = 0  # addresses closed again for them
        self.last_refusal = ""  # when and why, for status
        self._next_hold = 0
        self._queued: collections.deque = collections.deque()  # (Future, hold, zone), oldest first
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched: Future | None = None  # the queued entry whose settling wakes the loop
        self._tasks: set = set()

    def open(self, zone: str, workload: str, name: str, learn: dict, ttl: int, expiry: float,
             logged: Future | None) -> bool:
        """Open learn's addresses ({key: (address, rules)}) for ttl seconds (expiry: wall time)
        under each of their rules; `logged`: the answer's queued log entry (None: on record
        already). Raises what the learner raises. True: a new address, to persist first."""
        by_rule: dict[str, list] = {}
        for ip, rules in learn.values():
            for rule in rules:
                by_rule.setdefault(rule.name, []).append(ip)
        t0 = time.perf_counter()
        for rule_name, ips in by_rule.items():
            self.learner.learn(zone, rule_name, ips, ttl)
        self.metrics.learn_latency.observe(time.perf_counter() - t0)
        self.metrics.learned_ips.labels(zone).inc(len(learn))
        hold = None
        if logged is not None:
            self._next_hold = hold = self._next_hold + 1
        evictions = self.store.evictions
        for rule_name, ips in by_rule.items():
            self.store.add(zone, rule_name, name, [str(ip) for ip in ips], expiry, workload=workload, hold=hold)
        if self.store.evictions != evictions:
            self.metrics.learned_evicted.labels(zone).inc(self.store.evictions - evictions)
            self.forget_released()
        if logged is not None:
            self._queued.append((logged, hold, zone))
            if len(self._queued) == 1:
                self._watch()
        # Refreshes of known addresses are saved lazily (the server's periodic flush); a new one
        # under a queued entry once the entry is durable (settle), so not before this answer.
        return hold is None and self.store.urgent and self.store.path is not None

    def forget_released(self, wall: float | None = None) -> list[tuple[str, str, str]]:
        """Let a learner that can (an optional `forget(zone, rule, ips)`) close now what the
        store no longer holds (a cap evicted it, a policy swap stopped backing it, the log
        refused the answer that opened it); what it holds with less expiry than before (an entry
        of it dropped or refused: take_shortened) goes back to the expiry the store still gives
        it. Returns the (zone, rule, ip) closed."""
        released = self.store.take_evicted()
        groups: dict[tuple[str, str], list] = {}
        for z, rule, ip in released:
            groups.setdefault((z, rule), []).append(ipaddress.ip_address(ip))
        forget = getattr(self.learner, "forget", None)
        if forget is not None:
            for (z, rule), ips in groups.items():
                try:
                    forget(z, rule, ips)
                except Exception:  # noqa: BLE001 - the address then closes at its TTL instead
                    pass
        self._give_back(self.store.take_shortened(), time.time() if wall is None else wall)
        return released

    def _give_back(self, shortened: list[tuple[str, str, str]], wall: float) -> None:
        """Each (zone, rule, ip) back to the expiry the store's entries give it: exactly (the
        learner's optional `hold`; `learn` keeps the longer one it has), or closed if past."""
        kept: dict[tuple[str, str], list] = {}
        for zone, rule, ip in shortened:
            kept.setdefault((zone, rule), []).append(ip)
        hold = getattr(self.learner, "hold", None) or self.learner.learn
        forget = getattr(self.learner, "forget", None)
        for (zone, rule), ips in kept.items():
            for ip, expiry in self.store.held_until(zone, rule, ips).items():
                try:
                    if expiry > wall:
                        hold(zone, rule, [ipaddress.ip_address(ip)], max(1, int(expiry - wall)))
                    elif forget is not None:
                        forget(zone, rule, [ipaddress.ip_address(ip)])
                except Exception:  # noqa: BLE001 - it then closes at the longer expiry
                    log.exception("could not give %s its expiry back", ip)

    def _watch(self) -> None:
        """Wake the loop once the oldest queued entry is settled. One callback per wake, not per
        answer: the log settles entries in order (its groups), so what is queued behind it
        settles with it or after it (a log that did not would only delay the later ones)."""
        if self._queued and self._queued[0][0] is not self._watched:
            self._watched = self._queued[0][0]
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:  # tools and tests without a loop: settled where it resolves
                self._loop = None
            self._watched.add_done_callback(self._wake)

    def _wake(self, _logged: Future) -> None:
        """The oldest queued entry is settled (on the log writer's thread, or at once)."""
        if self._loop is None:
            self.settle()
            return
        try:
            self._loop.call_soon_threadsafe(self.settle)
        except RuntimeError:  # the loop is closed: the daemon is stopping
            pass

    def settle(self, wall: float | None = None) -> None:
        """Confirm or take back the holds whose entries the log has settled (on the loop)."""
        refused: dict[str, list[int]] = {}
        why = ""
        while self._queued and self._queued[0][0].done():
            logged, hold, zone = self._queued.popleft()
            error = LogError("the signed log dropped the entry") if logged.cancelled() else logged.exception()
            if error is None:
                self.store.confirm(hold)
            else:
                refused.setdefault(zone, []).append(hold)
                why = str(error)
        self._watch()
        if refused:
            self._take_back(refused, why, time.time() if wall is None else wall)
        if self.store.urgent:  # an answer on record now that added an address: saved at once
            self._save_soon()

    async def drain(self, timeout: float = DRAIN_S) -> None:
        """At stop, before the last save: wait up to `timeout` s for the queued entries to settle
        (a stalled log's are left out of the saved state), settle them, and save nothing before
        the caller does."""
        self.save = None
        if self._queued:  # in a thread: the log's Futures stay the writer's (never cancelled)
            await asyncio.to_thread(futures.wait, [logged for logged, _hold, _zone in self._queued], timeout)
        self.settle()

    def _take_back(self, refused: dict[str, list[int]], why: str, wall: float) -> None:
        for holds in refused.values():
            for hold in holds:
                self.store.release(hold)
        closed = self.forget_released(wall)  # what the other entries still hold: back to their expiry
        answers = sum(len(holds) for holds in refused.values())
        self.refused_answers += answers
        self.unlearned += len(closed)
        for zone, holds in refused.items():
            self.metrics.refused_after_answer.labels(zone).inc(len(holds))
        for zone, _rule, _ip in closed:
            self.metrics.unlearned.labels(zone).inc()
        self.last_refusal = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(wall))}: {why}"
        log.error("DNS answers released before the signed log refused their entries: %d (%s); "
                  "addresses only they opened, closed again: %d", answers, why, len(closed))
        if self.store.dirty:  # a restart must not learn them again
            self._save_soon()

    def _save_soon(self) -> None:
        """Write the store now (off the loop: `save`), without waiting for it."""
        if self.save is None:
            return
        try:
            task = asyncio.get_running_loop().create_task(self.save())
        except RuntimeError:  # no loop: the next flush or stop writes it
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def status(self) -> dict:
        return {"log_refused_after_answer": self.refused_answers, "unlearned": self.unlearned,
                "last_refusal": self.last_refusal or None}
