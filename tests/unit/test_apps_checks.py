"""The identity-aware proxy's decisions without sockets: the ID token checks (joserfc under
skyguard/apps/oidc.py) against the issue's attack list, the session cookie, the return path, the
access rule, the policy sections and the datapath's share (an app's port kept for the proxy).
The end-to-end tests with the real provider and a browser are tests/integration/test_apps_lab.py."""

from __future__ import annotations

import base64
import json
import time

import pytest
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, OctKey, RSAKey

from skyguard import config
from skyguard.apps.assertion import AssertionSigner, new_key_pem, verify
from skyguard.apps.oidc import TokenRejected, check_id_token
from skyguard.apps.sessions import (
    CookieSealer,
    Pending,
    SessionTable,
    allowed,
    cookie_value,
    safe_return_path,
    without_cookies,
    without_our_set_cookies,
)
from skyguard.datapath import abi
from skyguard.datapath.compile import APPS_RULE, compile_policy
from skyguard.errors import PolicyError
from skyguard.parts import MemoryLog
from skyguard.policy.apps import App
from skyguard.policy.parse import parse_policy

ISSUER, CLIENT, NONCE = "https://idp.test:9443", "skyguard", "n-0123456789"
ISSUER_KEY = RSAKey.generate_key(2048, parameters={"kid": "idp-1"})
ISSUER_KEYS = KeySet([ISSUER_KEY])
OTHER_KEY = RSAKey.generate_key(2048, parameters={"kid": "idp-1"})  # same kid, another key


def id_token(key=ISSUER_KEY, alg="RS256", **changes) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "alice", "aud": CLIENT, "exp": now + 300, "iat": now, "nonce": NONCE,
              "name": "Alice", "groups": ["admins"]}
    claims.update(changes)
    return jwt.encode({"alg": alg, "kid": "idp-1"}, {k: v for k, v in claims.items() if v is not None}, key)


def unsigned(**changes) -> str:
    part = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "alice", "aud": CLIENT, "exp": now + 300, "iat": now, "nonce": NONCE, **changes}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def check(token: str) -> dict:
    return check_id_token(token, ISSUER_KEYS, issuer=ISSUER, client_id=CLIENT, nonce=NONCE)


def test_a_good_id_token_passes():
    assert check(id_token())["sub"] == "alice"


@pytest.mark.parametrize("token, reason", [
    (lambda: id_token(aud="another-client"), "id_token_aud"),
    (lambda: id_token(nonce="someone-elses-nonce"), "id_token_nonce"),
    (lambda: id_token(nonce=None), "id_token_nonce"),
    (lambda: id_token(exp=int(time.time()) - 120, iat=int(time.time()) - 600), "id_token_expired_token"),
    (lambda: id_token(iss="https://evil.test"), "id_token_iss"),
    (lambda: id_token(key=OTHER_KEY), "id_token_signature"),
    (lambda: unsigned(), "id_token_signature"),
    # HMAC keyed with the (guessable or leaked) client secret: never an accepted algorithm.
    (lambda: id_token(key=OctKey.import_key(b"lab-client-secret-not-for-production"), alg="HS256"),
     "id_token_signature"),
    (lambda: id_token(aud=[CLIENT, "other"]), "id_token_azp"),
    (lambda: "not.a.jwt", "id_token_signature"),
], ids=["wrong-audience", "wrong-nonce", "no-nonce", "expired", "wrong-issuer", "another-key", "alg-none",
        "hmac-with-client-secret", "several-audiences-no-azp", "garbage"])
def test_id_tokens_from_the_attack_list_are_refused_with_their_reason(token, reason):
    with pytest.raises(TokenRejected) as refused:
        check(token())
    assert refused.value.reason == reason


# ---- the session cookie -------------------------------------------------------------------------

