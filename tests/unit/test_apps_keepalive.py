"""The identity-aware proxy's connections (skyguard/apps/proxy.py, upstream.py) on loopback: a
real TLS listener of AppsService, a real HTTP app, a TLS client holding a session cookie.
Keep-alive both ways, pipelining, the app closing a kept-alive connection, the app down, and
connections to the app reused across client connections. (The sign-in flows, the browser and
the datapath: tests/integration/test_apps_lab.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import socket
import ssl

from skyguard.apps.oidc import SignIn
from skyguard.apps.service import AppsService
from skyguard.custody.store import SecretStore
from skyguard.lab.ca import LabCA
from skyguard.parts import MemoryLog
from skyguard.policy.apps import App, Identity
from skyguard.policy.model import Policy, Workload, Zone

HOST = "keep.apps.test"


class TheApp(asyncio.Protocol):
    """Answers each request with the identity header it received. `close_after`: answer that
    many requests per connection, then close on the next one without answering (a keep-alive
    timeout racing a request)."""

    connections = 0
    close_after = 0

    def connection_made(self, transport):
        TheApp.connections += 1
        self.transport, self.buffer, self.answered = transport, b"", 0

    def data_received(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            if TheApp.close_after and self.answered >= TheApp.close_after:
                self.transport.close()
                return
            self.answered += 1
            lines = head.split(b"\r\n")
            seen = [v for n, _, v in (line.partition(b": ") for line in lines[1:]) if n.lower() == b"x-skyguard-assertion"]
            body = b"%s %s" % (lines[0].split(b" ")[1], b"signed" if len(seen) == 1 and seen[0] != b"forged" else b"forged")
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def read_response(reader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return status, await reader.readexactly(length)


def vm_at(address: str) -> Workload:
    return Workload("vm", "lab", "sg-vm", "02:00:00:00:00:01", (ipaddress.ip_address(address),))


def rig(tmp_path, app_port: int, proxy_port: int, **app_options):
    """The store (the app's certificate, the issuer's secret), the app `keep` on the VM at
    127.0.0.1 for bob, its policy, and a client TLS context trusting the lab CA."""
    chain, key = LabCA(tmp_path / "ca").leaf_files(HOST)
    store = SecretStore(tmp_path / "secrets")
    store.set("keep-tls", chain.read_bytes() + key.read_bytes())
    store.set("idp-secret", b"unused")
    app = App("keep", "vm", app_port, HOST, f"127.0.0.1:{proxy_port}", "keep-tls", users=("bob",), **app_options)
    policy = Policy(name="t", zones={"lab": Zone("lab", (vm_at("127.0.0.1"),))}, networks={}, rules=(),
                    identity=Identity("https://idp.test:9443", "skyguard", "idp-secret", session_check=3600),
                    apps=(app,))
    return store, app, policy, ssl.create_default_context(cafile=str(tmp_path / "ca" / "ca.pem"))


def test_keep_alive_pipelining_stale_app_connections_and_the_app_down(tmp_path):
    app_port, proxy_port, down_port = free_port(), free_port(), free_port()
    store, app, policy, client_tls = rig(tmp_path, app_port, proxy_port)

    async def run():
        server = await asyncio.get_running_loop().create_server(TheApp, "127.0.0.1", app_port)
        service = AppsService(policy, store, decision_log=MemoryLog())
        await service.start()
        session = service.sessions.create(app, SignIn("bob", "bob", "Bob", (), "t"), 600)
        cookie = service.sealer.seal(session.sid, HOST, session.expires)

        def request(path: str) -> bytes:
            return (f"GET {path} HTTP/1.1\r\nHost: {HOST}:{proxy_port}\r\nCookie: __Host-skyguard-session={cookie}\r\n"
                    f"X-Skyguard-Assertion: forged\r\n\r\n").encode()

        async def connect():
            return await asyncio.open_connection("127.0.0.1", proxy_port, ssl=client_tls, server_hostname=HOST)

        seen = {}
        reader, writer = await connect()
        writer.write(request("/one") + request("/two") + request("/three"))  # pipelined, one write
        seen["pipelined"] = [await read_response(reader) for _ in range(3)]
        writer.close()
        reader, writer = await connect()  # a new client connection: the idle app connection is reused
        writer.write(request("/four"))
        seen["reused"] = (await read_response(reader), TheApp.connections)
        TheApp.close_after = 1  # the app closes a kept-alive connection when the next request comes
        writer.write(request("/five"))
        seen["stale"] = (await read_response(reader), TheApp.connections)
        writer.write(request("/six"))
        seen["stale again"] = (await read_response(reader), TheApp.connections)
        writer.close()
        await service.set_policy(dataclasses.replace(policy, apps=(dataclasses.replace(app, port=down_port),)))
        reader, writer = await connect()
        writer.write(request("/seven") + request("/eight"))
        seen["down"] = [await read_response(reader) for _ in range(2)]
        writer.close()
        await service.stop()
        server.close()
        return seen

    seen = asyncio.run(run())
    assert seen["pipelined"] == [(200, b"/one signed"), (200, b"/two signed"), (200, b"/three signed")]
    assert seen["reused"] == ((200, b"/four signed"), 1)
    assert seen["stale"] == ((200, b"/five signed"), 2)  # retried once on a new connection, not a 502
    assert seen["stale again"] == ((200, b"/six signed"), 3)
    assert [status for status, _ in seen["down"]] == [502, 502]  # and the client's connection stays open


def test_a_policy_change_applies_to_the_next_request_of_a_kept_alive_connection(tmp_path):
    """bob is removed from the app's users while his browser holds a kept-alive connection:
    the next request on that connection is decided by the new policy (403), as on a new one.
    The connection used to keep the app as the policy said when it opened, and bob stayed in
    for as long as he kept sending requests."""
    app_port, proxy_port = free_port(), free_port()
    store, app, policy, client_tls = rig(tmp_path, app_port, proxy_port)

    async def run():
        server = await asyncio.get_running_loop().create_server(TheApp, "127.0.0.1", app_port)
        service = AppsService(policy, store, decision_log=MemoryLog())
        await service.start()
        session = service.sessions.create(app, SignIn("bob", "bob", "Bob", (), "t"), 600)
        cookie = service.sealer.seal(session.sid, HOST, session.expires)
        request = (f"GET /page HTTP/1.1\r\nHost: {HOST}\r\nCookie: __Host-skyguard-session={cookie}\r\n\r\n").encode()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port, ssl=client_tls, server_hostname=HOST)
            writer.write(request)
            before = await read_response(reader)
            await service.set_policy(dataclasses.replace(policy, apps=(dataclasses.replace(app, users=("carol",)),)))
            writer.write(request)
            after = await read_response(reader)
            await service.set_policy(dataclasses.replace(policy, apps=()))  # the app is gone: so is this connection
            writer.write(request)
            gone = (await read_response(reader), await reader.read())
            writer.close()
            return before, after, gone
        finally:
            await service.stop()
            server.close()

    before, after, gone = asyncio.run(run())
    assert before == (200, b"/page signed")
    assert after[0] == 403 and b"bob may not use keep" in after[1]
    assert gone[0][0] == 421 and gone[1] == b""


class NamedApp(asyncio.Protocol):
    """Answers every request with the address it listens on: which VM got the request."""

    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""
        self.name = transport.get_extra_info("sockname")[0].encode()

    def data_received(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(self.name), self.name))


def test_requests_follow_the_apps_workload_to_its_new_address(tmp_path):
    """The policy moves the app's workload to another address (the app entry itself unchanged):
    the next request of a kept-alive client connection goes to the new address, and so does a
    new client connection. The connection to the old address used to carry on, and was then
    pooled under the new address: the signed identity went to whatever VM has the old one."""
    app_port, proxy_port = free_port(), free_port()
    store, app, policy, client_tls = rig(tmp_path, app_port, proxy_port)
    new = vm_at("127.0.0.2")

    async def run():
        loop = asyncio.get_running_loop()
        servers = [await loop.create_server(NamedApp, address, app_port) for address in ("127.0.0.1", "127.0.0.2")]
        service = AppsService(policy, store, decision_log=MemoryLog())
        await service.start()
        session = service.sessions.create(app, SignIn("bob", "bob", "Bob", (), "t"), 600)
        cookie = service.sealer.seal(session.sid, HOST, session.expires)
        request = (f"GET / HTTP/1.1\r\nHost: {HOST}\r\nCookie: __Host-skyguard-session={cookie}\r\n\r\n").encode()
        seen = []
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port, ssl=client_tls, server_hostname=HOST)
            writer.write(request)
            seen.append(await read_response(reader))
            await service.set_policy(dataclasses.replace(policy, zones={"lab": Zone("lab", (new,))}))
            writer.write(request)
            seen.append(await read_response(reader))
            writer.close()
            await asyncio.sleep(0.1)  # the proxy releases its connection to the app to the pool
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port, ssl=client_tls, server_hostname=HOST)
            writer.write(request)
            seen.append(await read_response(reader))
            writer.close()
            return seen
        finally:
            await service.stop()
            for server in servers:
                server.close()

    assert asyncio.run(run()) == [(200, b"127.0.0.1"), (200, b"127.0.0.2"), (200, b"127.0.0.2")]


class HeadsApp(asyncio.Protocol):
    """Answers every request with 200 and keeps the request heads it received; a request for
    /socket is switched (101), then every byte is echoed."""

    heads: list = []

    def connection_made(self, transport):
        self.transport, self.buffer, self.echo = transport, b"", False

    def data_received(self, data):
        if self.echo:
            self.transport.write(data)
            return
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            HeadsApp.heads.append(head)
            if head.startswith(b"GET /socket "):
                self.echo = True
                self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                     b"Connection: Upgrade\r\n\r\n" + self.buffer)
                return
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def test_the_app_never_sees_a_client_copy_of_the_identity_or_forwarding_headers_in_any_spelling(tmp_path):
    """WSGI and CGI servers hand an app `X_Skyguard_Assertion` and `X-Skyguard-Assertion` as the
    same HTTP_X_SKYGUARD_ASSERTION, and apps read the client's address and scheme from any of
    the forwarding headers: a client's copy of any of them, in any spelling, never reaches the
    app; the app sees the proxy's own, once each."""
    app_port, proxy_port = free_port(), free_port()
    store, app, policy, client_tls = rig(tmp_path, app_port, proxy_port)
    spoofed = [b"X_Skyguard_Assertion", b"x-skyguard_assertion", b"X-Forwarded-Port", b"X-Forwarded-Prefix",
               b"X_Forwarded_For", b"x_forwarded_proto", b"X-Forwarded-Host", b"Forwarded", b"X-Real-IP"]

    async def run():
        HeadsApp.heads = []
        server = await asyncio.get_running_loop().create_server(HeadsApp, "127.0.0.1", app_port)
        service = AppsService(policy, store, decision_log=MemoryLog())
        await service.start()
        session = service.sessions.create(app, SignIn("bob", "bob", "Bob", (), "t"), 600)
        cookie = service.sealer.seal(session.sid, HOST, session.expires)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port, ssl=client_tls, server_hostname=HOST)
            writer.write(b"GET / HTTP/1.1\r\nHost: %s\r\nCookie: __Host-skyguard-session=%s\r\n%s\r\n" % (
                HOST.encode(), cookie.encode(), b"".join(b"%s: spoofed\r\n" % name for name in spoofed)))
            answer = await read_response(reader)
            writer.close()
            return answer, HeadsApp.heads
        finally:
            await service.stop()
            server.close()

    answer, [head] = asyncio.run(run())
    assert answer == (200, b"ok")
    names = [line.partition(b":")[0].lower().replace(b"_", b"-") for line in head.split(b"\r\n")[1:]]
    assert b"spoofed" not in head
    assert names.count(b"x-skyguard-assertion") == 1 and names.count(b"x-forwarded-for") == 1


