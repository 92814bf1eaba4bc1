"""An await bounded in time that keeps its cancellation.

asyncio.wait_for (Python 3.11) awaits in a task of its own and, when the caller is cancelled just
as that task finishes, returns the result instead of raising: the cancellation is lost, and a part
told to stop goes on (the TPM monitor's stop hung the daemon's shutdown so, the fleet agent kept
witnessing beside its successor). `within` awaits in the caller's task under asyncio.timeout,
which keeps it. ruff bans asyncio.wait_for in skyguard/ (pyproject.toml).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], timeout: float | None) -> T:
    """`await awaitable`, or TimeoutError after `timeout` seconds (None: no bound)."""
    async with asyncio.timeout(timeout):
        return await awaitable
