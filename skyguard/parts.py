"""The shape of every part the daemon hosts on its event loop (DNS proxy, credential proxy and TLS
termination, SSH access, and every part added later), and the loop they share.

A part is created for a policy, then driven only from the loop:

    await part.start()               # listen, install steering; raise SkyguardError if it cannot
    await part.set_policy(policy)    # hot swap: the next decision is the new policy's
    await part.stop()                # close listeners, end sessions

Whether a policy needs a part at all is the daemon's question (`PartSlot.wanted`), not the part's:
a part never runs in an "empty" mode. The daemon starts a part when a policy comes to need it,
stops it when a policy no longer does, and hot-swaps it otherwise, all in one loop over its slots
(skyguard/daemon.py). Decisions are reported through `DecisionLog.record(kind, **fields)`;
refusals a client can repeat at will through `BrakedRefusals.record` (a flood does not grow the
signed log at its rate).

Not here: what any part does, the signed log itself.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from skyguard.conncap import RefusalBrake, source_of
from skyguard.errors import LogError, SkyguardError
from skyguard.policy.model import Policy
from skyguard.tlog.errors import LogStalled

log = logging.getLogger("skyguard.parts")


class Degraded(SkyguardError):
    """Raised by start() or set_policy() of a part that runs, but without some of what the policy
    asks (one TLS key missing from the store, say): what is missing stays off, and so denied. The
    daemon keeps the part, logs the message and reports it; any other exception stops the part."""


class Part(Protocol):
    async def start(self) -> Any: ...

    async def stop(self) -> None: ...

    async def set_policy(self, policy: Policy) -> Any: ...


class DecisionLog(Protocol):
    """Where a part reports what it decided. Must not block (the daemon queues for the signed log).
    record may return the queued entry's concurrent.futures.Future, which resolves once the entry
    is durable or fails (LogError) if the log refuses it after all: for a part that must take back
    what it did ahead of the log (skyguard/dns/learning.py). None: nothing to wait for."""

    def record(self, kind: str, /, **fields) -> Future | None: ...


# How long a decision that must be on record before it takes effect (a secret released, an
# operator's session opened) waits for its entry to be durable. A healthy disk makes it durable in
# the writer's next group commit (milliseconds); past the log's own stall bound (tlog/intake.py,
# 5 s) the writer refuses new entries, and one queued just before must not wait on the disk longer.
ENTRY_WAIT_S = 6.0


def _not_durable() -> LogError:
    return LogError(f"the signed log has not written the entry within {ENTRY_WAIT_S:g} s: its disk is not answering")


# Records the withdrawals (below): the writer's thread resolves the Futures, and must not wait on itself.
_withdrawals = ThreadPoolExecutor(1, thread_name_prefix="skyguard-withdrawals")
WITHDRAW_TRIES_S = 60.0


def _withdraw_once_written(queued: Future, decisions: DecisionLog | None) -> None:
    """The decision `queued` records did not take effect (its caller stopped waiting, or another of
    its entries was refused), but the writer may still write it (once the disk answers): then a
    `decision_withdrawn` entry naming its index follows it, so the log never claims what did not happen."""
    if decisions is None:  # (a caller with nowhere to say it)
        return

    def settled(future: Future) -> None:
        if not future.cancelled() and future.exception() is None:
            _withdrawals.submit(_withdraw, decisions, future.result())
    queued.add_done_callback(settled)


def _withdraw(decisions: DecisionLog, index: int) -> None:
    """In the withdrawals' thread. The late entry's Future resolves as the writer's stalled write
    returns, a moment before the log accepts entries again: that refusal is tried again, for a while
    (a log that is closed or refuses for space is not waited for)."""
    deadline = time.monotonic() + WITHDRAW_TRIES_S
    while True:
        try:
            decisions.record("decision_withdrawn", index=index, reason="its decision did not take effect: the "
                             "entry was not durable in time, or another entry of the decision was refused")
            return
        except LogStalled:
            if time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            error: Exception = LogStalled("the signed log still refuses entries")
        except Exception as e:  # noqa: BLE001 - best effort, said in the host's log
            error = e
        log.error("the withdrawal of the signed log's entry %d (a decision that did not take effect) was not "
                  "written: %s", index, error)
        return


def wait_durable(queued: Future | None, decisions: DecisionLog | None) -> None:
    """In a worker thread: until the log writer's Future of an entry (`decisions.record`) resolves.
    LogError if the writer refused it, or has not made it durable within ENTRY_WAIT_S (then the
    decision must not take effect; if the entry is written later, a withdrawal follows it). The
    Future is never cancelled: it stays the writer's."""
    if queued is None:
        return
    try:
        queued.result(ENTRY_WAIT_S)  # raises the writer's LogError if it refused the entry
    except TimeoutError:
        _withdraw_once_written(queued, decisions)
        raise _not_durable() from None


