"""Log entries: canonical JSON records, the bytes that are hashed into the tree.

Canonical means one byte string per record: keys sorted, no spaces, UTF-8, and no floats (their
text form is not unique across languages); times are integer nanoseconds since the epoch or
RFC 3339 strings. Every entry has `type` and `time`. Not here: storage and hashing.
"""

from __future__ import annotations

import json
import re
import time

from skyguard.tlog.errors import BadLogInput

# The types the parts of skyguard write. Others are allowed if they look like these (lower
# snake case) so a new part can log without touching this file; the list documents the vocabulary.
KNOWN_TYPES = frozenset({
    "flow_start", "flow_end", "deny", "dns", "credential_swap", "admin_session", "policy_load",
    "attach", "detach", "tamper", "daemon_start", "daemon_stop", "ring_loss", "checkpoint_note",
    "log_recovery", "log_space_low", "log_space_restored",
})
_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def _check_value(value, where: str) -> None:
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        raise BadLogInput(f"log entry field {where} is a float; use an integer (for times: "
                          f"integer nanoseconds) so the entry has one canonical form")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_value(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise BadLogInput(f"log entry field {where} has a non-string key {key!r}")
            _check_value(item, f"{where}.{key}")
        return
    raise BadLogInput(f"log entry field {where} has type {type(value).__name__}; "
                      f"only str, int, bool, null, lists and objects are allowed")


# Values that need no look inside (exact types: a subclass takes _check_value's way). Most entries
# hold only these, and checking them field by field in one loop costs a third of the recursion.
_PLAIN = frozenset({str, int, bool, type(None)})


def canonical(record: dict) -> bytes:
    """The one byte form of a record (sorted keys, no spaces, UTF-8); rejects floats."""
    if type(record) is dict:
        for key, value in record.items():
            if type(key) is not str or type(value) not in _PLAIN:
                _check_value(record, "entry")
                break
    else:
        _check_value(record, "entry")
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def without_floats(value):
    """`value` with every float made a fixed-point string (3 decimals), for fields that come
    from parts measuring seconds; dict keys become strings. Entries themselves take no floats."""
    if isinstance(value, float):
        return f"{value:.3f}"
    if type(value) is dict and all(type(k) is str and type(v) in _PLAIN for k, v in value.items()):
        return value  # nothing to change (most parts' fields)
    if isinstance(value, dict):
        return {str(k): without_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_floats(v) for v in value]
    return value


def entry(type: str, **fields) -> bytes:  # noqa: A002 - `type` is the entry's field name
    """A canonical entry of that type; `time` defaults to now in integer nanoseconds."""
    if not isinstance(type, str) or not _TYPE_RE.match(type):
        raise BadLogInput(f"log entry type {type!r} must be lower snake case, e.g. 'flow_start'")
    when = fields.pop("time", None)
    record = {"type": type, "time": time.time_ns() if when is None else when}
    record.update(fields)
    return canonical(record)


def decode(entry_bytes: bytes) -> dict:
    """Parse an entry back into a dict (for show and tail; never used to compute hashes)."""
    return json.loads(entry_bytes)
