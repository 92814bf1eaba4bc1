"""Log entries' canonical form, against generated values: what the checks let through is exactly
json.dumps' sorted compact form, and a float anywhere (or a key that is not a string) is refused,
whichever way canonical() takes (the flat fast path or the recursive check)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skyguard.tlog.entries import canonical, without_floats
from skyguard.tlog.errors import BadLogInput

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8))
VALUES = st.recursive(st.one_of(SCALARS, st.floats(allow_nan=False)),
                      lambda inner: st.one_of(st.lists(inner, max_size=3),
                                              st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                      max_leaves=10)
KEYS = st.one_of(st.text(max_size=6), st.integers())


def has_float_or_bad_key(value) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, list):
        return any(map(has_float_or_bad_key, value))
    if isinstance(value, dict):
        return any(not isinstance(k, str) or has_float_or_bad_key(v) for k, v in value.items())
    return False


@given(st.dictionaries(KEYS, VALUES, max_size=5))
def test_canonical_is_json_sorted_and_refuses_every_float(record):
    if has_float_or_bad_key(record):
        with pytest.raises(BadLogInput):
            canonical(record)
    else:
        assert canonical(record) == json.dumps(record, sort_keys=True, separators=(",", ":"),
                                               ensure_ascii=False).encode()


@given(st.dictionaries(KEYS, VALUES, max_size=5))
def test_without_floats_leaves_nothing_canonical_refuses(record):
    made = without_floats(record)
    canonical(made)  # never raises: no float, every key a string
    if not has_float_or_bad_key(record):
        assert made == record
