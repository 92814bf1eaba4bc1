"""Keys in a real SoftHSM token made by the test (its own folder and SOFTHSM2_CONF), used through
the PKCS#11 backend and through the crypto proxy served in-process on loopback (127.0.0.1 and
127.0.0.2 stand for two VMs on interface lo; the kernel's route says which interface each is on).
The lab test (tests/integration/test_crypto_proxy.py) does the same through the datapath.

SoftHSM reads its configuration once per process, so this is the one test module that loads it
in the test process (the others use child processes)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys

import pytest

from skyguard.custody.store import SecretStore
from skyguard.keys.softhsm import SoftHsmToken
from skyguard.keys.types import KeyCustodyError, verify_signature
from skyguard.parts import Degraded, LoopThread
from skyguard.policy.keys import KeyGrant, KeysConfig
from skyguard.policy.model import Policy, Workload, Zone
from support.client_waits import ANSWER_WAIT_S, curl_argv

PIN = secrets.token_hex(10).encode()


@pytest.fixture(scope="module")
def token(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("softhsm")
    made = SoftHsmToken.create(tmp / "hsm", "unit", PIN)
    SoftHsmToken.create(tmp / "hsm", "tls", PIN)  # TLS keys: a token without Ed25519 keys (libp11 0.4.12)
    saved = os.environ.get("SOFTHSM2_CONF")
    os.environ.update(made.env)
    try:
        yield made
    finally:
        if saved is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = saved


@pytest.fixture(scope="module")
def backend(token):
    from skyguard.keys.pkcs11 import Pkcs11Backend

    made = Pkcs11Backend(token.module, "unit", PIN)
    for name, kind in (("release", "ec-p256"), ("ed", "ed25519"), ("wrap", "rsa-3072")):
        made.create(name, kind)
    yield made
    made.close()


@pytest.mark.parametrize("name, key_type", [("release", "ec-p256"), ("ed", "ed25519"), ("wrap", "rsa-3072")])
def test_token_keys_sign_what_their_public_key_verifies_and_never_leave(backend, name, key_type):
    digest = hashlib.sha384(b"payload").digest()
    signature = backend.sign(name, digest)
    assert verify_signature(backend.public_pem(name), key_type, digest, signature)
    info = backend.info(name)
    assert (info.type, info.extractable) == (key_type, False)
    with pytest.raises(KeyCustodyError, match="refuses to export"):
        backend.export_private(name)


def test_token_decrypts_with_rsa_only_and_names_missing_keys(backend):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    wrapped = load_pem_public_key(backend.public_pem("wrap")).encrypt(
        b"unwrap me", padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
    assert backend.decrypt("wrap", wrapped) == b"unwrap me"
    with pytest.raises(KeyCustodyError, match="it signs, it does not decrypt"):
        backend.decrypt("release", wrapped)
    with pytest.raises(KeyCustodyError, match="no key named 'absent'"):
        backend.sign("absent", b"\0" * 32)
    with pytest.raises(KeyCustodyError, match="already holds a key named 'release'"):
        backend.create("release", "ec-p256")
    backend.create("gone", "ec-p256")
    backend.remove("gone")
    assert "gone" not in [k.name for k in backend.list()]


def test_a_wrong_pin_is_refused_without_echoing_it(token, backend):
    script = ("import sys\nfrom skyguard.keys.pkcs11 import Pkcs11Backend\n"
              "try:\n    Pkcs11Backend(sys.argv[1], 'unit', b'not-the-pin-4242')\n"
              "except Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", script, token.module], capture_output=True, text=True,
                         env=dict(os.environ, **token.env), timeout=60)
    assert "KeyCustodyError" in out.stdout and "refused the PIN" in out.stdout
    assert "not-the-pin-4242" not in out.stdout + out.stderr


# ---- the crypto proxy, in-process ------------------------------------------------------------

class Recorded:
    def __init__(self):
        self.entries = []

    def record(self, kind, /, **fields):
        self.entries.append(dict(fields, type=kind))


@pytest.fixture(scope="module")
def tls_backend(token):
    from skyguard.keys.pkcs11 import Pkcs11Backend

    made = Pkcs11Backend(token.module, "tls", PIN)
    yield made
    made.close()


def loopback_policy(token, keys=None, label="unit") -> Policy:
    vm1 = Workload("vm1", "auth", "lo", "02:00:00:00:00:01", (ipaddress.ip_address("127.0.0.1"),))
    vm2 = Workload("vm2", "sdn", "lo", "02:00:00:00:00:02", (ipaddress.ip_address("127.0.0.2"),))
    keys = keys or (KeyGrant("release", ("auth",), ("sign", "verify"), 1000, 1000),
                    KeyGrant("wrap", ("sdn",), ("decrypt",), 1000, 1000))
    config = KeysConfig(backend="pkcs11", module=token.module, token=label, pin_secret="hsm-pin", port=0, grants=keys)
    return Policy(name="t", zones={"auth": Zone("auth", (vm1,)), "sdn": Zone("sdn", (vm2,))}, networks={},
                  rules=(), keys=config)


@pytest.fixture(scope="module")
def proxy(token, backend, tmp_path_factory):
    from prometheus_client import CollectorRegistry

    from skyguard.keys.proxy import CryptoProxy

    state = tmp_path_factory.mktemp("state")
    SecretStore(state / "secrets").set("hsm-pin", PIN)
    loop = LoopThread()
    registry, recorded = CollectorRegistry(), Recorded()
    part = CryptoProxy(loopback_policy(token), state, recorded, registry=registry, hosts=("127.0.0.1",))
    loop.call(part.start())
    yield type("P", (), {"part": part, "loop": loop, "registry": registry, "recorded": recorded, "state": state})
    loop.call(part.stop())
    loop.stop()


def post(proxy, path, body, source="127.0.0.1"):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.part.port, timeout=10, source_address=(source, 0))
    try:
        conn.request("POST", path, body=json.dumps(body) if not isinstance(body, bytes) else body,
                     headers={"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_the_proxy_signs_for_the_keys_zone_and_counts_it(proxy):
    digest = hashlib.sha256(b"in-process").digest()
    status, reply = post(proxy, "/v1/keys/release/sign", {"digest": digest.hex()})
    assert status == 200
    assert verify_signature(proxy.part.backend.public_pem("release"), "ec-p256", digest,
                            base64.b64decode(reply["signature"]))
    status, reply = post(proxy, "/v1/keys/release/sign", {"digest": digest.hex()}, source="127.0.0.2")
    assert (status, reply["error"]) == (403, "zone 'sdn' may not use key 'release'")
    entries = [e for e in proxy.recorded.entries if e["digest"] == digest.hex()]
    assert [(e["workload"], e["zone"], e["interface"], e["operation"], e["outcome"]) for e in entries] == [
        ("vm1", "auth", "lo", "sign", "ok"), ("vm2", "sdn", "lo", "sign", "denied-zone")]
    value = proxy.registry.get_sample_value
    assert value("skyguard_crypto_operations_total", {"key": "release", "operation": "sign", "outcome": "ok"}) >= 1
    assert value("skyguard_crypto_operations_total",
                 {"key": "release", "operation": "sign", "outcome": "denied-zone"}) >= 1
    # A VM cannot grow the label set with names of its own.
    post(proxy, "/v1/keys/made-up-name/sign", {"digest": digest.hex()})
    from prometheus_client import generate_latest

    exposition = generate_latest(proxy.registry).decode()
    assert "made-up-name" not in exposition and PIN.decode() not in exposition


def test_hostile_bytes_never_stop_the_proxy(proxy):
    for junk in (b"GARBAGE\r\n\r\n", b"POST /v1/keys/release/sign HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n",
                 b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 20000 + b"\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                 b"POST /v1/keys/release/sign HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n"):
        with socket.create_connection(("127.0.0.1", proxy.part.port), timeout=10) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            answer = s.recv(4096)
        assert answer == b"" or answer.split(b" ", 2)[1] in (b"400", b"413", b"404"), answer[:80]
    assert post(proxy, "/v1/keys/release/sign", {"digest": "33" * 32})[0] == 200


def test_an_operation_the_key_cannot_do_is_refused_403_not_503(token, proxy):
    """503 is for a backend that fails; a key that cannot do what was asked (decrypt with an EC
    key the policy lets a VM try) is a refusal (403). (Input a key cannot use is 400: the file
    backend's case is in test_keys.py; SoftHSM answers a bad ciphertext with GeneralError.)"""
    both = loopback_policy(token, keys=(KeyGrant("release", ("auth",), ("sign", "decrypt"), 1000, 1000),))
    proxy.loop.call(proxy.part.set_policy(both))
    try:
        status, reply = post(proxy, "/v1/keys/release/decrypt", {"ciphertext": base64.b64encode(b"\1" * 64).decode()})
        assert (status, reply["error"]) == (403, "key 'release' is ec-p256: it signs, it does not decrypt")
    finally:
        proxy.loop.call(proxy.part.set_policy(loopback_policy(token)))  # back as it was
    outcomes = [(e["key"], e["outcome"], e["status"]) for e in proxy.recorded.entries
                if e["operation"] == "decrypt" and e["workload"] == "vm1"]
    assert ("release", "denied-operation", 403) in outcomes


def test_listing_keys_is_held_to_a_per_vm_rate_limit(proxy):
    """GET /v1/keys is rate-limited per VM like the key operations (a flood gets 429 and is
    summarised in the log), and one VM's flood leaves another VM's listing alone."""
    import time

    from skyguard.keys.api import LIST_BURST

    conn = http.client.HTTPConnection("127.0.0.1", proxy.part.port, timeout=10, source_address=("127.0.0.1", 0))
    statuses = []
    try:
        for _ in range(LIST_BURST * 3):
            conn.request("GET", "/v1/keys")
            response = conn.getresponse()
            body = json.loads(response.read())
            statuses.append(response.status)
    finally:
        conn.close()
    assert statuses[0] == 200 and 429 in statuses, statuses
    assert "rate limit" in body["error"] and set(statuses) == {200, 429}
    other = http.client.HTTPConnection("127.0.0.1", proxy.part.port, timeout=10, source_address=("127.0.0.2", 0))
    try:
        other.request("GET", "/v1/keys")
        assert other.getresponse().status == 200
    finally:
        other.close()
    deadline = time.monotonic() + 5
    while True:
        limited = [e for e in proxy.recorded.entries if e["operation"] == "list" and e["outcome"] == "rate-limited"]
        if sum(e["refused"] for e in limited) >= statuses.count(429) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sum(e["refused"] for e in limited) == statuses.count(429) and limited[0]["workload"] == "vm1"


def test_a_key_the_token_lacks_is_degraded_and_answered_503(token, backend, proxy):
    policy = loopback_policy(token, keys=(KeyGrant("release", ("auth",), ("sign",), 1000, 1000),
                                          KeyGrant("absent", ("auth",), ("sign",), 1000, 1000)))
    with pytest.raises(Degraded, match="no key absent"):
        proxy.loop.call(proxy.part.set_policy(policy))
    status, reply = post(proxy, "/v1/keys/absent/sign", {"digest": "44" * 32})
    assert (status, reply["error"]) == (503, "key 'absent' is not available")
    proxy.loop.call(proxy.part.set_policy(loopback_policy(token)))  # back as it was


def test_a_restarted_proxy_uses_the_same_keys(token, proxy):
    from skyguard.keys.proxy import CryptoProxy

    before = proxy.part.backend.public_pem("release")
    again = CryptoProxy(loopback_policy(token), proxy.state, Recorded(), hosts=("127.0.0.1",))
    try:
        assert again.backend.public_pem("release") == before
        digest = hashlib.sha256(b"after").digest()
        assert verify_signature(before, "ec-p256", digest, again.backend.sign("release", digest))
    finally:
        again.pool.shutdown()
        again.backend.close()


# ---- token keys in TLS: the credential proxy's client certificate, TLS termination -----------

def issue_for(backend, name: str, ca, common_name: str, server_names=()) -> bytes:
    """`skyguard key csr`'s request, checked and issued by a CA (a LabCA): the certificate PEM,
    for a server with `server_names`, else for a client."""
    from cryptography import x509

    from skyguard.keys.tlskey import certificate_request

    request = x509.load_pem_x509_csr(certificate_request(backend, name, common_name))
    assert request.is_signature_valid  # signed inside the token
    return ca.certify(request.public_key(), server_names, subject=request.subject, client=not server_names)


def test_the_credential_proxy_presents_a_token_held_client_certificate(token, tls_backend, tmp_path):
    import asyncio
    import dataclasses

    from skyguard.credproxy.ca import CertificateAuthority
    from skyguard.credproxy.interfaces import CredentialMetrics
    from skyguard.credproxy.proxy import CredentialProxy, ProxyLimits
    from skyguard.keys.tlskey import client_certificates_of
    from skyguard.lab.ca import LabCA
    from skyguard.lab.internet import EchoServer
    from skyguard.parts import MemoryLog
    from skyguard.policy.model import Credential, Injection

    backend = tls_backend
    backend.create("mtls", "ec-p256")
    upstream_ca = LabCA(tmp_path / "upstream-ca", "test upstream")
    store = SecretStore(tmp_path / "secrets")
    store.set("hsm-pin", PIN)
    store.set("github", b"ghp_tokenheldsecret")
    store.set("cert.mtls", issue_for(backend, "mtls", upstream_ca, "sdnctl1-in-token"))
    cert, key = upstream_ca.issue(["api.github.test"])
    (tmp_path / "up.pem").write_bytes(cert)
    (tmp_path / "up.key").write_bytes(key)
    (tmp_path / "upca.pem").write_bytes(upstream_ca.cert_path.read_bytes())
    placeholder = "sg-placeholder-github-token-key"
    credential = Credential("github", placeholder, "github", ("auth",), ("api.github.test",),
                            Injection("Authorization", "Bearer {secret}"), client_certificate="mtls")
    policy = dataclasses.replace(loopback_policy(token, label="tls"), credentials=(credential,))
    skyca = CertificateAuthority(tmp_path / "skyca")
    (tmp_path / "skyca.pem").write_bytes(skyca.certificate_pem)
    loop = LoopThread()

    async def start():
        echo = EchoServer(cert=tmp_path / "up.pem", key=tmp_path / "up.key", client_ca=tmp_path / "upca.pem",
                          log=tmp_path / "echo.jsonl").start()
        port = echo.port
        proxy = CredentialProxy(policy, store, address_matches=lambda n, ip: True, decision_log=MemoryLog(),
                                metrics=CredentialMetrics(), destination_of=lambda s: ("127.0.0.1", port),
                                upstream_ca_file=str(tmp_path / "upca.pem"), limits=ProxyLimits(), ca=skyca,
                                client_certificates=client_certificates_of(policy))
        _, https = await proxy.start("127.0.0.1")
        return echo, proxy, https

    echo, proxy, https = loop.call(start())
    try:
        out = subprocess.run(curl_argv("--cacert", str(tmp_path / "skyca.pem"), "--connect-to", f"::127.0.0.1:{https}",
                                       "-H", f"Authorization: Bearer {placeholder}", "https://api.github.test/user"),
                             capture_output=True, timeout=ANSWER_WAIT_S + 20)
        assert out.returncode == 0, out.stderr
        seen = json.loads((tmp_path / "echo.jsonl").read_text().splitlines()[-1])
        assert seen["client_certificate"] == "sdnctl1-in-token"  # the key stayed in the token
        assert ["authorization", "Bearer ghp_tokenheldsecret"] in seen["headers"]
    finally:
        async def stop():
            await proxy.stop()
            echo.close()
        loop.call(stop())
        loop.stop()
        asyncio.set_event_loop(None)


def test_tls_termination_serves_with_a_token_held_key(token, tls_backend, tmp_path):
    import dataclasses

    from skyguard.credproxy.interfaces import CredentialMetrics
    from skyguard.credproxy.termination import TlsTerminator
    from skyguard.lab.ca import LabCA
    from skyguard.lab.internet import EchoServer
    from skyguard.parts import MemoryLog
    from skyguard.policy.model import TlsTermination

    backend = tls_backend
    backend.create("web1", "rsa-3072")
    ca = LabCA(tmp_path / "ca", "test")
    store = SecretStore(tmp_path / "secrets")
    store.set("hsm-pin", PIN)
    store.set("cert.web1", issue_for(backend, "web1", ca, "web1", server_names=["127.0.0.1"]))
    loop = LoopThread()
    echo = EchoServer().start()  # the VM's plain HTTP service
    vm_port = echo.port
    policy = dataclasses.replace(loopback_policy(token, label="tls"),
                                 tls_termination=(TlsTermination("vm1", 443, vm_port, "web1"),))
    terminator = TlsTerminator(policy, store, decision_log=MemoryLog(), metrics=CredentialMetrics())
    try:
        listeners = loop.call(terminator.start("127.0.0.1"))
        out = subprocess.run(curl_argv("--cacert", str(ca.cert_path), f"https://127.0.0.1:{listeners[0].listen_port}/hello"),
                             capture_output=True, timeout=ANSWER_WAIT_S + 20)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["path"] == "/hello"
    finally:
        loop.call(terminator.stop())
        echo.close()
        loop.stop()


def test_no_signature_leaves_without_its_durable_log_entry(token, backend, proxy):
    """The key_use entry of an operation that ran is written (durably, in the daemon) before the
    answer; a log that refuses it withholds the signature."""
    from skyguard.errors import LogError
    from skyguard.keys.proxy import CryptoProxy

    written = Recorded()
    part = CryptoProxy(loopback_policy(token), proxy.state, Recorded(), hosts=("127.0.0.1",), durable=written.record)
    loop = LoopThread()
    try:
        loop.call(part.start())
        digest = hashlib.sha256(b"durable").hexdigest()
        status, reply = post(type("P", (), {"part": part}), "/v1/keys/release/sign", {"digest": digest})
        assert status == 200 and [e["digest"] for e in written.entries] == [digest]

        def refuse(kind, /, **fields):
            raise LogError("the log's disk is full")

        part.durable = refuse
        status, reply = post(type("P", (), {"part": part}), "/v1/keys/release/sign", {"digest": digest})
        assert (status, reply) == (503, {"error": "the operation could not be logged, so its result is withheld"})
    finally:
        loop.call(part.stop())
        loop.stop()


def test_doctor_checks_the_token_the_policy_keeps_keys_in(token, backend, tmp_path, monkeypatch):
    """skyguard doctor: with no policy using a token, PKCS#11 is an optional capability (passes,
    says what is there); with one, the token must open with the PIN in the sealed store, its module
    must exist, and OpenSSL's pkcs11 engine is needed once a credential presents a token key."""
    import dataclasses

    from skyguard.keys import tlskey
    from skyguard.keys.doctor import check_pkcs11
    from skyguard.policy.model import Credential

    optional = check_pkcs11(None, tmp_path)
    assert optional.ok and optional.detail.startswith("optional") and "softhsm2-util" in optional.detail
    policy, state = loopback_policy(token), tmp_path / "state"
    no_pin = check_pkcs11(policy, state)
    assert not no_pin.ok and "token 'unit' does not open" in no_pin.detail
    assert "skyguard secret set hsm-pin" in no_pin.fix
    SecretStore(state / "secrets").set("hsm-pin", PIN)
    opened = check_pkcs11(policy, state)
    count = len(backend.list())
    assert opened.ok and f"token 'unit' opens with the PIN in secret 'hsm-pin' ({count} keys)" in opened.detail
    assert PIN.decode() not in opened.detail + no_pin.detail + no_pin.fix
    moved = dataclasses.replace(policy, keys=dataclasses.replace(policy.keys, module="/nonexistent/libsofthsm2.so"))
    gone = check_pkcs11(moved, state)
    assert not gone.ok and "/nonexistent/libsofthsm2.so" in gone.detail and "apt-get install softhsm2" in gone.fix

    monkeypatch.setattr(tlskey, "ENGINE_PATHS", ("/nonexistent/engines-3/pkcs11.so",))  # as if not installed
    noted = check_pkcs11(policy, state)
    assert noted.ok and "token keys serve no TLS" in noted.detail
    mtls = dataclasses.replace(policy, credentials=(
        Credential("github", "sg-placeholder", "github", ("auth",), ("api.github.test",), client_certificate="release"),))
    needed = check_pkcs11(mtls, state)
    assert not needed.ok and "pkcs11 engine" in needed.detail and "libengine-pkcs11-openssl" in needed.fix
    assert "libengine-pkcs11-openssl" in check_pkcs11(None, tmp_path).detail  # optional: says what it would need


def test_a_policy_without_keys_is_taken_before_the_part_stops(token, proxy):
    """The daemon tells a part the new policy before it stops one that policy no longer needs;
    a policy with no keys: section made the crypto proxy fail (AttributeError) and `policy load`
    report it failed. It now offers no key until it stops."""
    import dataclasses

    without = dataclasses.replace(loopback_policy(token), keys=None)
    proxy.loop.call(proxy.part.set_policy(without))
    status, _ = post(proxy, "/v1/keys/release/sign", {"digest": "55" * 32})
    assert status in (403, 404)
    proxy.loop.call(proxy.part.set_policy(loopback_policy(token)))  # back as it was
    assert post(proxy, "/v1/keys/release/sign", {"digest": "55" * 32})[0] == 200


def test_a_kept_alive_connection_is_judged_by_the_vms_zone_in_the_current_policy(token, proxy):
    """Who asks is decided per request, against the policy in force: a VM moved to another zone
    (or out of the policy) by a hot swap must not keep using its old zone's keys over the
    keep-alive connection it opened before the swap."""
    moved = Workload("vm1", "sdn", "lo", "02:00:00:00:00:01", (ipaddress.ip_address("127.0.0.1"),))
    base = loopback_policy(token)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.part.port, timeout=10)

    def sign():
        conn.request("POST", "/v1/keys/release/sign", body=json.dumps({"digest": "66" * 32}),
                     headers={"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    try:
        assert sign()[0] == 200
        swapped = Policy(name="t", zones={"auth": Zone("auth", ()), "sdn": Zone("sdn", (moved,))}, networks={},
                         rules=(), keys=base.keys)
        proxy.loop.call(proxy.part.set_policy(swapped))
        status, reply = sign()  # the same connection
        assert (status, reply.get("error")) == (403, "zone 'sdn' may not use key 'release'")
        gone = Policy(name="t", zones={"auth": Zone("auth", ()), "sdn": Zone("sdn", ())}, networks={},
                      rules=(), keys=base.keys)
        proxy.loop.call(proxy.part.set_policy(gone))
        assert sign()[0] == 403
    finally:
        conn.close()
        proxy.loop.call(proxy.part.set_policy(base))  # back as it was
    assert post(proxy, "/v1/keys/release/sign", {"digest": "66" * 32})[0] == 200


def test_every_refusal_of_a_flood_over_the_rate_limit_reaches_the_log(token, proxy):
    """A flood over a key's rate limit is summarised in one entry a second: the refusals made after
    that second's entry are counted in the next one, even when the flood stops (none is lost)."""
    import time

    slow = loopback_policy(token, keys=(KeyGrant("release", ("auth",), ("sign",), 1 / 60, 1),))
    proxy.loop.call(proxy.part.set_policy(slow))
    digest = secrets.token_hex(32)
    try:
        statuses = [post(proxy, "/v1/keys/release/sign", {"digest": digest})[0] for _ in range(6)]
        assert statuses == [200] + [429] * 5
        deadline = time.monotonic() + 5
        while True:
            limited = [e for e in proxy.recorded.entries if e["digest"] == digest and e["outcome"] == "rate-limited"]
            if sum(e["refused"] for e in limited) >= 5 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert sum(e["refused"] for e in limited) == 5 and len(limited) <= 2
    finally:
        proxy.loop.call(proxy.part.set_policy(loopback_policy(token)))  # back as it was


def test_a_flood_of_public_key_requests_is_refused_over_the_keys_rate_limit(token, proxy):
    """`public` reads the backend like sign does: a VM flooding it is held to the key's rate limit
    (the same per-VM bucket), counted and summarised in the log as the other operations' refusals."""
    import time

    # Key `ed`, which no other test grants: its bucket for vm1 is this test's alone.
    slow = loopback_policy(token, keys=(KeyGrant("ed", ("auth",), ("sign",), 1 / 60, 3),))
    proxy.loop.call(proxy.part.set_policy(slow))
    before = len(proxy.recorded.entries)

    def public():
        conn = http.client.HTTPConnection("127.0.0.1", proxy.part.port, timeout=10)
        try:
            conn.request("GET", "/v1/keys/ed/public")
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    try:
        replies = [public() for _ in range(8)]
        assert [status for status, _ in replies] == [200] * 3 + [429] * 5, replies
        assert "BEGIN PUBLIC KEY" in replies[0][1]["public_key"] and "rate limit" in replies[-1][1]["error"]
        assert post(proxy, "/v1/keys/ed/sign", {"digest": "77" * 32})[0] == 429  # one bucket per VM and key
        deadline = time.monotonic() + 5
        while True:
            limited = [e for e in proxy.recorded.entries[before:] if e["outcome"] == "rate-limited"]
            if sum(e["refused"] for e in limited) >= 6 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert sum(e["refused"] for e in limited) == 6 and len(limited) <= 2
        assert limited[0]["operation"] == "public" and limited[0]["workload"] == "vm1"
        value = proxy.registry.get_sample_value
        assert value("skyguard_crypto_operations_total",
                     {"key": "ed", "operation": "public", "outcome": "rate-limited"}) == 5
    finally:
        proxy.loop.call(proxy.part.set_policy(loopback_policy(token)))  # back as it was


def test_a_flood_of_refused_requests_is_summarised_in_the_log(proxy):
    """Refusals the rate limit never sees (a zone the key does not allow, key names the policy
    does not offer, malformed bodies) are summarised like rate-limited ones: about one entry a
    second per VM, key and outcome, whose `refused` counts every refusal (none is lost)."""
    import time

    before = len(proxy.recorded.entries)
    flood = [post(proxy, "/v1/keys/release/sign", {"digest": secrets.token_hex(32)}, source="127.0.0.2")[0]
             for _ in range(15)]
    flood += [post(proxy, f"/v1/keys/made-up-{n}/sign", {"digest": "88" * 32}, source="127.0.0.2")[0]
              for n in range(15)]
    flood += [post(proxy, "/v1/keys/wrap/decrypt", b"{", source="127.0.0.2")[0] for _ in range(15)]
    assert flood == [403] * 15 + [404] * 15 + [400] * 15
    outcomes = ("denied-zone", "unknown-key", "bad-request")
    deadline = time.monotonic() + 5
    while True:
        mine = [e for e in proxy.recorded.entries[before:] if e["workload"] == "vm2"]
        counted = {o: sum(e.get("refused", 0) for e in mine if e["outcome"] == o) for o in outcomes}
        if min(counted.values()) >= 15 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert counted == dict.fromkeys(outcomes, 15)
    assert all(len([e for e in mine if e["outcome"] == o]) <= 2 for o in outcomes), mine
    first = next(e for e in mine if e["outcome"] == "denied-zone")
    assert (first["key"], first["zone"], first["operation"], first["status"]) == ("release", "sdn", "sign", 403)
