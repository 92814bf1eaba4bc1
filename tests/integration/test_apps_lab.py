"""The identity-aware proxy end to end in the lab: the real OpenID provider (node-oidc-provider)
runs in the lab's internet namespace as idp.test, skyguard's daemon runs the proxy in the host
namespace, a small web app runs in lab VMs (it verifies the identity header against `skyguard apps
jwks` and says who it sees), and people come from the internet namespace with curl, a WebSocket
client and a headless Chromium driven by selenium. One IdP and one daemon for the module.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from daemon_support import RunningDaemon, wait_for

from skyguard import config
from skyguard.apps.assertion import verify
from skyguard.lab.ca import LabCA
from skyguard.lab.idp import DEFAULT_FIXTURE, ISSUER, LabIdp
from support.frozen_disk import FrozenDisk

UPLINK = "100.64.0.1"  # the lab host's address toward the internet namespace
CLIENT = "100.64.0.2"  # the internet namespace's address toward the lab host (people come from there)
WIKI, ADMIN = "wiki.apps.test", "admin.apps.test"
WIKI_URL, ADMIN_URL = f"https://{WIKI}:8443", f"https://{ADMIN}:8444"
CONSOLE_URL = f"https://{WIKI}:8445"  # the web console behind the wiki's sign-in
METRICS = "127.0.0.1:26031"  # loopback of the lab's host namespace
PASSWORDS = {u["username"]: u["password"] for u in json.loads(DEFAULT_FIXTURE.read_text())["users"]}
SESSION_CHECK = 2  # seconds: identity.session_check in this module's policy

POLICY = f"""
identity:
  issuer: {ISSUER}
  client_id: skyguard
  client_secret: idp-client-secret
  session_check: {SESSION_CHECK}
apps:
  - name: wiki
    workload: vfw1
    port: 443
    host: {WIKI}
    listen: "0.0.0.0:8443"
    certificate: wiki-tls
    groups: [wiki-editors]
    websockets: true
  - name: admin
    workload: dc1
    port: 8080
    host: {ADMIN}
    listen: "0.0.0.0:8444"
    certificate: admin-tls
    users: [alice]
admin:
  console:
    web: "0.0.0.0:8445"
    web_app: wiki
    targets:
      - {{name: dc1-desktop, workload: dc1, protocol: vnc, port: 5901, credential: dc1-vnc}}
    operators:
      - {{name: alice, may_access: [directory]}}
