"""Fuzz harnesses for every parser that takes input from a VM, an upstream or a file: policy YAML,
signed-log files, HTTP requests into the credential proxy and the responses its upstreams send
back, DNS messages into the DNS proxy, request bodies into the content filter. One function per
target, `(bytes) -> None`, that raises AssertionError (or any unexpected exception) on a bug and
returns quietly otherwise: a SkyguardError for bad input is the expected outcome, a crash is not.

Run by:
- tests/adversarial/test_fuzz_corpus.py (CI): replays tests/fuzz/corpus/<target>/ plus a few
  hundred deterministic mutations of it;
- tests/fuzz/test_fuzz_long.py (fuzz tier): atheris, 1M inputs per target, via
  `python tests/fuzz/harnesses.py TARGET -runs=1000000 [corpus dir]`.
The DNS target reuses tests/support/dns_fuzz.py (resolver and input split), not a copy of it.
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for _path in (REPO, REPO / "tests"):  # skyguard, and support/ (the DNS target)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

CORPUS = Path(__file__).resolve().parent / "corpus"
REAL_SECRET = b"ghp_" + b"5" * 36  # the fuzz credential's real value: must never pass or leak
PLACEHOLDER = b"sg-placeholder-github-7f3a"


# ---- policy YAML -----------------------------------------------------------------------------

def fuzz_policy(data: bytes) -> None:
    from skyguard.datapath.compile import compile_policy
    from skyguard.errors import BadInput
    from skyguard.policy.parse import parse_policy

    text = data.decode("utf-8", "replace")
    try:
        policy = parse_policy(text, source="fuzz.yaml")
    except BadInput as e:
        assert str(e), "a policy error must say what is wrong"
        return
    try:
        compile_policy(policy)  # what parse accepts, the compiler takes (or refuses as bad input)
    except BadInput:
        pass


# ---- signed log files ------------------------------------------------------------------------

class _LogTemplate:
    """A small valid log (entries + checkpoints) written once; each input mutates a copy."""

    def __init__(self):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from skyguard.tlog import LogWriter, Signer, entry

        # tmpfs where there is one: each input rewrites a file
        shm = Path("/dev/shm")
        self.root = Path(tempfile.mkdtemp(prefix="sg-fuzz-tlog-", dir=shm if shm.is_dir() else None))
        self.template = self.root / "template"
        signer = Signer("fuzz.skyguard", Ed25519PrivateKey.generate())
        self.verifier = signer.verifier
        with LogWriter(self.template, signer, checkpoint_every=64, segment_entries=256) as w:
            for i in range(300):  # two segments
                w.append(entry("flow_start", n=i, zone="sandbox", verdict="deny"))
        self.files = sorted(p.relative_to(self.template) for p in self.template.rglob("*") if p.is_file())
        # One working copy for every input: the verifier only reads, so putting back the one file
        # an input changed restores it (a copy of the tree per input was most of the cost).
        self.work = self.root / "work"
        shutil.copytree(self.template, self.work)
        self.originals = {rel: (self.template / rel).read_bytes() for rel in self.files}

    def close(self):
        shutil.rmtree(self.root, ignore_errors=True)


_log_template: _LogTemplate | None = None


def fuzz_tlog(data: bytes) -> None:
    """data[0] picks a file of a valid log, data[1:3] an offset, data[3] an operation (overwrite,
    truncate, insert, replace the file), the rest the bytes. Verifying the result must either pass
    (only if the file's bytes did not change) or report a failure; never raise anything else."""
    global _log_template
    if _log_template is None:
        import atexit

        _log_template = _LogTemplate()
        atexit.register(_log_template.close)
    t = _log_template
    if len(data) < 4:
        return
    rel = t.files[data[0] % len(t.files)]
    path = t.work / rel
    original = t.originals[rel]
    at = int.from_bytes(data[1:3], "big") % (len(original) + 1)
    payload, op = data[4:], data[3] % 4
    if op == 0:
        mutated = original[:at] + payload + original[at + len(payload):]
    elif op == 1:
        mutated = original[:at]
    elif op == 2:
        mutated = original[:at] + payload + original[at:]
    else:
        mutated = payload
    path.write_bytes(mutated)
    try:
        _check_tlog(t, rel, op, at, original, mutated)
    finally:
        path.write_bytes(original)


def _check_tlog(t: _LogTemplate, rel: Path, op: int, at: int, original: bytes, mutated: bytes) -> None:
    from skyguard.errors import SkyguardError
    from skyguard.tlog.verify import verify_log

    try:
        report = verify_log(t.work, t.verifier)
    except SkyguardError:
        return  # refused with a message (unreadable meta, bad key): fine
    if report.ok and mutated != original and rel.suffix != ".cache" and "cache" not in rel.name:
        # A changed file the verifier accepts must not have lost or changed an acknowledged
        # entry: re-read every entry and compare with the template.
        from skyguard.tlog import LogReader

        before = list(LogReader(t.template).entries())
        after = list(LogReader(t.work).entries())
        assert after[: len(before)] == before[: len(after)] and len(after) >= len(before) - 0, (
            f"verify passed a log whose entries changed ({rel}, op {op} at {at})")


# ---- HTTP into the credential proxy -----------------------------------------------------------

_engine = None


def _swap_engine():
    global _engine
    if _engine is None:
        from skyguard.credproxy.interfaces import MemorySecretSource
        from skyguard.credproxy.swap import SwapEngine
        from skyguard.policy.model import Credential, Injection

        cred = Credential("github", PLACEHOLDER.decode(), "github", ("sdn",), ("api.github.test",),
                          Injection(header="Authorization", format="Bearer {secret}"))
        _engine = SwapEngine([cred], MemorySecretSource({"github": REAL_SECRET}))
    return _engine


def fuzz_http(data: bytes) -> None:
    """Raw bytes from a VM, parsed as the proxy parses them (its llhttp reader), each request
    decided by the swap engine as if it came over TLS to api.github.test from zone sdn. A request
    carrying the real secret is never forwarded; the secret appears only in a swapped request,
    and only where the placeholder was; a blocked request forwards nothing. Two more oracles:
    the reader gives the same requests however the bytes are split into reads, and it is never
    more lenient than h11 (an independent parser): what it accepts, h11 reads the same."""
    from skyguard.credproxy.swap import ConnectionFacts

    engine = _swap_engine()
    facts = ConnectionFacts("sdnctl1", "sdn", "api.github.test", "203.0.113.5", 443, True,
                            lambda name, ip: name == "api.github.test" and ip == "203.0.113.5")
    requests = _proxy_requests([data])
    cut = 1 + (data[0] if data else 0) % max(len(data), 1)
    assert _proxy_requests([data[:cut], data[cut:]]) == requests, "parsing depends on how the bytes were read"
    if len(data) <= 1024:  # byte by byte costs a parser call per byte: keep the fuzzer fast
        assert _proxy_requests([data[i:i + 1] for i in range(len(data))]) == requests, "byte-wise reads parse differently"
    _check_against_h11(data, requests)
    for request in requests:
        _check_verdict(request, engine.decide(request, facts))


def _check_against_h11(data: bytes, requests: list) -> None:
    """The proxy is never more lenient than h11 in what it reads (see fuzz_http)."""
    theirs = _h11_requests(data, len(requests))
    for ours, h11_request in zip(requests, theirs):
        if h11_request is None:
            # llhttp allows what RFC 9112 lets a server allow and h11 does not (an empty line
            # before the request line, runs of spaces in it). The proxy forwards its canonical
            # form only, so that must read back the same.
            canonical = _canonical(ours)
            assert _h11_requests(_serialise(canonical), 1) == [canonical], \
                f"the proxy accepted a request whose canonical form h11 refuses or misreads: {ours!r}"
            continue
        assert _coding_lowered(ours) == h11_request, \
            f"the proxy accepted a request h11 reads differently: {ours!r} vs {h11_request!r}"


def _coding_lowered(request):
    """h11 hands the transfer coding back lowercased (names of codings are case-insensitive, RFC
    9112 7): `Transfer-Encoding: cHunked` is the same request to both readers."""
    import dataclasses

    return dataclasses.replace(request, headers=tuple(
        (n, v.lower() if n == b"transfer-encoding" else v) for n, v in request.headers))


def _proxy_requests(reads: list[bytes]) -> list:
    """The requests the proxy would answer, fed as these reads (up to the first that ends the
    connection, as the proxy stops answering there)."""
    from skyguard.credproxy.http1 import ProtocolRefusal, ProxyLimits, RequestReader, Upgraded, client_keeps_alive

    reader = RequestReader(ProxyLimits(max_header_bytes=16384))
    try:
        for chunk in reads:
            if chunk:
                reader.feed(chunk)
    except (ProtocolRefusal, Upgraded):
        pass  # the requests queued before it are still answered
    answered = []
    for request in reader.complete:
        answered.append(request)
        if not client_keeps_alive(request):
            break
    return answered


def _canonical(request):
    """The request framed by Content-Length, as a proxy forwards it."""
    from skyguard.credproxy.swap import HttpRequest

    headers = tuple((n, v) for n, v in request.headers if n not in (b"content-length", b"transfer-encoding"))
    return HttpRequest(request.method, request.target, headers + ((b"content-length", b"%d" % len(request.body)),),
                       request.body, request.http_version)


def _serialise(request) -> bytes:
    head = b"%s %s HTTP/%s\r\n" % (request.method, request.target, request.http_version)
    return head + b"".join(b"%s: %s\r\n" % pair for pair in request.headers) + b"\r\n" + request.body


def _h11_requests(data: bytes, count: int) -> list:
    """The first `count` requests as h11 reads them; None for one h11 refuses or never completes."""
    import h11

    from skyguard.credproxy.swap import HttpRequest

    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)  # syntax only, not size
    out: list = []
    try:
        conn.receive_data(data)
        conn.receive_data(b"")
        request, body = None, b""
        while len(out) < count:
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                break
            if isinstance(event, h11.Request):
                request, body = event, b""
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                out.append(HttpRequest(request.method, request.target, tuple(request.headers), body,
                                       request.http_version))
                if conn.our_state is h11.SEND_RESPONSE:  # answer it so h11 reads the next one
                    conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
                    conn.send(h11.EndOfMessage())
                    conn.start_next_cycle()
    except (h11.RemoteProtocolError, h11.LocalProtocolError):
        pass
    return out + [None] * (count - len(out))


