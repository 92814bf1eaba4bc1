"""Apps of one site against each other, on loopback: a real TLS listener of AppsService, a real
app (a compromised one where it matters), real clients (raw TLS, Python's cookie jar with a
browser's cookie rules). Sibling apps (keep.apps.test beside admin.apps.test) are one site to a
browser: what one app's answers or pages can make a browser do must not reach the other as the
user."""

from __future__ import annotations

import asyncio
import email.message
import http.cookiejar
import urllib.request

from skyguard.apps.oidc import SignIn
from skyguard.apps.service import AppsService
from skyguard.parts import MemoryLog
from tests.unit.test_apps_keepalive import HOST, free_port, rig

SIBLING = "admin.apps.test"
# What a compromised app sets: cookies for the whole site (every sibling app would receive
# them: session fixation, a forged CSRF token, a tracking id), spelt as browsers take them.
SITE_COOKIES = (b"Set-Cookie: fix=1; Domain=apps.test; Path=/; Secure\r\n"
                b"Set-Cookie: fix2=2; Path=/; domain=.apps.test; Secure\r\n"
                b"Set-Cookie: fix3=3;DOMAIN = apps.test;Secure\r\n"
                b"Set-Cookie: own=4; Path=/; Secure; HttpOnly\r\n")


class CookieApp(asyncio.Protocol):
    """Answers every request with SITE_COOKIES."""

    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""

    def data_received(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.transport.write(b"HTTP/1.1 200 OK\r\n" + SITE_COOKIES + b"Content-Length: 2\r\n\r\nok")


class _Answer:
    """What http.cookiejar reads of a response: its headers."""

    def __init__(self, head: bytes):
        self.headers = email.message.Message()
        for line in head.decode("latin-1").split("\r\n")[1:]:
            if line:
                name, _, value = line.partition(":")
                self.headers[name.strip()] = value.strip()

    def info(self):
        return self.headers


def test_an_app_cannot_set_cookies_that_its_sibling_apps_receive(tmp_path):
    """A compromised app answers with Set-Cookie ... Domain=apps.test: the browser used to keep
    it for the whole site, and send it to every sibling app (session fixation against an app
    that keeps its own session cookie, a forged double-submit CSRF token). Now the proxy drops
    the Domain attribute of an app's cookies: each is host-only, sent back to that app alone."""
    app_port, proxy_port = free_port(), free_port()
    store, app, policy, client_tls = rig(tmp_path, app_port, proxy_port)

    async def run():
        server = await asyncio.get_running_loop().create_server(CookieApp, "127.0.0.1", app_port)
        service = AppsService(policy, store, decision_log=MemoryLog())
        await service.start()
        session = service.sessions.create(app, SignIn("bob", "bob", "Bob", (), "t"), 600)
        cookie = service.sealer.seal(session.sid, HOST, session.expires)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port, ssl=client_tls, server_hostname=HOST)
            writer.write(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nCookie: __Host-skyguard-session={cookie}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.close()
            return head
        finally:
            await service.stop()
            server.close()

    head = asyncio.run(run())
    assert head.startswith(b"HTTP/1.1 200 ")
    jar = http.cookiejar.CookieJar()
    jar.extract_cookies(_Answer(head), urllib.request.Request(f"https://{HOST}/"))

    def sent_to(host: str) -> str:
        request = urllib.request.Request(f"https://{host}/")
        jar.add_cookie_header(request)
        return request.get_header("Cookie") or ""

    assert sorted(sent_to(HOST).split("; ")) == ["fix2=2", "fix3=3", "fix=1", "own=4"]  # the app's own, kept
    assert sent_to(SIBLING) == ""
    assert b"domain" not in head.lower()