async def entries_durable(queued: list[Future | None], decisions: DecisionLog | None) -> None:
    """wait_durable() on the event loop, for the entries of one decision: all durable, or LogError
    (or the caller cancelled: its connection ended) and a withdrawal after each of them that is
    written, now or later."""
    entries = [future for future in queued if future is not None]
    if not entries:
        return
    waiting = [asyncio.wrap_future(future) for future in entries]
    durable = False
    try:
        done, pending = await asyncio.wait(waiting, timeout=ENTRY_WAIT_S)
        refused = [error for error in (settled.exception() for settled in done) if error is not None]
        if pending:
            raise _not_durable()
        if refused:
            raise refused[0]  # the writer's fresh copy (tlog.errors.anew) for this entry
        durable = True
    finally:
        if not durable:
            for late in waiting:  # written or refused later: the writer says so, not this caller
                late.add_done_callback(lambda settled: settled.cancelled() or settled.exception())
            for future in entries:
                _withdraw_once_written(future, decisions)


class NullLog:
    """A DecisionLog that keeps nothing (benchmarks, tools that have no log)."""

    def record(self, kind: str, /, **fields) -> None:
        pass


class MemoryLog:
    """A DecisionLog that keeps entries in memory, each as {"kind": kind, **fields} (tests).
    Thread-safe: a part may run on another thread than the test reading it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.entries: list[dict] = []

    def record(self, kind: str, /, **fields) -> None:
        with self._lock:
            self.entries.append({"kind": kind, **fields})

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.entries)

    def of_kind(self, kind: str) -> list[dict]:
        return [e for e in self.snapshot() if e["kind"] == kind]


@dataclass
class PartSlot:
    """One kind of part the daemon may host: when a policy needs it, and how to make one."""

    name: str
    wanted: Callable[[Policy], bool]
    make: Callable[[Policy], Part]
    part: Part | None = None
    problem: str = ""  # why the part is not running, or runs without some of the policy

    @property
    def state(self) -> str:
        if self.part is None:
            return "failed" if self.problem else "not needed"
        return "degraded" if self.problem else "running"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed: it nearly triples the DNS proxy's queries/s (bench/dns.py)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoopThread:
    """The daemon's one event loop, run in its own thread; other threads (the control socket, the
    watchdog) hand it coroutines with call(), so loop-owned state is only ever touched on the loop."""

    def __init__(self):
        self.loop = new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sg-asyncio", daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class PartRegistry:
    """A Prometheus collector for one slot's part: a part made again (its policy came back after
    a policy that did not need it) registers its metrics afresh in a new registry here, instead of
    colliding with its predecessor's names in the daemon's registry (counters restart from zero,
    which Prometheus reads as a reset)."""

    def __init__(self, parent):
        from prometheus_client import CollectorRegistry

        self._new = CollectorRegistry
        self.current = CollectorRegistry()
        if parent is not None:
            parent.register(self)

    def fresh(self):
        self.current = self._new()
        return self.current

    def collect(self):
        yield from self.current.collect()


class PartLog:
    """A part's DecisionLog over the daemon's non-blocking log writer (`record_nowait(kind,
    **fields)`, which returns the queued entry's Future or None). `refusal()`: why the log would
    refuse an entry now (the writer's LogWriter.refusal), for a part that must not begin what it
    could not put on record; None without one."""

    def __init__(self, record_nowait: Callable[..., Future | None],
                 refusal: Callable[[], LogError | None] | None = None):
        self.record_nowait, self._refusal = record_nowait, refusal

    def record(self, kind: str, /, **fields) -> Future | None:
        return self.record_nowait(kind, **fields)

    def refusal(self) -> LogError | None:
        return self._refusal() if self._refusal is not None else None


def log_refusal(decision_log: DecisionLog) -> LogError | None:
    """Why `decision_log` would refuse an entry now (its disk full or stalled, a failed write),
    where it can tell (a PartLog given the writer's refusal); None otherwise. A hint for refusing
    early and saying why: an entry may still be refused after it said None."""
    refusal = getattr(decision_log, "refusal", None)
    return refusal() if callable(refusal) else None


async def make_part(slot: PartSlot, policy: Policy):
    """Constructors block (keys read from disk, pyroute2's synchronous netlink, which cannot run
    inside a running loop): they run in a worker thread."""
    return await asyncio.get_running_loop().run_in_executor(None, slot.make, policy)


async def stop_part(part) -> None:
    await part.stop()


async def stop_logged(name: str, part, logger: logging.Logger) -> None:
    """Stop a part (if any); a failure to stop is logged on `logger`, never raised: the others stop too."""
    if part is None:
        return
    try:
        await stop_part(part)
    except Exception:
        logger.exception("stopping %s failed", name)


def record_or_report(decision_log: DecisionLog, logger: logging.Logger, kind: str, /, **fields) -> None:
    """decision_log.record(kind, **fields) for a part's session code: a log that fails is reported
    on `logger` with its traceback instead of crashing the session that made the decision."""
    try:
        decision_log.record(kind, **fields)
    except LogError as e:  # the signed log refuses entries (full or stalled disk): said, without a traceback
        logger.error("%s was not written to the signed log: %s", kind, e)
    except Exception:  # noqa: BLE001 - reported, not raised (see above)
        logger.exception("could not record %s in the decision log", kind)


class BrakedRefusals:
    """Refusals a part records in the signed log, braked per source and kind
    (conncap.RefusalBrake): `record` writes `kind` with its fields while the brake allows, and
    otherwise holds the refusal; the held ones of a kind go in one `<kind>_summary` entry (the
    kind's words, the source, `refused`: how many) when the brake next allows, on the part's
    loop, and at flush() (a part stopping). Call on the loop. The caller counts every refusal in
    its metrics."""

    def __init__(self, decision_log: DecisionLog, logger: logging.Logger, brake: RefusalBrake | None = None):
        self.decision_log, self.logger = decision_log, logger
        self.brake = brake or RefusalBrake()
        self._due: dict[tuple, tuple] = {}  # (kind, source, *words) -> (address, words) with a summary scheduled

    def record(self, kind: str, address: str, words: dict[str, Any], /, **fields) -> None:
        """One refusal from `address`; `words`: the bounded fields that name its kind (app,
        reason, ...), in its entry and in the summary; `fields`: the rest of its entry."""
        now = time.monotonic()
        key = tuple(words.items())
        if self.brake.refused(address, key, now):
            record_or_report(self.decision_log, self.logger, kind, **words, **fields)
            return
        due = (kind, source_of(address), *key)
        if due in self._due:
            return
        self._due[due] = (address, words)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a tool, a test driving the part by hand): held until flush()
            return
        loop.call_later(self.brake.wait(address, key, now), self._summarise, due)

    def _summarise(self, due: tuple) -> None:
        address, words = self._due.pop(due, (None, None))
        if address is None:
            return  # flushed already
        count = self.brake.held(address, tuple(words.items()), time.monotonic())
        if count:
            record_or_report(self.decision_log, self.logger, f"{due[0]}_summary", **words, source=due[1],
                             refused=count)

    def flush(self) -> None:
        """Every held refusal into its summary now."""
        for due in list(self._due):
            self._summarise(due)


def raise_open_file_limit() -> None:
    """The parts share one process: per-VM connection caps, TLS terminations and idle upstream
    connections together can pass the default soft limit of 1,024 descriptors."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        logging.getLogger("skyguard.daemon").info("open file limit raised from %d to %d", soft, hard)
