"""Attacks on the credential proxy through real clients (curl, raw sockets) over loopback, issue
15's credential-proxy bullets: an upstream that reflects the swapped secret back in any spelling,
split across chunks and TCP writes, in its status line, header names and trailers, or after the
first gzip member; Connection headers that try to remove what the decision relied on; one VM
hoarding connections or making the proxy mint certificates. Uses the rig of
test_cred_proxy.py (echo upstream with its own CA, workloads 127.0.0.1 = sdn, 127.0.0.2 =
sandbox)."""

from __future__ import annotations

import asyncio
import gzip
import socket
import ssl
import threading
import time

import pytest
from test_cred_forms import FORMS
from test_cred_proxy import AUTH, SECRET, Rig

from skyguard.credproxy.ca import CertificateAuthority
from skyguard.credproxy.http1 import ProxyLimits
from skyguard.credproxy.secretforms import SecretForms
from skyguard.lab.internet import tls_server_context


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(tmp_path_factory.mktemp("crx-hostile"))
    yield r
    r.close()


class ReflectingUpstream:
    """A TLS upstream that takes the secret the proxy put in Authorization and sends it back as
    the path asks: /form/<name> (in that spelling, chunked, the encoded secret cut across chunk
    boundaries and separate TCP writes), /head (in the reason phrase, a header name, a header
    value and a trailer), /gzip (in the second of two gzip members)."""

    def __init__(self, rig):
        context = tls_server_context(rig.tmp / "up.pem", rig.tmp / "up.key")
        self.server = rig.run(asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context))
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer):
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            path = head[0].split(" ")[1]
            secret = next(line.split("Bearer ", 1)[1] for line in head if line.lower().startswith("authorization:"))
            secret = secret.encode()
            if path.startswith("/form/"):
                await self._chunked(writer, b"before " + FORMS[path[len("/form/"):]](secret) + b" after")
            elif path == "/head":
                writer.write(b"HTTP/1.1 200 " + secret + b"\r\nX-" + secret.hex().encode() + b": 1\r\n"
                             b"X-Value: " + secret + b"\r\nTrailer: X-Trailer\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\n0\r\nX-Trailer: " + secret + b"\r\n\r\n")
            elif path == "/coding":  # a content coding the proxy refuses, named after the secret
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: " + secret + b"\r\nContent-Length: 2\r\n\r\nhi")
            elif path == "/gzip":
                body = gzip.compress(b"part one, ") + gzip.compress(b"part two: " + secret + b" end")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
            elif path.startswith("/transfer/"):  # gzip as a transfer coding, not a content coding
                body = gzip.compress(b"reflected: " + secret)
                coding = path[len("/transfer/"):].replace("+", ", ").encode()
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                             % (coding, len(body), body))
            await writer.drain()
        finally:
            writer.close()

    @staticmethod
    async def _chunked(writer, body: bytes):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
        cuts = list(range(0, len(body), 7)) + [len(body)]  # 7-byte chunks: every form is cut several times
        for start, end in zip(cuts, cuts[1:]):
            writer.write(b"%x\r\n%s\r\n" % (end - start, body[start:end]))
            await writer.drain()
            await asyncio.sleep(0.002)  # separate TCP segments, so separate reads at the proxy
        writer.write(b"0\r\n\r\n")


@pytest.fixture(scope="module")
def reflecting(rig):
    upstream = ReflectingUpstream(rig)
    proxy = rig.make_proxy(lambda s: ("127.0.0.1", upstream.port))
    _, https = rig.run(proxy.start("127.0.0.1"))
    yield https
    rig.run(proxy.stop())
    upstream.server.close()


def no_form_of_the_secret(blob: bytes) -> bool:
    return not SecretForms([SECRET]).found_in(blob)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_a_reflected_secret_is_scrubbed_in_every_form_across_chunks_and_reads(rig, reflecting, form):
    code, body = rig.curl(f"https://api.github.test/form/{form}", "-H", AUTH, port=reflecting)
    assert code == 200 and body.startswith(b"before ") and body.endswith(b" after")
    assert b"[skyguard-redacted]" in body and no_form_of_the_secret(body), body


