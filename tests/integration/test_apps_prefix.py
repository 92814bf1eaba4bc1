"""The identity-aware proxy's caps per source where one source has many addresses: a real TLS
listener of AppsService in a network namespace of its own whose loopback holds addresses of two
IPv6 /64s, real TLS clients bound to those addresses. A host owns its whole /64 (SLAAC, privacy
addresses), so the caps count a /64 as one source (skyguard/conncap.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import subprocess

import pytest

from skyguard.apps import sessions
from skyguard.apps.oidc import SignIn
from skyguard.apps.service import AppsService
from skyguard.parts import MemoryLog
from support.netns_support import NamespaceLoop
from tests.unit.test_apps_keepalive import HOST, TheApp, read_response, rig

ONE_PREFIX = [f"2001:db8:64::{n:x}" for n in range(1, 9)]  # one host's /64
OTHER_PREFIX = "2001:db8:65::1"  # someone else
MORE_PREFIXES = [f"2001:db8:{n:x}::1" for n in range(0x70, 0x73)]  # more hosts, one address each
PROXY_PORT, APP_PORT = 8443, 8080  # in the namespace's own port space


@pytest.fixture(scope="module")
def ns(root):
    name = f"sgap-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        for address in ONE_PREFIX + [OTHER_PREFIX] + MORE_PREFIXES:
            subprocess.run(["ip", "-n", name, "addr", "add", f"{address}/64", "dev", "lo", "nodad"], check=True)
        loop = NamespaceLoop(name, timeout=60)
        yield loop
        loop.close()
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def on_ipv6_loopback(tmp_path):
    """The rig of test_apps_keepalive with the app's listener on [::1]."""
    store, app, policy, client_tls = rig(tmp_path, APP_PORT, PROXY_PORT)
    app = dataclasses.replace(app, listen=f"[::1]:{PROXY_PORT}")
    return store, app, dataclasses.replace(policy, apps=(app,)), client_tls


async def connect(source, client_tls):
    return await asyncio.open_connection("::1", PROXY_PORT, ssl=client_tls, server_hostname=HOST,
                                         local_addr=(source, 0))


def test_addresses_of_one_ipv6_prefix_share_one_cap_and_another_prefix_still_gets_in(ns, tmp_path):
    """A client holding connections nobody signed in on from many addresses of its /64 used to
    get a fresh per-address share from each (256 x as many addresses as it cared to use), up to
    the total, keeping everyone else out until the timeouts. Now the /64 is one source: past its
    share a connection from any of its addresses is closed at once, while a client of another
    /64 is still answered."""
    store, app, policy, client_tls = on_ipv6_loopback(tmp_path)

    async def run():
        server = await asyncio.get_running_loop().create_server(TheApp, "127.0.0.1", APP_PORT)
        service = AppsService(policy, store, decision_log=MemoryLog(), max_connections_per_client=4,
                              max_unsigned_connections=64)
        await service.start()

        async def closed_at_once(reader):
            try:
                return await asyncio.wait_for(reader.read(), 3) == b""
            except TimeoutError:
                return False

        try:
            held = [await connect(source, client_tls) for source in ONE_PREFIX[:4]]
            over = [await connect(source, client_tls) for source in ONE_PREFIX[4:]]
            refused = [await closed_at_once(reader) for reader, _ in over]
            other, other_writer = await connect(OTHER_PREFIX, client_tls)
            other_writer.write(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            answer = await asyncio.wait_for(read_response(other), 10)  # answered (no issuer here: 503)
            for _, writer in held + over + [(other, other_writer)]:
                writer.close()
            return refused, answer
        finally:
            await service.stop()
            server.close()

    refused, answer = ns.run(run())
    assert refused == [True] * 4, "connections past the /64's share were kept"
    assert answer[0] == 503 and b"identity provider" in answer[1], answer


class Issuer:
    """What the gate asks of the issuer for a sign-in: the authorization URL with a fresh state,
    and the code exchange (any code signs bob in)."""

    def __init__(self):
        self.n = 0

    async def authorization_url(self, redirect_uri):
        self.n += 1
        return f"https://idp.test/auth?state=s{self.n}", f"s{self.n}", "nonce", "verifier"

    async def finish(self, code, redirect_uri, nonce, verifier):
        return SignIn("bob", "bob", "Bob", (), "t")


def test_sign_ins_started_from_many_addresses_do_not_push_out_a_persons(ns, tmp_path, monkeypatch):
    """A person is sent to the issuer; meanwhile one host starts sign-ins from many addresses of
    its /64, and a few other hosts start theirs, past the table's size (MAX_PENDING, made 40
    here). The person's sign-in used to be pushed out (each address had its own share, and a
    full table dropped the oldest anywhere): back from the issuer, they were told their sign-in
    had expired. Now the /64 keeps its own last MAX_PENDING_PER_CLIENT, a full table drops the
    biggest holder's oldest, and the person's callback signs them in."""
    monkeypatch.setattr(sessions, "MAX_PENDING", 40)
    store, app, policy, client_tls = on_ipv6_loopback(tmp_path)

    async def get(reader, writer, target, cookie=""):
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\n{cookie}\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        return head

    async def run():
        server = await asyncio.get_running_loop().create_server(TheApp, "127.0.0.1", APP_PORT)
        service = AppsService(policy, store, decision_log=MemoryLog())
        await service.start()
        service.issuer = Issuer()
        try:
            person = await connect(OTHER_PREFIX, client_tls)
            head = await get(*person, "/docs")
            state = head.split(b"state=")[1].split(b"\r\n")[0].decode()
            for source in ONE_PREFIX + MORE_PREFIXES:  # 8 x 10 from the /64, 3 x 10 from the others
                flood = await connect(source, client_tls)
                for _ in range(10):
                    assert (await get(*flood, "/"))[:12] == b"HTTP/1.1 302"
                flood[1].close()
            back = await get(*person, f"/.skyguard/callback?state={state}&code=c",
                             f"Cookie: __Host-skyguard-login={state}\r\n")
            person[1].close()
            return back.split(b"\r\n")[0], len(service.sessions.pending)
        finally:
            await service.stop()
            server.close()

    back, pending = ns.run(run())
    assert back == b"HTTP/1.1 303 See Other", back
    assert pending == 40 - 1  # the table stayed full; the person's sign-in was taken
