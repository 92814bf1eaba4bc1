"""The crypto proxy end to end in the lab: keys in a SoftHSM token the test makes (PIN only in the
sealed store), the real `skyguard up` serving the key API on every VM's gateway address, curl
inside lab VMs as the client, openssl checking signatures against `skyguard key public`, and the
issue's attacks: a zone the key does not allow (403 and a log entry), a zone no rule lets reach
the proxy and a spoofed VM address (both dropped by the datapath), malformed and oversized
requests (refused, the daemon keeps serving), a flood over the rate limit (refused for that VM
only), a private key export (refused by the token), and a restart that keeps the keys."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_support import RunningDaemon, drop_count, wait_for

from skyguard import config
from skyguard.custody.store import SecretStore
from skyguard.keys.softhsm import SoftHsmToken
from support.client_waits import ANSWER_WAIT_S, curl_argv, wait_s

GATEWAY = "169.254.1.1"  # every lab VM's gateway (skyguard/lab/addressing.py)
GATEWAY6 = "fe80::1"
PORT = 18200
PIN = secrets.token_hex(12).encode()

KEYS_POLICY = f"""
keys:
  backend: pkcs11
  module: {{module}}
  token: skyguard-test
  pin_secret: hsm-pin
  port: {PORT}
  keys:
    - {{name: release, zones: [auth], operations: [sign, verify], rate_limit: 100/s}}
    - {{name: edkey, zones: [auth], operations: [sign]}}
    - {{name: wrap, zones: [sdn], operations: [decrypt]}}
    - {{name: limited, zones: [auth], operations: [sign], rate_limit: 3/min}}
