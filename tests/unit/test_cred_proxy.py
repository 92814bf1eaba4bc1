"""The credential proxy over real loopback sockets (no privileges): curl and raw sockets as the
VM, the echo fixture as the upstream with its own CA. The original destination is given by a
function here; the namespace test (tests/integration/test_cred_lab.py) covers the real
nftables redirect and SO_ORIGINAL_DST."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import re
import socket
import ssl
import subprocess
import threading

import pytest

from skyguard.credproxy.ca import CertificateAuthority
from skyguard.credproxy.interfaces import CredentialMetrics, MemorySecretSource
from skyguard.credproxy.proxy import ClientCertificate, CredentialProxy, ProxyLimits, original_destination
from skyguard.credproxy.secretforms import SecretForms
from skyguard.lab.ca import LabCA
from skyguard.lab.internet import EchoServer
from skyguard.parts import MemoryLog
from skyguard.policy.model import Credential, Injection, Policy, Workload, Zone
from support.client_waits import ANSWER_WAIT_S, curl_argv

SECRET = b"ghp_L00pbackSecret/42+=="
PH = "sg-placeholder-github-7f3a"
AUTH = f"Authorization: Bearer {PH}"


class Rig:
    """An event loop in a thread running: TLS echo (with client-cert CA), and two proxies."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.upstream_ca = LabCA(tmp / "upstream-ca", "test upstream")
        cert, key = self.upstream_ca.issue(["api.github.test", "other.test", "127.0.0.1"])
        (tmp / "up.pem").write_bytes(cert)
        (tmp / "up.key").write_bytes(key)
        (tmp / "upca.pem").write_bytes(self.upstream_ca.cert_path.read_bytes())
        client_cert, client_key = self.upstream_ca.issue(["sdnctl1-client"], client=True)
        self.echo_log = tmp / "echo.jsonl"
        self.ca = CertificateAuthority(tmp / "skyca")
        (tmp / "skyca.pem").write_bytes(self.ca.certificate_pem)
        workload = Workload("sdnctl1", "sdn", "sg-x", "02:00:00:00:03:02", (ipaddress.ip_address("127.0.0.1"),))
        agent = Workload("agent1", "sandbox", "sg-y", "02:00:00:00:05:02", (ipaddress.ip_address("127.0.0.2"),))
        credential = Credential("github", PH, "github", ("sdn",), ("api.github.test",),
                                Injection("Authorization", "Bearer {secret}"), ("X-Auth-Token",))
        self.policy = Policy("t", {"sdn": Zone("sdn", (workload,)), "sandbox": Zone("sandbox", (agent,))}, {}, (),
                             credentials=(credential,))
        self.secrets = MemorySecretSource({"github": SECRET, "mtls": client_cert + client_key})
        self.log = MemoryLog()
        self.metrics = CredentialMetrics()
        self.limits = ProxyLimits(header_timeout=1.0, idle_timeout=5.0, body_read_timeout=1.0,
                                  max_header_bytes=8192, max_request_body=65536)
        self.run(self._start())

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def make_proxy(self, destination_of, **kw):
        kw.setdefault("upstream_ca_file", str(self.tmp / "upca.pem"))
        kw.setdefault("limits", self.limits)
        kw.setdefault("ca", self.ca)
        return CredentialProxy(self.policy, self.secrets, address_matches=lambda n, ip: ip == "127.0.0.1",
                               decision_log=self.log, metrics=self.metrics, destination_of=destination_of, **kw)

    async def _start(self):
        self.echo = EchoServer(cert=self.tmp / "up.pem", key=self.tmp / "up.key", client_ca=self.tmp / "upca.pem",
                               log=self.echo_log).start()
        self.echo_port = self.echo.port
        self.proxy = self.make_proxy(lambda s: ("127.0.0.1", self.echo_port),
                                     client_certificates={"api.github.test": ClientCertificate("mtls", ("sdn",))})
        self.http_port, self.https_port = await self.proxy.start("127.0.0.1")
        # The same proxy with the real SO_ORIGINAL_DST lookup: nothing is redirected on loopback.
        self.real = self.make_proxy(original_destination)
        self.real_http, self.real_https = await self.real.start("127.0.0.1")

    async def _stop(self):
        await self.proxy.stop()
        await self.real.stop()
        self.echo.close()

    def close(self):
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def curl(self, url, *args, port=None):
        result = subprocess.run(
            curl_argv("--cacert", str(self.tmp / "skyca.pem"), "--connect-to", f"::127.0.0.1:{port or self.https_port}",
                      "-w", "\n%{http_code}", *args, url),
            capture_output=True, timeout=ANSWER_WAIT_S + 20)
        body, _, code = result.stdout.rpartition(b"\n")
        return int(code or 0), body

    def echoed(self):
        return [json.loads(line) for line in self.echo_log.read_text().splitlines()] if self.echo_log.exists() else []

    def raw(self, data: bytes, tls=True, sni="api.github.test", wait_close=True) -> bytes:
        sock = socket.create_connection(("127.0.0.1", self.https_port if tls else self.http_port), timeout=10)
        if tls:
            context = ssl.create_default_context(cafile=str(self.tmp / "skyca.pem"))
            sock = context.wrap_socket(sock, server_hostname=sni)
        with sock:
            sock.sendall(data)
            out = b""
            while True:
                try:
                    chunk = sock.recv(65536)
                except (ConnectionResetError, ssl.SSLError):
                    break
                if not chunk:
                    break
                out += chunk
        return out


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(tmp_path_factory.mktemp("crx-proxy"))
    yield r
    r.close()