# ---- HTTP responses from an upstream into the credential proxy ----------------------------------

def fuzz_upstream(data: bytes) -> None:
    """Raw bytes an upstream sends back, read as the proxy reads a response (its llhttp reader;
    the first byte says whether the request was HEAD). Only the errors the proxy answers with a
    502 may come out, and what is read does not depend on how the bytes were split into reads.
    The response is then made safe as the proxy does: no form of the real secret survives."""
    head_request, raw = bool(data[:1]) and data[0] & 1 == 1, data[1:]
    whole = _read_response([raw], head_request)
    cut = 1 + (data[0] if data else 0) % max(len(raw), 1)
    assert _read_response([raw[:cut], raw[cut:]], head_request) == whole, "depends on how the bytes were read"
    if len(raw) <= 1024:
        assert _read_response([raw[i:i + 1] for i in range(len(raw))], head_request) == whole, \
            "byte-wise reads read differently"
    if whole[0] == "ok":
        from skyguard.credproxy.codings import UnscrubbableResponse, decode_body
        from skyguard.credproxy.secretforms import SecretForms

        _, _status, headers, body = whole
        try:
            safe_headers, safe_body, _ = _swap_engine().scrub_response("api.github.test", headers,
                                                                        decode_body(headers, body, 1 << 20))
        except UnscrubbableResponse:
            return  # the proxy answers 502
        forms = SecretForms([REAL_SECRET])
        assert not forms.found_in(safe_body) and not any(forms.found_in(n + b":" + v) for n, v in safe_headers)


