"""Content rules in the credential proxy over real loopback sockets: curl (and a raw TLS socket
for chunking curl will not do) as the VM, a real clamd started here, the TLS echo server as the
upstream, which records every request it receives. A blocked upload is a 403 with a JSON
reason, a `content_blocked` log entry and a counter, and the upstream receives nothing of it.
The namespace test (tests/integration/test_content_lab.py) covers steering and a lab VM."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import ipaddress
import json
import socket
import ssl
import subprocess
import threading

import pytest

from skyguard.credproxy.ca import CertificateAuthority
from skyguard.credproxy.interfaces import CredentialMetrics, MemorySecretSource
from skyguard.credproxy.proxy import CredentialProxy, ProxyLimits
from skyguard.lab.ca import LabCA
from skyguard.lab.internet import EchoServer, request_body
from skyguard.parts import MemoryLog
from skyguard.policy.content import ContentBlock, ContentPolicy, ContentRule
from skyguard.policy.model import Policy, Workload, Zone
from support.content_support import EICAR, LocalClamd, gzip_bomb, harmless_bytes, zip_bomb, zipped

ELF = b"\x7fELF\x02\x01\x01\x00" + b"\0" * 8 + b"\x02\x00\x3e\x00\x01\x00\x00\x00" + b"\0" * 200
DOWNLOAD_MARKER = "SKYGUARD-DOWNLOAD-MARKER-7731"


def content_policy(socket_path: str) -> ContentPolicy:
    rules = (
        ContentRule("malware", ("web",), ("upload",), ("http", "sftp"), ContentBlock(clamav=True)),
        ContentRule("no-binaries", ("web",), ("upload",), ("http",),
                    ContentBlock(mime_types=("application/x-executable", "application/x-sharedlib",
                                             "application/x-pie-executable"), max_size=200_000)),
        ContentRule("inbound", ("web",), ("download",), ("http",), ContentBlock(patterns=(DOWNLOAD_MARKER,))),
        ContentRule("no-keys", ("web",), ("upload",), ("http",), ContentBlock(patterns=(r"AKIA[0-9A-Z]{16}",))),
        ContentRule("no-webshells", ("web",), ("upload",), ("http",),
                    ContentBlock(patterns=(r"eval\(base64_decode\(\$_POST\[[^]]*\]\)\);",))),
    )
    return ContentPolicy(rules, clamd_socket=socket_path, scan_timeout=5, max_inspect_bytes=4 << 20)


class Rig:
    """An event loop in a thread: the TLS echo upstream and one proxy, with a clamd."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.clamd = LocalClamd(tmp / "clamd").start()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        upstream_ca = LabCA(tmp / "upstream-ca", "test upstream")
        cert, key = upstream_ca.issue(["upload.test", "127.0.0.1"])
        (tmp / "up.pem").write_bytes(cert)
        (tmp / "up.key").write_bytes(key)
        (tmp / "upca.pem").write_bytes(upstream_ca.cert_path.read_bytes())
        self.echo_log = tmp / "echo.jsonl"
        self.ca = CertificateAuthority(tmp / "skyca")
        (tmp / "skyca.pem").write_bytes(self.ca.certificate_pem)
        web = Workload("web1", "web", "sg-x", "02:00:00:00:03:02", (ipaddress.ip_address("127.0.0.1"),))
        other = Workload("other1", "other", "sg-y", "02:00:00:00:05:02", (ipaddress.ip_address("127.0.0.2"),))
        self.policy = Policy("t", {"web": Zone("web", (web,)), "other": Zone("other", (other,))}, {}, (),
                             content=content_policy(self.clamd.socket))
        self.log = MemoryLog()
        self.metrics = CredentialMetrics()
        self.run(self._start())

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    async def _start(self):
        self.echo = EchoServer(cert=self.tmp / "up.pem", key=self.tmp / "up.key", log=self.echo_log).start()
        port = self.echo.port
        self.proxy = CredentialProxy(self.policy, MemorySecretSource(), self.ca, address_matches=lambda n, ip: True,
                                     decision_log=self.log, metrics=self.metrics, destination_of=lambda s: ("127.0.0.1", port),
                                     upstream_ca_file=str(self.tmp / "upca.pem"), limits=ProxyLimits(max_request_body=1 << 20))
        self.http_port, self.https_port = await self.proxy.start("127.0.0.1")

    def close(self):
        async def stop():
            await self.proxy.stop()
            self.echo.close()
        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.clamd.stop()

    def upload(self, data: bytes, *args, source="127.0.0.1", name="upload.bin"):
        path = self.tmp / name
        path.write_bytes(data)
        args = args or ("--data-binary", f"@{path}", "-H", "Content-Type: application/octet-stream")
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "--interface", source, "--cacert", str(self.tmp / "skyca.pem"),
             "--connect-to", f"::127.0.0.1:{self.https_port}", "-w", "\n%{http_code}",
             *[a.replace("{path}", str(path)) for a in args], "https://upload.test/files"],
            capture_output=True, timeout=30)
        body, _, code = result.stdout.rpartition(b"\n")
        return int(code or 0), body

    def echoed(self) -> list[dict]:
        return [json.loads(line) for line in self.echo_log.read_text().splitlines()] if self.echo_log.exists() else []

    def blocks(self) -> list[dict]:
        return self.log.of_kind("content_blocked")

    def counted(self, rule: str, verdict: str) -> float:
        return self.metrics.content.decisions.labels("web", rule, "http", verdict)._value.get()


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(tmp_path_factory.mktemp("content-http"))
    yield r
    r.close()