def no_secret(blob: bytes) -> bool:
    return not SecretForms([SECRET]).found_in(blob)


def test_swap_reaches_upstream_and_secret_never_comes_back(rig):
    before = len(rig.echoed())
    code, body = rig.curl("https://api.github.test/user", "-H", AUTH)
    assert code == 200
    seen = rig.echoed()[before]
    assert ["authorization", "Bearer " + SECRET.decode()] in seen["headers"]
    assert seen["sni"] == "api.github.test"
    assert seen["client_certificate"] == "sdnctl1-client"  # outbound mTLS, key from the store
    assert no_secret(body) and b"[skyguard-redacted]" in body


def test_gzip_echo_is_decoded_and_scrubbed(rig):
    code, body = rig.curl("https://api.github.test/", "-H", AUTH, "-H", "X-Echo-Encoding: gzip")
    assert code == 200 and no_secret(body) and b"redacted" in body


def test_undecodable_response_encoding_fails_closed(rig):
    code, body = rig.curl("https://api.github.test/", "-H", AUTH, "-H", "X-Echo-Encoding: br")
    assert code == 502 and no_secret(body)


def test_placeholder_to_other_host_blocked_and_logged(rig):
    before = len(rig.echoed())
    code, body = rig.curl("https://other.test/", "-H", AUTH)
    assert code == 403 and len(rig.echoed()) == before
    entry = rig.log.snapshot()[-1]
    assert (entry["credential"], entry["destination"], entry["result"], entry["zone"], entry["workload"]) == (
        "github", "other.test", "blocked_exfiltration", "sdn", "sdnctl1")


def test_sni_host_mismatch_blocked(rig):
    code, _ = rig.curl("https://api.github.test/", "-H", AUTH, "-H", "Host: other.test")
    assert code == 421


def test_keep_alive_and_chunked_bodies(rig):
    before = len(rig.echoed())
    common = ["--cacert", str(rig.tmp / "skyca.pem"), "--connect-to", f"::127.0.0.1:{rig.https_port}", "-H", AUTH]
    result = subprocess.run(
        curl_argv(*common, "-H", "Transfer-Encoding: chunked", "--data-binary", "hello=1",
                  "-o", "/dev/null", "https://api.github.test/a",
                  "--next", *common, "-o", "/dev/null", "-w", "%{http_code} %{num_connects}", "https://api.github.test/b"),
        capture_output=True, timeout=ANSWER_WAIT_S + 20)
    assert result.stdout == b"200 0"  # second request answered on the same (kept-alive) connection
    seen = rig.echoed()[before:]
    assert [s["path"] for s in seen] == ["/a", "/b"] and seen[0]["body"] == "hello=1"


def test_plain_http_passes_but_never_carries_the_secret(rig):
    code, _ = rig.curl("http://api.github.test/", port=rig.http_port)
    assert code in (200, 502)  # the echo speaks TLS only: what matters is the next line
    code, _ = rig.curl("http://api.github.test/", "-H", AUTH, port=rig.http_port)
    assert code == 403


