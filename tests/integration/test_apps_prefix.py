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

from skyguard.apps.service import AppsService
from skyguard.parts import MemoryLog
from support.netns_support import NamespaceLoop
from tests.unit.test_apps_keepalive import HOST, TheApp, read_response, rig

ONE_PREFIX = [f"2001:db8:64::{n:x}" for n in range(1, 9)]  # one host's /64
OTHER_PREFIX = "2001:db8:65::1"  # someone else
PROXY_PORT, APP_PORT = 8443, 8080  # in the namespace's own port space


@pytest.fixture(scope="module")
def ns(root):
    name = f"sgap-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        for address in ONE_PREFIX + [OTHER_PREFIX]:
            subprocess.run(["ip", "-n", name, "addr", "add", f"{address}/64", "dev", "lo", "nodad"], check=True)
        loop = NamespaceLoop(name, timeout=60)
        yield loop
        loop.close()
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_addresses_of_one_ipv6_prefix_share_one_cap_and_another_prefix_still_gets_in(ns, tmp_path):
    """A client holding connections nobody signed in on from many addresses of its /64 used to
    get a fresh per-address share from each (256 x as many addresses as it cared to use), up to
    the total, keeping everyone else out until the timeouts. Now the /64 is one source: past its
    share a connection from any of its addresses is closed at once, while a client of another
    /64 is still answered."""
    store, app, policy, client_tls = rig(tmp_path, APP_PORT, PROXY_PORT)
    app = dataclasses.replace(app, listen=f"[::1]:{PROXY_PORT}")
    policy = dataclasses.replace(policy, apps=(app,))

    async def run():
        server = await asyncio.get_running_loop().create_server(TheApp, "127.0.0.1", APP_PORT)
        service = AppsService(policy, store, decision_log=MemoryLog(), max_connections_per_client=4,
                              max_unsigned_connections=64)
        await service.start()

        async def connect(source):
            return await asyncio.open_connection("::1", PROXY_PORT, ssl=client_tls, server_hostname=HOST,
                                                 local_addr=(source, 0))

        async def closed_at_once(reader):
            try:
                return await asyncio.wait_for(reader.read(), 3) == b""
            except TimeoutError:
                return False

        try:
            held = [await connect(source) for source in ONE_PREFIX[:4]]
            over = [await connect(source) for source in ONE_PREFIX[4:]]
            refused = [await closed_at_once(reader) for reader, _ in over]
            other, other_writer = await connect(OTHER_PREFIX)
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