def _read_response(reads: list[bytes], head_request: bool):
    from skyguard.credproxy.codings import UnscrubbableResponse
    from skyguard.credproxy.http1 import ResponseReader, UpstreamProtocolError

    response = ResponseReader(head_request, 1 << 20, 16384)
    try:
        for chunk in reads:
            if chunk:
                response.feed(chunk)
                if response.done:
                    break
        if not response.done:
            response.finish()  # the upstream closes
    except (UpstreamProtocolError, UnscrubbableResponse, ConnectionResetError) as error:
        return ("error", type(error).__name__)
    return ("ok", response.status, tuple(response.headers), bytes(response.body))


def _check_verdict(req, verdict) -> None:
    assert verdict.action in ("swap", "pass", "block"), verdict
    sent_secret = REAL_SECRET in req.body or any(REAL_SECRET in v or REAL_SECRET in n for n, v in req.headers) \
        or REAL_SECRET in req.target
    if sent_secret:
        assert verdict.action == "block", "a request carrying the real secret was not blocked"
    if verdict.action == "block":
        assert verdict.request is None
        return
    out = verdict.request
    forwarded = out.target + out.body + b"".join(n + b":" + v for n, v in out.headers)
    if verdict.action == "pass":
        assert REAL_SECRET not in forwarded, "a passed request carries the real secret"
    assert REAL_SECRET not in repr(verdict).encode() and REAL_SECRET not in repr(out).encode()


# ---- DNS into the DNS proxy --------------------------------------------------------------------

_resolver = None


def fuzz_dns(data: bytes) -> None:
    from support import dns_fuzz

    global _resolver
    if _resolver is None:
        _resolver = dns_fuzz.make_resolver()
    dns_fuzz.one_input(_resolver, data)


# ---- request bodies into the content filter ----------------------------------------------------

CONTENT_LIMIT = 1 << 16  # the inspection buffer the target decodes within


