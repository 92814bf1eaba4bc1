"""The identity-aware proxy against a hostile app and an unsigned client, on loopback: a real TLS
listener of AppsService, a real app (a compromised one where it matters), real clients (the
websocket-client library, raw TLS). What an app answers reaches the client filtered the same
way whatever the status (a 101 too); what a client sends before signing in can never keep the
proxy's resources."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib

import websocket

from skyguard.apps.oidc import SignIn
from skyguard.apps.service import AppsService
from skyguard.parts import MemoryLog
from tests.unit.test_apps_keepalive import HOST, TheApp, free_port, read_response, rig

# What a compromised app puts in its 101 besides the handshake: skyguard's cookies (the user's
# browser would then carry the attacker's session: login CSRF), hop-by-hop headers, framing.
HOSTILE_101_EXTRAS = (b"Set-Cookie: __Host-skyguard-session=attackers-session; Path=/; Secure; HttpOnly\r\n"
                      b"Set-Cookie: __Host-skyguard-login=attackers-state; Path=/; Secure; HttpOnly\r\n"
                      b"Set-Cookie: theme=dark; Path=/; Secure\r\n"
                      b"Proxy-Authenticate: Basic realm=x\r\nKeep-Alive: timeout=5\r\nContent-Length: 12\r\n")


class HostileSocketApp(asyncio.Protocol):
    """Switches every upgrade request with a 101 carrying HOSTILE_101_EXTRAS, written in two
    parts (the status line, then the rest of the head with the first frame), then echoes."""

    def connection_made(self, transport):
        self.transport, self.buffer, self.echo = transport, b"", False

    def data_received(self, data):
        if self.echo:
            self.transport.write(data)
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head = self.buffer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        key = next(line.split(":", 1)[1].strip() for line in head.split("\r\n")
                   if line.lower().startswith("sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        self.echo = True
        if head.startswith("GET /bare-lf "):  # a head the client and the proxy could read apart
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\nSet-Cookie: "
                                 b"__Host-skyguard-session=x\r\nConnection: Upgrade\r\n\r\n")
            return
        if head.startswith("GET /endless "):  # a head that never ends
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\n" + b"X-Pad: %s\r\n" % (b"a" * 1000) * 40)
            return
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\n")
        rest = (b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n%s\r\n"
                b"\x81\x05hello" % (accept, HOSTILE_101_EXTRAS))
        asyncio.get_running_loop().call_later(0.05, self.transport.write, rest)


def test_an_apps_101_cannot_set_skyguards_cookies_or_hop_by_hop_headers(tmp_path):
    """A compromised app answers a WebSocket upgrade with a 101 that sets skyguard's session
    and sign-in cookies: the proxy used to pass the 101's head to the client raw, so the
    browser would keep the attacker's session (and act as the attacker's account). Now the
    head is read whole and filtered as every other answer: the app's own cookies and the
    handshake pass, skyguard's cookies and hop-by-hop headers do not, the frames still flow."""
    app_port, proxy_port = free_port(), free_port()
    store, app, policy, client_tls = rig(tmp_path, app_port, proxy_port, websockets=True)

    async def run():
        server = await asyncio.get_running_loop().create_server(HostileSocketApp, "127.0.0.1", app_port)
        service = AppsService(policy, store, decision_log=MemoryLog())
        await service.start()
        session = service.sessions.create(app, SignIn("bob", "bob", "Bob", (), "t"), 600)
        cookie = service.sealer.seal(session.sid, HOST, session.expires)

        def client():  # the websocket-client library, as a browser's script would use a WebSocket
            ws = websocket.create_connection(
                f"wss://127.0.0.1:{proxy_port}/socket", host=f"{HOST}:{proxy_port}", timeout=10,
                header=[f"Cookie: __Host-skyguard-session={cookie}"], origin=f"https://{HOST}:{proxy_port}",
                sslopt={"ca_certs": str(tmp_path / "ca" / "ca.pem"), "server_hostname": HOST})
            try:
                first = ws.recv()
                ws.send("ping")
                return ws.handshake_response.status, ws.handshake_response.headers, first, ws.recv()
            finally:
                ws.close()

        async def unreadable(path: str) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port, ssl=client_tls, server_hostname=HOST)
            writer.write(b"GET %s HTTP/1.1\r\nHost: %s\r\nCookie: __Host-skyguard-session=%s\r\n"
                         b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: a2V5\r\n\r\n"
                         % (path.encode(), HOST.encode(), cookie.encode()))
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return answer

        try:
            return await asyncio.to_thread(client), await unreadable("/bare-lf"), await unreadable("/endless")
        finally:
            await service.stop()
            server.close()

    (status, headers, first, echoed), bare_lf, endless = asyncio.run(run())
    assert status == 101 and first == "hello" and echoed == "ping"
    assert headers["upgrade"] == "websocket" and headers["connection"].lower() == "upgrade"
    assert "sec-websocket-accept" in headers
    cookies = headers.get("set-cookie", "")
    assert "skyguard" not in cookies and "theme=dark" in cookies
    for name in ("proxy-authenticate", "keep-alive", "content-length"):
        assert name not in headers, name
    for answer in (bare_lf, endless):  # an unreadable 101 is a 502, none of it passed on
        assert answer.startswith(b"HTTP/1.1 502 ") and b"skyguard-session" not in answer and b"X-Pad" not in answer