def test_a_renamed_identity_header_is_stripped_from_the_next_request_of_a_kept_alive_connection(tmp_path):
    """The policy renames the app's identity header while a client holds a kept-alive
    connection on which it already sent a header of the new name (an ordinary header then, and
    passed): from the next request on, the client's copy is stripped and the app gets the
    proxy's signed one under that name. The connection remembers which header names it strips
    (proxy.AppConnection._clients_own); what it remembered for the old name must not outlive it."""
    app_port, proxy_port = free_port(), free_port()
    store, app, policy, client_tls = rig(tmp_path, app_port, proxy_port)

    async def run():
        HeadsApp.heads = []
        server = await asyncio.get_running_loop().create_server(HeadsApp, "127.0.0.1", app_port)
        service = AppsService(policy, store, decision_log=MemoryLog())
        await service.start()
        session = service.sessions.create(app, SignIn("bob", "bob", "Bob", (), "t"), 600)
        cookie = service.sealer.seal(session.sid, HOST, session.expires)
        request = (f"GET / HTTP/1.1\r\nHost: {HOST}\r\nCookie: __Host-skyguard-session={cookie}\r\n"
                   f"X-Corp-User: spoofed\r\n\r\n").encode()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port, ssl=client_tls, server_hostname=HOST)
            writer.write(request)
            before = await read_response(reader)
            await service.set_policy(dataclasses.replace(
                policy, apps=(dataclasses.replace(app, identity_header="X-Corp-User"),)))
            writer.write(request)
            after = await read_response(reader)
            writer.close()
            return before, after, HeadsApp.heads
        finally:
            await service.stop()
            server.close()

    before, after, heads = asyncio.run(run())
    assert before == after == (200, b"ok")
    first, second = ([line.partition(b": ") for line in head.split(b"\r\n")[1:]] for head in heads)
    assert [v for n, _, v in first if n.lower() == b"x-corp-user"] == [b"spoofed"]  # not the identity header yet
    assert [v for n, _, v in second if n.lower() == b"x-skyguard-assertion"] == []
    mine = [v for n, _, v in second if n.lower() == b"x-corp-user"]
    assert len(mine) == 1 and mine[0] != b"spoofed" and mine[0].count(b".") == 2  # the proxy's JWT, once