"""


def policy_text(module: str) -> str:
    """The default policy (no rule to the gateway: the keys: section alone opens the way for the
    zones its keys name) with keys:."""
    return config.DEFAULT_POLICY.read_text() + KEYS_POLICY.replace("{module}", module)


@pytest.fixture(scope="module")
def crypto(lab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crypto")
    token = SoftHsmToken.create(tmp / "hsm", "skyguard-test", PIN)
    policy = tmp / "policy.yaml"
    policy.write_text(policy_text(token.module))
    daemon = RunningDaemon(lab, tmp / "daemon", policy_path=policy)
    daemon.env.update(token.env)
    SecretStore(daemon.state_dir / "secrets").set("hsm-pin", PIN)
    # Made before the daemon runs: the CLI writes the signed log itself (one key; the others in
    # one child process, which saves a CLI start each).
    daemon.cli("key", "create", "release", "--type", "ec-p256", "--policy", str(policy), check=True)
    script = ("import sys\nfrom skyguard.keys.pkcs11 import Pkcs11Backend\n"
              "b = Pkcs11Backend(sys.argv[1], 'skyguard-test', sys.stdin.buffer.read())\n"
              "for name, kind in (('edkey', 'ed25519'), ('wrap', 'rsa-3072'), ('limited', 'ec-p256')):\n"
              "    b.create(name, kind)\n")
    subprocess.run([sys.executable, "-c", script, token.module], input=PIN, env=daemon.env, check=True, timeout=60)
    try:
        daemon.start()
        yield type("Crypto", (), {"tmp": tmp, "lab": lab, "daemon": daemon, "policy": policy, "token": token})
    finally:
        daemon.cleanup()


def call(crypto, vm: str, path: str, body=None, extra=(), answer=True):
    """curl inside `vm` to the key API on its gateway: (HTTP status, parsed JSON or raw text).
    answer=False: the test expects no answer (curl gives up after SILENCE_WAIT_S, status 0)."""
    argv = curl_argv("-o", "-", "-w", "\n%{http_code}", answer=answer)
    if body is not None:
        argv += ["-X", "POST", "-H", "content-type: application/json",
                 "--data-binary", body if isinstance(body, str) else json.dumps(body)]
    argv += list(extra) + [f"http://{GATEWAY}:{PORT}{path}"]
    out = crypto.lab.exec(vm, argv, capture_output=True, text=True, timeout=wait_s(answer) + 10)
    text, _, status = out.stdout.rpartition("\n")
    try:
        return int(status), json.loads(text) if text.strip() else None
    except ValueError:
        return int(status or 0), text


def key_uses(crypto, expect=None, timeout: float = ANSWER_WAIT_S) -> list[dict]:
    """The daemon's key_use entries, read from its log directory; with `expect`, wait (entries are
    group-committed) until one matches it."""
    from skyguard.tlog.entries import decode
    from skyguard.tlog.store import LogReader

    deadline = time.monotonic() + timeout
    while True:
        entries = [e for e in (decode(raw) for _, raw in LogReader(crypto.daemon.state_dir / "log").entries())
                   if e.get("type") == "key_use"]
        if expect is None or any(expect(e) for e in entries) or time.monotonic() > deadline:
            return entries
        time.sleep(0.1)


def public_pem(crypto, name: str, tmp: Path) -> Path:
    out = crypto.daemon.cli("key", "public", name, check=True)
    path = tmp / f"{name}.pem"
    path.write_text(out.stdout)
    return path


def test_a_vm_signs_and_openssl_verifies_against_key_public(crypto, tmp_path):
    data = b"release 1.2.3\n"
    (tmp_path / "data").write_bytes(data)
    digest = hashlib.sha256(data).digest()
    status, reply = call(crypto, "radius1", "/v1/keys/release/sign", {"digest": digest.hex()})
    assert status == 200, reply
    (tmp_path / "sig").write_bytes(base64.b64decode(reply["signature"]))
    pem = public_pem(crypto, "release", tmp_path)
    ok = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(pem), "-signature", str(tmp_path / "sig"),
                         str(tmp_path / "data")], capture_output=True, text=True)
    assert ok.returncode == 0 and "Verified OK" in ok.stdout, ok.stdout + ok.stderr
    # Ed25519 signs the digest bytes themselves.
    status, reply = call(crypto, "tacacs1", "/v1/keys/edkey/sign", {"digest": digest.hex()})
    assert status == 200, reply
    (tmp_path / "digest").write_bytes(digest)
    (tmp_path / "edsig").write_bytes(base64.b64decode(reply["signature"]))
    status, public = call(crypto, "tacacs1", "/v1/keys/edkey/public")
    assert status == 200 and public["type"] == "ed25519"
    (tmp_path / "edkey.pem").write_text(public["public_key"])
    ed = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(tmp_path / "edkey.pem"),
                         "-rawin", "-in", str(tmp_path / "digest"), "-sigfile", str(tmp_path / "edsig")],
                        capture_output=True, text=True)
    assert ed.returncode == 0 and "Signature Verified Successfully" in ed.stdout, ed.stdout + ed.stderr
    # The API verifies too, and says no to a changed digest.
    good = call(crypto, "radius1", "/v1/keys/release/verify",
                {"digest": digest.hex(), "signature": base64.b64encode((tmp_path / "sig").read_bytes()).decode()})
    bad = call(crypto, "radius1", "/v1/keys/release/verify",
               {"digest": hashlib.sha256(b"other").hexdigest(),
                "signature": base64.b64encode((tmp_path / "sig").read_bytes()).decode()})
    assert good == (200, {"key": "release", "valid": True}) and bad == (200, {"key": "release", "valid": False})
    mine = lambda e: e.get("digest") == digest.hex() and e.get("workload") == "radius1"  # noqa: E731
    entry = next(e for e in key_uses(crypto, mine) if mine(e))
    assert (entry["key"], entry["zone"], entry["operation"], entry["outcome"], entry["interface"]) == \
        ("release", "auth", "sign", "ok", "sg-radius1")


def test_a_vm_reaches_the_api_on_its_ipv6_gateway_and_is_known_by_its_interface(crypto):
    digest = hashlib.sha256(b"over IPv6").hexdigest()
    out = crypto.lab.exec("tacacs1", curl_argv("-g", "-d", json.dumps({"digest": digest}),
                                               f"http://[{GATEWAY6}%eth0]:{PORT}/v1/keys/release/sign"),
                          capture_output=True, text=True, timeout=60)
    assert "signature" in json.loads(out.stdout), out.stdout + out.stderr
    entry = next(e for e in key_uses(crypto, lambda e: e.get("digest") == digest) if e.get("digest") == digest)
    assert (entry["workload"], entry["interface"], entry["outcome"]) == ("tacacs1", "sg-tacacs1", "ok")
    assert entry["address"].startswith("fe80::")


def test_decrypt_where_the_key_allows_it(crypto):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    pem = crypto.daemon.cli("key", "public", "wrap", check=True).stdout.encode()
    secret = os.urandom(32)
    wrapped = load_pem_public_key(pem).encrypt(secret, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
    status, reply = call(crypto, "sdnctl1", "/v1/keys/wrap/decrypt", {"ciphertext": base64.b64encode(wrapped).decode()})
    assert status == 200 and base64.b64decode(reply["plaintext"]) == secret
    # sign is not among wrap's operations.
    status, reply = call(crypto, "sdnctl1", "/v1/keys/wrap/sign", {"digest": "00" * 32})
    assert status == 403 and "does not allow sign" in reply["error"]


def test_a_zone_the_key_does_not_allow_gets_403_and_a_log_entry(crypto):
    digest = hashlib.sha256(b"sdn wants the release key").hexdigest()
    status, reply = call(crypto, "sdnctl1", "/v1/keys/release/sign", {"digest": digest})
    assert status == 403 and "zone 'sdn' may not use key 'release'" in reply["error"]
    entry = next(e for e in key_uses(crypto, lambda e: e.get("digest") == digest) if e.get("digest") == digest)
    assert (entry["workload"], entry["zone"], entry["outcome"], entry["status"]) == ("sdnctl1", "sdn", "denied-zone", 403)


def test_the_flow_to_the_proxy_is_allowed_by_the_keys_proxy_rule(crypto):
    assert call(crypto, "radius1", "/v1/keys")[0] == 200

    def started():
        out = crypto.daemon.cli("flows", "--json", "--limit", "10000", "--verdict", "allow", check=True).stdout
        return [r for r in json.loads(out)["records"]
                if r["type"] == "flow_start" and r["dport"] == PORT and r["src_workload"] == "radius1"]

    assert {r["rule"] for r in wait_for(started, 30, "radius1's flow to the crypto proxy")} == {"keys-proxy"}


def test_a_zone_no_key_names_is_dropped_by_the_datapath(crypto):
    """auth and sdn reach the proxy with no rule of the operator's (the other tests); sandbox,
    named by no key, gets no connection at all: its SYN is dropped (no rule), not refused by the API."""
    before, uses = drop_count(crypto.daemon.status(), "sandbox", "no_rule"), len(key_uses(crypto))
    status, _ = call(crypto, "agent1", "/v1/keys", answer=False)
    assert status == 0
    assert drop_count(crypto.daemon.status(), "sandbox", "no_rule") > before
    assert not [e for e in key_uses(crypto)[uses:] if e.get("workload") == "agent1"]


def test_a_spoofed_vm_address_is_dropped_before_the_api(crypto):
    """radius1 (auth) sends from sdnctl1's address: the datapath drops it, nothing reaches the proxy."""
    lab = crypto.lab
    lab.exec("radius1", ["ip", "addr", "add", "10.10.3.2/32", "dev", "eth0"], check=True)
    try:
        before = len(key_uses(crypto))
        spoofs = lambda: sum(drop_count(crypto.daemon.status(), "auth", reason)  # noqa: E731
                             for reason in ("spoof_ip", "arp_spoof"))  # the SYN, or the ARP before it
        spoof_drops = spoofs()
        status, _ = call(crypto, "radius1", "/v1/keys/wrap/decrypt", {"ciphertext": "AAAA"},
                         extra=["--interface", "10.10.3.2"], answer=False)
        assert status == 0
        assert not [e for e in key_uses(crypto)[before:] if e.get("address") == "10.10.3.2"]
        assert spoofs() > spoof_drops  # dropped by the datapath, counted as spoofing
    finally:
        lab.exec("radius1", ["ip", "addr", "del", "10.10.3.2/32", "dev", "eth0"])