def test_the_session_cookie_opens_only_with_its_key_for_its_host_before_it_expires():
    sealer = CookieSealer(b"\x01" * 32)
    now = time.time()
    value = sealer.seal("sid-1", "wiki.apps.test", now + 60)
    assert sealer.open(value, "wiki.apps.test", now) == ("sid-1", "")
    assert sealer.open(value, "admin.apps.test", now) == (None, "cookie_for_another_app")
    assert sealer.open(value, "wiki.apps.test", now + 61) == (None, "session_expired")
    assert CookieSealer(b"\x02" * 32).open(value, "wiki.apps.test", now) == (None, "cookie_invalid")
    for i in range(len(value)):  # any one character changed is refused, never an exception
        if value[i] == ".":
            continue
        changed = value[:i] + ("A" if value[i] != "A" else "B") + value[i + 1:]
        assert sealer.open(changed, "wiki.apps.test", now)[0] in (None, "sid-1")
    assert sealer.open(value[:-4] + "AAAA", "wiki.apps.test", now) == (None, "cookie_invalid")
    assert "\x01" not in repr(sealer)


def test_skyguards_cookies_are_found_and_removed_and_others_kept():
    headers = [(b"host", b"wiki"), (b"cookie", b"theme=dark; __Host-skyguard-session=abc; lang=en"),
               (b"cookie", b"__Host-skyguard-login=xyz")]
    assert cookie_value(headers, "__Host-skyguard-session") == "abc"
    assert cookie_value(headers, "__host-skyguard-session") is None  # names are case-sensitive
    assert without_cookies(headers, ("__Host-skyguard-session", "__Host-skyguard-login")) == [
        (b"host", b"wiki"), (b"cookie", b"theme=dark; lang=en")]


def test_an_app_cannot_set_or_clear_skyguards_cookies():
    response = [(b"content-type", b"text/html"), (b"set-cookie", b"__Host-skyguard-session=; Max-Age=0"),
                (b"set-cookie", b"__Host-skyguard-login=x"), (b"set-cookie", b"app_session=1; HttpOnly")]
    assert without_our_set_cookies(response) == [(b"content-type", b"text/html"),
                                                 (b"set-cookie", b"app_session=1; HttpOnly")]


@pytest.mark.parametrize("target, kept", [
    ("/docs?page=1", "/docs?page=1"), ("/", "/"), ("//evil.test/x", "/"), ("/\\evil.test", "/"),
    ("https://evil.test/", "/"), ("evil", "/"), ("/a\x00b", "/"), ("/" + "a" * 3000, "/"),
])
def test_the_return_path_stays_on_the_app(target, kept):
    assert safe_return_path(target) == kept


def test_a_state_is_taken_once_and_expires():
    table = SessionTable()
    table.begin("s1", Pending("wiki", "n", "v", "/", time.time()))
    assert table.take("s1", time.time()) is not None
    assert table.take("s1", time.time()) is None  # replayed
    table.begin("s2", Pending("wiki", "n", "v", "/", time.time() - 3600))
    assert table.take("s2", time.time()) is None  # too old


def test_one_client_starting_sign_ins_in_a_loop_pushes_out_only_its_own():
    """A client that starts sign-ins without end (a cookieless request is one) used to push a
    real user's sign-in out between their redirect and their return, at MAX_PENDING; now each
    address keeps its last MAX_PENDING_PER_CLIENT, whatever the others do."""
    from skyguard.apps.sessions import MAX_PENDING_PER_CLIENT

    table, now = SessionTable(), time.time()
    table.begin("user", Pending("wiki", "n", "v", "/", now, "10.0.0.9"))
    for n in range(12_000):
        table.begin(f"flood{n}", Pending("wiki", "n", "v", "/", now, "10.0.0.66"))
    assert len(table.pending) == 1 + MAX_PENDING_PER_CLIENT
    assert table.take("flood0", now) is None and table.take("flood11999", now) is not None
    assert table.take("user", now) is not None
    # expiry goes oldest first and leaves the per-client book in step
    table.begin("late", Pending("wiki", "n", "v", "/", now + 601, "10.0.0.66"))
    assert list(table.pending) == ["late"]


def test_access_is_for_the_named_users_and_groups():
    app = App("wiki", "vfw1", 443, "wiki.apps.test", "0.0.0.0:8443", "c", users=("alice",), groups=("editors",))
    assert allowed(app, "alice", ())
    assert allowed(app, "bob", ("editors", "x"))
    assert not allowed(app, "carol", ("Editors",))


