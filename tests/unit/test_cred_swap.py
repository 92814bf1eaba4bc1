"""The credential-swap decision (swap.py), table-driven, plus the secret-forms matcher and the
promise that no secret reaches a log entry, a reason, a repr or an exception."""

from __future__ import annotations

import base64
import gzip
import json
import urllib.parse
import zlib

import pytest

from skyguard.credproxy.codings import UnscrubbableResponse, decode_body
from skyguard.credproxy.interfaces import CredentialMetrics, MemorySecretSource
from skyguard.credproxy.secretforms import SecretForms
from skyguard.credproxy.swap import (
    ConnectionFacts,
    HttpRequest,
    SwapEngine,
    normalise_name,
)
from skyguard.errors import CredentialError
from skyguard.parts import MemoryLog
from skyguard.policy.model import Credential, Injection

SECRET = b"ghp_R3alS3cret/Value+xyz"
BODY_SECRET = b"sk_live_body_secret_0123"
PH = "sg-placeholder-github-7f3a"
BODY_PH = "sg-placeholder-pay-11aa"

GITHUB = Credential(
    name="github", placeholder=PH, secret="github", zones=("sdn",), destinations=("api.github.test",),
    inject=Injection(header="Authorization", format="Bearer {secret}"),
    strip_response_headers=("X-Auth-Token",),
)
PAY = Credential(
    name="pay", placeholder=BODY_PH, secret="pay", zones=("sdn", "sandbox"), destinations=("pay.test",),
    inject=Injection(header=None, body=True, max_occurrences=2),
)
LEARNED = {("api.github.test", "203.0.113.10"), ("pay.test", "203.0.113.20"), ("other.test", "203.0.113.30")}


def learned(name, ip):
    return (name, ip) in LEARNED


def engine(patterns=()):
    return SwapEngine([GITHUB, PAY], MemorySecretSource({"github": SECRET, "pay": BODY_SECRET}), patterns)


def facts(zone="sdn", sni="api.github.test", address="203.0.113.10", tls=True, workload="sdnctl1"):
    return ConnectionFacts(workload, zone, sni if tls else None, address, 443 if tls else 80, tls, learned)


def request(host="api.github.test", headers=(), body=b"", target=b"/repos", method=b"GET"):
    hs = ((b"host", host.encode()),) if host is not None else ()
    return HttpRequest(method, target, hs + tuple((n.lower().encode(), v.encode()) for n, v in headers), body)


AUTH = ("Authorization", f"Bearer {PH}")