def assert_blocked(rig, code, body, rule, engine, data_sha=None):
    assert code == 403, body
    answer = json.loads(body)
    assert (answer["error"], answer["rule"], answer["engine"]) == ("content_blocked", rule, engine), answer
    entry = rig.blocks()[-1]
    assert (entry["zone"], entry["workload"], entry["rule"], entry["protocol"], entry["destination"]) == (
        "web", "web1", rule, "http", "upload.test")
    if data_sha:
        assert entry["sha256"] == data_sha
    assert "X5O!P" not in json.dumps(entry)  # never the content


def test_clean_file_passes_byte_exact(rig):
    data = bytes(range(256)) * 300  # binary, 76.8 KB
    before = len(rig.echoed())
    code, _ = rig.upload(data)
    assert code == 200
    got = rig.echoed()[before:]
    assert len(got) == 1 and request_body(got[0]) == data
    assert rig.counted("-", "allowed") >= 1


ATTACKS = [
    # (description, data, curl arguments ({path}: the file), rule, engine)
    ("EICAR as the raw body", EICAR, (), "malware", "clamav"),
    ("EICAR in a zip named photo.jpg sent as image/jpeg", zipped("notes.txt", EICAR),
     ("--data-binary", "@{path}", "-H", "Content-Type: image/jpeg"), "malware", "clamav"),
    ("EICAR in a multipart form", EICAR, ("-F", "note=hello", "-F", "file=@{path};filename=cat.jpg;type=image/jpeg"),
     "malware", "clamav"),
    ("EICAR gzip-encoded", gzip.compress(EICAR), ("--data-binary", "@{path}", "-H", "Content-Encoding: gzip"),
     "malware", "clamav"),
    ("an executable renamed readme.txt, sent as text/plain", ELF,
     ("-F", "file=@{path};filename=readme.txt;type=text/plain"), "no-binaries", "mime"),
    ("a body over max_size", b"a" * 200_001, (), "no-binaries", "size"),
    ("a gzip bomb (20 MiB of zeros in 20 KB)", gzip_bomb(),
     ("--data-binary", "@{path}", "-H", "Content-Encoding: gzip"), "malware", "uninspectable"),
    ("a zip bomb", zip_bomb(), (), "malware", "archive"),
    ("a content coding the filter cannot read", b"whatever", ("--data-binary", "@{path}", "-H", "Content-Encoding: br"),
     "malware", "uninspectable"),
]


