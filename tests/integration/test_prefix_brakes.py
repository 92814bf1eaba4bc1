"""Brakes per client source where one source has many addresses, beyond the caps of
test_apps_prefix.py and the SSH door's (test_admin_attack.py): the console's VNC door, the crypto
proxy and TLS termination, each real part listening on [::1] in a network namespace of its own
whose loopback holds addresses of a few IPv6 /64s, with real clients bound to those addresses. A
host owns its whole /64 (SLAAC, privacy addresses), so each brake counts a /64 as one source
(skyguard/conncap.py source_of)."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import ssl
import struct
import subprocess
import tracemalloc
from dataclasses import replace

import pytest

from skyguard import config
from skyguard.conncap import source_of
from skyguard.console import rfb
from skyguard.credproxy.interfaces import CredentialMetrics, MemorySecretSource
from skyguard.credproxy.termination import TlsTerminator
from skyguard.keys import proxy as keys_proxy
from skyguard.keys.backends import secret_store
from skyguard.keys.filebackend import FileBackend
from skyguard.keys.proxy import CryptoProxy
from skyguard.lab.ca import LabCA
from skyguard.parts import MemoryLog
from skyguard.policy.model import Policy, TlsTermination, Workload, Zone
from skyguard.policy.parse import parse_policy
from support.netns_support import NamespaceLoop
from tests.unit.test_console_proxy import hostile_vm, start_proxy, two_policies

ONE_PREFIX = [f"2001:db8:64::{n:x}" for n in range(1, 9)]  # one host's /64
OTHER_PREFIX = "2001:db8:65::1"  # someone else


@pytest.fixture(scope="module")
def ns_name(root):
    """A network namespace whose loopback holds the addresses above."""
    name = f"sgpb-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        for address in ONE_PREFIX + [OTHER_PREFIX]:
            subprocess.run(["ip", "-n", name, "addr", "add", f"{address}/64", "dev", "lo", "nodad"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="module")
def ns(ns_name):
    """An asyncio loop in that namespace: the parts and their clients run there."""
    loop = NamespaceLoop(ns_name, timeout=60)
    yield loop
    loop.close()


# ---- the console's VNC door: the failed-login brake ----------------------------------------------

async def vnc_login(port: int, source: str, password: str | None) -> bytes:
    """A VNC login through the proxy from `source` with a ticket's password (None: a wrong guess):
    the SecurityResult, or b"" when the proxy closed before the handshake (a blocked source)."""
    reader, writer = await asyncio.open_connection("::1", port, local_addr=(source, 0))
    try:
        await reader.readexactly(12)
        writer.write(rfb.VERSION_3_8)
        await reader.readexactly(2)
        writer.write(bytes([rfb.SECURITY_VNC]))
        challenge = await reader.readexactly(16)
        writer.write(rfb.vnc_auth_response(password.encode(), challenge) if password else bytes(16))
        result = await reader.readexactly(4)
        if result == bytes(4):  # logged in: ClientInit, and the session runs until the VM ends it
            writer.write(b"\x01")
            await asyncio.wait_for(reader.read(), 10)
        return result
    except asyncio.IncompleteReadError:
        return b""
    finally:
        writer.close()


def test_bad_tickets_from_the_addresses_of_one_64_block_the_whole_64(ns, tmp_path):
    """The console's VNC door blocks a source after `max_failures` wrong ticket passwords. It
    counted per address: from the next address of its /64 a guesser had fresh guesses. Now the
    /64 is one source: its next login, a right ticket even, is refused before the handshake, while
    an operator of another /64 still logs in."""

    async def run():
        vm = await asyncio.start_server(lambda r, w: hostile_vm(r, w, b""), "127.0.0.1", 0)
        policy, console = two_policies(vm.sockets[0].getsockname()[1])
        policy = replace(policy, admin_console=replace(console, listen="[::1]:0"))
        proxy, port, _ = await start_proxy(tmp_path, policy, max_failures=3)
        try:
            guesses = [await vnc_login(port, source, None) for source in ONE_PREFIX[:3]]
            same = await vnc_login(port, ONE_PREFIX[3], proxy.tickets.issue("alice", "desk").password)
            other = await vnc_login(port, OTHER_PREFIX, proxy.tickets.issue("alice", "desk").password)
            return guesses, same, other
        finally:
            await proxy.stop()
            vm.close()

    guesses, same, other = ns.run(run())
    assert guesses == [struct.pack(">I", 1)] * 3  # each guess tried and refused
    assert same == b"", "a login from the blocked /64 was tried"
    assert other == bytes(4)  # another /64: logged in


# ---- TLS termination: open connections per client ------------------------------------------------

def test_a_64_holds_one_share_of_the_terminated_connections(ns, tmp_path):
    """TLS termination caps the connections one client holds open (each costs two of the
    daemon's descriptors). It counted per address: from the addresses of its /64 one host held a
    share per address. Now the /64 is one source: past its share a connection from any of its
    addresses is closed at once, while a client of another /64 still gets through."""
    cert, key = LabCA(tmp_path / "ca").issue(["web1.test"])
    workload = Workload("web1", "web", "sg-web1", "02:00:00:00:09:02", (ipaddress.ip_address("::1"),))
    policy = Policy("t", {"web": Zone("web", (workload,))}, {}, (),
                    tls_termination=(TlsTermination("web1", 443, 18443, "web1-tls"),))
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE

    async def echo(reader, writer):  # the VM's plaintext service
        while data := await reader.read(100):
            writer.write(data)

    async def run():
        vm = await asyncio.start_server(echo, "::1", 18443)
        terminator = TlsTerminator(policy, MemorySecretSource({"web1-tls": cert + key}), decision_log=MemoryLog(),
                                   metrics=CredentialMetrics(), max_connections_per_client=2)
        [listener] = await terminator.start("::1")

        async def exchange(source):
            reader, writer = await asyncio.open_connection("::1", listener.listen_port, ssl=context,
                                                           server_hostname="web1.test", local_addr=(source, 0))
            writer.write(b"ping")
            try:
                return await asyncio.wait_for(reader.read(4), 5), writer
            except (ConnectionResetError, ssl.SSLError):
                return b"", writer

        try:
            held = [await exchange(source) for source in ONE_PREFIX[:2]]
            over = [await exchange(source) for source in ONE_PREFIX[2:4]]
            other = await exchange(OTHER_PREFIX)
            for _, writer in held + over + [other]:
                writer.close()
            return [answer for answer, _ in held], [answer for answer, _ in over], other[0]
        finally:
            await terminator.stop()
            vm.close()

    held, over, other = ns.run(run())
    assert held == [b"ping", b"ping"]
    assert over == [b"", b""], "connections past the /64's share were spliced to the VM"
    assert other == b"ping"


# ---- the crypto proxy: open connections of a client that is no VM ------------------------------

KEYS = """
keys:
  backend: file
  port: 18201
  keys:
    - {name: release, zones: [auth], operations: [sign]}
"""


async def http_get(reader, writer, target: str) -> bytes:
    """One kept-alive GET; the status line."""
    writer.write(f"GET {target} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return head.split(b"\r\n")[0]


async def closed_at_once(reader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 3) == b""
    except TimeoutError:
        return False


def test_a_64_that_is_no_vm_holds_one_share_of_the_crypto_proxys_connections(ns, tmp_path, monkeypatch):
    """The crypto proxy caps the connections a VM holds open; a caller that is no VM (answered
    403) was counted by its exact address, so from the addresses of its /64 one host held a
    share per address (and each address had its own refusal entries in the signed log). Now
    such a caller is counted by its source: past the /64's share a connection from any of its
    addresses is closed at once, while a caller of another /64 is still answered."""
    monkeypatch.setattr(keys_proxy, "MAX_CONNECTIONS_PER_VM", 4)
    state = tmp_path / "state"
    FileBackend(secret_store(state)).create("release", "ec-p256")
    policy = parse_policy(config.DEFAULT_POLICY.read_text() + KEYS)

    async def run():
        proxy = CryptoProxy(policy, state, MemoryLog(), hosts=("::1",))
        await proxy.start()
        connections = []
        try:
            held = []
            for source in ONE_PREFIX[:4]:  # each answered, then kept alive: it holds a slot
                connections.append(await asyncio.open_connection("::1", proxy.port, local_addr=(source, 0)))
                held.append(await http_get(*connections[-1], "/v1/keys"))
            over = []
            for source in ONE_PREFIX[4:]:
                connections.append(await asyncio.open_connection("::1", proxy.port, local_addr=(source, 0)))
                over.append(await closed_at_once(connections[-1][0]))
            connections.append(await asyncio.open_connection("::1", proxy.port, local_addr=(OTHER_PREFIX, 0)))
            other = await http_get(*connections[-1], "/v1/keys")
            return held, over, other
        finally:
            for _, writer in connections:
                writer.close()
            await proxy.stop()

    held, over, other = ns.run(run())
    assert held == [b"HTTP/1.1 403 "] * 4, held
    assert over == [True] * 4, "connections past the /64's share were kept"
    assert other == b"HTTP/1.1 403 "  # another /64: answered (it is no VM either)


def test_callers_from_ever_new_addresses_do_not_grow_the_crypto_proxys_memory(ns, ns_name, tmp_path, monkeypatch):
    """The crypto proxy asks the kernel which interface leads to each caller, and remembered
    the answer for every address it ever saw: a host going through the addresses of its /64 (one
    connection each) grew the daemon's memory without end. Now what it remembers is bounded
    (MAX_ROUTES_CACHED, made 16 here): after some hundred more addresses, what the proxy's code
    holds has not grown with them."""
    monkeypatch.setattr(keys_proxy, "MAX_ROUTES_CACHED", 16, raising=False)
    state = tmp_path / "state"
    FileBackend(secret_store(state)).create("release", "ec-p256")
    policy = parse_policy(config.DEFAULT_POLICY.read_text() + KEYS)
    sources = [f"2001:db8:66::{n:x}" for n in range(1, 401)]
    subprocess.run(["ip", "-n", ns_name, "-batch", "-"], check=True, text=True,
                   input="".join(f"addr add {a}/64 dev lo nodad\n" for a in sources))

    def held_by_the_proxy() -> int:
        """Bytes allocated by skyguard/keys/proxy.py's code and still alive."""
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, keys_proxy.__file__)])
        return sum(stat.size for stat in snapshot.statistics("filename"))

    async def run():
        proxy = CryptoProxy(policy, state, MemoryLog(), hosts=("::1",))
        await proxy.start()
        sizes = []
        try:
            for at, source in enumerate(sources):
                if at in (100, len(sources) - 1):
                    sizes.append(held_by_the_proxy())
                reader, writer = await asyncio.open_connection("::1", proxy.port, local_addr=(source, 0))
                assert await http_get(reader, writer, "/v1/keys") == b"HTTP/1.1 403 "
                writer.close()
                await writer.wait_closed()
            return sizes
        finally:
            await proxy.stop()

    for source in sources:  # conncap.source_of's own cache (bounded too) filled here: not counted below
        source_of(source)
    tracemalloc.start()
    try:
        before, after = ns.run(run())
    finally:
        tracemalloc.stop()
    assert after - before < 8000, f"{after - before} bytes more held after 300 more callers"
