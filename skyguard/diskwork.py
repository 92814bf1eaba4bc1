"""Blocking file work of one user (a part's session records, its console tickets), off the event
loop in threads of that user's own, and bounded. Not the file work itself (admin/recording.py,
console/tickets.py), not CPU work on HTTP bodies (bodywork.py).

Why not asyncio.to_thread: its executor (min(32, cores + 4) threads, 6 on 2 cores) is every part's,
for the sealed store, the TPM, DNS state, the fleet, the log. Work on a disk that stalls (a hung
or frozen filesystem) holds its thread until the disk answers: six sessions starting on such a
disk took every one of them, and the whole daemon waited on that disk. Here each user has
`workers` threads of its own and a bound on its work in flight (running, or waiting for a thread):
at `max_in_flight`, `start` refuses at once (Busy: the user refuses the session or login with that
message) instead of queueing without end, while `run`, for what must happen whatever (a record
closed, recovery at start), always queues.

The threads are daemon threads, started when needed and gone after IDLE seconds without work: a
process whose last work waits on a stalled disk still gets through interpreter exit (the kernel
keeps it until that write returns). Call `start` and `run` on an event loop; their result (or
exception) comes back on it. Thread-safe otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import threading
from collections.abc import Callable
from typing import TypeVar

from skyguard.errors import SkyguardError

IDLE = 30.0  # seconds a thread without work waits for more before it ends

_T = TypeVar("_T")


class Busy(SkyguardError):
    """A user's file work is at its bound: its disk is not keeping up (or not answering)."""


class DiskWork:
    def __init__(self, what: str, workers: int, max_in_flight: int):
        """`what`: the work, in the plural, as messages name it ("session record operations")."""
        self.what, self.workers, self.max_in_flight = what, workers, max_in_flight
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque[tuple[Callable[[], object], asyncio.Future, asyncio.AbstractEventLoop]] = \
            collections.deque()
        self._threads = 0
        self._idle = 0
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Work running or waiting for a thread."""
        return self._in_flight

    @property
    def full(self) -> bool:
        """`start` would refuse now."""
        return self._in_flight >= self.max_in_flight

    async def start(self, function: Callable[..., _T], /, *args, **kwargs) -> _T:
        """function(*args, **kwargs) in one of the threads; Busy at once when `max_in_flight` work
        is in flight already (new work, which may be refused)."""
        return await self._submit(functools.partial(function, *args, **kwargs), refusable=True)

    async def run(self, function: Callable[..., _T], /, *args, **kwargs) -> _T:
        """function(*args, **kwargs) in one of the threads, after the work queued before it;
        never refused (work that must be done: closing what `start` opened)."""
        return await self._submit(functools.partial(function, *args, **kwargs), refusable=False)

    async def _submit(self, call: Callable[[], _T], refusable: bool) -> _T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        with self._lock:
            if refusable and self._in_flight >= self.max_in_flight:
                raise Busy(f"{self._in_flight} {self.what} are under way, the most at once: the disk under them "
                           "is not keeping up")
            self._in_flight += 1
            self._queue.append((call, future, loop))
            if self._idle > len(self._queue) - 1:
                self._wake.notify()
            elif self._threads < self.workers:
                self._threads += 1
                threading.Thread(target=self._work, name=f"sg-disk {self.what}", daemon=True).start()
        return await future

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
                if not self._queue:
                    self._wake.wait(IDLE)
                self._idle -= 1
                if not self._queue:
                    self._threads -= 1
                    return
                call, future, loop = self._queue.popleft()
            result, error = None, None
            try:
                result = call()
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
                error = e
            with self._lock:
                self._in_flight -= 1
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:
                pass  # the loop is closed: nobody waits for it


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # the awaiting coroutine was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