def test_a_client_trickling_a_head_is_closed_and_one_address_cannot_hold_every_connection(tmp_path, monkeypatch):
    """Before signing in, a client can make the proxy keep nothing for long: a head sent a byte
    at a time (slowloris) used to be waited for forever, each byte restarting the idle timeout;
    now the head must be whole within header_timeout of its first byte. And one address holds at
    most max_connections_per_client connections that carried no signed-in request (each costs
    descriptors the whole daemon shares, DNS and the credential proxy included): beyond it a
    connection is closed at once, the ones it holds still work, and one that signed in no longer
    counts (people behind one NAT share an address)."""
    from skyguard.apps import proxy

    monkeypatch.setattr(proxy, "LIMITS", dataclasses.replace(proxy.LIMITS, header_timeout=1.0, idle_timeout=30.0))
    monkeypatch.setattr(proxy, "WATCHDOG_PERIOD", 0.1)
    app_port, proxy_port = free_port(), free_port()
    store, app, policy, client_tls = rig(tmp_path, app_port, proxy_port)

    async def run():
        server = await asyncio.get_running_loop().create_server(TheApp, "127.0.0.1", app_port)
        service = AppsService(policy, store, decision_log=MemoryLog(), max_connections_per_client=4)
        await service.start()
        session = service.sessions.create(app, SignIn("bob", "bob", "Bob", (), "t"), 600)
        cookie = service.sealer.seal(session.sid, HOST, session.expires)

        async def connect():
            return await asyncio.open_connection("127.0.0.1", proxy_port, ssl=client_tls, server_hostname=HOST)

        try:
            reader, writer = await connect()
            writer.write(b"GET / HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nX-Slow: ")
            trickled = 0
            for _ in range(40):  # 10 s of a byte every 0.25 s: ten header timeouts
                try:
                    closed = await asyncio.wait_for(reader.read(1), 0.25)
                except TimeoutError:
                    writer.write(b"a")
                    trickled += 1
                    continue
                if closed == b"":
                    break
            else:
                closed = b"(still open)"
            writer.close()
            held = [await connect() for _ in range(4)]
            extra_reader, extra_writer = await connect()
            try:
                refused = await asyncio.wait_for(extra_reader.read(), 5)
            except TimeoutError:
                refused = b"(still open)"
            extra_writer.close()
            reader, writer = held[0]
            writer.write(f"GET /held HTTP/1.1\r\nHost: {HOST}\r\nCookie: __Host-skyguard-session={cookie}\r\n\r\n"
                         .encode())
            answer = await asyncio.wait_for(read_response(reader), 10)
            reader, writer = await connect()  # held[0] signed in: it no longer counts
            writer.write(f"GET /more HTTP/1.1\r\nHost: {HOST}\r\nCookie: __Host-skyguard-session={cookie}\r\n\r\n"
                         .encode())
            more = await asyncio.wait_for(read_response(reader), 10)
            held.append((reader, writer))
            for _, open_writer in held:
                open_writer.close()
            return closed, trickled, refused, answer, more
        finally:
            await service.stop()
            server.close()

    closed, trickled, refused, answer, more = asyncio.run(run())
    assert closed == b"" and trickled < 40
    assert refused == b""
    assert answer == (200, b"/held signed") and more == (200, b"/more signed")



