"""The web console behind sign-in (admin.console.web_app), over loopback HTTPS: who is signed in
comes from the identity-aware proxy's identify(); here a stand-in answers it from a test cookie
(the identity-aware proxy is tested in tests/integration/test_apps.py; what is tested here is the
console's own decision). The signed-in operator sees only the targets their zones allow; opening
one yields a one-time web ticket; a forged request for another zone's target is refused and logged;
nobody signed in is sent to sign in; a web_app naming no app keeps the console closed."""

import asyncio
import datetime
import http.client
import ipaddress
import ssl
from dataclasses import dataclass, replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from skyguard.admin.decisionlog import JsonLinesDecisionLog
from skyguard.console.proxy import ConsoleProxy
from skyguard.custody.store import SecretStore
from skyguard.parts import Degraded
from skyguard.policy.apps import App
from skyguard.policy.console import AdminConsole, ConsoleGrant, ConsoleTarget
from skyguard.policy.model import Policy, Workload, Zone

HOST = "console.apps.test"


@dataclass(frozen=True)
class SignedIn:
    user: str
    groups: tuple[str, ...] = ()


def stand_in_identify(host, headers):
    """A signed-in session per the test cookie 'who=USER' (only for HOST, like the real one)."""
    cookie = dict(headers).get(b"cookie", b"").decode()
    return SignedIn(cookie.removeprefix("who=")) if host == HOST and cookie.startswith("who=") else None


def self_signed() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def policy(web_app="console") -> Policy:
    w = {n: Workload(n, z, f"sg-{n}", "02:00:00:00:00:01", (ipaddress.ip_address(a),))
         for n, z, a in (("dc1", "directory", "10.0.2.2"), ("agent1", "sandbox", "10.0.5.2"))}
    return Policy(name="t", zones={"directory": Zone("directory", (w["dc1"],)), "sandbox": Zone("sandbox", (w["agent1"],))},
                  networks={}, rules=(),
                  apps=(App("console", "dc1", 8080, HOST, "127.0.0.1:18443", "console-tls"),),
                  admin_console=AdminConsole(web="127.0.0.1:0", web_app=web_app, targets=(
                      ConsoleTarget("dc1-desktop", "dc1", "vnc", 5901, "dc1-vnc"),
                      ConsoleTarget("agent1-desktop", "agent1", "vnc", 5901, "agent1-vnc")),
                      operators=(ConsoleGrant("alice", ("directory",)), ConsoleGrant("bob", ("sandbox",)))))


@pytest.fixture
def console(tmp_path):
    store = SecretStore(tmp_path / "secrets")
    store.set("console-tls", self_signed())
    log = JsonLinesDecisionLog(tmp_path / "log.jsonl")
    loop = asyncio.new_event_loop()
    proxy = ConsoleProxy(policy(), store, tmp_path, log, identify=stand_in_identify)
    loop.run_until_complete(proxy.start())
    yield loop, proxy, log
    loop.run_until_complete(proxy.stop())
    loop.close()