def test_malformed_and_oversized_requests_are_refused_and_the_daemon_keeps_serving(crypto, tmp_path):
    cases = [
        ("/v1/keys/release/sign", "{not json", 400),
        ("/v1/keys/release/sign", {"digest": "abc"}, 400),  # odd hex
        ("/v1/keys/release/sign", {"digest": "00" * 31}, 400),  # not a digest length
        ("/v1/keys/release/sign", ["a list"], 400),
        ("/v1/keys/release/private", {"digest": "00" * 32}, 404),  # no export endpoint exists
        ("/v1/keys/NOPE!/sign", {"digest": "00" * 32}, 400),
        ("/v1/keys/unknown/sign", {"digest": "00" * 32}, 404),
        ("/v1/nothing", None, 404),
    ]
    for path, body, expected in cases:
        status, reply = call(crypto, "radius1", path, body)
        assert status == expected and "error" in reply, (path, body, status, reply)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"digest": "00" * 32, "pad": "x" * 200_000}))
    status, reply = call(crypto, "radius1", "/v1/keys/release/sign", "@" + str(big))
    assert status == 413
    garbage = crypto.lab.exec("radius1", ["sh", "-c", f"printf 'GARBAGE\\r\\n\\r\\n' | nc -w {ANSWER_WAIT_S} {GATEWAY} {PORT}"],
                              capture_output=True, text=True, timeout=ANSWER_WAIT_S + 30)
    assert garbage.stdout.startswith("HTTP/1.1 400"), garbage.stdout
    assert call(crypto, "radius1", "/v1/keys/release/sign", {"digest": "11" * 32})[0] == 200
    assert crypto.daemon.running()