def test_secret_in_request_blocked(rig):
    code, _ = rig.curl("https://api.github.test/", "-H",
                       "Authorization: Basic " + base64.b64encode(b"me:" + SECRET).decode())
    assert code == 403
    assert rig.log.snapshot()[-1]["result"] == "blocked_content"


@pytest.mark.parametrize("raw, status", [
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"POST / HTTP/1.1\r\nHost: api.github.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: api.github.test\r\nX-A: a\r\n b\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: api.github.test\r\nX-A: a\rb\r\n\r\n", b"400"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"505"),
    (b"GET / HTTP/1.1\r\nHost: api.github.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: api.github.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", b"501"),
    (b"GET / HTTP/1.1\r\nHost: api.github.test\r\nX: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
    (b"POST / HTTP/1.1\r\nHost: api.github.test\r\nContent-Length: 100000\r\n\r\n" + b"a" * 100000, b"413"),
    (b"GET / HTTP/1.1\r\nHost: api.github.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", b"501"),
    (b"GET / HTTP/1.1\r\nHost: api.github.test\r\nHost: other.test\r\n\r\n", b"400"),
], ids=["garbage", "cl+te", "obs-fold", "bare-cr", "h2-preface", "two-cl", "te-gzip", "huge-header", "huge-body",
        "websocket", "two-hosts"])
def test_malformed_and_smuggling_requests_get_an_error_and_close(rig, raw, status):
    out = rig.raw(raw)
    assert out.split(b" ")[1] == status, out[:200]
    # One response, nothing after it: the connection was closed.
    assert len(re.findall(rb"(?:^|\n)HTTP/1\.1 \d{3} ", out)) == 1
    code, _ = rig.curl("https://api.github.test/", "-H", AUTH)  # and the proxy still serves
    assert code == 200


@pytest.mark.parametrize("target, host", [
    (b"https://api.github.test:443@evil.test/x", b"api.github.test"),  # userinfo: the upstream reads evil.test
    (b"http://api.github.test:@evil.test/x", b"api.github.test"),
    (b"ftp://evil.test/x", b"api.github.test"),  # a scheme the proxy did not compare with Host
    (b"httpx://evil.test/x", b"api.github.test"),
    (b"/x", b"api.github.test:443@evil.test"),
    (b"/x", b"[api.github.test]evil.test"),
], ids=["userinfo-port", "userinfo-empty-port", "ftp-scheme", "other-scheme", "host-userinfo", "host-after-bracket"])
def test_a_request_naming_another_authority_than_the_one_checked_is_refused(rig, target, host):
    # A server taking the authority of an absolute-form target over Host (RFC 9112 3.2.2; Go's
    # net/http, nginx) would route the swapped credential to evil.test's virtual host.
    before = len(rig.echoed())
    out = rig.raw(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + AUTH.encode() +
                  b"\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 "), out[:200]
    assert len(rig.echoed()) == before


def test_slowloris_head_is_cut_off(rig):
    # A head that never completes: the proxy answers 408 and closes within its header timeout.
    out = rig.raw(b"GET / HTTP/1.1\r\nHost: api.github.test\r\nX-Slow: ")
    assert out.startswith(b"HTTP/1.1 408")


def test_tls_without_sni_is_refused(rig):
    sock = socket.create_connection(("127.0.0.1", rig.https_port), timeout=10)
    context = ssl.create_default_context(cafile=str(rig.tmp / "skyca.pem"))
    context.check_hostname = False
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with context.wrap_socket(sock, server_hostname=None) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: api.github.test\r\n\r\n")
            assert tls.recv(100) == b""
            raise ConnectionError("closed without answer")
    assert rig.log.snapshot()[-1]["reason"] == "TLS ClientHello without a usable SNI"


def test_untrusted_upstream_is_a_502(rig):
    proxy = rig.make_proxy(lambda s: ("127.0.0.1", rig.echo_port), upstream_ca_file=None)  # the system store only
    ports = rig.run(proxy.start("127.0.0.1"))
    try:
        code, body = rig.curl("https://api.github.test/", "-H", AUTH, port=ports[1])
        assert code == 502 and no_secret(body)
    finally:
        rig.run(proxy.stop())