def test_the_assertion_verifies_with_the_jwks_and_only_for_its_app():
    signer = AssertionSigner(new_key_pem())
    app = App("wiki", "vfw1", 443, "wiki.apps.test", "0.0.0.0:8443", "c", users=("alice",))
    token = signer.sign(app, "alice", "Alice", ("admins",))
    claims = verify(token, signer.jwks(), "https://wiki.apps.test:8443")
    assert (claims["sub"], claims["groups"], claims["exp"] - claims["iat"]) == ("alice", ["admins"], 60)
    assert "d" not in signer.jwks()["keys"][0]  # the public half only
    with pytest.raises(JoseError):
        verify(token, signer.jwks(), "https://admin.apps.test:8444")
    with pytest.raises(JoseError):
        verify(token, AssertionSigner(new_key_pem()).jwks(), "https://wiki.apps.test:8443")


# ---- the policy sections and the datapath -------------------------------------------------------

APPS = """
identity:
  issuer: https://idp.test:9443
  client_id: skyguard
  client_secret: idp-client-secret
apps:
  - {name: wiki, workload: vfw1, port: 443, host: wiki.apps.test, listen: "0.0.0.0:8443", certificate: wiki-tls,
     groups: [wiki-editors]}
"""


def test_an_app_section_parses():
    policy = parse_policy(config.DEFAULT_POLICY.read_text() + APPS)
    [app] = policy.apps
    assert (app.workload, app.port, app.origin, app.identity_header) == (
        "vfw1", 443, "https://wiki.apps.test:8443", "X-Skyguard-Assertion")
    assert policy.identity.groups_claim == "groups" and policy.identity.session_check == 60


@pytest.mark.parametrize("change, message", [
    (("identity:\n  issuer: https://idp.test:9443\n  client_id: skyguard\n  client_secret: idp-client-secret\n", ""),
     "apps: needs an identity: section"),
    (("https://idp.test:9443", "http://idp.test:9443"), "is not an https URL"),
    (("client_secret: idp-client-secret", "client_secret: 'ghp_real token value!'"), "never the secret itself"),
    (("groups: [wiki-editors]", "users: []"), "lets nobody in"),
    (("workload: vfw1", "workload: vfw9"), "did you mean 'vfw1'"),
    (("host: wiki.apps.test", "host: 'wiki apps'"), "is not a host name"),
    # A trailing newline is no part of a host name (every request would be refused 421).
    (("host: wiki.apps.test", 'host: "wiki.apps.test\\n"'), "is not a host name"),
    (("groups: [wiki-editors]", 'groups: ["wiki-editors\\n"]'), "must be a user or group name"),
    (("listen: \"0.0.0.0:8443\"", "listen: \"0.0.0.0\""), "has no port"),
    (("groups: [wiki-editors]", "groups: [x], identity_header: Cookie"), "is not a header name skyguard may write"),
])
def test_bad_app_sections_are_named_with_their_line(change, message):
    old, new = change
    with pytest.raises(PolicyError) as error:
        parse_policy(config.DEFAULT_POLICY.read_text() + APPS.replace(old, new, 1))
    assert message in str(error.value)
    assert "ghp_real" not in str(error.value)


def test_two_apps_cannot_share_a_host_a_listener_or_a_vm_port():
    second = APPS.split("apps:\n")[1].replace("name: wiki", "name: wiki2")
    with pytest.raises(PolicyError) as error:
        parse_policy(config.DEFAULT_POLICY.read_text() + APPS + second)
    text = str(error.value)
    assert "host 'wiki.apps.test' is already used by apps[0]" in text
    assert "listen '0.0.0.0:8443' is already used" in text and "target vfw1 port 443 is already used" in text


def test_an_apps_port_is_kept_for_the_host_and_denied_to_every_zone():
    """sdn-manages-firewall lets sdn reach firewall tcp/443; with the app on vfw1:443 only the
    host (the proxy) may, and another port of the same rule is untouched."""
    policy = parse_policy(config.DEFAULT_POLICY.read_text() + APPS)
    compiled = compile_policy(policy, host_addresses=["10.10.4.1"])
    firewall, apps_rule = compiled.zone_ids["firewall"], compiled.rule_ids[APPS_RULE]
    host_identity = compiled.ipcache[next(n for n in compiled.ipcache if str(n) == "10.10.4.1/32")]
    sdn_identity = compiled.ipcache[next(n for n in compiled.ipcache if str(n) == "10.10.3.2/32")]

    def verdict(identity, port):
        found = [e for e in compiled.policy if (e.direction, e.zone, e.identity, e.proto) ==
                 (abi.DIR_INGRESS, firewall, identity, abi.IPPROTO["tcp"])
                 and e.port <= port < e.port + (1 << (16 - e.port_prefixlen))]
        return [(e.verdict, e.rule_id) for e in found]

    assert verdict(host_identity, 443) == [(abi.POLICY_ALLOW, apps_rule)]
    assert verdict(sdn_identity, 443) == [(abi.POLICY_DENY, apps_rule)]
    assert verdict(sdn_identity, 830) == [(abi.POLICY_ALLOW, compiled.rule_ids["sdn-manages-firewall"])]
    assert verdict(host_identity, 830) == []  # the host gets the app's port, nothing more