def test_status_line_header_names_values_and_trailers_are_scrubbed(rig, reflecting):
    code, out = rig.curl("https://api.github.test/head", "-H", AUTH, "-i", "--raw", port=reflecting)
    assert code == 200
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 [skyguard-redacted]\r\n")
    assert b"x-value: [skyguard-redacted]" in head.lower() and b"x-trailer" not in out.lower()
    assert no_form_of_the_secret(out) and body.endswith(b"hello")


def test_a_refused_response_does_not_carry_the_secret_in_the_refusal(rig, reflecting):
    code, body = rig.curl("https://api.github.test/coding", "-H", AUTH, port=reflecting)
    assert code == 502 and b"content coding an unregistered one" in body and no_form_of_the_secret(body)


def test_every_gzip_member_is_decoded_and_scrubbed(rig, reflecting):
    code, body = rig.curl("https://api.github.test/gzip", "-H", AUTH, port=reflecting)
    assert code == 200
    assert body == b"part one, part two: [skyguard-redacted] end"  # nothing cut after the first member


@pytest.mark.parametrize("coding", ["gzip+chunked", "deflate+chunked", "x-anything+chunked"])
def test_a_transfer_coding_other_than_chunked_is_refused_not_forwarded_undecoded(rig, reflecting, coding):
    # llhttp undoes only the chunked framing of "gzip, chunked": the gzip stream would reach the
    # VM unscrubbed (and without a Content-Encoding), for it to gunzip the secret out of.
    code, body = rig.curl(f"https://api.github.test/transfer/{coding}", "-H", AUTH, port=reflecting)
    if code == 200 and body[:2] == b"\x1f\x8b":
        body = gzip.decompress(body)
    assert code == 502 and no_form_of_the_secret(body), (code, body)


@pytest.mark.parametrize("form", ["html-hex", "double-percent", "base32", "utf-16-le", "quoted-printable-every-byte"])
def test_a_vm_that_knows_the_secret_cannot_send_it_out_in_another_spelling(rig, form):
    body = rig.tmp / f"out-{form}"
    body.write_bytes(b"x=" + FORMS[form](SECRET))  # a file: UTF-16 holds NUL bytes, argv cannot
    before = len(rig.echoed())
    code, _ = rig.curl("https://api.github.test/out", "--data-binary", f"@{body}")
    assert code == 403 and len(rig.echoed()) == before
    assert rig.log.snapshot()[-1]["result"] == "blocked_content"


def test_a_secret_split_across_request_chunks_and_reads_is_blocked(rig):
    context = ssl.create_default_context(cafile=str(rig.tmp / "skyca.pem"))
    body = b"q=" + FORMS["html-hex"](SECRET)
    before = len(rig.echoed())
    with context.wrap_socket(socket.create_connection(("127.0.0.1", rig.https_port), timeout=10),
                             server_hostname="api.github.test") as tls:
        tls.sendall(b"POST /in HTTP/1.1\r\nHost: api.github.test\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, len(body), 5):  # 5-byte chunks, each its own write
            tls.sendall(b"%x\r\n%s\r\n" % (len(body[start:start + 5]), body[start:start + 5]))
            time.sleep(0.002)
        tls.sendall(b"0\r\n\r\n")
        answer = tls.recv(100)
    assert answer.startswith(b"HTTP/1.1 403 ") and len(rig.echoed()) == before
    assert rig.log.snapshot()[-1]["result"] == "blocked_content"


@pytest.mark.parametrize("token", ["authorization", "host", "Authorization, Host, accept-encoding", "x-keep"])
def test_connection_tokens_never_remove_what_the_decision_relied_on(rig, token):
    before = len(rig.echoed())
    code, _ = rig.curl("https://api.github.test/tokens", "-H", AUTH, "-H", f"Connection: {token}",
                       "-H", "X-Keep: 1")
    assert code == 200
    seen = {name.lower(): value for name, value in rig.echoed()[before]["headers"]}
    assert seen["authorization"] == "Bearer " + SECRET.decode()  # swapped and forwarded
    assert seen["host"] == "api.github.test" and seen["accept-encoding"] == "identity"
    assert ("x-keep" in seen) == (token != "x-keep")  # an ordinary header named there still goes
    assert "connection" not in seen


def _hold(port: int, source: str, tls: bool, count: int) -> list[socket.socket]:
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        if tls:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            sock = context.wrap_socket(sock, server_hostname="api.github.test")
        held.append(sock)
    return held


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError, OSError):
        return True


