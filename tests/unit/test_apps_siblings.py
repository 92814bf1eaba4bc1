"""Apps of one site against each other, on loopback: a real TLS listener of AppsService, a real
app (a compromised one where it matters), real clients (raw TLS, Python's cookie jar with a
browser's cookie rules). Sibling apps (keep.apps.test beside admin.apps.test) are one site to a
browser: what one app's answers or pages can make a browser do must not reach the other as the
user. And clients against each other: how many sign-ins under way one may hold."""

from __future__ import annotations

import asyncio
import email.message
import http.cookiejar
import time
import urllib.request

from skyguard.apps.oidc import SignIn
from skyguard.apps.service import AppsService
from skyguard.apps.sessions import MAX_PENDING, MAX_PENDING_PER_CLIENT, Pending, SessionTable
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


class EchoApp(asyncio.Protocol):
    """Answers each request with its method and path; remembers what reached it."""

    seen: list = []

    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""

    def data_received(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            self.buffer = self.buffer[length:]  # the tests' bodies come whole with their head
            line = b" ".join(head.split(b" ")[:2])
            EchoApp.seen.append(line)
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(line), line))


def test_a_page_of_a_sibling_app_cannot_post_to_this_app_as_the_user(tmp_path):
    """A form (or a script's fetch) on admin.apps.test POSTs to keep.apps.test: both are one
    site, so the browser sends keep's SameSite=Lax session cookie along, and the proxy used to
    forward the request as the signed-in user (cross-app CSRF). Now a request of an unsafe
    method whose Origin is another origin (or, with no Origin or `Origin: null`, whose
    Sec-Fetch-Site is same-site or cross-site) is refused with 403 and logged; the app's own
    pages, clients that are not browsers (neither header), and GETs (a link, the sign-in
    redirects: top-level navigation) still pass."""
    import httpx

    app_port, proxy_port = free_port(), free_port()
    store, app, policy, client_tls = rig(tmp_path, app_port, proxy_port)
    own, sibling = f"https://{HOST}:{proxy_port}", f"https://{SIBLING}:{proxy_port}"
    log = MemoryLog()
    cases = {  # what a browser sends from where: (method, headers) -> status expected
        "sibling form": ("POST", {"Origin": sibling, "Sec-Fetch-Site": "same-site"}, 403),
        "other site": ("POST", {"Origin": "https://evil.test", "Sec-Fetch-Site": "cross-site"}, 403),
        "sibling put": ("PUT", {"Origin": sibling, "Sec-Fetch-Site": "same-site"}, 403),
        "sibling patch": ("PATCH", {"Origin": sibling}, 403),
        "sibling delete": ("DELETE", {"Origin": sibling, "Sec-Fetch-Site": "same-site"}, 403),
        "plain http origin": ("POST", {"Origin": f"http://{HOST}:{proxy_port}"}, 403),
        "no origin, same site": ("POST", {"Sec-Fetch-Site": "same-site"}, 403),
        "null origin, same site": ("POST", {"Origin": "null", "Sec-Fetch-Site": "same-site"}, 403),
        "null origin, sandboxed page of an old browser": ("POST", {"Origin": "null"}, 403),
        "own page": ("POST", {"Origin": own, "Sec-Fetch-Site": "same-origin"}, 200),
        "own page, no-referrer policy": ("POST", {"Origin": "null", "Sec-Fetch-Site": "same-origin"}, 200),
        "own page, delete": ("DELETE", {"Origin": own}, 200),
        "not a browser": ("POST", {}, 200),
        "link from a sibling": ("GET", {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate"}, 200),
        "sibling preflight": ("OPTIONS", {"Origin": sibling, "Sec-Fetch-Site": "same-site"}, 200),
    }

    async def run():
        EchoApp.seen = []
        server = await asyncio.get_running_loop().create_server(EchoApp, "127.0.0.1", app_port)
        service = AppsService(policy, store, decision_log=log)
        await service.start()
        session = service.sessions.create(app, SignIn("bob", "bob", "Bob", (), "t"), 600)
        cookie = service.sealer.seal(session.sid, HOST, session.expires)
        got = {}
        try:
            async with httpx.AsyncClient(verify=client_tls, timeout=10) as client:
                for what, (method, headers, _) in cases.items():
                    answer = await client.request(
                        method, f"https://127.0.0.1:{proxy_port}/form", content=b"amount=100",
                        headers={"Host": f"{HOST}:{proxy_port}", "Cookie": f"__Host-skyguard-session={cookie}",
                                 **headers}, extensions={"sni_hostname": HOST})
                    got[what] = answer.status_code
            return got
        finally:
            await service.stop()
            server.close()

    got = asyncio.run(run())
    assert got == {what: status for what, (_, _, status) in cases.items()}
    assert sorted(EchoApp.seen) == sorted([b"POST /form"] * 3 + [b"DELETE /form", b"GET /form", b"OPTIONS /form"])
    refused = [e for e in log.of_kind("apps_refused") if e["reason"] == "cross_origin_request"]
    assert len(refused) == 9
    assert {"method": "POST", "origin": sibling, "site": "same-site", "client": "127.0.0.1"}.items() <= refused[0].items()


def test_many_addresses_cannot_push_out_anyone_elses_sign_in():
    """The addresses of one IPv6 /64 (one host's) each got their own MAX_PENDING_PER_CLIENT, and
    past MAX_PENDING in all the oldest sign-in anywhere went, a real user's between their
    redirect and their return included. Now a /64 is one source, and a full table drops the
    oldest sign-in of the source holding the most: a user's one sign-in outlives floods from a
    /64 and from hundreds of IPv4 addresses alike."""
    table, now = SessionTable(), time.time()
    table.begin("user", Pending("wiki", "n", "v", "/", now, "192.0.2.9"))
    for n in range(12_000):
        table.begin(f"v6-{n}", Pending("wiki", "n", "v", "/", now, f"2001:db8:66::{n:x}"))
    assert len(table.pending) == 1 + MAX_PENDING_PER_CLIENT and "v6-11999" in table.pending
    sources = MAX_PENDING // MAX_PENDING_PER_CLIENT + 40  # enough to fill the table, 32 each
    for n in range(sources * MAX_PENDING_PER_CLIENT):
        table.begin(f"v4-{n}", Pending("wiki", "n", "v", "/", now, f"10.{n % sources // 250}.{n % sources % 250}.1"))
    assert len(table.pending) == MAX_PENDING
    assert table.take("user", now) is not None
    table.begin("late", Pending("wiki", "n", "v", "/", now + 601, "10.0.0.66"))  # expiry keeps the books in step
    assert list(table.pending) == ["late"]
    assert table.take("late", now + 601) is not None and not table.pending