# (description, request, facts, expected action, expected result label, expected status)
CASES = [
    ("placeholder to the right host: swapped", request(headers=[AUTH]), facts(), "swap", "swapped", 0),
    ("bare placeholder in the header is also accepted", request(headers=[("Authorization", PH)]), facts(), "swap", "swapped", 0),
    ("no placeholder: passed untouched", request(headers=[("Accept", "*/*")]), facts(), "pass", "passed", 0),
    ("host name case and trailing dot are normalised", request(host="API.GitHub.test.", headers=[AUTH]),
     facts(), "swap", "swapped", 0),
    ("host with port", request(host="api.github.test:443", headers=[AUTH]), facts(), "swap", "swapped", 0),
    ("placeholder to another host", request(host="other.test", headers=[AUTH]),
     facts(sni="other.test", address="203.0.113.30"), "block", "blocked_exfiltration", 403),
    ("SNI and Host disagree", request(headers=[AUTH]), facts(sni="other.test"), "block", "blocked_exfiltration", 421),
    ("SNI and Host disagree, no placeholder", request(), facts(sni="other.test"), "block", "blocked_exfiltration", 421),
    ("no SNI on a TLS connection", request(headers=[AUTH]), facts(sni=None), "block", "blocked_exfiltration", 421),
    ("address not learned for the host", request(headers=[AUTH]), facts(address="203.0.113.30"),
     "block", "blocked_exfiltration", 403),
    ("zone not allowed", request(headers=[AUTH]), facts(zone="sandbox", workload="agent1"),
     "block", "blocked_exfiltration", 403),
    ("unknown client", request(headers=[AUTH]), facts(zone=None, workload=None), "block", "blocked_exfiltration", 403),
    ("cleartext HTTP never carries the secret", request(headers=[AUTH]), facts(tls=False),
     "block", "blocked_exfiltration", 403),
    ("cleartext without placeholder passes", request(), facts(tls=False), "pass", "passed", 0),
    ("placeholder in another header", request(headers=[AUTH, ("X-Debug", PH)]), facts(),
     "block", "blocked_exfiltration", 403),
    ("placeholder in a header name", request(headers=[(f"X-{PH}", "1")]), facts(), "block", "blocked_exfiltration", 403),
    ("placeholder in the URL", request(target=f"/search?q={PH}".encode(), headers=[AUTH]), facts(),
     "block", "blocked_exfiltration", 403),
    ("placeholder in the body when body injection is off", request(headers=[AUTH], body=PH.encode(), method=b"POST"),
     facts(), "block", "blocked_exfiltration", 403),
    ("placeholder in a different case elsewhere", request(headers=[AUTH, ("Cookie", PH.upper())]), facts(),
     "block", "blocked_exfiltration", 403),
    ("injection header in an unexpected shape", request(headers=[("Authorization", f"token {PH} {PH}")]), facts(),
     "block", "blocked_exfiltration", 403),
    ("injection header repeated", request(headers=[AUTH, AUTH]), facts(), "block", "blocked_exfiltration", 403),
    ("absolute-form target naming another host", request(target=b"http://other.test/x", headers=[AUTH]), facts(),
     "block", "blocked_protocol", 400),
    ("missing Host", request(host=None, headers=[AUTH]), facts(), "block", "blocked_protocol", 400),
    ("garbage Host", request(host="a b/c", headers=[AUTH]), facts(), "block", "blocked_protocol", 400),
    ("WebSocket upgrade refused", request(headers=[AUTH, ("Upgrade", "websocket"), ("Connection", "Upgrade")]),
     facts(), "block", "blocked_protocol", 501),
    ("h2c upgrade refused", request(headers=[("Upgrade", "h2c")]), facts(), "block", "blocked_protocol", 501),
    ("CONNECT refused", request(method=b"CONNECT", target=b"api.github.test:443"), facts(), "block", "blocked_protocol", 501),
    ("raw secret in a header", request(headers=[("X-Leak", SECRET.decode())]), facts(), "block", "blocked_content", 403),
    ("base64 secret in Basic auth", request(headers=[("Authorization", "Basic " + base64.b64encode(b"u:" + SECRET).decode())]),
     facts(), "block", "blocked_content", 403),
    ("hex secret in the body", request(body=SECRET.hex().upper().encode(), method=b"POST"), facts(),
     "block", "blocked_content", 403),
    ("URL-encoded secret in the query", request(target=b"/?t=" + urllib.parse.quote(SECRET, safe="").encode()),
     facts(), "block", "blocked_content", 403),
    ("urlsafe base64 of the body secret toward another host",
     request(host="other.test", body=base64.urlsafe_b64encode(b"xx" + BODY_SECRET), method=b"POST"),
     facts(sni="other.test", address="203.0.113.30"), "block", "blocked_content", 403),
    ("secret sent to its own destination is still blocked (the VM must not hold it)",
     request(headers=[("Authorization", "Bearer " + SECRET.decode())]), facts(), "block", "blocked_content", 403),
    ("body placeholder swapped", request(host="pay.test", body=f'{{"key":"{BODY_PH}"}}'.encode(), method=b"POST"),
     facts(sni="pay.test", address="203.0.113.20"), "swap", "swapped", 0),
    ("body placeholder within the occurrence cap",
     request(host="pay.test", body=f"{BODY_PH}&{BODY_PH}".encode(), method=b"POST"),
     facts(sni="pay.test", address="203.0.113.20"), "swap", "swapped", 0),
    ("body placeholder over the occurrence cap",
     request(host="pay.test", body=f"{BODY_PH}{BODY_PH}{BODY_PH}".encode(), method=b"POST"),
     facts(sni="pay.test", address="203.0.113.20"), "block", "blocked_exfiltration", 403),
    ("body placeholder in a header when only body injection is configured",
     request(host="pay.test", headers=[("Authorization", BODY_PH)]),
     facts(sni="pay.test", address="203.0.113.20"), "block", "blocked_exfiltration", 403),
    ("sandbox may use pay but not github at once",
     request(host="pay.test", headers=[("Authorization", f"Bearer {PH}")], body=BODY_PH.encode(), method=b"POST"),
     facts(zone="sandbox", sni="pay.test", address="203.0.113.20"), "block", "blocked_exfiltration", 403),
]