def test_a_flood_over_the_rate_limit_is_refused_for_that_vm_only(crypto):
    statuses = [call(crypto, "radius1", "/v1/keys/limited/sign", {"digest": "22" * 32})[0] for _ in range(6)]
    assert statuses[:3] == [200, 200, 200] and set(statuses[3:]) == {429}
    assert call(crypto, "tacacs1", "/v1/keys/limited/sign", {"digest": "22" * 32})[0] == 200  # its own bucket
    limited = [e for e in key_uses(crypto, lambda e: e.get("outcome") == "rate-limited")
               if e.get("outcome") == "rate-limited"]
    assert limited and limited[0]["workload"] == "radius1" and limited[0]["refused"] >= 1


def test_private_keys_do_not_leave_the_token(crypto):
    listing = json.loads(crypto.daemon.cli("key", "list", "--json", check=True).stdout)
    assert {k["name"]: k["extractable"] for k in listing} == {"release": False, "edkey": False, "wrap": False,
                                                               "limited": False}
    script = ("import os,sys\nfrom skyguard.keys.pkcs11 import Pkcs11Backend\nfrom skyguard.keys.types import KeyCustodyError\n"
              "b = Pkcs11Backend(sys.argv[1], 'skyguard-test', sys.stdin.buffer.read())\n"
              "for name in ('release', 'edkey', 'wrap'):\n"
              "    try:\n        b.export_private(name); print('EXPORTED', name)\n"
              "    except KeyCustodyError as e:\n        print(e)\n")
    out = subprocess.run([sys.executable, "-c", script, crypto.token.module], input=PIN, capture_output=True,
                         env=dict(os.environ, **crypto.token.env), timeout=60)
    assert out.returncode == 0, out.stderr
    assert "EXPORTED" not in out.stdout.decode() and out.stdout.decode().count("refuses to export") == 3


def test_key_changes_are_signed_log_entries_and_the_pin_is_nowhere(crypto):
    daemon = crypto.daemon
    made = daemon.cli("key", "create", "later", "--type", "ed25519")  # through the running daemon
    assert made.returncode == 0, made.stderr
    assert daemon.cli("key", "rm", "later").returncode == 0
    from skyguard.tlog.entries import decode
    from skyguard.tlog.store import LogReader

    entries = [decode(raw) for _, raw in LogReader(daemon.state_dir / "log").entries()]
    assert [(e["name"], e["key_type"], e["backend"]) for e in entries if e["type"] == "key_create"] == \
        [("release", "ec-p256", "pkcs11"), ("later", "ed25519", "pkcs11")]
    assert [e["name"] for e in entries if e["type"] == "key_remove"] == ["later"]
    assert daemon.cli("log", "verify").returncode == 0
    pin = PIN.decode()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    everything = json.dumps(entries) + daemon.log_tail(10**7) + ps
    assert pin not in everything


@pytest.mark.fuzz  # a second daemon start (~30 s of bcc compiling): the long tier
def test_a_restart_keeps_the_keys(crypto, tmp_path):
    before = crypto.daemon.cli("key", "public", "release", check=True).stdout
    crypto.daemon.stop()
    crypto.daemon.start()
    assert crypto.daemon.cli("key", "public", "release", check=True).stdout == before
    digest = hashlib.sha256(b"after restart").digest()
    status, reply = call(crypto, "radius1", "/v1/keys/release/sign", {"digest": digest.hex()})
    assert status == 200
    from skyguard.keys.types import verify_signature

    assert verify_signature(before.encode(), "ec-p256", digest, base64.b64decode(reply["signature"]))
