"""The web console behind the identity-aware proxy's sign-in, end to end in the lab: the real OpenID
provider (node-oidc-provider) as idp.test in the internet namespace, a real Xvnc in the dc1 lab VM
(root window the marker colour), skyguard's identity-aware proxy and console proxy together in one
process in the lab's host namespace (as the daemon hosts them, without the datapath: see
test_console_vnc.py), and a person in a headless Chromium who signs in at the app, opens the
console page, sees the targets of their zones, clicks one (a POST) and reads the marker colour off noVNC's
canvas. A second person, whose zones do not hold that VM, sees no target and is refused (and
logged) when they forge the request that opens it.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import pytest

from skyguard import config
from skyguard.lab.ca import LabCA
from skyguard.lab.idp import DEFAULT_FIXTURE, ISSUER, LabIdp
from support.console_support import start_xvnc

UPLINK = "100.64.0.1"
APP_HOST = "wiki.apps.test"
APP_PORT, WEB_PORT = 24264, 24265
MARKER = [0x33, 0x66, 0xCC]
PASSWORDS = {u["username"]: u["password"] for u in json.loads(DEFAULT_FIXTURE.read_text())["users"]}
VM_PASSWORD = "Vs-" + secrets.token_hex(3)
PY = sys.executable

POLICY = f"""
identity:
  issuer: {ISSUER}
  client_id: skyguard
  client_secret: idp-client-secret
apps:
  - name: wiki
    workload: vfw1
    port: 443
    host: {APP_HOST}
    listen: "0.0.0.0:{APP_PORT}"
    certificate: wiki-tls
    users: [alice, bob]
admin:
  console:
    web: "0.0.0.0:{WEB_PORT}"
    web_app: wiki
    targets:
      - {{name: dc1-desktop, workload: dc1, protocol: vnc, port: 5901, credential: dc1-vnc}}
    operators:
      - {{name: alice, may_access: [directory]}}
      - {{name: bob, may_access: [sandbox]}}