@pytest.mark.parametrize("description, req, conn, action, result, status", CASES, ids=[c[0] for c in CASES])
def test_decision_table(description, req, conn, action, result, status):
    verdict = engine().decide(req, conn)
    assert verdict.action == action, verdict.reason
    assert [r for _, r in verdict.results] and all(r == result for _, r in verdict.results)
    assert verdict.status == status
    if action == "block":
        assert verdict.request is None
    everything = repr(verdict).encode() + verdict.reason.encode() + json.dumps(verdict.entries).encode()
    assert not SecretForms([SECRET, BODY_SECRET]).found_in(everything)


def test_swap_injects_the_secret_exactly_where_configured():
    verdict = engine().decide(request(headers=[AUTH, ("Accept-Encoding", "br")]), facts())
    headers = dict(verdict.request.headers)
    assert headers[b"authorization"] == b"Bearer " + SECRET
    assert headers[b"accept-encoding"] == b"identity"  # the proxy must be able to read responses
    assert SECRET not in verdict.request.target + verdict.request.body
    entry = verdict.entries[0]
    assert (entry["credential"], entry["zone"], entry["workload"], entry["destination"], entry["result"]) == (
        "github", "sdn", "sdnctl1", "api.github.test", "swapped")


def test_body_swap_replaces_every_allowed_occurrence():
    req = request(host="pay.test", body=f"a={BODY_PH}&b={BODY_PH}".encode(), method=b"POST")
    verdict = engine().decide(req, facts(sni="pay.test", address="203.0.113.20"))
    assert verdict.request.body == b"a=" + BODY_SECRET + b"&b=" + BODY_SECRET


def test_exfiltration_attempt_is_logged_with_who_and_where():
    verdict = engine().decide(request(host="other.test", headers=[AUTH]), facts(sni="other.test", address="203.0.113.30"))
    (entry,) = verdict.entries
    assert entry["credential"] == "github" and entry["destination"] == "other.test"
    assert entry["zone"] == "sdn" and entry["workload"] == "sdnctl1" and entry["result"] == "blocked_exfiltration"


def test_missing_secret_fails_closed_and_does_not_break_other_credentials():
    eng = SwapEngine([GITHUB, PAY], MemorySecretSource({"pay": BODY_SECRET}))
    verdict = eng.decide(request(headers=[AUTH]), facts())
    assert verdict.action == "block" and "not available" in verdict.reason
    ok = eng.decide(request(host="pay.test", body=BODY_PH.encode(), method=b"POST"),
                    facts(sni="pay.test", address="203.0.113.20"))
    assert ok.action == "swap"


def test_configured_content_pattern_blocks():
    eng = engine(patterns=[rb"AKIA[0-9A-Z]{16}"])
    verdict = eng.decide(request(body=b"key=AKIAABCDEFGHIJKLMNOP", method=b"POST"), facts())
    assert (verdict.action, verdict.results[0][1]) == ("block", "blocked_content")


