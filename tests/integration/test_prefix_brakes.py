"""Brakes per client source where one source has many addresses, beyond the caps of
test_apps_prefix.py and the SSH door's (test_admin_attack.py): the console's VNC door, the crypto
proxy and TLS termination, each real part listening on [::1] in a network namespace of its own
whose loopback holds addresses of a few IPv6 /64s, with real clients bound to those addresses. A
host owns its whole /64 (SLAAC, privacy addresses), so each brake counts a /64 as one source
(skyguard/conncap.py source_of)."""

from __future__ import annotations

import asyncio
import secrets
import struct
import subprocess
from dataclasses import replace

import pytest

from skyguard.console import rfb
from support.netns_support import NamespaceLoop
from tests.unit.test_console_proxy import hostile_vm, start_proxy, two_policies

ONE_PREFIX = [f"2001:db8:64::{n:x}" for n in range(1, 9)]  # one host's /64
OTHER_PREFIX = "2001:db8:65::1"  # someone else


@pytest.fixture(scope="module")
def ns(root):
    name = f"sgpb-{secrets.token_hex(3)}"
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