def test_direct_connection_without_redirect_is_closed(rig):
    code, _ = rig.curl("https://api.github.test/", "-H", AUTH, port=rig.real_https)
    assert code == 0  # closed before any HTTP answer: there is no destination to forward to


def test_metrics_count_by_credential_and_result(rig):
    def value(result):
        return rig.metrics.registry.get_sample_value(
            "skyguard_credential_swaps_total", {"credential": "github", "result": result}) or 0

    swapped, blocked = value("swapped"), value("blocked_exfiltration")
    assert rig.curl("https://api.github.test/", "-H", AUTH)[0] == 200
    assert rig.curl("https://other.test/", "-H", AUTH)[0] == 403
    assert (value("swapped"), value("blocked_exfiltration")) == (swapped + 1, blocked + 1)
    assert all(no_secret(json.dumps(e).encode()) for e in rig.log.snapshot())


def test_upstream_connections_are_pooled_across_client_connections(rig):
    before = len(rig.echoed())
    assert rig.curl("https://api.github.test/one", "-H", AUTH)[0] == 200
    assert rig.curl("https://api.github.test/two", "-H", AUTH)[0] == 200
    one, two = rig.echoed()[before:]
    assert one["connection"] == two["connection"]  # two VM connections, one upstream handshake


def test_an_upstream_that_drops_an_idle_pooled_connection_costs_nothing(rig):
    assert rig.curl("https://api.github.test/", "-H", AUTH, "-H", "X-Echo-Drop-Idle: 1")[0] == 200
    import time
    time.sleep(0.2)  # let the upstream drop it while it sits in the pool
    code, body = rig.curl("https://api.github.test/after", "-H", AUTH)
    assert code == 200 and b'"/after"' in body


def test_client_certificate_only_for_its_zones(rig):
    before = len(rig.echoed())
    code, _ = rig.curl("https://api.github.test/", "--interface", "127.0.0.2")  # agent1, zone sandbox
    assert code == 200
    assert rig.echoed()[before]["client_certificate"] is None
    code, _ = rig.curl("https://api.github.test/", "-H", AUTH, "--interface", "127.0.0.2")
    assert code == 403  # and its zone may not use the credential either


