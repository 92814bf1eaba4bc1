"""The records `skyguard flows` shows: a bounded ring of the latest flow records with a cursor
(RecentRecords), and the checks of the control op's arguments (query_args). Thread-safe: the
consumer remembers, the control thread queries.
"""

from __future__ import annotations

import collections
import itertools
import json
import threading

VERDICT_FILTERS = ("allow", "deny", "loss")
MAX_QUERY_LIMIT = 10_000


class RecentRecords:
    """The newest `maxlen` records, oldest first. A record is a dict, or the canonical log entry
    (bytes) whose JSON is the record, as for flow_start and flow_end: the consumer makes those by
    the ten thousand a second and keeps the entries it logs, and only a query parses them (bytes
    are not tracked by the garbage collector; a dict per flow kept it busy). Seqs are implicit:
    the newest record's is the count of records ever remembered, and they are consecutive."""

    def __init__(self, maxlen: int):
        self._lock = threading.Lock()
        self._recent: collections.deque = collections.deque(maxlen=maxlen)
        self._seq = 0

    def remember(self, records: list) -> None:
        """Append records, dicts or entries (each gets the next `seq`); the oldest fall out past
        maxlen. A dict is kept as it is: the caller must not change it afterwards."""
        if not records:
            return
        with self._lock:
            self._recent.extend(records)
            self._seq += len(records)

    def query(self, since: int = 0, zone: str | None = None, verdict: str | None = None,
              limit: int = 100) -> dict:
        """Records after cursor `since` (oldest first, at most `limit`: the newest ones when
        there are more), filtered by zone (source or destination) and verdict. The returned
        cursor is the last record's seq, to pass as `since` next time."""
        with self._lock:  # only the references: parsing happens outside the consumer's way
            cursor = self._seq
            oldest = cursor - len(self._recent) + 1
            newer = list(itertools.islice(reversed(self._recent), max(0, cursor - since)))
        picked: list[dict] = []
        cut = 0
        for seq, item in enumerate(newer):
            if len(picked) >= limit and not since:
                break  # what is cut only matters to a follower (since > 0)
            rec = json.loads(item) if isinstance(item, bytes) else dict(item)
            if verdict and rec.get("verdict") != verdict:
                continue
            if zone and zone not in (rec.get("src_zone"), rec.get("dst_zone")):
                continue
            if len(picked) < limit:
                rec["seq"] = cursor - seq
                picked.append(rec)
            else:
                cut += 1
        picked.reverse()
        evicted = max(0, oldest - since - 1) if since else 0
        # missed: records after the cursor that this reply cannot show (evicted from memory, or
        # past the limit); a follower learns it fell behind.
        return {"records": picked, "cursor": cursor, "missed": evicted + (cut if since else 0)}


def query_args(args: dict) -> tuple[dict, bool]:
    """Validate the control op "flows" arguments: (keyword arguments of recent(), sync?).
    Raises BadInput naming the bad argument."""
    from skyguard.errors import BadInput

    since = args.get("since", 0)
    limit = args.get("limit", 100)
    zone, verdict = args.get("zone"), args.get("verdict")
    if not isinstance(since, int) or isinstance(since, bool) or since < 0:
        raise BadInput(f"flows: since must be a cursor (an integer >= 0), not {since!r}")
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_QUERY_LIMIT:
        raise BadInput(f"flows: limit must be an integer from 1 to {MAX_QUERY_LIMIT}, not {limit!r}")
    if zone is not None and not isinstance(zone, str):
        raise BadInput("flows: zone must be a zone name")
    if verdict is not None and verdict not in VERDICT_FILTERS:
        raise BadInput(f"flows: verdict must be one of {', '.join(VERDICT_FILTERS)}, not {verdict!r}")
    return {"since": since, "zone": zone, "verdict": verdict, "limit": limit}, bool(args.get("sync"))