# What the upstream's form and query parsers undo before the application sees a value.
ATTACKS += [
    ("EICAR percent-encoded as a form field", EICAR, ("--data-urlencode", "file@{path}"), "malware", "clamav"),
    ("a key percent-encoded in a form field", b"", ("--data", "key=%41KIAABCDEFGHIJKLMNOP"), "no-keys", "pattern"),
    ("a key percent-encoded in a form field's name", b"", ("--data", "%41KIAABCDEFGHIJKLMNOP=1"), "no-keys",
     "pattern"),
    ("a key percent-encoded in the query", b"", ("-G", "--data", "key=%41KIAABCDEFGHIJKLMNOP"), "no-keys", "pattern"),
    # a bare ';' inside an escaped value: parsers splitting at '&' only (Python's since 3.10) read
    # the value whole, ';' included; the filter split there too and judged the halves apart
    ("a web shell escaped in a form field cut by a bare ';'", b"",
     ("--data", "x=%65val(base64_decode(%24_POST[%27c%27]));%20"), "no-webshells", "pattern"),
]
# JSON: the parser undoes string escapes; a file in a JSON API is base64 in a string (GitHub's
# contents API stores it decoded), whatever Content-Type the VM names.
_JSON = ("--data-binary", "@{path}", "-H", "Content-Type: application/json")
ATTACKS += [
    ("EICAR base64 in a JSON string", json.dumps({"message": "add", "content": base64.b64encode(EICAR).decode()})
     .encode(), _JSON, "malware", "clamav"),
    ("EICAR base64 in a JSON string sent as text/plain", json.dumps([base64.b64encode(EICAR).decode()]).encode(),
     ("--data-binary", "@{path}", "-H", "Content-Type: text/plain"), "malware", "clamav"),
    ("an executable base64 in a JSON string", json.dumps({"content": base64.b64encode(ELF).decode()}).encode(),
     _JSON, "no-binaries", "mime"),
    ("a key escaped in a JSON string", b'{"k": "\\u0041KIAABCDEFGHIJKLMNOP"}', _JSON,
     "no-keys", "pattern"),
    ("a body named JSON that is not JSON", b'{"content": "X', _JSON, "malware", "uninspectable"),
    # ... and so is a JSON file in a form (an API's metadata part, or the file itself as JSON)
    ("EICAR base64 in a JSON part of a multipart form", json.dumps({"content": base64.b64encode(EICAR).decode()})
     .encode(), ("-F", "note=hello", "-F", "f=@{path};type=application/json"), "malware", "clamav"),
    ("EICAR base64 in a JSON part sent as octet-stream", json.dumps([base64.b64encode(EICAR).decode()]).encode(),
     ("-F", "f=@{path}"), "malware", "clamav"),
    ("a form part named JSON that is not JSON", b'{"content": "X', ("-F", "f=@{path};type=application/json"),
     "malware", "uninspectable"),
]