# ---- the part's bookkeeping: metrics, log entries, sessions ending --------------------------------

def test_a_denied_user_is_logged_and_counted_and_identify_names_a_signed_in_user(tmp_path):
    from prometheus_client import CollectorRegistry

    from skyguard.apps.oidc import SignIn
    from skyguard.apps.service import AppsService, SignedIn
    from skyguard.custody.store import SecretStore

    policy = parse_policy(config.DEFAULT_POLICY.read_text() + APPS)
    [app] = policy.apps
    registry, log = CollectorRegistry(), MemoryLog()
    service = AppsService(policy, SecretStore(tmp_path / "secrets"), decision_log=log, registry=registry)
    session = service.sessions.create(app, SignIn("carol", "carol", "Carol", ("staff",), "token"), 600)
    service.deny(app, session, client="100.64.0.2")
    assert registry.get_sample_value("skyguard_apps_requests_total", {"app": "wiki", "result": "denied"}) == 1
    assert registry.get_sample_value("skyguard_apps_sessions") == 1
    assert log.entries == [{"kind": "apps_denied", "app": "wiki", "user": "carol", "groups": ["staff"],
                            "client": "100.64.0.2", "reason": "not_in_users_or_groups"}]
    assert "token" not in repr(session) and "token" not in json.dumps(log.entries)
    cookie = service.sealer.seal(session.sid, app.host, session.expires)
    headers = [(b"host", b"wiki.apps.test:8443"), (b"cookie", f"__Host-skyguard-session={cookie}".encode())]
    assert service.identify("wiki.apps.test", headers) == SignedIn("carol", "Carol", ("staff",), "wiki")
    assert service.identify("admin.apps.test", headers) is None
    assert service.identify("wiki.apps.test", [(b"cookie", b"__Host-skyguard-session=forged")]) is None


def test_an_ended_or_expired_session_cuts_its_websockets():
    import asyncio

    from skyguard.apps.oidc import SignIn

    app = App("wiki", "vfw1", 443, "wiki.apps.test", "0.0.0.0:8443", "c", users=("alice",))

    async def run():
        table = SessionTable()
        old = table.create(app, SignIn("alice", "alice", "Alice", (), "t"), 60, now=time.time() - 120)
        live = table.create(app, SignIn("bob", "bob", "Bob", (), "t"), 600)
        tunnels = [asyncio.get_running_loop().create_task(asyncio.sleep(60)) for _ in range(2)]
        old.tunnels.add(tunnels[0])
        live.tunnels.add(tunnels[1])
        assert [s.user for s in table.expire(time.time())] == ["alice"]
        table.end(live.sid)
        await asyncio.sleep(0)
        return [t.cancelled() for t in tunnels], table.sessions

    cancelled, left = asyncio.run(run())
    assert cancelled == [True, True] and left == {}


def test_the_apps_sections_canonical_form_parses_back_to_the_same_values():
    from skyguard.policy.apps import apps_to_dict

    policy = parse_policy(config.DEFAULT_POLICY.read_text() + APPS)
    form = apps_to_dict(policy)
    assert form["apps"][0]["identity_header"] == "X-Skyguard-Assertion" and form["identity"]["session_check"] == 60
    sections = "".join(f"{key}: {json.dumps(value)}\n" for key, value in form.items())  # JSON is flow YAML
    again = parse_policy(config.DEFAULT_POLICY.read_text() + sections)
    assert (again.identity, again.apps) == (policy.identity, policy.apps)
    assert apps_to_dict(parse_policy(config.DEFAULT_POLICY.read_text())) == {}