def fuzz_content(data: bytes) -> None:
    """A request body as the content filter turns it into files (skyguard.content.http): the
    input is header lines ("Name: value"), a blank line, then the body. Only Uninspectable (a
    refusal) may come out; the files are bounded; and, against Python's own parsers, nothing a
    form or JSON upstream would decode is missing from them: every form value urllib decodes
    from an escape, every JSON string of base64 that base64.b64decode(validate=True) reads."""
    import base64
    import binascii
    import json
    from urllib.parse import parse_qsl

    from skyguard.content.http import MAX_PARTS, MIN_BASE64, Uninspectable, body_files

    head, _, body = data.partition(b"\n\n")
    headers = tuple((n.strip().lower(), v.strip()) for n, _, v in
                    (line.partition(b":") for line in head.split(b"\n")) if n.strip())
    try:
        files = body_files(headers, body, CONTENT_LIMIT)
    except Uninspectable:
        return
    assert files and all(isinstance(f, bytes) for f in files)
    assert len(files) <= 2 * MAX_PARTS + 3, f"{len(files)} files"
    assert all(len(f) <= CONTENT_LIMIT for f in files), "a file larger than the inspection buffer"
    if any(n == b"content-encoding" for n, _ in headers):
        return  # the checks below read the body as sent
    # every file is something a parser reads out of the body: never larger (a size rule holds)
    assert all(len(f) <= len(body) for f in files), "a file larger than the body it came from"
    media = next((v.split(b";")[0].strip().lower() for n, v in headers if n == b"content-type"), b"")
    if media == b"application/x-www-form-urlencoded":
        for separator in ("&", ";"):
            for name, value in parse_qsl(body.decode("latin-1"), keep_blank_values=True,
                                         encoding="latin-1", separator=separator):
                for text in (name, value):
                    decoded = text.encode("latin-1")
                    assert decoded in body or any(decoded in f for f in files), \
                        f"form field {decoded[:60]!r} decoded by urllib is in no file"
    elif body.lstrip()[:1] in (b"{", b"[") and not media.startswith(b"multipart/"):
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            return
        pending = [document]
        while pending:
            item = pending.pop()
            if isinstance(item, dict):
                pending.extend(item)
                pending.extend(item.values())
            elif isinstance(item, list):
                pending.extend(item)
            elif isinstance(item, str) and len(item) >= MIN_BASE64:
                try:
                    decoded = base64.b64decode(item, validate=True)
                except (binascii.Error, ValueError):
                    continue
                assert any(decoded in f for f in files), f"base64 string {item[:60]!r} is in no file"


TARGETS = {"policy": fuzz_policy, "tlog": fuzz_tlog, "http": fuzz_http, "upstream": fuzz_upstream,
           "dns": fuzz_dns, "content": fuzz_content}


# ---- mutation without atheris (CI) --------------------------------------------------------------

def mutate(rnd: random.Random, data: bytes, others: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randint(1, 6)):
        op = rnd.random()
        if op < 0.35 and b:
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        elif op < 0.5 and b:
            del b[rnd.randrange(len(b)):][: rnd.randint(1, 64)]
        elif op < 0.65:
            at = rnd.randrange(len(b) + 1)
            b[at:at] = rnd.choice((b"\0", b"\xff" * 4, b"\r\n", b":", b"\n- ", b"{", b"*", b"%s", b"\x80",
                                   bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 16)))))
        elif op < 0.8 and b:
            i, j = sorted(rnd.randrange(len(b) + 1) for _ in range(2))
            b[i:i] = b[i:j] * rnd.randint(1, 4)  # repeat a chunk
        elif others:
            other = rnd.choice(others)
            b = b[: rnd.randrange(len(b) + 1)] + bytearray(other[rnd.randrange(len(other) + 1):])
    return bytes(b)


def corpus(target: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((CORPUS / target).glob("*")) if p.is_file()]


def replay(target: str, mutations: int, seed: int = 20261130) -> dict:
    """Every corpus file, then `mutations` mutated inputs. Returns {"inputs": n}; raises on a bug
    (the message names the input as hex)."""
    fn, seeds = TARGETS[target], corpus(target)
    rnd = random.Random(seed)
    inputs = 0
    for data in seeds + [mutate(rnd, rnd.choice(seeds), seeds) for _ in range(mutations)]:
        try:
            fn(data)
        except Exception as e:
            raise AssertionError(f"{target} harness failed on input {data[:400].hex()}: {type(e).__name__}: {e}") from e
        inputs += 1
    return {"inputs": inputs}


def main() -> None:
    """python tests/fuzz/harnesses.py TARGET [libFuzzer flags, e.g. -runs=1000000] [corpus dirs]"""
    import atheris

    target = sys.argv.pop(1)
    # httpcodings.py stays uninstrumented: atheris 2.3 breaks its try/except loop (see its docstring).
    with atheris.instrument_imports(include=["skyguard"], exclude=["skyguard.httpcodings"]):
        import skyguard.content.http  # noqa: F401
        import skyguard.credproxy.http1  # noqa: F401
        import skyguard.credproxy.swap  # noqa: F401
        import skyguard.dns.resolver  # noqa: F401
        import skyguard.policy.parse  # noqa: F401
        import skyguard.tlog.verify  # noqa: F401
    atheris.Setup(sys.argv, TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