@pytest.mark.parametrize("encode", [
    lambda s: s,
    lambda s: base64.b64encode(s),
    lambda s: base64.b64encode(b"p" + s),
    lambda s: base64.b64encode(b"pq" + s),
    lambda s: base64.urlsafe_b64encode(s),
    lambda s: s.hex().encode(),
    lambda s: s.hex().upper().encode(),
    lambda s: urllib.parse.quote(s, safe="").encode(),
    lambda s: urllib.parse.quote_plus(s).encode(),
    lambda s: json.dumps(s.decode()).replace("/", "\\/").encode(),
    lambda s: "".join(f"\\u{b:04x}" for b in s).encode(),
], ids=["raw", "b64", "b64+1", "b64+2", "b64url", "hex", "HEX", "pct", "pct+", "json-solidus", "json-u"])
def test_response_scrubbing_removes_every_form(encode):
    eng = engine()
    form = encode(SECRET)
    headers = ((b"content-type", b"text/plain"), (b"location", b"https://x.test/?t=" + form),
               (b"x-auth-token", b"anything"), (b"content-length", b"5"))
    safe_headers, body, count = eng.scrub_response("api.github.test", headers, b"<<" + form + b">>")
    blob = body + b"".join(n + v for n, v in safe_headers)
    assert not SecretForms([SECRET]).found_in(blob)
    assert form not in blob and count == 2
    names = [n for n, _ in safe_headers]
    assert b"x-auth-token" not in names and b"content-length" not in names


def test_strip_headers_only_for_the_credentials_destination():
    headers = ((b"x-auth-token", b"abc"),)
    assert engine().scrub_response("other.test", headers, b"")[0] == headers


def test_decode_body_gzip_deflate_and_refuses_unknown():
    data = b"hello " + SECRET
    assert decode_body(((b"content-encoding", b"gzip"),), gzip.compress(data), 1000) == data
    assert decode_body(((b"content-encoding", b"deflate"),), zlib.compress(data), 1000) == data
    with pytest.raises(UnscrubbableResponse):
        decode_body(((b"content-encoding", b"br"),), b"xx", 1000)
    with pytest.raises(UnscrubbableResponse):
        decode_body(((b"content-encoding", b"gzip"),), gzip.compress(b"a" * 5000), 1000)  # zip bomb bound



GZ = ((b"content-encoding", b"gzip"),)


def test_decode_body_reads_every_gzip_member_and_never_truncates():
    members = gzip.compress(b"one ") + gzip.compress(b"two ") + gzip.compress(SECRET)
    assert decode_body(GZ, members, 1000) == b"one two " + SECRET
    assert decode_body(GZ, b"", 1000) == b""  # HEAD, 204, 304
    assert decode_body(((b"content-encoding", b"gzip, gzip"),), gzip.compress(gzip.compress(b"x") * 2), 1000) == b"xx"
    for refused in (gzip.compress(b"one")[:-3],  # a stream that ends early
                    gzip.compress(b"one") + b"\0\0",  # bytes after a member that are no member
                    gzip.compress(b"a" * 600) + gzip.compress(b"b" * 600)):  # the limit counts every member
        with pytest.raises(UnscrubbableResponse):
            decode_body(GZ, refused, 1000)
    with pytest.raises(UnscrubbableResponse):
        decode_body(((b"content-encoding", b"deflate"),), zlib.compress(b"one") + zlib.compress(SECRET), 1000)


@pytest.mark.parametrize("raw, expected", [
    ("API.Github.Test.", "api.github.test"), ("a.test:8443", "a.test"), ("[2001:db8::1]:443", "2001:db8::1"),
    ("", None), ("bad host", None), ("x" * 300, None), (b"\xff", None),
    ("a.test:443@evil.test", None), ("a.test:x", None), ("[2001:db8::1]evil.test", None), ("a.test:\u00b2", None),
])
def test_normalise_name(raw, expected):
    assert normalise_name(raw) == expected


