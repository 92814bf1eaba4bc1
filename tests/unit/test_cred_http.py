"""The credential proxy's two HTTP readers, sans-io: what a VM sends becomes whole requests
(RequestReader), what an upstream answers becomes one response (ResponseReader). Both sit on
llhttp (httptools); these tests pin the rules the proxy adds on top of it and the framing
corner cases a hostile VM or upstream would try. Over real sockets: test_cred_proxy.py and
test_cred_fastpath.py; the differential fuzz oracle against h11: tests/fuzz/harnesses.py."""

from __future__ import annotations

import pytest

from skyguard.credproxy.codings import UnscrubbableResponse
from skyguard.credproxy.http1 import (
    ProtocolRefusal,
    ProxyLimits,
    RequestReader,
    ResponseReader,
    StaleConnection,
    Upgraded,
    UpstreamProtocolError,
)

LIMITS = ProxyLimits(max_header_bytes=1024, max_request_body=4096)
GET = b"GET /a HTTP/1.1\r\nHost: api.github.test\r\n\r\n"


def read(*reads: bytes, limits: ProxyLimits = LIMITS) -> RequestReader:
    reader = RequestReader(limits)
    for data in reads:
        reader.feed(data)
    return reader


def refusal(*reads: bytes) -> tuple[int, str]:
    with pytest.raises(ProtocolRefusal) as caught:
        read(*reads)
    return caught.value.status, caught.value.reason


# ---- requests from the VM ---------------------------------------------------------------------

def test_pipelined_requests_come_out_whole_and_in_order_however_they_are_read():
    data = GET + b"POST /b HTTP/1.1\r\nHost: api.github.test\r\nContent-Length: 3\r\n\r\nxyz" + GET
    whole = list(read(data).complete)
    assert [(r.method, r.target, r.body) for r in whole] == [(b"GET", b"/a", b""), (b"POST", b"/b", b"xyz"),
                                                             (b"GET", b"/a", b"")]
    for cut in range(1, len(data)):
        assert list(read(data[:cut], data[cut:]).complete) == whole, cut


def test_header_names_are_lowered_and_values_lose_surrounding_whitespace():
    [request] = read(b"GET / HTTP/1.1\r\nHost: api.github.test\r\nX-Token:  \t a b \t\r\n\r\n").complete
    assert request.headers == ((b"host", b"api.github.test"), (b"x-token", b"a b"))


def test_chunked_body_is_decoded_and_trailers_are_dropped():
    # A trailer is never forwarded, so a placeholder or secret hidden in one goes nowhere.
    [request] = read(b"POST / HTTP/1.1\r\nHost: api.github.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nAuthorization: Bearer sg-placeholder\r\n\r\n").complete
    assert request.body == b"abcde"
    assert [n for n, _ in request.headers] == [b"host", b"transfer-encoding"]


@pytest.mark.parametrize("raw, status", [
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),  # obs-fold
    (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400),  # bare CR
    (b"GET / HTTP/1.1\nHost: a\n\n", 400),  # bare LF
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),  # space before the colon
    (b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n", 400),
    (b"GET /a\x7fb HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET /\r\n\r\n", 505),  # HTTP/0.9
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4097\r\n\r\n", 413),  # refused before the body
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 1100 + b"\r\n\r\n", 431),
], ids=["cl+te", "two-cl", "signed-cl", "te-gzip", "two-te", "chunk-size-space", "chunk-lf", "obs-fold",
        "bare-cr", "bare-lf", "space-colon", "nul", "del-in-target", "no-host", "two-hosts", "h2", "h09",
        "h2-preface", "body-limit", "head-limit"])
def test_smuggling_and_oversized_requests_are_refused(raw, status):
    assert refusal(raw)[0] == status


def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives():
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"
    assert refusal(head, *[chunk] * 5) == (413, "request body larger than the proxy's limit")


def test_an_endless_header_line_is_cut_off_with_bounded_memory():
    reader = RequestReader(LIMITS)
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Endless: ")
    with pytest.raises(ProtocolRefusal) as caught:
        for _ in range(100):
            reader.feed(b"a" * 100)  # 10 KB if it were all kept; the limit is 1 KB
    assert caught.value.status == 431
    assert reader.head_reads <= 2 * LIMITS.max_header_bytes + 100