"""

# The app in the VM: plain HTTP; verifies the identity header with the JWKS file (as a real app
# would, with a JOSE library) and answers JSON; /ws is a WebSocket echo (RFC 6455 handshake,
# then bytes echoed as they come: the client's frames come back to it unchanged).
APP = r"""
import base64, hashlib, json, socket, sys, threading
from skyguard.apps.assertion import verify
jwks_path, port, origin = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def handle(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head = data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    method, target, _ = head[0].split(" ")
    headers = [line.split(": ", 1) for line in head[1:]]
    h = {k.lower(): v for k, v in headers}
    if h.get("upgrade", "").lower() == "websocket":
        magic = h["sec-websocket-key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        accept = base64.b64encode(hashlib.sha1(magic.encode()).digest()).decode()
        conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
        while chunk := conn.recv(65536):
            conn.sendall(chunk)
        return
    identities = [v for k, v in headers if k.lower() == "x-skyguard-assertion"]
    try:
        claims = verify(identities[0], json.load(open(jwks_path)), origin) if len(identities) == 1 else None
        seen = f"Hello, {claims['name']}" if claims else "no identity"
    except Exception as e:
        claims, seen = None, f"bad identity: {type(e).__name__}"
    body = json.dumps({"seen": seen, "claims": claims, "headers": headers, "target": target}).encode()
    page = f"<html><body><h1 id='hello'>{seen}</h1><pre id='json'>".encode() + body + b"</pre></body></html>"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
    conn.sendall(head % len(page) + page)
def serve(conn):
    try:
        handle(conn)
    finally:
        conn.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", port)); s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


class LabHostDaemon(RunningDaemon):
    """The daemon and its CLI in the lab's host namespace with the lab's resolver (idp.test
    resolves as it would for a host configured to use the site's DNS) and the lab's CA."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.env["SKYGUARD_LAB_DIR"] = str(self.lab.lab_dir.parent)

    def _in_host(self, argv):
        return self.lab.command("host", argv)


@pytest.fixture(scope="module")
def apps_lab(lab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("apps")
    fixture = tmp / "idp.json"
    shutil.copy(DEFAULT_FIXTURE, fixture)
    idp = LabIdp(lab, fixture=fixture, work_dir=tmp / "idp").start()
    policy = tmp / "policy.yaml"
    policy.write_text(config.DEFAULT_POLICY.read_text() + POLICY)
    daemon = LabHostDaemon(lab, tmp / "daemon", policy_path=policy, ready_timeout=180,
                           metrics=METRICS)  # bcc on a loaded 2-core machine
    ca = LabCA(lab.lab_dir / "ca")
    secrets = json.loads(fixture.read_text())["clients"][0]["client_secret"]
    (tmp / "client-secret").write_text(secrets)
    daemon.cli("secret", "set", "idp-client-secret", "--file", str(tmp / "client-secret"), check=True)
    for name, host in (("wiki-tls", WIKI), ("admin-tls", ADMIN)):
        chain, key = ca.leaf_files(host)
        (tmp / name).write_bytes(chain.read_bytes() + key.read_bytes())
        daemon.cli("secret", "set", name, "--file", str(tmp / name), check=True)
    apps = []
    log_disk = FrozenDisk(daemon.state_dir / "log")  # the signed log's own disk, frozen by one test
    try:
        with log_disk:
            try:
                daemon.start()
                (tmp / "jwks.json").write_text(daemon.cli("apps", "jwks", check=True).stdout)
                for vm, port, origin in (("vfw1", 443, WIKI_URL), ("dc1", 8080, ADMIN_URL)):
                    app = lab.popen(vm, [sys.executable, "-c", APP, str(tmp / "jwks.json"), str(port), origin],
                                    stdout=subprocess.PIPE, stderr=open(tmp / f"{vm}-app.log", "w"), text=True,
                                    env={"PYTHONPATH": str(config.REPO_ROOT)})
                    apps.append(app)
                    assert app.stdout.readline().strip() == "ready"
                yield type("AppsLab", (), {"tmp": tmp, "lab": lab, "daemon": daemon, "idp": idp, "ca": ca,
                                           "fixture": fixture, "log_disk": log_disk})
            finally:
                for app in apps:
                    app.terminate()
                    app.wait(10)
                daemon.cleanup()
    finally:
        idp.stop()


# ---- a person's HTTP client (curl in the internet namespace) ---------------------------------

class Browser:
    """curl with a cookie jar, from the internet namespace; the app host names resolve to the
    lab host's uplink (as a site's DNS would), idp.test through the lab's DNS."""

    def __init__(self, apps_lab, name: str):
        self.lab = apps_lab
        self.jar = apps_lab.tmp / f"{name}.jar"
        self.jar.unlink(missing_ok=True)

    def curl(self, url: str, *args: str, follow: bool = False) -> tuple[int, dict, str, str]:
        """(status, headers of the last response, body, final URL)."""
        head = tempfile.NamedTemporaryFile(dir=self.lab.tmp, delete=False)
        argv = ["curl", "-sS", "--max-time", "20", "--cacert", str(self.lab.ca.cert_path), "-c", str(self.jar),
                "-b", str(self.jar), "-D", head.name, "-w", "\n%{http_code} %{url_effective}",
                "--resolve", f"{WIKI}:8443:{UPLINK}", "--resolve", f"{ADMIN}:8444:{UPLINK}", *args, url]
        if follow:
            argv.insert(1, "-L")
        out = self.lab.lab.exec("internet", argv, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        body, _, tail = out.stdout.rpartition("\n")
        code, final = tail.split(" ", 1)
        blocks = Path(head.name).read_text().strip().split("\r\n\r\n")
        Path(head.name).unlink()
        headers: dict[str, list[str]] = {}
        for line in blocks[-1].splitlines()[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        return int(code), headers, body, final

    def cookie(self, name: str) -> str | None:
        for line in self.jar.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) == 7 and fields[5] == name:
                return fields[6]
        return None

    def sign_in(self, user: str, url: str = WIKI_URL + "/", password: str | None = None, stop_at_callback=False):
        """Follow the app to the issuer's sign-in page, fill in the form, follow back."""
        code, _, page, final = self.curl(url, follow=True)
        assert code == 200 and final.startswith(ISSUER + "/interaction/"), (code, final, page[:300])
        action = re.search(r'action="([^"]+)"', page).group(1)
        form = ["--data-urlencode", f"username={user}", "--data-urlencode",
                f"password={password or PASSWORDS[user]}"]
        if not stop_at_callback:
            return self.curl(ISSUER + action, *form, follow=True)
        # Follow the issuer's own redirects, stop before the callback on the app.
        code, headers, body, final = self.curl(ISSUER + action, *form)
        while code in (302, 303) and headers["location"][0].startswith(ISSUER):
            code, headers, body, final = self.curl(headers["location"][0])
        return headers["location"][0]


def app_view(body: str) -> dict:
    return json.loads(re.search(r"<pre id='json'>(.*)</pre>", body, re.S).group(1))


def entries(apps_lab, kind: str) -> list[dict]:
    return apps_lab.daemon.log_entries(kind)


# ---- sign-in, identity header, refusals -------------------------------------------------------

def test_a_request_without_a_session_is_sent_to_the_issuer_with_pkce(apps_lab):
    code, headers, _, _ = Browser(apps_lab, "anon").curl(WIKI_URL + "/docs?page=1")
    assert code == 302
    location = urlsplit(headers["location"][0])
    query = parse_qs(location.query)
    assert f"{location.scheme}://{location.netloc}{location.path}" == ISSUER + "/auth"
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
    assert query["client_id"] == ["skyguard"] and query["redirect_uri"] == [WIKI_URL + "/.skyguard/callback"]
    assert query["state"][0] and query["nonce"][0] and "openid" in query["scope"][0].split()
    [login] = headers["set-cookie"]
    assert login.startswith("__Host-skyguard-login=") and all(
        flag in login for flag in ("Secure", "HttpOnly", "SameSite=Lax", "Path=/"))


def test_a_member_signs_in_and_the_app_gets_a_verified_identity_and_never_a_forged_one(apps_lab):
    browser = Browser(apps_lab, "bob")
    code, _, body, final = browser.sign_in("bob", WIKI_URL + "/docs?page=1")
    assert code == 200 and final == WIKI_URL + "/docs?page=1"  # back where the user started
    seen = app_view(body)
    assert seen["seen"] == "Hello, Bob Builder"
    assert seen["claims"]["sub"] == "bob" and "wiki-editors" in seen["claims"]["groups"]
    assert seen["claims"]["exp"] - seen["claims"]["iat"] <= 60  # short-lived
    cookie = browser.cookie("__Host-skyguard-session")
    assert cookie and "#HttpOnly_" in browser.jar.read_text()
    # A client's own copy of the identity header (in any case) is stripped; skyguard's cookies
    # never reach the app.
    forged = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSIsIm5hbWUiOiJBbGljZSJ9."
    _, _, body, _ = browser.curl(WIKI_URL + "/again", "-H", f"X-Skyguard-Assertion: {forged}",
                                 "-H", f"x-skyguard-ASSERTION: {forged}", "-H", "X-Forwarded-For: 6.6.6.6")
    seen = app_view(body)
    sent = [v for k, v in seen["headers"] if k.lower() == "x-skyguard-assertion"]
    assert len(sent) == 1 and forged not in sent and seen["claims"]["sub"] == "bob"
    assert not any(k.lower() == "cookie" and "skyguard" in v for k, v in seen["headers"])
    assert [v for k, v in seen["headers"] if k.lower() == "x-forwarded-for"] == [CLIENT]
    # The header verifies against `skyguard apps jwks` (and not against another key).
    jwks = json.loads(apps_lab.daemon.cli("apps", "jwks", check=True).stdout)
    assert verify(sent[0], jwks, WIKI_URL)["name"] == "Bob Builder"
    assert any(e["user"] == "bob" and e["app"] == "wiki" for e in entries(apps_lab, "apps_signin"))


def test_a_signed_in_user_outside_the_apps_users_and_groups_gets_403_and_a_log_entry(apps_lab):
    code, _, body, _ = Browser(apps_lab, "carol").sign_in("carol")
    assert code == 403 and "carol may not use wiki" in body
    [denied] = [e for e in entries(apps_lab, "apps_denied") if e["user"] == "carol"]
    assert denied["app"] == "wiki" and denied["reason"] == "not_in_users_or_groups"


def test_a_wrong_password_is_refused_by_the_issuer(apps_lab):
    code, _, body, final = Browser(apps_lab, "mallory").sign_in("bob", password="guess")
    assert code == 401 and final.startswith(ISSUER) and "Wrong user name or password" in body


def test_tampered_foreign_and_expired_cookies_are_refused_and_logged(apps_lab):
    from skyguard.apps.sessions import CookieSealer
    from skyguard.custody.store import SecretStore

    alice = Browser(apps_lab, "alice-admin")
    code, _, body, _ = alice.sign_in("alice", ADMIN_URL + "/")
    assert code == 200 and app_view(body)["claims"]["sub"] == "alice"
    admin_cookie = alice.cookie("__Host-skyguard-session")
    bob = Browser(apps_lab, "bob-cookies")
    bob.sign_in("bob")
    good = bob.cookie("__Host-skyguard-session")
    tampered = good[:-6] + ("AAAAAA" if not good.endswith("AAAAAA") else "BBBBBB")
    key = SecretStore(apps_lab.daemon.state_dir / "secrets").get("apps-cookie-key")
    expired = CookieSealer(bytes(key)).seal("anything", WIKI, time.time() - 5)
    outsider = CookieSealer(b"k" * 32).seal("anything", WIKI, time.time() + 600)
    for value, reason in ((tampered, "cookie_invalid"), (admin_cookie, "cookie_for_another_app"),
                          (outsider, "cookie_invalid"), (expired, None)):
        code, headers, _, _ = Browser(apps_lab, "thief").curl(WIKI_URL + "/", "-H",
                                                             f"Cookie: __Host-skyguard-session={value}")
        assert code == 302 and headers["location"][0].startswith(ISSUER + "/auth"), reason
    reasons = [e["reason"] for e in entries(apps_lab, "apps_refused")]
    assert "cookie_invalid" in reasons and "cookie_for_another_app" in reasons


def test_a_replayed_state_and_a_callback_from_another_browser_are_refused(apps_lab):
    browser = Browser(apps_lab, "replay")
    callback = browser.sign_in("bob", stop_at_callback=True)
    assert callback.startswith(WIKI_URL + "/.skyguard/callback?")
    stranger = Browser(apps_lab, "stranger")  # no login cookie: someone else's sign-in link
    code, _, body, _ = stranger.curl(callback)
    assert code == 400 and "not started by this browser" in body
    code, headers, _, _ = browser.curl(callback)
    assert code == 303 and headers["location"] == ["/"]
    # The same state again, even with the login cookie that went with it (a captured pair).
    state = parse_qs(urlsplit(callback).query)["state"][0]
    code, _, body, _ = Browser(apps_lab, "replayer").curl(callback, "-H", f"Cookie: __Host-skyguard-login={state}")
    assert code == 400 and "already used" in body
    reasons = [e["reason"] for e in entries(apps_lab, "apps_refused")]
    assert "state_mismatch" in reasons and "state_unknown_or_replayed" in reasons


def test_the_return_path_never_leaves_the_app(apps_lab):
    for target in ("//evil.test/steal", "/\\evil.test/steal"):
        browser = Browser(apps_lab, "redirect")
        callback = browser.sign_in("bob", WIKI_URL + target, stop_at_callback=True)
        code, headers, _, _ = browser.curl(callback)
        assert code == 303 and headers["location"] == ["/"], target


def test_a_host_header_naming_another_app_is_refused(apps_lab):
    browser = Browser(apps_lab, "bob-host")
    browser.sign_in("bob")
    code, _, body, _ = browser.curl(WIKI_URL + "/", "-H", f"Host: {ADMIN}")
    assert code == 421 and "serves wiki.apps.test" in body
    assert any(e["reason"] == "host_mismatch" and e.get("host") == ADMIN for e in entries(apps_lab, "apps_refused"))


def test_an_app_port_is_reachable_only_through_the_proxy(apps_lab):
    """sdn-manages-firewall allows sdn -> firewall tcp/443 in the policy; the app on vfw1:443
    takes that port for the proxy: another VM and the outside are dropped by the datapath."""
    probe = ("import socket, sys; s = socket.socket(); s.settimeout(2)\n"
             "try:\n    s.connect((sys.argv[1], int(sys.argv[2]))); print('open')\nexcept OSError:\n    print('blocked')")
    probes = {(where, address, port): apps_lab.lab.popen(where, [sys.executable, "-c", probe, address, str(port)],
                                                         stdout=subprocess.PIPE, text=True)
              for where, address, port in (("sdnctl1", "10.10.4.2", 443), ("internet", "10.10.4.2", 443),
                                           ("radius1", "10.10.2.2", 8080), ("dc2", "10.10.2.2", 8080))}
    for what, probe_process in probes.items():  # side by side: each blocked one waits out its timeout
        assert probe_process.communicate(timeout=30)[0].strip() == "blocked", what
    status = apps_lab.daemon.status()
    dropped = [r for r in status["counters"]["drops"] if r["zone"] in ("firewall", "directory")]
    assert dropped  # counted by the datapath, not merely unanswered


# ---- sessions: logout, groups changing at the issuer, WebSockets --------------------------------

WS_CLIENT = r"""
import json, sys, websocket
url, host, cookie, ca = sys.argv[1:5]
try:
    # Connect to the lab host's address; the app's name goes in SNI, certificate check, Host and
    # Origin (as from one of the app's own pages).
    ws = websocket.create_connection(url, host=host, header=[f"Cookie: __Host-skyguard-session={cookie}"],
                                     origin=f"https://{host}",
                                     sslopt={"ca_certs": ca, "server_hostname": host.split(":")[0]}, timeout=20)
except websocket.WebSocketBadStatusException as e:
    print(json.dumps({"status": e.status_code})); sys.exit(0)
ws.send("ping-1"); print(json.dumps({"echo": ws.recv()}), flush=True)
sys.stdin.readline()  # the test ends the session now
try:
    ws.send("ping-2"); print(json.dumps({"echo": ws.recv()}), flush=True)
except Exception as e:
    print(json.dumps({"closed": type(e).__name__}), flush=True)
"""


def ws_client(apps_lab, host: str, port: int, cookie: str) -> subprocess.Popen:
    return apps_lab.lab.popen("internet", [sys.executable, "-c", WS_CLIENT, f"wss://{UPLINK}:{port}/ws",
                                           f"{host}:{port}", cookie, str(apps_lab.ca.cert_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_websockets_pass_where_allowed_and_are_cut_when_the_session_is_logged_out(apps_lab):
    browser = Browser(apps_lab, "bob-ws")
    browser.sign_in("bob")
    client = ws_client(apps_lab, WIKI, 8443, browser.cookie("__Host-skyguard-session"))
    try:
        first = client.stdout.readline()
        assert json.loads(first) == {"echo": "ping-1"}, first + client.stderr.read()
        sessions = json.loads(apps_lab.daemon.cli("apps", "sessions", "--json", check=True).stdout)["sessions"]
        assert any(s["user"] == "bob" and s["websockets"] == 1 for s in sessions)
        out = json.loads(apps_lab.daemon.cli("apps", "logout", "bob", "--json", check=True).stdout)
        assert out["ended"] >= 1
        client.stdin.write("\n")
        client.stdin.flush()
        after = json.loads(client.stdout.readline())
        assert "closed" in after, after
    finally:
        client.kill()
        client.wait()
    code, headers, _, _ = browser.curl(WIKI_URL + "/")  # logged out: sign in again
    assert code == 302 and headers["location"][0].startswith(ISSUER)
    assert any(e["user"] == "bob" and e["reason"] == "logged_out_by_operator"
               for e in entries(apps_lab, "apps_session_ended"))


def test_websockets_are_refused_on_an_app_that_does_not_take_them(apps_lab):
    browser = Browser(apps_lab, "alice-ws")
    browser.sign_in("alice", ADMIN_URL + "/")
    client = ws_client(apps_lab, ADMIN, 8444, browser.cookie("__Host-skyguard-session"))
    out, err = client.communicate(timeout=30)
    assert json.loads(out.splitlines()[0]) == {"status": 403}, out + err


def test_signing_out_at_the_app_ends_the_session(apps_lab):
    browser = Browser(apps_lab, "bob-out")
    browser.sign_in("bob")
    code, _, body, _ = browser.curl(WIKI_URL + "/.skyguard/logout")  # a link: a page with a button, no more
    assert code == 200 and '<form method="post" action="/.skyguard/logout">' in body
    assert browser.curl(WIKI_URL + "/")[0] == 200
    code, _, _, _ = browser.curl(WIKI_URL + "/.skyguard/logout", "-X", "POST", "-H", "Origin: https://evil.test")
    assert code == 403 and browser.curl(WIKI_URL + "/")[0] == 200
    code, headers, body, _ = browser.curl(WIKI_URL + "/.skyguard/logout", "-X", "POST", "-H", f"Origin: {WIKI_URL}")
    assert code == 200 and "signed out" in body
    assert any(c.startswith("__Host-skyguard-session=;") and "Max-Age=0" in c for c in headers["set-cookie"])
    code, _, _, _ = browser.curl(WIKI_URL + "/")
    assert code == 302


def test_apps_list_names_every_app(apps_lab):
    listed = json.loads(apps_lab.daemon.cli("apps", "list", "--json", check=True).stdout)
    assert listed["issuer"] == ISSUER
    assert {(a["name"], a["listening"]) for a in listed["apps"]} == {("wiki", True), ("admin", True)}
    text = apps_lab.daemon.cli("apps", "list", check=True).stdout
    assert "wiki" in text and "group:wiki-editors" in text


def test_a_user_removed_from_the_group_is_refused_within_the_session_check(apps_lab):
    browser = Browser(apps_lab, "bob-groups")
    code, _, _, _ = browser.sign_in("bob")
    assert code == 200
    users = json.loads(apps_lab.fixture.read_text())["users"]
    try:
        apps_lab.idp.write_users([dict(u, groups=[]) if u["username"] == "bob" else u for u in users])
        wait_for(lambda: browser.curl(WIKI_URL + "/")[0] == 403, SESSION_CHECK * 10, "bob's next request refused")
    finally:
        apps_lab.idp.write_users(users)
    changed = [e for e in entries(apps_lab, "apps_groups_changed") if e["user"] == "bob"]
    assert changed and changed[-1]["after"] == []


# ---- the signed log cannot record a sign-in ------------------------------------------------------

def test_a_sign_in_the_log_cannot_record_is_refused_with_503_and_leaves_no_session(apps_lab):
    """A sign-in's apps_signin entry was only queued: with the log's disk stalled the session
    cookie went out at once, the sign-in on record nowhere (a crash then: no record at all); once
    the log refused entries the callback raised out of the connection (no answer, a traceback in
    the host log). Now a sign-in waits until its entry is durable, else a 503 saying why: no
    session, no cookie, counted log_refused, said once in the host log."""
    daemon = apps_lab.daemon
    stalled, refusing = Browser(apps_lab, "bob-stalled"), Browser(apps_lab, "bob-refusing")
    callbacks = [(browser, browser.sign_in("bob", stop_at_callback=True)) for browser in (stalled, refusing)]
    counted = metric(apps_lab, "skyguard_apps_requests_total", app="wiki", result="log_refused")
    host_log = daemon.log_path.stat().st_size
    frozen_at = time.time()
    apps_lab.log_disk.freeze()
    try:
        for browser, callback in callbacks:
            if browser is refusing:  # the second once the log refuses new entries
                wait_for(lambda: daemon.status()["log"]["refusing"], 60, "the log refusing entries")
            code, headers, body, _ = browser.curl(callback)  # the first at once: the log is not refusing yet
            assert code == 503 and "cannot record sign-ins" in body, (code, body)
            assert "set-cookie" not in headers or not any(c.startswith("__Host-skyguard-session=")
                                                          for c in headers["set-cookie"]), headers
            assert browser.cookie("__Host-skyguard-session") is None
        assert metric(apps_lab, "skyguard_apps_requests_total", app="wiki", result="log_refused") == counted + 2
    finally:
        apps_lab.log_disk.thaw()
    wait_for(lambda: daemon.status()["log"]["refusing"] is None, 60, "the log accepting entries")
    sessions = json.loads(daemon.cli("apps", "sessions", "--json", check=True).stdout)["sessions"]
    assert not [s for s in sessions if s["signed_in"] >= frozen_at], sessions  # nothing kept of either
    said = daemon.log_path.read_bytes()[host_log:].decode(errors="replace")
    assert said.count("cannot record the sign-in") == 2 and "Traceback" not in said, said
    code, _, body, _ = Browser(apps_lab, "bob-thawed").sign_in("bob")
    assert code == 200 and app_view(body)["seen"] == "Hello, Bob Builder"
    daemon.cli("log", "verify", check=True)


def test_while_the_log_refuses_a_sign_out_signs_out_and_only_a_lost_group_takes_effect(apps_lab):
    """With the log refusing entries, ending a session and a change of groups raised LogError out
    of the request: a sign-out got no answer (the browser kept its cookie), and so did every
    request of a user whose groups changed. Now ending access never depends on the log (its entry
    is best effort, said in the host log): the sign-out page, the session gone, a lost group
    taking effect; a gained group, which grants access, only once its entry is on record."""
    daemon = apps_lab.daemon
    first, leaving, bob, carol = (Browser(apps_lab, name) for name in ("bob-out-1", "bob-out-2", "bob-regrouped",
                                                                        "carol-regrouped"))
    for browser, user, code in ((first, "bob", 200), (leaving, "bob", 200), (bob, "bob", 200), (carol, "carol", 403)):
        assert browser.sign_in(user)[0] == code
    users = json.loads(apps_lab.fixture.read_text())["users"]
    regrouped = {"bob": [], "carol": ["wiki-editors"]}
    host_log = daemon.log_path.stat().st_size
    apps_lab.idp.write_users([dict(u, groups=regrouped.get(u["username"], u["groups"])) for u in users])
    apps_lab.log_disk.freeze()
    try:
        sign_out = ("-X", "POST", "-H", f"Origin: {WIKI_URL}")
        assert first.curl(WIKI_URL + "/.skyguard/logout", *sign_out)[0] == 200  # its entry waits on the disk
        wait_for(lambda: daemon.status()["log"]["refusing"], 60, "the log refusing entries")
        code, headers, body, _ = leaving.curl(WIKI_URL + "/.skyguard/logout", *sign_out)
        assert code == 200 and "signed out" in body, (code, body)
        assert any(c.startswith("__Host-skyguard-session=;") for c in headers["set-cookie"])
        assert leaving.curl(WIKI_URL + "/")[0] == 302
        wait_for(lambda: bob.curl(WIKI_URL + "/")[0] == 403, SESSION_CHECK * 10, "bob's lost group taking effect")
        said = lambda: daemon.log_path.read_bytes()[host_log:].decode(errors="replace")  # noqa: E731
        wait_for(lambda: carol.curl(WIKI_URL + "/")[0] == 403 and "carol" in said(), SESSION_CHECK * 10,
                 "carol's gained group held back, said in the host log")
        assert "Traceback" not in said(), said()
    finally:
        apps_lab.log_disk.thaw()
    try:
        wait_for(lambda: daemon.status()["log"]["refusing"] is None, 60, "the log accepting entries")
        wait_for(lambda: carol.curl(WIKI_URL + "/")[0] == 200, SESSION_CHECK * 10, "carol's gained group on record")
    finally:
        apps_lab.idp.write_users(users)
    changed = [e for e in entries(apps_lab, "apps_groups_changed") if e["user"] == "carol"]
    assert changed and changed[-1]["after"] == ["wiki-editors"], changed
    daemon.cli("log", "verify", check=True)


# ---- a real browser ---------------------------------------------------------------------------

BROWSER = r"""
import base64, hashlib, json, sys, tempfile
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
leaf, url, user, password, uplink, hosts, shot = sys.argv[1:8]
# Trust exactly the lab's leaf key (every lab leaf shares it): no blanket certificate bypass.
cert = x509.load_pem_x509_certificate(open(leaf, "rb").read())
der = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
spki = base64.b64encode(hashlib.sha256(der).digest()).decode()
options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tempfile.mkdtemp()}", f"--ignore-certificate-errors-spki-list={spki}",
             "--host-resolver-rules=" + ",".join(f"MAP {h} {uplink}" for h in hosts.split(","))):
    options.add_argument(flag)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
try:
    driver.set_page_load_timeout(30)
    driver.get(url)
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: d.find_elements(By.ID, "username"))
    signin_page = driver.current_url
    driver.find_element(By.ID, "username").send_keys(user)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "submit").click()
    wait.until(lambda d: d.find_elements(By.ID, "hello"))
    driver.save_screenshot(shot)
    cookies = {c["name"]: c for c in driver.get_cookies()}
    print(json.dumps({"signin_page": signin_page, "landed": driver.current_url,
                      "hello": driver.find_element(By.ID, "hello").text,
                      "cookie": cookies.get("__Host-skyguard-session")}))
finally:
    driver.quit()
"""


def test_a_person_signs_in_with_a_real_browser_and_the_app_greets_them_by_name(apps_lab):
    leaf, _ = apps_lab.ca.leaf_files(WIKI)
    shot = apps_lab.tmp / "browser.png"
    out = apps_lab.lab.exec("internet", [
        sys.executable, "-c", BROWSER, str(leaf), WIKI_URL + "/welcome", "alice", PASSWORDS["alice"], UPLINK,
        f"{WIKI},{ADMIN}", str(shot)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["signin_page"].startswith(ISSUER + "/interaction/")
    assert seen["landed"] == WIKI_URL + "/welcome"
    assert seen["hello"] == "Hello, Alice Liddell"
    cookie = seen["cookie"]
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["domain"] == WIKI
    assert shot.stat().st_size > 0


# ---- the issuer down: last, it restarts the provider --------------------------------------------

def test_with_the_issuer_down_nobody_gets_in_and_the_page_says_why(apps_lab):
    signed_in = Browser(apps_lab, "bob-before")
    assert signed_in.sign_in("bob")[0] == 200
    apps_lab.idp.stop()
    try:
        # A signed-in user is refused too once their session is due a check (fail closed).
        code, _, body, _ = wait_for(lambda: (r := signed_in.curl(WIKI_URL + "/"))[0] == 503 and r,
                                    SESSION_CHECK * 10, "the signed-in user's refusal")
        assert "identity provider cannot be reached" in body
        # What skyguard knows of the issuer is at most session_check old: within it, sign-in fails.
        code, _, body, _ = wait_for(lambda: (r := Browser(apps_lab, "idp-down").curl(WIKI_URL + "/"))[0] == 503 and r,
                                    SESSION_CHECK * 10, "the page saying the issuer is down")
        assert "identity provider cannot be reached" in body
        assert any(e["reason"] == "issuer_unavailable" for e in entries(apps_lab, "apps_refused"))
    finally:
        apps_lab.idp.start()
    code, _, body, _ = Browser(apps_lab, "idp-back").sign_in("bob")
    assert code == 200 and app_view(body)["seen"] == "Hello, Bob Builder"


# ---- floods of refusals: a bounded number of entries in the signed log, every one counted ----------

FLOOD = 200  # requests of one kind, from one client
BURST = 10  # conncap.RefusalBrake: entries of one kind from one source before summaries take over

BAD_TICKETS = r"""
import sys, websocket
url, host, ca, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
for _ in range(n):  # each opens (101), and skyguard closes it: 1008, unknown ticket
    ws = websocket.create_connection(url, host=host, sslopt={"ca_certs": ca, "server_hostname": host.split(":")[0]},
                                     timeout=20)
    try:
        ws.recv()
    except websocket.WebSocketException:
        pass
    print(ws.status)
    ws.shutdown()  # the socket, at once: an open one counts against this address's share
"""


def curl_flood(apps_lab, url: str, *args: str) -> list[str]:
    """The status of each request `url` globs to ([1-N]), sent by one curl in the internet namespace."""
    out = apps_lab.lab.exec("internet", ["curl", "-sS", "--cacert", str(apps_lab.ca.cert_path), "--resolve",
                                         f"{WIKI}:8443:{UPLINK}", "--resolve", f"{WIKI}:8445:{UPLINK}",
                                         "-o", "/dev/null", "-w", "%{http_code}\\n", *args, url],
                            capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def bad_tickets(apps_lab) -> list[str]:
    out = apps_lab.lab.exec("internet", [sys.executable, "-c", BAD_TICKETS, f"wss://{UPLINK}:8445/console/ws?ticket=x",
                                         f"{WIKI}:8445", str(apps_lab.ca.cert_path), str(FLOOD)],
                            capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def metric(apps_lab, name: str, **labels: str) -> float:
    text = apps_lab.lab.exec("host", ["curl", "-sf", f"http://{METRICS}/metrics"], lab_resolver=False,
                             capture_output=True, text=True, timeout=20).stdout
    wanted = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "} "
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(wanted))


def logged(apps_lab, kind: str, **words) -> tuple[int, int]:
    """(entries, refusals they stand for) of `kind` with these fields, its summaries included."""
    log = apps_lab.daemon.log_entries()
    single = [e for e in log if e["type"] == kind and words.items() <= e.items()]
    summaries = [e for e in log if e["type"] == kind + "_summary" and words.items() <= e.items()]
    return len(single) + len(summaries), len(single) + sum(e["refused"] for e in summaries)


def test_a_flood_of_refusals_takes_a_bounded_number_of_signed_entries_and_the_metrics_count_each(apps_lab):
    floods = [  # (log kind, its fields, metric, its labels, the flood, the status of each request)
        ("apps_refused", {"app": "wiki", "reason": "host_mismatch"},
         "skyguard_apps_requests_total", {"app": "wiki", "result": "host_mismatch"},
         lambda: curl_flood(apps_lab, WIKI_URL + f"/[1-{FLOOD}]", "-H", f"Host: {ADMIN}"), "421"),
        ("apps_refused", {"app": "wiki", "reason": "state_mismatch"},
         "skyguard_apps_requests_total", {"app": "wiki", "result": "state_mismatch"},
         lambda: curl_flood(apps_lab, WIKI_URL + f"/.skyguard/callback?state=[1-{FLOOD}]&code=c"), "400"),
        ("console_access_refused", {"reason": "not_same_origin", "door": "web"},
         "skyguard_console_refused_total", {"reason": "not_same_origin"},
         lambda: curl_flood(apps_lab, CONSOLE_URL + f"/console/open?target=[1-{FLOOD}]", "-X", "POST",
                            "-H", "Origin: https://evil.test"), "403"),
        ("console_access_refused", {"reason": "bad_ticket", "door": "web"},
         "skyguard_console_refused_total", {"reason": "bad_ticket"}, lambda: bad_tickets(apps_lab), "101"),
    ]
    wait_for(lambda: apps_lab.daemon.status()["parts"].get("console") in ("running", "degraded"), 60,
             "the console part")
    for kind, words, name, labels, flood, status in floods:
        entries_before, refusals_before = logged(apps_lab, kind, **words)
        counted_before = metric(apps_lab, name, **labels)
        began = time.monotonic()
        assert flood() == [status] * FLOOD, words
        # Refusals held when the flood ends go in a summary entry about a second later.
        wait_for(lambda kind=kind, words=words, before=refusals_before: logged(apps_lab, kind, **words)[1] - before
                 == FLOOD, 30,
                 f"every {words} refusal accounted for in the signed log", interval=0.5)
        seconds = time.monotonic() - began
        entries = logged(apps_lab, kind, **words)[0] - entries_before
        assert entries <= BURST + seconds + 2, (words, entries, seconds)  # about one a second past the burst
        assert metric(apps_lab, name, **labels) - counted_before == FLOOD, words