"""

# skyguard's identity-aware proxy and console proxy on one loop, as the daemon wires them.
SERVER = r"""
import asyncio, sys
from pathlib import Path
from skyguard.admin.decisionlog import JsonLinesDecisionLog
from skyguard.apps.service import AppsService
from skyguard.console.proxy import ConsoleProxy
from skyguard.custody.store import SecretStore
from skyguard.policy.parse import load_policy
policy, state, ca = load_policy(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
async def main():
    store, log = SecretStore(state / "secrets"), JsonLinesDecisionLog(state / "log.jsonl")
    apps = AppsService(policy, store, decision_log=log, ca_file=ca)
    await apps.start()
    console = ConsoleProxy(policy, store, state, log, identify=apps.identify)
    await console.start()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


@pytest.fixture(scope="module")
def signin(lab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console-signin")
    os.chmod(tmp, 0o700)
    state = tmp / "state"
    fixture = tmp / "idp.json"
    users = json.loads(DEFAULT_FIXTURE.read_text())
    client = users["clients"][0]  # this module's app port is its own: register its callback
    client["redirect_uris"].append(f"https://{APP_HOST}:{APP_PORT}/.skyguard/callback")
    client["post_logout_redirect_uris"].append(f"https://{APP_HOST}:{APP_PORT}/")
    fixture.write_text(json.dumps(users))
    from skyguard.custody.store import SecretStore

    store = SecretStore(state / "secrets")
    store.set("dc1-vnc", VM_PASSWORD.encode())
    store.set("idp-client-secret", json.loads(fixture.read_text())["clients"][0]["client_secret"].encode())
    ca = LabCA(lab.lab_dir / "ca")
    chain, key = ca.leaf_files(APP_HOST)
    store.set("wiki-tls", chain.read_bytes() + key.read_bytes())
    (tmp / "policy.yaml").write_text(config.DEFAULT_POLICY.read_text() + POLICY)
    xvnc, _ = start_xvnc(lab, "dc1", tmp, VM_PASSWORD, 5901, "10.10.2.2", display_base=300)
    procs = [xvnc]
    idp = None
    try:
        idp = LabIdp(lab, fixture=fixture, work_dir=tmp / "idp").start()
        server = lab.popen("host", [PY, "-c", SERVER, str(tmp / "policy.yaml"), str(state), str(ca.cert_path)],
                           stdout=subprocess.PIPE, stderr=open(tmp / "server.log", "w"), text=True,
                           env=dict(os.environ, PYTHONPATH=str(config.REPO_ROOT)))
        procs.append(server)
        assert server.stdout.readline().strip() == "ready", (tmp / "server.log").read_text()[-3000:]
        yield type("SignIn", (), {"tmp": tmp, "lab": lab, "state": state, "chain": chain})
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(10)
        if idp is not None:
            idp.stop()


@pytest.fixture(scope="module")
def people(signin):
    """alice and bob, each in a fresh headless Chromium: sign in, open the console page, try."""
    out = signin.lab.exec("internet", [PY, "-c", BROWSER, str(signin.chain), UPLINK, APP_HOST,
                                       json.dumps(PASSWORDS), f"https://{APP_HOST}:{APP_PORT}/",
                                       f"https://{APP_HOST}:{WEB_PORT}"],
                          capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_signed_in_operator_opens_the_vm_console_in_the_browser(people):
    alice = people["alice"]
    assert alice["signin_page"].startswith(ISSUER + "/interaction/")
    assert alice["user"] == "alice" and alice["targets"] == ["dc1-desktop"]
    assert alice["state"] == "connected" and alice["pixel"][:3] == MARKER
    assert VM_PASSWORD not in alice["received"] and alice["frames"] > 3


def test_an_operator_outside_the_zone_sees_no_target_and_a_forged_request_is_refused(people, signin):
    bob = people["bob"]
    assert bob["user"] == "bob" and bob["targets"] == []
    assert "bob may not open the console dc1-desktop" in bob["forged"]
    log = [json.loads(line) for line in (signin.state / "log.jsonl").read_text().splitlines()]
    refused = [e for e in log if e["type"] == "console_access_refused" and e.get("door") == "web"]
    assert refused and refused[-1]["operator"] == "bob" and refused[-1]["reason"] == "not_allowed"


def test_the_session_is_recorded_under_the_signed_in_name(people, signin):
    records = [json.loads(p.read_text()) for p in (signin.state / "admin" / "sessions").glob("*.json")]
    assert [(r["operator"], r["console"]["auth"]) for r in records] == [("alice", "web")]


# Run in the lab's internet namespace: selenium drives Debian's chromium, trusting exactly the lab's
# leaf key (as tests/integration/test_apps.py does) and mapping the app's name to the lab host.
BROWSER = r"""
import base64, hashlib, json, sys, tempfile, time
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
leaf, uplink, host, passwords, app_url, console_url = sys.argv[1:7]
passwords = json.loads(passwords)
cert = x509.load_pem_x509_certificate(open(leaf, "rb").read())
der = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
spki = base64.b64encode(hashlib.sha256(der).digest()).decode()

def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=400,320", f"--user-data-dir={tempfile.mkdtemp()}",
                 f"--ignore-certificate-errors-spki-list={spki}", f"--host-resolver-rules=MAP {host} {uplink}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(30)
    return driver

def sign_in(driver, user):
    driver.get(app_url)
    wait = WebDriverWait(driver, 30)
    try:
        wait.until(lambda d: d.find_elements(By.ID, "username"))
    except Exception:
        raise SystemExit(f"no sign-in form at {driver.current_url}: {driver.page_source[:1500]}")
    page = driver.current_url
    driver.find_element(By.ID, "username").send_keys(user)
    driver.find_element(By.ID, "password").send_keys(passwords[user])
    driver.find_element(By.ID, "submit").click()
    try:
        wait.until(lambda d: d.current_url.startswith(app_url))
    except Exception:
        raise SystemExit(f"not back at the app: {driver.current_url}: {driver.page_source[:1500]}")
    return page

results = {}
for user in ("alice", "bob"):
    driver = browser()
    try:
        seen = {"signin_page": sign_in(driver, user)}
        driver.get(console_url + "/console/")
        seen["user"] = driver.find_element(By.ID, "user").text
        links = driver.find_elements(By.CSS_SELECTOR, "button.target")  # each POSTs to /console/open
        seen["targets"] = [a.text for a in links]
        if links:
            driver.get_log("performance")
            links[0].click()
            # the POST's answer redirects to the viewer: until it is loaded, the page is still the list
            WebDriverWait(driver, 30).until(lambda d: "/console/view" in d.current_url)
            state = "starting"
            for _ in range(150):
                state = driver.execute_script("return document.body.dataset.state")
                if state == "connected" and driver.execute_script(
                        "const c = document.querySelector('#screen canvas'); return c && c.width > 10"):
                    time.sleep(0.5)
                    break
                if state not in (None, "starting", "connected"):  # None: the viewer's script not run yet
                    break
                time.sleep(0.1)
            seen["state"] = state
            seen["pixel"] = driver.execute_script(
                "const c = document.querySelector('#screen canvas');"
                "return c ? Array.from(c.getContext('2d').getImageData(160, 120, 1, 1).data) : null")
            received, frames = [driver.page_source, json.dumps(driver.get_cookies())], 0
            for entry in driver.get_log("performance"):
                message = json.loads(entry["message"])["message"]
                if message["method"] == "Network.webSocketFrameReceived":
                    frame = message["params"]["response"]
                    data = frame["payloadData"]
                    received.append(base64.b64decode(data).decode("latin-1") if frame["opcode"] == 2 else data)
                    frames += 1
            seen["received"], seen["frames"] = "".join(received), frames
        else:  # no button to click: ask for the target anyway, from the console's page
            driver.execute_script("const f = document.createElement('form'); f.method = 'post';"
                                  "f.action = '/console/open?target=dc1-desktop'; document.body.append(f); f.submit()")
            WebDriverWait(driver, 30).until(lambda d: "/console/open" in d.current_url)
            seen["forged"] = driver.find_element(By.TAG_NAME, "body").text
        results[user] = seen
    finally:
        driver.quit()
print(json.dumps(results))
"""
