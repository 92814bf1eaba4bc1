"""The records `skyguard flows` shows: a bounded ring of the latest flow records with a cursor
(RecentRecords), and the checks of the control op's arguments (query_args). Thread-safe: the
consumer remembers, the control thread queries.
"""

from __future__ import annotations

import collections
import threading

VERDICT_FILTERS = ("allow", "deny", "loss")
MAX_QUERY_LIMIT = 10_000


class RecentRecords:
    """The newest `maxlen` records, oldest first. A record is a dict, or, for the flow records the
    consumer makes by the ten thousand a second, (shared base record, ((field, index), ...),
    values): the dict is only built when a query returns it. Seqs are implicit: the newest
    record's is the count of records ever remembered, and they are consecutive."""

    def __init__(self, maxlen: int):
        self._lock = threading.Lock()
        self._recent: collections.deque = collections.deque(maxlen=maxlen)
        self._seq = 0

    def remember(self, records: list[dict]) -> None:
        """Append records (each gets the next `seq`); the oldest fall out past maxlen."""
        self.remember_compact(records)

    def remember_compact(self, records: list) -> None:
        """Append records, dicts or (base, fields, values) as the class says; `base` is never
        changed, so many records may share one."""
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
        with self._lock:
            cursor = self._seq
            oldest = cursor - len(self._recent) + 1
            picked: list[dict] = []
            cut = 0
            seq = cursor + 1
            for item in reversed(self._recent):
                seq -= 1
                if seq <= since:
                    break
                base = item if isinstance(item, dict) else item[0]
                if verdict and base.get("verdict") != verdict:
                    continue
                if zone and zone not in (base.get("src_zone"), base.get("dst_zone")):
                    continue
                if len(picked) < limit:
                    picked.append(_record(item, seq))
                else:
                    cut += 1
        picked.reverse()
        evicted = max(0, oldest - since - 1) if since else 0
        # missed: records after the cursor that this reply cannot show (evicted from memory, or
        # past the limit); a follower learns it fell behind.
        return {"records": picked, "cursor": cursor, "missed": evicted + (cut if since else 0)}


def _record(item, seq: int) -> dict:
    """A new dict of a remembered record, with its seq."""
    if isinstance(item, dict):
        return dict(item, seq=seq)
    base, fields, values = item
    rec = dict(base)
    for name, index in fields:
        rec[name] = values[index]
    rec["seq"] = seq
    return rec


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