def test_one_vm_holding_connections_never_locks_another_out(rig):
    proxy = rig.make_proxy(lambda s: ("127.0.0.1", rig.echo_port), limits=ProxyLimits(max_connections_per_vm=3))
    http, https = rig.run(proxy.start("127.0.0.1"))
    held = []
    try:
        held = _hold(http, "127.0.0.2", False, 2) + _hold(https, "127.0.0.2", True, 1)  # agent1: its 3
        extra = socket.create_connection(("127.0.0.1", http), timeout=5, source_address=("127.0.0.2", 0))
        assert _closed_by_peer(extra)  # agent1's fourth is refused at once
        extra.close()
        assert rig.curl("https://api.github.test/", "-H", AUTH, port=https)[0] == 200  # sdnctl1 unaffected
        held.pop().close()
        for _ in range(50):  # the slot comes back once the proxy has seen the close
            again = socket.create_connection(("127.0.0.1", http), timeout=5, source_address=("127.0.0.2", 0))
            again.sendall(b"GET / HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n")
            again.settimeout(5)
            answer = again.recv(100)
            again.close()
            if answer:
                break
        assert answer.startswith(b"HTTP/1.1 ")
    finally:
        for sock in held:
            sock.close()
        rig.run(proxy.stop())


def test_idle_upstream_connections_are_bounded_in_total(rig):
    """A VM naming ever new hosts makes ever new pool keys; the pool keeps at most its total."""
    proxy = rig.make_proxy(lambda s: ("127.0.0.1", rig.echo_port), limits=ProxyLimits(max_idle_upstream=1))
    _, https = rig.run(proxy.start("127.0.0.1"))
    try:
        for name in ("api.github.test", "other.test"):  # two names, two keys (the upstream's certificate has both)
            assert rig.curl(f"https://{name}/", port=https)[0] == 200
        assert proxy.upstreams.idle == 1
        assert rig.curl("https://api.github.test/", "-H", AUTH, port=https)[0] == 200  # still served
    finally:
        rig.run(proxy.stop())


class RecordingCA(CertificateAuthority):
    """The real CA, noting which thread minted each name."""

    def __init__(self, directory):
        super().__init__(directory)
        self.minted: dict[str, str] = {}

    def mint(self, name):
        self.minted[name] = threading.current_thread().name
        return super().mint(name)


def _handshake(port: int, source: str, name: str) -> str | None:
    """The subject CN the proxy presented for `name`, or None when it refused the handshake."""
    context = ssl.create_default_context(cafile=None)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    try:
        with context.wrap_socket(sock, server_hostname=name) as tls:
            der = tls.getpeercert(binary_form=True)
    except (ssl.SSLError, ConnectionError):
        return None
    from cryptography import x509

    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def test_certificates_are_minted_off_the_loop_within_a_per_vm_budget(rig, tmp_path):
    ca = RecordingCA(tmp_path / "ca")
    proxy = rig.make_proxy(lambda s: ("127.0.0.1", rig.echo_port), ca=ca,
                           limits=ProxyLimits(mint_burst_per_vm=2, mint_rate_per_vm=1e-9))
    _, https = rig.run(proxy.start("127.0.0.1"))
    try:
        assert _handshake(https, "127.0.0.2", "n1.test") == "CN=n1.test"
        assert _handshake(https, "127.0.0.2", "n2.test") == "CN=n2.test"
        assert _handshake(https, "127.0.0.2", "n3.test") is None  # agent1's budget is spent
        assert _handshake(https, "127.0.0.2", "n1.test") == "CN=n1.test"  # cached names cost nothing
        assert _handshake(https, "127.0.0.1", "n4.test") == "CN=n4.test"  # sdnctl1 has its own budget
        assert set(ca.minted) == {"n1.test", "n2.test", "n4.test"}
        assert all(thread.startswith("sg-cert-mint") for thread in ca.minted.values()), ca.minted
        refused = [e for e in rig.log.snapshot() if e["workload"] == "agent1" and "rate-limited" in e["reason"]]
        assert len(refused) == 1 and refused[0]["result"] == "blocked_protocol"
    finally:
        rig.run(proxy.stop())