def test_an_upgrade_the_app_does_not_accept_opens_no_raw_tunnel_to_it(tmp_path):
    """A signed-in client sends an upgrade request to a path where the app answers 200, not 101,
    then a second request on the same connection. The proxy used to splice from the upgrade
    request on, whatever the app answered: the second request reached the app raw, with the
    client's own identity and X-Forwarded-For headers and no decision. Now the app's answer
    reaches the client, nothing more of the client's reaches the app, and the connection closes."""
    app_port, proxy_port = free_port(), free_port()
    store, app, policy, client_tls = rig(tmp_path, app_port, proxy_port, websockets=True)

    async def run():
        HeadsApp.heads = []
        server = await asyncio.get_running_loop().create_server(HeadsApp, "127.0.0.1", app_port)
        service = AppsService(policy, store, decision_log=MemoryLog())
        await service.start()
        session = service.sessions.create(app, SignIn("bob", "bob", "Bob", (), "t"), 600)
        cookie = service.sealer.seal(session.sid, HOST, session.expires)

        async def upgrade_and_echo():  # where the app switches, the splice works as before
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port, ssl=client_tls, server_hostname=HOST)
            writer.write(b"GET /socket HTTP/1.1\r\nHost: %s\r\nCookie: __Host-skyguard-session=%s\r\n"
                         b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n" % (HOST.encode(), cookie.encode()))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.write(b"ping")
            echoed = await asyncio.wait_for(reader.readexactly(4), 10)
            writer.close()
            return head.split(b"\r\n")[0], echoed

        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port, ssl=client_tls, server_hostname=HOST)
            writer.write(b"GET /not-a-socket HTTP/1.1\r\nHost: %s\r\nCookie: __Host-skyguard-session=%s\r\n"
                         b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" % (HOST.encode(), cookie.encode()))
            answer = await asyncio.wait_for(read_response(reader), 10)
            switched = await upgrade_and_echo()
            with contextlib.suppress(ConnectionError):  # the proxy may have closed already
                writer.write(b"GET /admin HTTP/1.1\r\nHost: %s\r\nX-Skyguard-Assertion: smuggled\r\n"
                             b"X-Forwarded-For: 203.0.113.9\r\n\r\n" % HOST.encode())
                await writer.drain()
            try:
                rest = await asyncio.wait_for(reader.read(), 3)
            except TimeoutError:
                rest = b"(still open)"
            writer.close()
            return answer, rest, switched, list(HeadsApp.heads)
        finally:
            await service.stop()
            server.close()

    answer, rest, switched, heads = asyncio.run(run())
    assert switched == (b"HTTP/1.1 101 Switching Protocols", b"ping")
    assert len(heads) == 2 and heads[0].startswith(b"GET /not-a-socket ") and heads[1].startswith(b"GET /socket ")
    assert answer == (200, b"ok") and rest == b""