def test_secrets_never_in_reprs_or_errors():
    source = MemorySecretSource({"github": SECRET})
    eng = SwapEngine([GITHUB], source)
    swapped = eng.decide(request(headers=[AUTH]), facts())
    blob = repr(source) + repr(eng) + repr(eng.forms) + repr(swapped) + repr(swapped.request)
    with pytest.raises(CredentialError) as error:
        source.get("nope")
    blob += str(error.value)
    assert SECRET.decode() not in blob and "R3alS3cret" not in blob


def test_metrics_and_log_protocols():
    log = MemoryLog()
    log.record("credential", result="x")
    assert log.snapshot() == [{"kind": "credential", "result": "x"}]
    metrics = CredentialMetrics()
    metrics.count("github", "swapped")
    metrics.count(None, "blocked_protocol")
    swaps = "skyguard_credential_swaps_total"
    assert metrics.registry.get_sample_value(swaps, {"credential": "github", "result": "swapped"}) == 1
    assert metrics.registry.get_sample_value(swaps, {"credential": "-", "result": "blocked_protocol"}) == 1


def test_secret_with_line_breaks_is_never_injected_into_a_header():
    eng = SwapEngine([GITHUB], MemorySecretSource({"github": b"abc\r\nX-Forged: 1"}))
    verdict = eng.decide(request(headers=[AUTH]), facts())
    assert verdict.action == "block" and "control characters" in verdict.reason


def test_a_secret_in_a_header_the_connection_header_drops_is_still_blocked():
    sent = request(headers=[("Connection", "x-smuggle"), ("X-Smuggle", SECRET.decode())])
    verdict = engine().decide(sent, facts())
    assert (verdict.action, verdict.status, verdict.entries[0]["result"]) == ("block", 403, "blocked_content")


def test_a_secret_as_a_header_name_is_dropped_although_the_reader_lowers_names():
    # Names are lowered as they are read (llhttp, then ResponseReader), so an upper- or
    # mixed-case secret sent as a header name reached the scrubber, and the VM, in lower case:
    # the raw form is matched case-sensitively, and the case is all the VM has left to guess.
    from skyguard.credproxy.http1 import ResponseReader
    secret = b"AKIAIOSFODNN7EXAMPLE"  # token characters only: a valid header name
    eng = SwapEngine([GITHUB], MemorySecretSource({"github": secret}))
    reader = ResponseReader(False, 4096, 4096)
    reader.feed(b"HTTP/1.1 200 OK\r\nX-" + secret + b": 1\r\n" + secret + b"-Y: 2\r\nContent-Length: 0\r\n\r\n")
    safe_headers, _, count = eng.scrub_response("api.github.test", tuple(reader.headers), b"")
    assert count == 2 and not any(secret.lower() in name for name, _ in safe_headers), safe_headers
    sent = request(headers=[(f"X-{secret.decode()}", "1")])
    assert eng.decide(sent, facts()).status == 403  # and the same name from the VM is not sent out


def test_a_secret_shaped_like_a_host_name_never_reaches_a_log_entry():
    # A VM that holds a secret and sends it as Host (or SNI) is blocked, but the block's log
    # entry named the destination as sent: the secret, in the decision log.
    secret = b"sk-live-0123456789abcdef"  # a valid host name, as many API keys are
    eng = SwapEngine([GITHUB], MemorySecretSource({"github": secret}))
    for req, conn in ((request(host=secret.decode()), facts()),
                      (request(host=secret.decode()), facts(sni=secret.decode())),
                      (request(host=secret.decode(), headers=[("Upgrade", "h2c")]), facts(sni=secret.decode()))):
        verdict = eng.decide(req, conn)
        assert verdict.action == "block"
        blob = json.dumps(verdict.entries) + verdict.reason + repr(verdict)
        assert not SecretForms([secret]).found_in(blob.encode()), blob