def test_a_policy_without_the_app_closes_its_listener_and_ends_its_sessions(tmp_path):
    """set_policy on a running service (real TLS listener on loopback, the store on disk)."""
    import asyncio
    import dataclasses
    import socket

    from skyguard.apps.oidc import SignIn
    from skyguard.apps.service import AppsService
    from skyguard.custody.store import SecretStore
    from skyguard.lab.ca import LabCA
    from skyguard.parts import Degraded

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    text = APPS.replace('listen: "0.0.0.0:8443"', f'listen: "127.0.0.1:{port}"')
    policy = parse_policy(config.DEFAULT_POLICY.read_text() + text)
    store = SecretStore(tmp_path / "secrets")
    chain, key = LabCA(tmp_path / "ca").leaf_files("wiki.apps.test")
    store.set("wiki-tls", chain.read_bytes() + key.read_bytes())
    store.set("idp-client-secret", b"s3cret-not-logged")
    log = MemoryLog()

    def listening() -> bool:
        with socket.socket() as client:
            return client.connect_ex(("127.0.0.1", port)) == 0

    async def run():
        service = AppsService(policy, store, decision_log=log)
        await service.start()
        session = service.sessions.create(policy.apps[0], SignIn("bob", "bob", "Bob", ("wiki-editors",), "t"), 600)
        before = await asyncio.to_thread(listening)
        await service.set_policy(dataclasses.replace(policy, apps=()))
        after = await asyncio.to_thread(listening)
        with pytest.raises(Degraded) as degraded:  # the certificate gone from the store: that app stays closed
            store.remove("wiki-tls")
            await service.set_policy(policy)
        closed = await asyncio.to_thread(listening)
        await service.stop()
        return before, after, closed, session.sid in service.sessions.sessions, str(degraded.value)

    before, after, closed, kept, problem = asyncio.run(run())
    assert (before, after, closed, kept) == (True, False, False, False)
    assert "app wiki: certificate 'wiki-tls' is not in the store" in problem and "s3cret" not in problem
    assert {"kind": "apps_session_ended", "app": "wiki", "user": "bob", "groups": ["wiki-editors"],
            "reason": "app_removed_from_policy"} in log.entries


