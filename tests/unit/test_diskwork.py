"""DiskWork (skyguard/diskwork.py): a user's blocking file work in threads of its own, bounded.
Work held on an event (as a stalled disk holds it) shows the bound: new work is refused at once,
work that must be done queues, and the loop's default executor is never used."""

from __future__ import annotations

import asyncio
import threading

import pytest

from skyguard.diskwork import Busy, DiskWork


def test_new_work_past_the_bound_is_refused_and_work_that_must_be_done_queues():
    release = threading.Event()
    names = []

    def held(n):
        release.wait(30)
        names.append(threading.current_thread().name)
        return n

    async def main():
        work = DiskWork("test operations", workers=2, max_in_flight=3)
        started = [asyncio.create_task(work.start(held, n)) for n in range(3)]
        await asyncio.sleep(0)  # each submitted
        assert work.in_flight == 3 and work.full
        with pytest.raises(Busy, match="3 test operations are under way, the most at once"):
            await work.start(held, 99)
        closing = asyncio.create_task(work.run(held, "closed"))  # never refused
        await asyncio.sleep(0)
        assert work.in_flight == 4
        release.set()
        return await asyncio.gather(*started, closing), work.in_flight

    results, in_flight = asyncio.run(main())
    assert results == [0, 1, 2, "closed"] and in_flight == 0
    assert len(set(names)) <= 2 and all(name.startswith("sg-disk ") for name in names)


def test_an_error_comes_back_to_the_caller_and_a_cancelled_caller_is_not_answered():
    release = threading.Event()

    def fails():
        raise OSError(5, "Input/output error")

    async def main():
        work = DiskWork("test operations", workers=1, max_in_flight=2)
        with pytest.raises(OSError, match="Input/output error"):
            await work.run(fails)
        waiting = asyncio.create_task(work.run(release.wait, 30))
        await asyncio.sleep(0)
        waiting.cancel()
        release.set()
        assert await work.run(str, "after") == "after"  # the thread went on
        return waiting.cancelled()

    assert asyncio.run(main())
