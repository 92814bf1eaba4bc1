"""The fuzz regression corpus in CI: every input in tests/fuzz/corpus/<target>/ (seeds and inputs
that once found new coverage or a bug) plus MUTATIONS deterministic mutations of them, through
the harnesses of tests/fuzz/harnesses.py: policy YAML, signed-log files, HTTP requests into the
credential proxy's swap engine and upstream responses into its reader, DNS messages into the
DNS proxy, request bodies into the content filter. The fuzz tier runs a million atheris inputs per target."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))

import harnesses  # noqa: E402

MUTATIONS = {"policy": 300, "tlog": 300, "http": 3000, "upstream": 3000, "dns": 3000, "content": 3000}


@pytest.mark.parametrize("target", sorted(harnesses.TARGETS))
def test_corpus_and_mutations_do_not_break_the_parsers(target):
    assert harnesses.corpus(target), f"tests/fuzz/corpus/{target}/ is empty"
    result = harnesses.replay(target, MUTATIONS[target])
    assert result["inputs"] == len(harnesses.corpus(target)) + MUTATIONS[target]


def test_the_http_harness_catches_a_leak():
    """The oracle is not blind: a swap engine that forwarded a request carrying the real secret
    would be reported."""
    from skyguard.credproxy.swap import HttpRequest, Verdict

    req = HttpRequest(b"GET", b"/", ((b"host", b"api.github.test"), (b"x", harnesses.REAL_SECRET)))
    with pytest.raises(AssertionError):
        harnesses._check_verdict(req, Verdict("pass", 0, "", req))


def test_the_http_harness_catches_a_parser_that_reads_more_than_h11():
    """The differential oracle is not blind: a reader that saw a header h11 does not, or that
    accepted bytes whose canonical form h11 refuses, would be reported."""
    import dataclasses

    data = b"GET /x HTTP/1.1\r\nHost: api.github.test\r\n\r\n"
    [request] = harnesses._proxy_requests([data])
    harnesses._check_against_h11(data, [request])
    forged = dataclasses.replace(request, headers=request.headers + ((b"x-smuggled", b"1"),))
    with pytest.raises(AssertionError):
        harnesses._check_against_h11(data, [forged])
    refused = b"GET /x HTTP/1.1\r\nHost: api.github.test\r\nBad Name: 1\r\n\r\n"
    unreadable = dataclasses.replace(request, headers=request.headers + ((b"bad name", b"1"),))
    with pytest.raises(AssertionError):
        harnesses._check_against_h11(refused, [unreadable])


def test_the_upstream_harness_catches_a_scrubber_that_lets_the_secret_through(monkeypatch):
    class Leaky:  # hands the response back untouched
        def scrub_response(self, host, headers, body):
            return headers, body, 0

    echo = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(harnesses.REAL_SECRET), harnesses.REAL_SECRET)
    harnesses.fuzz_upstream(b"\x00" + echo)  # the real engine scrubs it
    monkeypatch.setattr(harnesses, "_swap_engine", Leaky)
    with pytest.raises(AssertionError):
        harnesses.fuzz_upstream(b"\x00" + echo)