def test_many_addresses_cannot_hold_every_connection_either(tmp_path):
    """Connections nobody signed in on are capped in all, not only per address: a client with
    many addresses (an IPv6 /64 is one attacker) used to hold as many as it had addresses times
    256, each costing descriptors the whole daemon shares. Past the total a connection is closed
    at once, whatever its address; one closing makes room again."""
    app_port, proxy_port = free_port(), free_port()
    store, app, policy, client_tls = rig(tmp_path, app_port, proxy_port)

    async def run():
        server = await asyncio.get_running_loop().create_server(TheApp, "127.0.0.1", app_port)
        service = AppsService(policy, store, decision_log=MemoryLog(), max_connections_per_client=4,
                              max_unsigned_connections=6)
        await service.start()

        async def connect(source):
            return await asyncio.open_connection("127.0.0.1", proxy_port, ssl=client_tls, server_hostname=HOST,
                                                 local_addr=(source, 0))

        async def closed_at_once(reader):
            try:
                return await asyncio.wait_for(reader.read(), 3) == b""
            except TimeoutError:
                return False
        try:
            held = [await connect("127.0.0.1") for _ in range(4)] + [await connect("127.0.0.2") for _ in range(2)]
            third, _ = await connect("127.0.0.3")
            over = await closed_at_once(third)
            held.pop(0)[1].close()
            await asyncio.sleep(0.3)
            room, room_writer = await connect("127.0.0.3")
            room_writer.write(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            answer = await asyncio.wait_for(read_response(room), 10)  # answered (no issuer here: 503), not closed
            for _, writer in held + [(room, room_writer)]:
                writer.close()
            return over, answer
        finally:
            await service.stop()
            server.close()

    over, answer = asyncio.run(run())
    assert over, "a connection past the total was kept"
    assert answer[0] == 503 and b"identity provider" in answer[1], answer

def test_a_host_header_with_anything_but_digits_after_the_name_never_reaches_the_app(tmp_path):
    """The Host must name this app; what follows a colon must be a port. `Host: app:@evil.test`
    used to pass (only the part before the last colon was compared), and the app, building
    absolute links from its Host as apps do (password reset mails, redirects), wrote
    https://app:@evil.test/..., which browsers read as user `app` at host evil.test."""
    app_port, proxy_port = free_port(), free_port()
    store, app, policy, client_tls = rig(tmp_path, app_port, proxy_port)
    hosts = [f"{HOST}:@evil.test", f"{HOST}:8443@evil.test", f"{HOST}:8443/../x", f"{HOST}:\u00b9",
             f"{HOST}:{proxy_port}", f"{HOST}:", HOST]

    async def run():
        server = await asyncio.get_running_loop().create_server(TheApp, "127.0.0.1", app_port)
        service = AppsService(policy, store, decision_log=MemoryLog())
        await service.start()
        session = service.sessions.create(app, SignIn("bob", "bob", "Bob", (), "t"), 600)
        cookie = service.sealer.seal(session.sid, HOST, session.expires)
        seen = []
        try:
            for host in hosts:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port, ssl=client_tls,
                                                               server_hostname=HOST)
                writer.write(b"GET /page HTTP/1.1\r\nHost: %s\r\nCookie: __Host-skyguard-session=%s\r\n\r\n"
                             % (host.encode("latin-1"), cookie.encode()))
                seen.append((await asyncio.wait_for(read_response(reader), 10))[0])
                writer.close()
            return seen
        finally:
            await service.stop()
            server.close()

    assert asyncio.run(run()) == [421, 421, 421, 421, 200, 200, 200]