def test_an_app_that_never_answers_gets_a_502_and_an_idle_client_is_closed(tmp_path, monkeypatch):
    """The per-connection watchdog (one timer per connection, not one per read): a signed-in
    request to an app that accepts and says nothing ends in a 502 after upstream_timeout, and a
    keep-alive client that sends nothing more is closed after idle_timeout. Real TLS listener,
    real app socket on loopback."""
    import asyncio
    import dataclasses
    import ipaddress
    import ssl

    from skyguard.apps import proxy
    from skyguard.apps.oidc import SignIn
    from skyguard.apps.service import AppsService
    from skyguard.custody.store import SecretStore
    from skyguard.lab.ca import LabCA
    from skyguard.policy.apps import Identity
    from skyguard.policy.model import Policy, Workload, Zone

    monkeypatch.setattr(proxy, "LIMITS", dataclasses.replace(proxy.LIMITS, upstream_timeout=0.5, idle_timeout=1.0))
    monkeypatch.setattr(proxy, "WATCHDOG_PERIOD", 0.1)
    store = SecretStore(tmp_path / "secrets")
    chain, key = LabCA(tmp_path / "ca").leaf_files("mute.apps.test")
    store.set("mute-tls", chain.read_bytes() + key.read_bytes())
    store.set("idp-secret", b"never-used")

    async def run():
        held = []
        mute = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)  # accepts, never answers
        app_port = mute.sockets[0].getsockname()[1]
        workload = Workload("vm", "lab", "sg-vm", "02:00:00:00:00:01", (ipaddress.ip_address("127.0.0.1"),))
        app = App("mute", "vm", app_port, "mute.apps.test", "127.0.0.1:0", "mute-tls", users=("bob",))
        policy = Policy(name="t", zones={"lab": Zone("lab", (workload,))}, networks={}, rules=(),
                        identity=Identity("https://idp.test:9443", "skyguard", "idp-secret"), apps=(app,))
        service = AppsService(policy, store, decision_log=MemoryLog())
        await service.start()
        try:
            port = service._servers["mute"][1][0].sockets[0].getsockname()[1]
            session = service.sessions.create(app, SignIn("bob", "bob", "Bob", (), "t"), 600)
            cookie = service.sealer.seal(session.sid, app.host, session.expires)
            client = ssl.create_default_context()  # this test is about timeouts, not the certificate
            client.check_hostname = False
            client.verify_mode = ssl.CERT_NONE
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
            writer.write(f"GET / HTTP/1.1\r\nHost: mute.apps.test\r\nCookie: __Host-skyguard-session={cookie}\r\n\r\n"
                         .encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            closed = await asyncio.wait_for(reader.read(1), 10)  # kept alive, then nothing sent: closed
            writer.close()
            return head, closed
        finally:
            await service.stop()
            mute.close()

    head, closed = asyncio.run(run())
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and closed == b""
    assert b"connection: close" not in head.lower()  # the 502 kept the connection: the idle timeout closed it


# ---- an issuer that answers garbage: fail closed with skyguard's page, the sweep keeps running ----

class GarbageIssuer:
    """A real HTTPS server on loopback (certificate for 127.0.0.1 from a test CA) answering GETs
    from `answers` (path -> JSON bytes)."""

    def __init__(self, tmp_path):
        import ssl
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from skyguard.lab.ca import LabCA

        ca = LabCA(tmp_path / "idp-ca", "test issuer")
        cert, key = ca.issue(["127.0.0.1"])
        (tmp_path / "idp.pem").write_bytes(cert)
        (tmp_path / "idp.key").write_bytes(key)
        self.ca_file = str(ca.cert_path)
        answers = self.answers = {}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = answers.get(self.path.split("?")[0], b"{}")
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tmp_path / "idp.pem", tmp_path / "idp.key")
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.issuer = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.answers["/jwks"] = json.dumps({"keys": [ISSUER_KEY.as_dict(private=False)]}).encode()
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def discovery(self, document) -> None:
        self.answers["/.well-known/openid-configuration"] = json.dumps(document).encode()

    def good(self, **changes) -> dict:
        i = self.issuer
        document = {"issuer": i, "jwks_uri": i + "/jwks", "authorization_endpoint": i + "/authorize",
                    "token_endpoint": i + "/token", "userinfo_endpoint": i + "/userinfo"}
        document.update(changes)
        return {k: v for k, v in document.items() if v is not None}


def garbage_documents(idp: GarbageIssuer) -> dict:
    return {"a-list": [], "a-string": "issuer", "no-authorization-endpoint": idp.good(authorization_endpoint=None),
            "authorization-endpoint-a-number": idp.good(authorization_endpoint=5),
            "userinfo-endpoint-a-number": idp.good(userinfo_endpoint=5),
            "userinfo-endpoint-no-url": idp.good(userinfo_endpoint="http://[")}


