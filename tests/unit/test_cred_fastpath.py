"""The credential proxy's keep-alive fast path over real loopback TLS: the proxy writes response
heads itself and parses requests with llhttp (httptools), so framing, keep-alive and
pipelining are checked here as a client sees them; and the pure response serialiser refuses a
header that could split a response. Uses the proxy rig of test_cred_proxy.py (same module-scoped
echo upstream and proxies). Not here: the swap rules (test_cred_swap.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import socket
import ssl

import pytest
from test_cred_proxy import AUTH, SECRET, Rig, no_secret

from skyguard.credproxy.http1 import UnsafeHead, client_keeps_alive, serialise_response
from skyguard.credproxy.swap import HttpRequest
from skyguard.lab.internet import tls_server_context

RESPONSE_HEAD = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n((?:[^\r\n]+\r\n)*)\r\n")


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(tmp_path_factory.mktemp("crx-fast"))
    yield r
    r.close()


def responses(stream: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Split a byte stream of Content-Length-framed responses (what the proxy always writes)."""
    out = []
    while stream:
        match = RESPONSE_HEAD.match(stream)
        assert match, stream[:200]
        headers = dict(line.split(b": ", 1) for line in match.group(2).split(b"\r\n") if line)
        length = int(headers[b"content-length"])
        end = match.end() + length
        out.append((int(match.group(1)), headers, stream[match.end():end]))
        stream = stream[end:]
    return out


def request(path: str, *extra: str, method: str = "GET", version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: api.github.test", AUTH, *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_pipelined_requests_are_each_swapped_and_answered_in_order(rig):
    before = len(rig.echoed())
    out = rig.raw(request("/p1") + request("/p2") + request("/p3", "Connection: close"))
    answers = responses(out)
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert [h.get(b"connection") for _, h, _ in answers] == [None, None, b"close"]
    assert all(no_secret(body) for _, _, body in answers)
    seen = rig.echoed()[before:]
    assert [s["path"] for s in seen] == ["/p1", "/p2", "/p3"]
    assert all(dict((k.lower(), v) for k, v in s["headers"])["authorization"] == f"Bearer {SECRET.decode()}"
               for s in seen)


def test_http_1_0_gets_connection_close_and_the_connection_ends(rig):
    out = rig.raw(request("/old", version="1.0"))  # raw() returns once the proxy closes
    [(status, headers, _)] = responses(out)
    assert status == 200 and headers[b"connection"] == b"close"


def test_head_response_keeps_its_length_and_has_no_body(rig):
    # The echo fixture wrongly sends a body after HEAD, as a careless upstream might: the proxy
    # must neither pass it on nor reuse that upstream connection (its next "response" would be
    # the stray body).
    out = rig.raw(request("/h", method="HEAD") + request("/after", "Connection: close"))
    head = RESPONSE_HEAD.match(out)
    assert head.group(1) == b"200" and b"content-length: " in head.group(2)
    rest = out[head.end():]
    assert rest.startswith(b"HTTP/1.1 200 ")  # no body bytes between the two responses
    [(status, _, body)] = responses(rest)
    assert status == 200 and b"/after" in body


def test_serialiser_frames_by_length_and_closes_when_asked():
    data = serialise_response(b"GET", False, (200, b"OK"), ((b"x-a", b"1"),), b"hello")
    assert data == b"HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello"
    no_body = serialise_response(b"GET", True, (204, b"No Content"), (), b"")
    assert no_body == b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"
    head = serialise_response(b"HEAD", True, (200, b""), ((b"content-length", b"42"),), b"")
    assert head == b"HTTP/1.1 200 \r\ncontent-length: 42\r\n\r\n"


@pytest.mark.parametrize("headers, reason", [
    (((b"x-a", b"1\r\nset-cookie: evil"),), b"OK"),
    (((b"x-a", b"1\nx"),), b"OK"),
    (((b"x-a\r\nx-b", b"1"),), b"OK"),
    (((b"x-a", b"nul\x00"),), b"OK"),
    ((), b"OK\r\nx-injected: 1"),
], ids=["crlf-value", "lf-value", "crlf-name", "nul", "crlf-reason"])
def test_serialiser_refuses_what_would_split_a_response(headers, reason):
    with pytest.raises(UnsafeHead):
        serialise_response(b"GET", True, (200, reason), headers, b"")


def test_serialiser_refuses_informational_statuses():
    with pytest.raises(UnsafeHead):
        serialise_response(b"GET", True, (101, b"Switching Protocols"), (), b"")


@pytest.mark.parametrize("version, headers, keeps", [
    (b"1.1", (), True),
    (b"1.1", ((b"connection", b"close"),), False),
    (b"1.1", ((b"connection", b"keep-alive, Close"),), False),
    (b"1.0", (), False),
    (b"1.0", ((b"connection", b"keep-alive"),), False),  # as h11: no keep-alive for HTTP/1.0
])
def test_keep_alive_follows_h11s_rule(version, headers, keeps):
    assert client_keeps_alive(HttpRequest(b"GET", b"/", ((b"host", b"a"), *headers), b"", version)) is keeps


def test_many_pipelined_requests_are_all_answered_while_reading_pauses(rig):
    # More than the proxy parses ahead (MAX_PIPELINED): reading pauses and resumes, none is lost.
    paths = [f"/many{i}" for i in range(12)]
    out = rig.raw(b"".join(request(p) for p in paths[:-1]) + request(paths[-1], "Connection: close"))
    answers = responses(out)
    assert [status for status, _, _ in answers] == [200] * len(paths)
    assert [json.loads(body)["path"] for _, _, body in answers] == paths


def test_expect_100_continue_gets_its_interim_answer_before_the_body(rig):
    context = ssl.create_default_context(cafile=str(rig.tmp / "skyca.pem"))
    with socket.create_connection(("127.0.0.1", rig.https_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="api.github.test") as tls:
        tls.sendall(request("/continue", "Expect: 100-continue", "Content-Length: 5", "Connection: close",
                            method="POST"))
        assert tls.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"  # and nothing else: the body is not sent yet
        tls.sendall(b"hello")
        out = b""
        while chunk := tls.recv(65536):
            out += chunk
    [(status, _, body)] = responses(out)
    assert status == 200 and json.loads(body)["body"] == "hello"


class CannedUpstream:
    """A TLS upstream that answers every request with fixed bytes, then closes: the hostile or
    old-fashioned servers the echo fixture does not imitate."""

    def __init__(self, rig, answer: bytes):
        self.answer = answer
        context = tls_server_context(rig.tmp / "up.pem", rig.tmp / "up.key")
        self.server = rig.run(asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context))
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(self.answer)
        await writer.drain()
        writer.close()


@pytest.mark.parametrize("answer, status, body", [
    # No framing: the body ends at the close, and is scrubbed like any other.
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\necho: " + SECRET, 200, b"echo: [skyguard-redacted]"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\ncut short", 502, None),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 502, None),
    (b"HTTP/1.1 200 OK\r\nX-Split: a\r\n\rSet-Cookie: x\r\n\r\n", 502, None),
    (b"not http at all\r\n\r\n", 502, None),
    (b"", 502, None),
], ids=["until-close", "truncated", "two-lengths", "bare-cr", "garbage", "silent"])
def test_hostile_or_odd_upstreams_never_leak_and_never_hang(rig, answer, status, body):
    upstream = CannedUpstream(rig, answer)
    proxy = rig.make_proxy(lambda s: ("127.0.0.1", upstream.port))
    _, https = rig.run(proxy.start("127.0.0.1"))
    try:
        code, got = rig.curl("https://api.github.test/", "-H", AUTH, port=https)
        assert code == status and no_secret(got)
        if body is not None:
            assert got == body
    finally:
        rig.run(proxy.stop())
        upstream.server.close()