def test_a_websocket_opened_by_another_origins_page_is_refused(tmp_path):
    """A page of another app of the same site (admin.apps.test beside wiki.apps.test: same
    site, so the browser sends wiki's SameSite=Lax session cookie along) opens a WebSocket to
    this app: nothing like CORS guards a WebSocket, so the other app's script would talk to
    this one as the user and read every answer (cross-site WebSocket hijacking). The proxy used
    to splice it like any; now an upgrade whose Origin is not this app's is refused (403,
    logged). The app's own pages, and clients that send no Origin (not a browser's), pass."""
    app_port, proxy_port = free_port(), free_port()
    store, app, policy, client_tls = rig(tmp_path, app_port, proxy_port, websockets=True)
    log = MemoryLog()

    async def run():
        server = await asyncio.get_running_loop().create_server(HostileSocketApp, "127.0.0.1", app_port)
        service = AppsService(policy, store, decision_log=log)
        await service.start()
        session = service.sessions.create(app, SignIn("bob", "bob", "Bob", (), "t"), 600)
        cookie = service.sealer.seal(session.sid, HOST, session.expires)

        def client(origin: str | None):  # websocket-client sends the Origin a browser would
            try:
                ws = websocket.create_connection(
                    f"wss://127.0.0.1:{proxy_port}/socket", host=f"{HOST}:{proxy_port}", timeout=10,
                    header=[f"Cookie: __Host-skyguard-session={cookie}"], origin=origin,
                    suppress_origin=origin is None,
                    sslopt={"ca_certs": str(tmp_path / "ca" / "ca.pem"), "server_hostname": HOST})
            except websocket.WebSocketBadStatusException as e:
                return e.status_code
            ws.close()
            return 101

        try:
            return [await asyncio.to_thread(client, origin) for origin in (
                f"https://admin.apps.test:{proxy_port}", "null", f"http://{HOST}:{proxy_port}",
                f"https://{HOST}:{proxy_port}", None)]
        finally:
            await service.stop()
            server.close()

    assert asyncio.run(run()) == [403, 403, 403, 101, 101]
    assert [e["reason"] for e in log.of_kind("apps_refused")].count("websocket_cross_origin") == 3


class H2cApp(asyncio.Protocol):
    """Switches to whatever protocol it is asked for (as servers that speak h2c do), then keeps
    what comes through the tunnel: requests no decision saw."""

    tunnelled: list = []

    def connection_made(self, transport):
        self.transport, self.buffer, self.switched = transport, b"", False

    def data_received(self, data):
        if self.switched:
            H2cApp.tunnelled.append(data)
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            upgrade = next(line.split(b":", 1)[1].strip() for line in self.buffer.split(b"\r\n")
                           if line.lower().startswith(b"upgrade:"))
            self.switched = True
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\n" % upgrade)


