"""A fleet task that fails is restarted (skyguard/fleet/agent.py run_forever): before, one record
nobody foresaw ended a host's policy watch or witnessing for good while it kept heartbeating "ok"."""

from __future__ import annotations

import asyncio

from skyguard.fleet.agent import run_forever


def test_a_failing_task_is_reported_and_started_again_until_it_ends():
    runs, reported = [], []

    async def task():
        runs.append(len(runs))
        if len(runs) < 3:
            raise ValueError(f"bad record {len(runs)}")

    asyncio.run(run_forever(task, "witness", 0.01, lambda label, error: reported.append((label, str(error)))))
    assert runs == [0, 1, 2]
    assert reported == [("witness", "bad record 1"), ("witness", "bad record 2")]


def test_cancelling_a_task_stops_it_without_a_report():
    reported = []

    async def main():
        async def stuck():
            await asyncio.sleep(3600)

        task = asyncio.create_task(run_forever(stuck, "policy", 0.01, lambda *a: reported.append(a)))
        await asyncio.sleep(0.05)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"

    assert asyncio.run(main()) == "cancelled" and reported == []