class AnswersOnce:
    """A TLS upstream that answers the first request of a connection (keep-alive), then reads
    and says nothing: a hung upstream, on a fresh connection or on one the proxy pooled."""

    def __init__(self, rig, answer_first: bool):
        self.answer_first = answer_first
        context = tls_server_context(rig.tmp / "up.pem", rig.tmp / "up.key")
        self.server = rig.run(asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context))
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        if self.answer_first:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
            await writer.drain()
        await reader.read()  # silent until the proxy gives up and closes


@pytest.mark.parametrize("pooled", [False, True], ids=["fresh", "pooled"])
def test_an_upstream_that_never_answers_is_a_502_after_the_upstream_timeout(rig, pooled):
    upstream = AnswersOnce(rig, answer_first=pooled)
    proxy = rig.make_proxy(lambda s: ("127.0.0.1", upstream.port),
                           limits=dataclasses.replace(rig.limits, upstream_timeout=1.0))
    _, https = rig.run(proxy.start("127.0.0.1"))
    try:
        context = ssl.create_default_context(cafile=str(rig.tmp / "skyca.pem"))
        with socket.create_connection(("127.0.0.1", https), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="api.github.test") as tls:
            tls.sendall(request("/one") + request("/two") if pooled else request("/one"))
            out = b""
            while chunk := tls.recv(65536):  # the proxy closes after its 502
                out += chunk
        got = responses(out)
        assert [status for status, _, _ in got] == ([200, 502] if pooled else [502])
        assert b"TimeoutError" in got[-1][2]
    finally:
        rig.run(proxy.stop())
        upstream.server.close()


def test_a_body_refused_while_it_arrives_still_gets_its_answer(rig):
    # The proxy refuses at Content-Length, before the body. It must keep reading (and discarding)
    # until the client has finished sending: closing with unread input resets the connection,
    # and the reset can destroy the 413 before the client reads it.
    import select

    context = ssl.create_default_context(cafile=str(rig.tmp / "skyca.pem"))
    with socket.create_connection(("127.0.0.1", rig.https_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="api.github.test") as tls:
        tls.sendall(request("/big", "Content-Length: 300000", method="POST"))
        assert select.select([tls], [], [], 10)[0]  # the answer is there before the body is sent
        for _ in range(30):
            tls.sendall(b"a" * 10_000)
        out = b""
        while chunk := tls.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 413 "), out[:100]
