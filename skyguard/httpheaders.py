"""Request headers through which a client claims where a request came from or was aimed at (its
address, scheme, host, port, path prefix or original URL). Upstreams behind a proxy trust them to
pick the host, tenant or path; a client is the first hop and may claim none of them, so both
proxies drop them from what they forward (the identity-aware proxy then writes its own), and the
policy refuses them as a credential's injection header (it would be dropped with the rest).

A module of its own, in the foundation, so the proxies and the policy check share one list.
"""

from __future__ import annotations

# Every X-Forwarded-* name too (FORWARDED_PREFIX), and compared with `_` as `-` (WSGI and CGI
# servers give an app X_Forwarded_Host as X-Forwarded-Host).
FORWARDED = frozenset({b"forwarded", b"x-real-ip", b"x-client-ip", b"true-client-ip", b"x-host",
                       b"x-original-host", b"x-original-url", b"x-rewrite-url"})
FORWARDED_PREFIX = b"x-forwarded-"


# Both proxies ask for every header of every request, and a client sends the same few names each
# time: verdicts are remembered, bounded since the names are the client's to choose (emptied when
# full, long names never kept).
_MEMO_ENTRIES = 1024
_MEMO_KEY_BYTES = 255
_memo: dict[bytes, bool] = {}


def is_forwarding_header(name: bytes) -> bool:
    """Is `name` one of the FORWARDED headers, in any letter case and `_`/`-` spelling?"""
    known = _memo.get(name)
    if known is not None:
        return known
    spelt = name.lower().replace(b"_", b"-")
    verdict = spelt.startswith(FORWARDED_PREFIX) or spelt in FORWARDED
    if len(name) <= _MEMO_KEY_BYTES:
        if len(_memo) >= _MEMO_ENTRIES:
            _memo.clear()
        _memo[name] = verdict
    return verdict
