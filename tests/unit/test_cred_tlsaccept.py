"""Intercepted TLS accepted with the certificate chosen before the handshake (tlsaccept.py): the
sans-io ClientHello reader on real ClientHellos from Python's ssl module (whole, cut anywhere,
spread over records, malformed), then over loopback sockets: a ClientHello that arrives in
pieces, garbage, and a silent client, each against the proxy of test_cred_proxy.py's rig."""

from __future__ import annotations

import socket
import ssl
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cred_proxy import AUTH, Rig

from skyguard.credproxy.http1 import ProxyLimits
from skyguard.credproxy.tlsaccept import NotClientHello, client_hello_sni


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(tmp_path_factory.mktemp("crx-accept"))
    yield r
    r.close()


def client_hello(name: str | None) -> bytes:
    """The first flight of a real TLS client (Python's ssl, OpenSSL)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def as_two_records(hello: bytes) -> bytes:
    body = hello[5:]
    cut = len(body) // 3
    return b"".join(hello[:3] + len(part).to_bytes(2, "big") + part for part in (body[:cut], body[cut:]))


def test_the_server_name_of_real_client_hellos():
    assert client_hello_sni(client_hello("api.github.test")) == (True, "api.github.test")
    assert client_hello_sni(client_hello(None)) == (True, None)
    assert client_hello_sni(as_two_records(client_hello("x.test"))) == (True, "x.test")


def test_an_incomplete_client_hello_asks_for_more_at_every_cut():
    hello = as_two_records(client_hello("api.github.test"))
    for cut in range(len(hello)):
        assert client_hello_sni(hello[:cut]) == (False, None), cut


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: api.github.test\r\n\r\n",
    b"\x15\x03\x03\x00\x02\x02\x28",  # an alert record
    b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello where the ClientHello belongs
    b"\x16\x03\x01\x00\x00",  # an empty record
    b"\x16\x03\x01\x00\x06\x01\x00\x00\x02\x03\x03",  # a ClientHello too short to hold its fields
], ids=["http", "alert", "server-hello", "empty-record", "truncated-hello"])
def test_what_is_not_a_client_hello_is_refused(data):
    with pytest.raises(NotClientHello):
        client_hello_sni(data)


def test_a_repeated_extension_is_refused():
    hello = bytearray(client_hello("api.github.test"))
    # Duplicate the server_name extension by rewriting another extension's type to 0 (SNI).
    at = hello.index(b"\x00\x0b")  # ec_point_formats, present in OpenSSL's ClientHello
    hello[at:at + 2] = b"\x00\x00"
    with pytest.raises(NotClientHello):
        client_hello_sni(bytes(hello))


def test_a_client_hello_in_pieces_still_gets_its_certificate(rig):
    """The proxy waits (polling, not spinning) until the whole ClientHello is queued."""
    context = ssl.create_default_context(cafile=str(rig.tmp / "skyca.pem"))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="api.github.test")
    sock = socket.create_connection(("127.0.0.1", rig.https_port), timeout=10)
    with sock:
        first = True
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                data = outgoing.read()
                if first:  # the ClientHello: in three TCP writes, 50 ms apart
                    for start in range(0, len(data), len(data) // 3 + 1):
                        sock.sendall(data[start:start + len(data) // 3 + 1])
                        time.sleep(0.05)
                    first = False
                elif data:
                    sock.sendall(data)
                incoming.write(sock.recv(65536))
        sock.sendall(outgoing.read())
        tls.write(f"GET / HTTP/1.1\r\nHost: api.github.test\r\n{AUTH}\r\nConnection: close\r\n\r\n".encode())
        sock.sendall(outgoing.read())
        answer = b""
        while b"\r\n" not in answer:
            incoming.write(sock.recv(65536))
            try:
                answer += tls.read(65536)
            except ssl.SSLWantReadError:
                continue
    assert answer.startswith(b"HTTP/1.1 200 ")


def closed_without_answer(sock: socket.socket) -> bool:
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:  # closed with our bytes unread: a reset, also no answer
        return True


def test_garbage_and_silence_on_the_https_port_are_closed_and_give_their_slot_back(rig):
    proxy = rig.make_proxy(lambda s: ("127.0.0.1", rig.echo_port),
                           limits=ProxyLimits(header_timeout=0.5, max_connections_per_vm=1))
    _, https = rig.run(proxy.start("127.0.0.1"))
    try:
        garbage = socket.create_connection(("127.0.0.1", https), timeout=5)
        garbage.sendall(b"GET / HTTP/1.1\r\nHost: api.github.test\r\n\r\n")  # HTTP where TLS belongs
        assert closed_without_answer(garbage)
        garbage.close()
        silent = socket.create_connection(("127.0.0.1", https), timeout=5)
        assert closed_without_answer(silent)  # after the header timeout
        silent.close()
        code, _ = rig.curl("https://api.github.test/", "-H", AUTH, port=https)
        assert code == 200  # both gave the VM's only slot back
    finally:
        rig.run(proxy.stop())


CHILD = r"""
import asyncio, logging, os, resource, sys
from skyguard.credproxy.tlsaccept import PeekingTlsListener
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")

async def main():
    async def on_hello(sock, token, name):
        sock.close()
    listener = PeekingTlsListener(admit=lambda peer: (peer,), release=lambda token: None, on_hello=on_hello,
                                  hello_timeout=5)
    port = await listener.start("127.0.0.1", 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 2, hard))
    print(port, flush=True)
    await asyncio.sleep(2.5)
    await listener.stop()

asyncio.run(main())
"""


def test_running_out_of_descriptors_pauses_accepting_instead_of_spinning():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    port = int(child.stdout.readline())
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(8)]
    _, errors = child.communicate(timeout=30)
    for client in clients:
        client.close()
    warnings = [line for line in errors.decode().splitlines() if "cannot accept" in line]
    assert child.returncode == 0, errors.decode()[-2000:]
    assert 1 <= len(warnings) <= 4, len(warnings)  # one per retry second, not one per loop turn


REAL_HELLO = client_hello("api.github.test")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(REAL_HELLO) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(REAL_HELLO)))
def test_a_mutated_client_hello_is_read_or_refused_never_anything_else(flips, cut):
    data = bytearray(REAL_HELLO)
    for at, value in flips:
        data[at] = value
    try:
        complete, name = client_hello_sni(bytes(data[:cut]))
    except NotClientHello:
        return
    assert isinstance(complete, bool) and (name is None or isinstance(name, str))
