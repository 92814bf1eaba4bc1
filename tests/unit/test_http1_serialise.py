"""The HTTP/1.1 serialisers (skyguard/credproxy/http1.py) refuse exactly the heads a naive check
refuses: a control character (any but HTAB, CR and LF included) in a header name, value or
reason phrase. The serialisers check the bytes they wrote in one pass (issue 20's per-request
cost); this cross-checks them against the plain search over each part, on random heads."""

from __future__ import annotations

import random
import re

from skyguard.credproxy.http1 import UnsafeHead, serialise_request, serialise_response
from skyguard.credproxy.swap import HttpRequest

NAIVE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
BYTES = [b"a", b"-", b" ", b":", b"\t", b"\r", b"\n", b"\r\n", b"\x00", b"\x0b", b"\x1f", b"\x7f", b"\x80", b"\xff"]
NAMES = [b"x-a", b"cookie", b"content-length", b"connection", b"expect"]


def _piece(rnd: random.Random) -> bytes:
    return b"".join(rnd.choice(BYTES) for _ in range(rnd.randint(0, 3)))


def _outcome(write, *args) -> bytes | str:
    try:
        return write(*args)
    except UnsafeHead:
        return "refused"


def test_serialisers_refuse_exactly_what_a_naive_search_finds():
    rnd = random.Random(20)
    refused = 0
    for _ in range(3000):
        headers = tuple((rnd.choice(NAMES) if rnd.random() < 0.5 else b"x" + _piece(rnd),
                         b"v" + (_piece(rnd) if rnd.random() < 0.5 else b"")) for _ in range(rnd.randint(0, 4)))
        reason = rnd.choice([b"OK", b"", b"O" + _piece(rnd)])
        request = _outcome(serialise_request, HttpRequest(b"GET", b"/", headers, b""))
        forwarded = [(n, v) for n, v in headers if n not in (b"content-length", b"connection", b"expect")]
        assert (request == "refused") == any(NAIVE.search(n + v) for n, v in forwarded)
        response = _outcome(serialise_response, b"GET", True, (200, reason), forwarded, b"body")
        unsafe = any(NAIVE.search(n + v) for n, v in forwarded) or bool(NAIVE.search(reason))
        assert (response == "refused") == unsafe
        if unsafe:
            refused += 1
        else:
            head, _, body = response.partition(b"\r\n\r\n")
            assert body == b"body" and head.count(b"\r\n") == len(forwarded) + 1  # content-length added
    assert refused > 500  # the random heads did exercise the refusals