def test_mutated_requests_never_crash_a_connection_handler(rig, caplog):
    import random

    generator = random.Random(6)  # fixed seed: the same 120 mutants every run
    valid = (b"POST /x HTTP/1.1\r\nHost: api.github.test\r\n" + AUTH.encode() +
             b"\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    alphabet = b"\r\n :\t\x00\x7f\xff0123456789abcdefABCDEF-%;,\"\\"
    for _ in range(120):
        mutant = bytearray(valid)
        for _ in range(generator.randint(1, 8)):
            position = generator.randrange(len(mutant))
            action = generator.randrange(3)
            if action == 0:
                mutant[position] = generator.choice(alphabet)
            elif action == 1:
                mutant.insert(position, generator.choice(alphabet))
            else:
                del mutant[position]
        out = rig.raw(bytes(mutant), tls=generator.random() < 0.5)
        assert out == b"" or out.startswith(b"HTTP/1.1 "), out[:80]
        assert no_secret(out)
    assert not [r for r in caplog.records if "connection failed" in r.getMessage()]
    assert rig.curl("https://api.github.test/", "-H", AUTH)[0] == 200


FORWARDING = ["X-Forwarded-Host: tenant-b.github.test", "X-Forwarded-Proto: http",
              "Forwarded: for=10.0.0.1;host=tenant-b.github.test;proto=https",
              "X-Forwarded-For: 10.0.0.1", "X-Forwarded-Port: 8443", "X-Forwarded-Prefix: /tenant-b",
              "X-Forwarded-Server: tenant-b.github.test", "X-Real-IP: 10.0.0.1",
              "X_Forwarded_Host: tenant-b.github.test", "x-forwarded_proto: http",
              "X-Original-Host: tenant-b.github.test", "X-Original-URL: /tenant-b/admin"]


@pytest.mark.parametrize("swapped", [True, False], ids=["swap", "pass"])
def test_forwarding_headers_from_the_vm_never_reach_the_upstream(rig, swapped):
    # On main these reached the upstream beside the real secret: an upstream behind a proxy that
    # trusts them picks the host, tenant, scheme or path from them, not from the Host the policy
    # checked. The VM is the first hop: nothing it claims about forwarding is forwarded.
    before = len(rig.echoed())
    args = [arg for header in FORWARDING for arg in ("-H", header)]
    code, _ = rig.curl("https://api.github.test/user", *(("-H", AUTH) if swapped else ()),
                       "-H", "X-Request-Id: r-1", *args)
    assert code == 200
    seen = rig.echoed()[before]
    assert ["x-request-id", "r-1"] in seen["headers"]
    assert (["authorization", "Bearer " + SECRET.decode()] in seen["headers"]) == swapped
    leaked = [header for header in seen["headers"] if "tenant-b" in header[1] or "10.0.0.1" in header[1]
              or header[0].lower().replace("_", "-").startswith(("forwarded", "x-forwarded", "x-real-ip",
                                                                 "x-original"))
              or header[1] in ("http", "8443")]
    assert leaked == [], leaked


def test_a_large_response_being_scrubbed_holds_up_no_other_vm(rig, monkeypatch, tmp_path):
    """Decoding and scrubbing a response of up to 16 MiB is CPU work of up to a second, and every
    VM's proxied requests share the loop. Here the decoding of a large answer (the echo of a
    65000-byte upload, past bodywork.INLINE_BYTES) is held until another VM (agent1) has had its
    answer: that answer must come first, and the large one is scrubbed as usual once let go."""
    from concurrent.futures import ThreadPoolExecutor

    import skyguard.credproxy.proxy as credproxy

    decoding, release = threading.Event(), threading.Event()
    real = credproxy.decode_body

    def held(headers, body, limit):
        if len(body) > 65000:  # the large answer only
            decoding.set()
            release.wait(60)
        return real(headers, body, limit)

    monkeypatch.setattr(credproxy, "decode_body", held)
    upload = tmp_path / "upload"
    upload.write_bytes(b"a" * 65000)
    with ThreadPoolExecutor(1) as pool:
        large = pool.submit(rig.curl, "https://api.github.test/large", "-H", AUTH, "--data-binary", f"@{upload}")
        try:
            assert decoding.wait(30), "the large answer never reached the scrubber"
            code, body = rig.curl("https://api.github.test/other-vm", "--interface", "127.0.0.2")
            assert code == 200 and b'"/other-vm"' in body and not large.done()
        finally:
            release.set()
        code, body = large.result()
    assert code == 200 and len(body) > 65000 and no_secret(body) and b"[skyguard-redacted]" in body


def test_a_large_upload_being_searched_holds_up_no_other_vm(rig, monkeypatch, tmp_path):
    """Every byte of a request is searched for secrets and placeholders before it leaves: for the
    bodies of tens of MiB a zone under upload content rules may send, a second or more. Here
    that search of a 200 KB upload is held until another VM (agent1) has had its answer: that
    answer must come first, and the upload goes on, swapped, once let go."""
    from concurrent.futures import ThreadPoolExecutor

    from skyguard.credproxy.swap import SwapEngine

    searching, release = threading.Event(), threading.Event()
    real = SwapEngine.decide

    def held(engine, request, facts):
        if len(request.body) > 100_000:  # the large upload only
            searching.set()
            release.wait(60)
        return real(engine, request, facts)

    monkeypatch.setattr(SwapEngine, "decide", held)
    proxy = rig.make_proxy(lambda s: ("127.0.0.1", rig.echo_port), limits=ProxyLimits(max_request_body=1 << 20))
    _, port = rig.run(proxy.start("127.0.0.1"))
    upload = tmp_path / "upload"
    upload.write_bytes(b"a" * 200_000)
    try:
        with ThreadPoolExecutor(1) as pool:
            large = pool.submit(rig.curl, "https://api.github.test/upload", "-H", AUTH, "--data-binary", f"@{upload}",
                                port=port)
            try:
                assert searching.wait(30), "the upload never reached the search"
                code, body = rig.curl("https://api.github.test/meanwhile", "--interface", "127.0.0.2", port=port)
                assert code == 200 and b'"/meanwhile"' in body and not large.done()
            finally:
                release.set()
            code, _ = large.result()
    finally:
        rig.run(proxy.stop())
    assert code == 200
    [seen] = [e for e in rig.echoed() if e["path"] == "/upload"]
    assert ["authorization", "Bearer " + SECRET.decode()] in seen["headers"] and len(seen["body"]) == 200_000