def test_an_upgrade_is_queued_for_decide_to_refuse_and_nothing_after_it_is_read():
    reader = RequestReader(LIMITS)
    with pytest.raises(Upgraded):
        reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                    b"\x81\x05hello")
    [request] = reader.complete
    assert (b"upgrade", b"websocket") in request.headers


def test_expect_100_continue_is_noticed_until_the_body_starts():
    reader = read(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert reader.expects_continue and not reader.complete
    reader.feed(b"abc")
    assert not reader.expects_continue and reader.complete[0].body == b"abc"


# ---- responses from an upstream ---------------------------------------------------------------

def respond(*reads: bytes, head_request: bool = False, limit: int = 4096) -> ResponseReader:
    response = ResponseReader(head_request, limit, 1024)
    for data in reads:
        response.feed(data)
    return response


def test_a_keep_alive_response_is_whole_and_its_connection_reusable():
    response = respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhel", b"lo")
    assert response.done and response.reusable
    assert (response.status, response.reason, response.headers, bytes(response.body)) == \
        (200, b"OK", [(b"content-length", b"5"), (b"x-a", b"1")], b"hello")


def test_informational_responses_are_skipped():
    response = respond(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert response.done and response.status == 201


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiHTTP/1.1 200 OK\r\n",  # bytes beyond the response
], ids=["close", "http10", "extra-bytes"])
def test_a_connection_that_cannot_carry_another_exchange_is_not_reused(raw):
    response = respond(raw)
    assert response.done and bytes(response.body) == b"hi" and not response.reusable


def test_a_body_delimited_by_the_close_is_whole_only_at_the_close():
    response = respond(b"HTTP/1.1 200 OK\r\n\r\nuntil ", b"the close")
    assert not response.done
    response.finish()
    assert response.done and bytes(response.body) == b"until the close" and not response.reusable


def test_a_head_response_ends_at_its_head_and_its_connection_is_not_reused():
    response = respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nstray body", head_request=True)
    assert response.done and response.body == b"" and not response.reusable


def test_no_body_statuses_end_at_the_head():
    response = respond(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n")
    assert response.done and response.body == b""


def test_chunked_response_trailers_are_dropped():
    response = respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX-Secret: s\r\n\r\n")
    assert response.done and bytes(response.body) == b"hi"
    assert [n for n, _ in response.headers] == [b"transfer-encoding"]


def test_an_upstream_that_closes_early_is_told_apart_from_a_stale_pooled_connection():
    with pytest.raises(StaleConnection):  # nothing at all: the pool retries on a new connection
        respond().finish()
    with pytest.raises(ConnectionResetError) as caught:  # cut mid-body: a 502, never retried
        respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhi").finish()
    assert not isinstance(caught.value, StaleConnection)


@pytest.mark.parametrize("reads, error", [
    ((b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", b"x" * 5000), UnscrubbableResponse),
    ((b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",), UpstreamProtocolError),
    ((b"SSH-2.0-OpenSSH\r\n",), UpstreamProtocolError),
    ((b"HTTP/1.1 200 OK\r\nX: " + b"a" * 2000 + b"\r\n\r\n",), UpstreamProtocolError),
    ((b"HTTP/1.1 200 OK\r\nX: ",) + (b"a" * 500,) * 10, UpstreamProtocolError),
], ids=["body-limit", "two-cl", "not-http", "head-limit", "endless-header"])
def test_unreadable_or_oversized_responses_raise_what_becomes_a_502(reads, error):
    with pytest.raises(error):
        respond(*reads)


def test_bytes_after_a_whole_response_only_make_the_connection_unusable():
    # Found by the upstream fuzzer: in one read, llhttp's error on what follows a complete
    # response turned it into a 502; read byte by byte it went through. Now both read it whole.
    raw = b"HTTP/1.0 204 No Content\r\n\r\n\x00garbage"
    whole = respond(raw)
    assert whole.done and whole.status == 204 and not whole.reusable
    bytewise = respond(*[raw[i:i + 1] for i in range(len(raw))])
    assert bytewise.done and bytewise.status == 204 and not bytewise.reusable


def test_an_upstream_that_switches_protocols_is_refused():
    with pytest.raises(UpstreamProtocolError):
        respond(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00")