def test_an_issuer_answering_garbage_gets_skyguards_page_and_never_stops_the_sweep(tmp_path, monkeypatch):
    """Discovery documents a provider could answer by mistake (or on purpose): a sign-in gets the
    503 page saying the provider cannot be used, not a connection closed without a word; and the
    housekeeping sweep, re-checking a session that holds a WebSocket, ends that session (fail
    closed) and keeps running: it used to die on the first error that was not an AppsError, and
    from then on no WebSocket was cut, not when its session expired nor when its user lost access."""
    import asyncio
    import ipaddress
    import socket
    import ssl

    from skyguard.apps import service as service_module
    from skyguard.apps.oidc import IssuerUnavailable, SignIn
    from skyguard.apps.service import AppsService
    from skyguard.custody.store import SecretStore
    from skyguard.lab.ca import LabCA
    from skyguard.policy.apps import Identity
    from skyguard.policy.model import Policy, Workload, Zone

    idp = GarbageIssuer(tmp_path)
    documents = garbage_documents(idp)
    monkeypatch.setattr(service_module, "HOUSEKEEPING_PERIOD", 0.05)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = SecretStore(tmp_path / "secrets")
    ca = LabCA(tmp_path / "ca")
    chain, key = ca.leaf_files("wiki.apps.test")
    store.set("wiki-tls", chain.read_bytes() + key.read_bytes())
    store.set("idp-secret", b"s3cret")
    workload = Workload("vm", "lab", "sg-vm", "02:00:00:00:00:01", (ipaddress.ip_address("127.0.0.1"),))
    app = App("wiki", "vm", 1, "wiki.apps.test", f"127.0.0.1:{port}", "wiki-tls", users=("bob",), websockets=True)
    policy = Policy(name="t", zones={"lab": Zone("lab", (workload,))}, networks={}, rules=(),
                    identity=Identity(idp.issuer, "skyguard", "idp-secret", session_check=1), apps=(app,))
    client_tls = ssl.create_default_context(cafile=str(tmp_path / "ca" / "ca.pem"))

    async def run():
        service = AppsService(policy, store, decision_log=MemoryLog(), ca_file=idp.ca_file)
        await service.start()
        pages, errors, swept = {}, {}, {}
        try:
            for name, document in documents.items():
                idp.discovery(document)
                service.issuer._discovery = None  # as after DISCOVERY_TTL
                for call in ("authorization_url", "userinfo"):
                    try:
                        await (service.issuer.authorization_url("https://wiki.apps.test/cb") if call == "authorization_url"
                               else service.issuer.userinfo("token", "bob"))
                    except IssuerUnavailable:
                        pass
                    except Exception as e:
                        errors[(name, call)] = type(e).__name__
                service.issuer._discovery = None
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_tls,
                                                               server_hostname="wiki.apps.test")
                writer.write(b"GET /docs HTTP/1.1\r\nHost: wiki.apps.test\r\n\r\n")
                try:
                    pages[name] = (await asyncio.wait_for(reader.readuntil(b"\r\n"), 20)).strip()
                except asyncio.IncompleteReadError:
                    pages[name] = b"closed without an answer"
                writer.close()
                # The sweep re-checks a session holding a WebSocket against the same issuer.
                service.issuer._discovery = None
                session = service.sessions.create(app, SignIn("bob", "bob", "Bob", (), "t"), 600,
                                                  now=time.time() - 10)
                tunnel = asyncio.get_running_loop().create_task(asyncio.sleep(60))
                session.tunnels.add(tunnel)
                for _ in range(100):
                    await asyncio.sleep(0.05)
                    if tunnel.done():
                        break
                swept[name] = (tunnel.cancelled(), session.sid in service.sessions.sessions,
                               service._housekeeping.done())
                tunnel.cancel()
        finally:
            await service.stop()
            idp.server.shutdown()
        return pages, errors, swept

    pages, errors, swept = asyncio.run(run())
    assert errors == {}  # every garbage answer is IssuerUnavailable
    assert pages == {name: b"HTTP/1.1 503 Service Unavailable" for name in documents}
    assert swept == {name: (True, False, False) for name in documents}


def test_websockets_turned_off_in_the_policy_are_cut_by_the_sweep(tmp_path):
    """An app's `websockets: true` becomes false: the next sweep cuts the WebSockets already open
    (a new upgrade is refused 403), as it does when their user loses access."""
    import asyncio
    import dataclasses

    from skyguard.apps.oidc import IssuerClient, SignIn
    from skyguard.apps.service import AppsService
    from skyguard.custody.store import SecretStore

    policy = parse_policy(config.DEFAULT_POLICY.read_text() + APPS.replace("groups: [wiki-editors]",
                                                                          "groups: [wiki-editors], websockets: true"))
    [app] = policy.apps

    async def run():
        log = MemoryLog()
        service = AppsService(policy, SecretStore(tmp_path / "secrets"), decision_log=log)
        service.issuer = IssuerClient(policy.identity, b"unused")
        session = service.sessions.create(app, SignIn("bob", "bob", "Bob", ("wiki-editors",), "t"), 600)
        tunnel = asyncio.get_running_loop().create_task(asyncio.sleep(60))
        session.tunnels.add(tunnel)
        await service._sweep_once()
        await asyncio.sleep(0)
        kept = not tunnel.done()
        service.policy = dataclasses.replace(policy, apps=(dataclasses.replace(app, websockets=False),))
        await service._sweep_once()
        await asyncio.sleep(0)
        return kept, tunnel.cancelled(), log.entries

    kept, cut, entries = asyncio.run(run())
    assert kept and cut
    assert {"kind": "apps_denied", "app": "wiki", "user": "bob", "groups": ["wiki-editors"],
            "reason": "websockets_not_allowed", "websockets_cut": True} in entries