def get(loop, proxy, path, user=None, method="GET", headers=None):
    def request():
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # a test's self-signed certificate
        conn = http.client.HTTPSConnection("127.0.0.1", proxy.web.address[1], context=context, timeout=10)
        conn.request(method, path, headers={"Host": f"{HOST}:{proxy.web.address[1]}",
                                            **({"Cookie": f"who={user}"} if user else {}), **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    return loop.run_until_complete(asyncio.to_thread(request))


def post(loop, proxy, path, user=None, headers=None):
    """A POST as the console page's form sends it (from the console's own origin)."""
    origin = {"Origin": f"https://{HOST}:{proxy.web.address[1]}", "Sec-Fetch-Site": "same-origin"}
    return get(loop, proxy, path, user, "POST", origin if headers is None else headers)


def test_nobody_signed_in_is_sent_to_sign_in(console):
    loop, proxy, _ = console
    status, _, body = get(loop, proxy, "/console/")
    assert status == 401 and f"https://{HOST}:18443/" in body
    assert post(loop, proxy, "/console/open?target=dc1-desktop")[0] == 401


def test_an_operator_sees_only_the_targets_of_their_zones(console):
    loop, proxy, _ = console
    status, headers, body = get(loop, proxy, "/console/", "alice")
    assert status == 200 and "dc1-desktop" in body and "agent1-desktop" not in body
    assert headers["X-Frame-Options"] == "DENY" and headers["Cache-Control"] == "no-store"
    assert "dc1-desktop" not in get(loop, proxy, "/console/", "mallory")[2]


def test_opening_a_target_gives_a_one_time_web_ticket(console):
    loop, proxy, _ = console
    status, headers, _ = post(loop, proxy, "/console/open?target=dc1-desktop", "alice")
    assert status == 303 and headers["Location"].startswith("/console/view#ticket=")
    ticket = proxy.tickets.redeem_token(headers["Location"].split("#ticket=")[1])
    assert (ticket.operator, ticket.target) == ("alice", "dc1-desktop")


def test_no_page_of_another_origin_can_open_a_console(console):
    # A link, an <img> or a form elsewhere must not open a console in the operator's browser: not
    # another site, and not another origin of the same site (the app the console rides on, on
    # its own port, or another app: their POSTs carry the SameSite=Lax sign-in cookie).
    loop, proxy, log = console
    status, _, body = get(loop, proxy, "/", "alice")
    assert '<form method="post" action="/console/open?target=dc1-desktop">' in body
    forged = {"link": get(loop, proxy, "/console/open?target=dc1-desktop", "alice", headers={
                  "Sec-Fetch-Site": "cross-site"})}
    for what, headers in {"other site": {"Origin": "https://evil.test", "Sec-Fetch-Site": "cross-site"},
                          "the app's origin": {"Origin": f"https://{HOST}:18443", "Sec-Fetch-Site": "same-site"},
                          "another app": {"Origin": "https://wiki.apps.test", "Sec-Fetch-Site": "same-site"},
                          "opaque origin": {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
                          "no origin": {}}.items():
        forged[what] = post(loop, proxy, "/console/open?target=dc1-desktop", "alice", headers)
    assert {what: status for what, (status, _, _) in forged.items()} == {
        "link": 405, "other site": 403, "the app's origin": 403, "another app": 403, "opaque origin": 403,
        "no origin": 403}
    assert not list((proxy.tickets.directory).glob("*.json"))  # no ticket was issued
    refused = [e for e in log.entries() if e["type"] == "console_access_refused"]
    assert [e["reason"] for e in refused] == ["not_same_origin"] * 5
    # The console page's own form: Chromium sends `Origin: null` under its no-referrer policy.
    status, headers, _ = post(loop, proxy, "/console/open?target=dc1-desktop", "alice",
                              {"Origin": "null", "Sec-Fetch-Site": "same-origin"})
    assert status == 303 and headers["Location"].startswith("/console/view#ticket=")


def test_a_forged_request_for_another_zones_target_is_refused_and_logged(console):
    loop, proxy, log = console
    status, _, body = post(loop, proxy, "/console/open?target=dc1-desktop", "bob")
    assert status == 403 and "bob may not open the console dc1-desktop" in body
    refused = [e for e in log.entries() if e["type"] == "console_access_refused"]
    assert refused[-1]["operator"] == "bob" and refused[-1]["reason"] == "not_allowed"
    assert not list((proxy.tickets.directory).glob("*.json"))  # no ticket was issued


def test_a_web_app_naming_no_app_keeps_the_web_console_closed(tmp_path):
    proxy = ConsoleProxy(policy(web_app="nosuchapp"), SecretStore(tmp_path / "s"), tmp_path,
                         JsonLinesDecisionLog(tmp_path / "l"), identify=stand_in_identify)
    with pytest.raises(Degraded, match="names no app"):
        asyncio.run(proxy.start())
    assert proxy.web is None


def test_one_operator_opening_in_a_loop_does_not_lock_the_others_out(console):
    # bob may open only a sandbox console; asking for it over and over (or a page he was lured to
    # doing it) must not use up the tickets everybody shares.
    loop, proxy, _ = console
    for _ in range(70):
        post(loop, proxy, "/console/open?target=agent1-desktop", "bob")
    status, headers, _ = post(loop, proxy, "/console/open?target=dc1-desktop", "alice")
    assert status == 303 and headers["Location"].startswith("/console/view#ticket=")
    ticket = proxy.tickets.redeem_token(headers["Location"].split("#ticket=")[1])
    assert (ticket.operator, ticket.target) == ("alice", "dc1-desktop")
    # bob's most recent ticket still works: only his oldest ones made way.
    status, headers, _ = post(loop, proxy, "/console/open?target=agent1-desktop", "bob")
    assert proxy.tickets.redeem_token(headers["Location"].split("#ticket=")[1]).operator == "bob"


# ---- a session behind sign-in lasts while its operator is signed in -----------------------------

async def quiet_vm(reader, writer):
    """A VNC server that logs skyguard in (any response) and then says nothing."""
    from skyguard.console import rfb

    writer.write(rfb.VERSION_3_8)
    await reader.readexactly(12)
    writer.write(bytes([1, rfb.SECURITY_VNC]))
    await reader.readexactly(1)
    writer.write(bytes(16))
    await reader.readexactly(16)
    writer.write(bytes(4))
    await reader.readexactly(1)
    writer.write(rfb.ServerInit(4, 2, rfb.PixelFormat(32, 24, False, True, 255, 255, 255, 16, 8, 0), b"vm").raw)
    await writer.drain()
    await reader.read()  # until skyguard closes the VM leg


def test_a_web_session_ends_when_its_operator_is_signed_out(tmp_path):
    # alice opens dc1's console in the browser, then is logged out (`skyguard apps logout alice`,
    # or her sign-in expired, or the provider dropped her group): her console must not stay open.
    # And a ticket reaches the console only with the ticket's operator's sign-in beside it.
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    signed_out: set[str] = set()

    def identify(host, headers):
        who = stand_in_identify(host, headers)
        return None if who is None or who.user in signed_out else who

    async def run():
        vm = await asyncio.start_server(quiet_vm, "127.0.0.1", 0)
        w = Workload("dc1", "directory", "sg-dc1", "02:00:00:00:00:01", (ipaddress.ip_address("127.0.0.1"),))
        p = replace(policy(), zones={"directory": Zone("directory", (w,))},
                    admin_console=replace(policy().admin_console, targets=(
                        ConsoleTarget("dc1-desktop", "dc1", "vnc", vm.sockets[0].getsockname()[1], "dc1-vnc"),)))
        store = SecretStore(tmp_path / "secrets")
        store.set("console-tls", self_signed())
        store.set("dc1-vnc", b"vm-only1")
        proxy = ConsoleProxy(p, store, tmp_path, JsonLinesDecisionLog(tmp_path / "log.jsonl"), identify=identify)
        await proxy.start()
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # a test's self-signed certificate
        url = f"wss://127.0.0.1:{proxy.web.address[1]}/console/ws?ticket="
        try:
            bob_cookie = {"Cookie": "who=bob"}
            async with connect(url + proxy.tickets.issue("alice", "dc1-desktop", web=True).password, ssl=context,
                               additional_headers=bob_cookie) as ws:  # alice's ticket, bob's sign-in
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)
                wrong_person = ws.close_code
            async with connect(url + proxy.tickets.issue("alice", "dc1-desktop", web=True).password, ssl=context,
                               additional_headers={"Cookie": "who=alice"}) as ws:
                assert (await ws.recv()).startswith(b"RFB")
                await ws.send(b"RFB 003.008\n")
                assert await ws.recv() == bytes([1, 1])
                await ws.send(bytes([1]))
                assert (await ws.recv())[:4] == bytes(4)
                await ws.send(b"\x01")
                await asyncio.wait_for(ws.recv(), 10)  # ServerInit: the session is open
                signed_out.add("alice")
                with pytest.raises(ConnectionClosed):
                    while True:
                        await asyncio.wait_for(ws.recv(), 10)
        finally:
            await proxy.stop()
            vm.close()
        return wrong_person, proxy
    wrong_person, proxy = asyncio.run(run())
    assert wrong_person == 1008
    assert [s["result"] for s in proxy.archive.list()] == ["revoked"]


# ---- connections before sign-in are capped --------------------------------------------------------

def test_connections_nobody_authenticated_are_capped_per_source_and_overall(console, caplog):
    """A client that opens connections and never sends a request (or never finishes its WebSocket)
    holds them for the handshake timeout: past MAX_PENDING_PER_SOURCE from one address its next
    one is answered 429, past MAX_PENDING in all 503, each logged; another address is not locked
    out by one source, and a closed connection frees its place."""
    import socket
    import time

    from skyguard.console.web import MAX_PENDING, MAX_PENDING_PER_SOURCE

    loop, proxy, _ = console
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # a test's self-signed certificate
    port = proxy.web.address[1]

    def hold(sources: list[str]) -> list:
        def run():
            out = []
            for source in sources:  # TLS done, no request: a silent client
                raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
                out.append(context.wrap_socket(raw, server_hostname=HOST))
            return out
        return loop.run_until_complete(asyncio.to_thread(run))  # the console's loop runs meanwhile

    def ask(source: str) -> int:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10, source_address=(source, 0))
        try:
            conn.request("GET", "/console/", headers={"Host": f"{HOST}:{port}"})
            return conn.getresponse().status
        except (ConnectionError, http.client.RemoteDisconnected):
            return 0
        finally:
            conn.close()

    def settled(count: int):
        deadline = time.monotonic() + 30
        while proxy.web.pending() != count and time.monotonic() < deadline:
            loop.run_until_complete(asyncio.sleep(0.05))
        assert proxy.web.pending() == count

    held = []
    try:
        held += hold(["127.0.0.1"] * MAX_PENDING_PER_SOURCE)
        settled(MAX_PENDING_PER_SOURCE)
        assert loop.run_until_complete(asyncio.to_thread(ask, "127.0.0.1")) == 429
        assert loop.run_until_complete(asyncio.to_thread(ask, "127.0.0.2")) == 401  # another address: served
        sources = [f"127.0.1.{i}" for i in range(1, MAX_PENDING // MAX_PENDING_PER_SOURCE)]
        held += hold([source for source in sources for _ in range(MAX_PENDING_PER_SOURCE)])
        settled(MAX_PENDING)
        assert loop.run_until_complete(asyncio.to_thread(ask, "127.0.0.3")) == 503
        held.pop().close()
        settled(MAX_PENDING - 1)
        assert loop.run_until_complete(asyncio.to_thread(ask, "127.0.0.3")) == 401
    finally:
        for sock in held:
            sock.close()
    settled(0)
    refusals = [r.getMessage() for r in caplog.records if "web console refused a connection" in r.getMessage()]
    assert any("from 127.0.0.1" in m and "429" in m for m in refusals), refusals
    assert any("from 127.0.0.3" in m and "503" in m for m in refusals), refusals
