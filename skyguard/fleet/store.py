"""The store a fleet of skyguard hosts shares: the few operations the fleet needs, so that etcd
(etcd.py) is one implementation and a Kubernetes backend (a ConfigMap/Lease per key, watches on a
label selector) can be another.

Keys are '/'-separated text, values bytes. Every read returns the store's revision, a number that
only grows; `watch_prefix(prefix, after)` yields the changes made after that revision. When the
store has forgotten that far back (compaction) the watch raises Compacted, and the caller re-lists
and watches again from the new revision: the one recovery path for compaction, a lost connection
and a member that went away alike.

Not here: what the fleet stores (keys.py), who trusts what (policy signing, witnessing).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from skyguard.errors import SkyguardError


def load_value(value: bytes):
    """A stored value as JSON. Whoever can write the store chooses it: JSON nested too deep for
    the parser (which raises RecursionError) is a ValueError like any other bad JSON, so every
    reader that skips a bad record skips this one too instead of ending its task."""
    try:
        return json.loads(value)
    except RecursionError:
        raise ValueError("a stored value nests JSON too deeply") from None


class FleetError(SkyguardError):
    """The fleet store or a fleet peer failed or refused something."""


class StoreUnavailable(FleetError):
    """No member of the store answered (all down, or quorum lost). Callers keep what they have
    (fail closed: a host that cannot reach the store keeps enforcing its policy)."""


class Compacted(FleetError):
    """A watch asked for revisions the store no longer keeps: re-list, then watch again."""

    def __init__(self, revision: int):
        super().__init__(f"the store compacted its history up to revision {revision}")
        self.revision = revision


@dataclass(frozen=True)
class Item:
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class Change:
    key: str
    value: bytes | None   # None: deleted (or its lease expired)
    mod_revision: int


class Store(Protocol):
    async def get_prefix(self, prefix: str) -> tuple[list[Item], int]:
        """Every key under prefix, and the revision the answer is as of."""

    async def get(self, key: str, revision: int = 0) -> tuple[Item | None, int]:
        """The key as it was at `revision` (0: now); Compacted when the store no longer keeps
        that revision."""

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Returns the revision of the write."""

    async def put_if(self, key: str, value: bytes, mod_revision: int) -> bool:
        """Write only if the key was last written at mod_revision (0: the key does not exist)."""

    async def delete(self, key: str) -> None: ...

    async def grant_lease(self, ttl: int) -> int: ...

    async def keep_alive(self, lease: int) -> bool:
        """False when the lease expired (its keys are gone: register again)."""

    async def revoke(self, lease: int) -> None: ...

    def watch_prefix(self, prefix: str, after: int) -> AsyncGenerator[list[Change], None]:
        """Changes after revision `after`, in order; raises Compacted or StoreUnavailable. An
        async generator: a caller done early closes it (aclose), which ends the watch."""

    async def close(self) -> None: ...