def test_only_websocket_upgrades_reach_the_app(tmp_path):
    """On an app that takes WebSockets, a client asked for another protocol, h2c: the proxy
    used to pass any Upgrade token, the app switched, and everything the client sent next went
    through the tunnel unchecked (h2c smuggling): requests with the client's own forwarding
    headers, which the proxy otherwise strips. Now an upgrade to anything but websocket is
    refused before the app hears of it."""
    app_port, proxy_port = free_port(), free_port()
    store, app, policy, client_tls = rig(tmp_path, app_port, proxy_port, websockets=True)
    log = MemoryLog()

    async def run():
        H2cApp.tunnelled = []
        server = await asyncio.get_running_loop().create_server(H2cApp, "127.0.0.1", app_port)
        service = AppsService(policy, store, decision_log=log)
        await service.start()
        session = service.sessions.create(app, SignIn("bob", "bob", "Bob", (), "t"), 600)
        cookie = service.sealer.seal(session.sid, HOST, session.expires)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port, ssl=client_tls, server_hostname=HOST)
            writer.write(b"GET / HTTP/1.1\r\nHost: %s\r\nCookie: __Host-skyguard-session=%s\r\n"
                         b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA"
                         b"\r\n\r\n" % (HOST.encode(), cookie.encode()))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            try:
                writer.write(b"GET /admin HTTP/1.1\r\nHost: %s\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n" % HOST.encode())
                await asyncio.wait_for(reader.read(), 3)
            except (ConnectionError, TimeoutError):
                pass
            writer.close()
            await asyncio.sleep(0.1)
            return head.split(b"\r\n")[0], H2cApp.tunnelled
        finally:
            await service.stop()
            server.close()

    status, tunnelled = asyncio.run(run())
    assert status == b"HTTP/1.1 403 Forbidden" and tunnelled == []
    assert "upgrade_not_websocket" in [e["reason"] for e in log.of_kind("apps_refused")]


def test_a_client_not_signed_in_cannot_make_the_proxy_hold_a_body(tmp_path, monkeypatch):
    """A request without a session is answered with the sign-in redirect whatever its body, yet
    the proxy used to read that body first: up to 1 MiB each (three per connection while the
    client reads no answers), at one byte per body_read_timeout if the client liked. Now a body
    longer than MAX_UNSIGNED_BODY on a request without a session is refused at once (413), and
    such a request must be whole within header_timeout of its first byte. A signed-in upload
    sent in pieces still passes."""
    from skyguard.apps import proxy

    monkeypatch.setattr(proxy, "LIMITS", dataclasses.replace(proxy.LIMITS, header_timeout=1.0, body_read_timeout=5.0))
    monkeypatch.setattr(proxy, "WATCHDOG_PERIOD", 0.1)
    app_port, proxy_port = free_port(), free_port()
    store, app, policy, client_tls = rig(tmp_path, app_port, proxy_port)

    async def run():
        server = await asyncio.get_running_loop().create_server(TheApp, "127.0.0.1", app_port)
        service = AppsService(policy, store, decision_log=MemoryLog())
        await service.start()
        session = service.sessions.create(app, SignIn("bob", "bob", "Bob", (), "t"), 600)
        cookie = service.sealer.seal(session.sid, HOST, session.expires)

        async def post(length: int, pieces: list[bytes], signed: bool, pace: float = 0.01):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port, ssl=client_tls, server_hostname=HOST)
            cookies = f"Cookie: __Host-skyguard-session={cookie}\r\n" if signed else ""
            writer.write(f"POST /upload HTTP/1.1\r\nHost: {HOST}\r\n{cookies}Content-Length: {length}\r\n\r\n".encode())
            for piece in pieces:
                await asyncio.sleep(pace)
                if reader.at_eof():
                    break
                writer.write(piece)
            try:
                answer = await asyncio.wait_for(reader.readline(), 3)  # b"": closed without an answer
            except TimeoutError:
                answer = b"(no answer yet)"
            except ConnectionError:  # closed while a byte was on its way: reset rather than ended
                answer = b""
            writer.close()
            return answer.rstrip(b"\r\n")

        try:
            return (await post(1_000_000, [], signed=False),  # the head, then the client waits
                    await post(40, [b"a"] * 40, signed=False, pace=0.25),  # 10 s of body
                    await post(200_000, [b"a" * 20_000] * 10, signed=True))
        finally:
            await service.stop()
            server.close()

    big, trickled, signed = asyncio.run(run())
    assert big.startswith(b"HTTP/1.1 413 ")
    assert trickled == b""  # closed before the 10 s it took to send
    assert signed == b"HTTP/1.1 200 OK"