@pytest.mark.parametrize("description,data,args,rule,engine", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_blocked_uploads_never_reach_the_upstream(rig, description, data, args, rule, engine):
    before = len(rig.echoed())
    blocked_before = rig.counted(rule, "blocked")
    code, body = rig.upload(data, *args)
    assert_blocked(rig, code, body, rule, engine)
    assert len(rig.echoed()) == before  # the upstream received nothing at all
    assert rig.counted(rule, "blocked") == blocked_before + 1


@pytest.mark.parametrize("args", [
    ("-G", "--data-urlencode", "key=AKIAABCDEFGHIJKLMNOP"),  # in the query string, no body at all
    ("-H", "X-Api-Key: AKIAABCDEFGHIJKLMNOP", "-X", "GET"),
    ("-H", "AKIAABCDEFGHIJKLMNOP: 1", "-X", "GET"),  # a header's name is the VM's to choose too
    ("--data-binary", "@{path}"),  # in the body
], ids=["query", "header", "header-name", "body"])
def test_patterns_cover_the_target_and_headers_too(rig, args):
    before = len(rig.echoed())
    code, body = rig.upload(b"aws key AKIAABCDEFGHIJKLMNOP\n", *args)
    assert_blocked(rig, code, body, "no-keys", "pattern")
    assert len(rig.echoed()) == before


def test_marker_split_across_chunks_is_blocked(rig):
    """Chunked transfer coding with the EICAR string cut between two chunks."""
    before = len(rig.echoed())
    cut = 30
    body = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (cut, EICAR[:cut], len(EICAR) - cut, EICAR[cut:])
    request = (b"POST /files HTTP/1.1\r\nHost: upload.test\r\nTransfer-Encoding: chunked\r\n"
               b"Connection: close\r\n\r\n" + body)
    context = ssl.create_default_context(cafile=str(rig.tmp / "skyca.pem"))
    with socket.create_connection(("127.0.0.1", rig.https_port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="upload.test") as tls:
            tls.sendall(request)
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403")
    assert_blocked(rig, 403, payload, "malware", "clamav", hashlib.sha256(EICAR).hexdigest())
    assert len(rig.echoed()) == before


def test_other_zones_are_not_inspected(rig):
    code, _ = rig.upload(EICAR, source="127.0.0.2")
    assert code == 200  # no content rule names zone "other"


def test_downloads_are_judged_under_download_rules(rig):
    """The echo answers with what it received: a marker allowed out is refused on the way in."""
    before = len(rig.echoed())
    code, body = rig.upload(DOWNLOAD_MARKER.encode())
    assert len(rig.echoed()) == before + 1  # the upload itself was allowed
    assert code == 403 and json.loads(body)["rule"] == "inbound"
    assert rig.blocks()[-1]["direction"] == "download"


def test_clamd_down_means_refusal_not_a_pass(rig):
    """clamd killed: uploads from zones whose rules need it are refused, with the reason."""
    dead = LocalClamd(rig.tmp / "clamd-dead").start()
    dead.kill()
    policy = Policy(rig.policy.name, rig.policy.zones, {}, (), content=content_policy(dead.socket))
    rig.run(rig.proxy.set_policy(policy))
    try:
        before = len(rig.echoed())
        code, body = rig.upload(b"perfectly harmless text\n")
        assert_blocked(rig, code, body, "malware", "clamav")
        assert "unavailable" in json.loads(body)["reason"]
        assert len(rig.echoed()) == before
        code, _ = rig.upload(b"", "-X", "GET")  # nothing uploaded: no scan needed, no refusal
        assert code == 200
    finally:
        rig.run(rig.proxy.set_policy(rig.policy))


def test_a_body_being_decoded_does_not_hold_up_other_connections(rig, monkeypatch):
    """Undoing a large body's codings, multipart and JSON (up to max_inspect_bytes, 64 MiB by
    default) is CPU work of up to seconds; the proxy serves every VM's connections meanwhile. Here
    the decoding of a 2.7 MiB JSON upload is held until an upload on another connection has had
    its answer: that answer must come first."""
    from concurrent.futures import ThreadPoolExecutor

    import skyguard.content.httpfilter as httpfilter

    decoding, release = threading.Event(), threading.Event()
    real = httpfilter.body_files

    def held(headers, body, limit):
        if len(body) > 1 << 20:  # the large upload only
            decoding.set()
            release.wait(60)
        return real(headers, body, limit)

    monkeypatch.setattr(httpfilter, "body_files", held)
    large = json.dumps({"content": base64.b64encode(harmless_bytes(2 << 20)).decode()}).encode()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(rig.upload, large, *_JSON, name="large.json")
        try:
            assert decoding.wait(30), "the large upload never reached the filter"
            code, _ = rig.upload(b"small and harmless\n", name="small.txt")
            assert code == 200 and not answer.done()
        finally:
            release.set()
        code, body = answer.result()
    assert code == 403 and json.loads(body)["engine"] == "size"  # judged as usual once decoded


def test_content_zones_are_steered_whatever_the_destination():
    from skyguard.credproxy.steering import CredentialSteering

    rules = CredentialSteering(["sg-cred"], 8080, 8443, content_interfaces=["sg-web1"]).ruleset()
    assert 'iifname { "sg-web1" } meta nfproto { ipv4, ipv6 } tcp dport 443 redirect to :8443' in rules
    assert 'iifname { "sg-web1" } meta nfproto { ipv4, ipv6 } tcp dport 80 redirect to :8080' in rules
    assert 'iifname { "sg-cred" } ip daddr @cred_v4 tcp dport 443 redirect to :8443' in rules


def raw_upload(rig, head: bytes, body: bytes) -> tuple[int, bytes]:
    """One request written by hand over TLS to the proxy: (status, body of the answer)."""
    request = (b"POST /files HTTP/1.1\r\nHost: upload.test\r\nConnection: close\r\n" + head +
               b"Content-Length: %d\r\n\r\n" % len(body) + body)
    context = ssl.create_default_context(cafile=str(rig.tmp / "skyca.pem"))
    with socket.create_connection(("127.0.0.1", rig.https_port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="upload.test") as tls:
            tls.sendall(request)
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    status, _, payload = answer.partition(b"\r\n\r\n")
    return int(status.split(b" ", 2)[1]), payload


# An executable as the one file of a form with boundary BBB, then a harmless form with boundary
# AAA: a parser that reads the boundary as BBB (RFC 2045 parameters: Python's email, werkzeug,
# busboy) gets the executable, the AAA form being its epilogue; one that reads AAA gets "hello",
# the BBB form being its preamble.
SMUGGLED_FORM = (b"--BBB\r\nContent-Disposition: form-data; name=\"f\"; filename=\"readme.txt\"\r\n"
                 b"Content-Type: text/plain\r\n\r\n" + ELF + b"\r\n--BBB--\r\n"
                 b"--AAA\r\nContent-Disposition: form-data; name=\"n\"\r\n\r\nhello\r\n--AAA--\r\n")


@pytest.mark.parametrize("head", [
    b"Content-Type: multipart/form-data; xboundary=AAA; boundary=BBB\r\n",  # "boundary=" inside another name
    b"Content-Type: multipart/form-data; note=\"boundary=AAA\"; boundary=BBB\r\n",  # ... or inside a value
    b"Content-Type: multipart/form-data; boundary=AAA; boundary=BBB\r\n",  # two: werkzeug takes the last
    b"Content-Type: text/plain\r\nContent-Type: multipart/form-data; boundary=BBB\r\n",  # gunicorn: the last
    b"Content-Type: multipart/form-data; boundary=AAA; boundary*=''BBB\r\n",  # RFC 2231 form: read where decoded
], ids=["boundary-in-a-name", "boundary-in-a-value", "two-boundaries", "two-content-types", "rfc2231-boundary"])
def test_the_form_judged_is_the_form_the_upstream_reads(rig, head):
    before = len(rig.echoed())
    code, body = raw_upload(rig, head, SMUGGLED_FORM)
    assert code == 403, body
    assert json.loads(body)["engine"] in ("mime", "uninspectable")
    assert len(rig.echoed()) == before


_DISPOSITION = b"Content-Disposition: form-data; name=\"f\"; filename=\"readme.txt\""


@pytest.mark.parametrize("part", [
    _DISPOSITION + b"\n\n" + ELF + b"\r\n\r\nhello",
    _DISPOSITION + b"\r\r" + ELF + b"\r\n\r\nhello",
    _DISPOSITION + b"\r\n\n" + ELF + b"\r\n\r\nhello",
    b"\r\n" + _DISPOSITION + b"\n\n" + ELF,  # no headers, as the filter reads it: all of it is the file
], ids=["lf-lf", "cr-cr", "crlf-lf", "headerless"])
def test_a_part_header_block_cannot_hide_the_file(rig, part):
    """werkzeug (Flask) ends a part's headers at the first \\r\\n\\r\\n, \\r\\r or \\n\\n, Go at an empty
    line with or without its CR: a part whose header block ends in a bare line break gives them
    the executable as the file, while a filter that looks for \\r\\n\\r\\n only judges what
    follows (here "hello"), or the text before the executable (libmagic: not an executable)."""
    form = b"--BBB\r\n" + part + b"\r\n--BBB--\r\n"
    before = len(rig.echoed())
    code, body = raw_upload(rig, b"Content-Type: multipart/form-data; boundary=BBB\r\n", form)
    assert code == 403, body
    assert len(rig.echoed()) == before
