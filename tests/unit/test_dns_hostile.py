"""Hostile queries and upstream replies: each case must give the stated rcode or a silent drop,
and never an exception. Plus a property test over random and mutated bytes (a fixed-seed corpus
in CI; SKYGUARD_FUZZ_EXAMPLES=1000000 runs the million-input tier)."""

from __future__ import annotations

import os
import struct

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skyguard.dns import wire
from tests.unit.test_dns_resolver import VM_IP, make_resolver, upstream_reply


def header(id=0x1234, flags=0x0100, qd=1, an=0, ns=0, ar=0) -> bytes:
    return struct.pack("!HHHHHH", id, flags, qd, an, ns, ar)


def qname(*labels: bytes) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


GOOD_Q = qname(b"deb", b"debian", b"test") + struct.pack("!HH", 1, 1)

HOSTILE_QUERIES = [
    # (description, bytes, expected rcode or None for drop)
    ("empty", b"", None),
    ("shorter than a header", b"\x12\x34\x01", None),
    ("header only, qdcount 1", header(), RCODE.FORMERR),
    ("a response, not a query", header(flags=0x8180) + GOOD_Q, None),
    ("opcode STATUS", header(flags=0x1100) + GOOD_Q, RCODE.NOTIMP),
    ("opcode UPDATE", header(flags=0x2800) + GOOD_Q, RCODE.NOTIMP),
    ("no question", header(qd=0), RCODE.FORMERR),
    ("two questions", header(qd=2) + GOOD_Q + GOOD_Q, RCODE.FORMERR),
    ("huge counts", header(qd=65535, an=65535, ns=65535, ar=65535) + GOOD_Q, RCODE.FORMERR),
    ("answer records in a query", header(an=1) + GOOD_Q, RCODE.FORMERR),
    ("lying additional count", header(ar=2) + GOOD_Q, RCODE.FORMERR),
    ("question truncated in the name", header() + b"\x03deb\x06deb", RCODE.FORMERR),
    ("question without type/class", header() + qname(b"deb", b"debian", b"test"), RCODE.FORMERR),
    ("compression pointer to itself", header() + b"\xc0\x0c" + struct.pack("!HH", 1, 1),
     RCODE.FORMERR),
    ("compression loop of two", header() + b"\x01a\xc0\x0e\xc0\x0c" + struct.pack("!HH", 1, 1),
     RCODE.FORMERR),
    ("forward pointer", header() + b"\xc0\x20" + b"\x00" * 30, RCODE.FORMERR),
    ("pointer into the header", header() + b"\xc0\x02" + struct.pack("!HH", 1, 1), RCODE.FORMERR),
    ("extended label type", header() + b"\x41abc\x00" + struct.pack("!HH", 1, 1), RCODE.FORMERR),
    ("name longer than 255", header() + qname(*[b"a" * 63] * 5) + struct.pack("!HH", 1, 1),
     RCODE.FORMERR),
    ("class CHAOS", header() + qname(b"version", b"bind") + struct.pack("!HH", 16, 3),
     RCODE.REFUSED),
    ("class ANY", header() + qname(b"deb", b"debian", b"test") + struct.pack("!HH", 1, 255),
     RCODE.REFUSED),
    ("dot inside a label", header() + qname(b"deb.debian", b"test") + struct.pack("!HH", 1, 1),
     RCODE.REFUSED),
    ("NUL inside a label", header() + qname(b"deb\x00", b"debian", b"test")
     + struct.pack("!HH", 1, 1), RCODE.REFUSED),
    ("non-ASCII label", header() + qname("dé".encode(), b"debian", b"test")
     + struct.pack("!HH", 1, 1), RCODE.REFUSED),
    ("root name", header() + b"\x00" + struct.pack("!HH", 1, 1), RCODE.REFUSED),
    ("AXFR", header() + qname(b"deb", b"debian", b"test") + struct.pack("!HH", 252, 1),
     RCODE.REFUSED),
    ("OPT as question type", header() + qname(b"deb", b"debian", b"test")
     + struct.pack("!HH", 41, 1), RCODE.REFUSED),
    ("truncated OPT record", header(ar=1) + GOOD_Q + b"\x00\x00\x29", RCODE.FORMERR),
    ("64 KiB of garbage after a query", header() + GOOD_Q + b"\xff" * 65000, None),  # forwarded
]


@pytest.mark.parametrize("description,query,rcode", HOSTILE_QUERIES,
                         ids=[c[0] for c in HOSTILE_QUERIES])
def test_hostile_query(description, query, rcode):
    resolver, learner, log = make_resolver()
    decision = resolver.decide(query, VM_IP)
    if description.startswith("64 KiB"):
        # trailing bytes are ignored, but they are not forwarded either
        assert decision.action == "forward" and len(decision.upstream_query) < 100
        return
    if rcode is None:
        assert decision.action == "drop"
        return
    assert decision.action == "reply"
    reply = DNSRecord.parse(decision.reply)
    assert reply.header.rcode == rcode
    assert reply.header.id == 0x1234
    assert learner.calls == []


def _forwarded():
    resolver, learner, log = make_resolver()
    decision = resolver.decide(DNSRecord.question("deb.debian.test").pack(), VM_IP)
    assert decision.action == "forward"
    return resolver, learner, decision


def _reply_header(decision, flags=0x8180, qd=1, an=1, ns=0, ar=0):
    return struct.pack("!HHHHHH", decision.upstream_id, flags, qd, an, ns, ar)


def test_hostile_upstream_replies_never_raise_and_never_learn():
    resolver, learner, d = _forwarded()
    q = d.upstream_query[12:d.question.end]  # our question as asked (its random letter case)
    assert q.lower() == qname(b"deb", b"debian", b"test") + struct.pack("!HH", 1, 1)
    cases = [
        _reply_header(d) + q,  # answer count lies
        _reply_header(d) + q + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4),  # rdata missing
        _reply_header(d) + q + b"\xc0\x40" + struct.pack("!HHIH", 1, 1, 60, 4) + b"\x01" * 4,
        _reply_header(d, an=60000) + q,
        _reply_header(d) + q + b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 60, 2) + b"\xc0\x7f",
    ]
    for case in cases:
        answer = resolver.answer(d, case)
        assert answer is not None
        assert DNSRecord.parse(answer.reply).header.rcode == RCODE.SERVFAIL
    assert learner.calls == []


def test_cname_loop_in_answer_terminates():
    resolver, learner, d = _forwarded()
    up = upstream_reply(d.upstream_query, [
        RR("deb.debian.test", QTYPE.CNAME, rdata=__import__("dnslib").CNAME("a.test")),
        RR("a.test", QTYPE.CNAME, rdata=__import__("dnslib").CNAME("deb.debian.test")),
        RR("a.test", QTYPE.A, rdata=A("203.0.113.5"))])
    assert resolver.answer(d, up).learned == ["203.0.113.5"]


FUZZ_EXAMPLES = int(os.environ.get("SKYGUARD_FUZZ_EXAMPLES", "300"))
SEEDS = [DNSRecord.question(n, t).pack() for n, t in
         [("deb.debian.test", "A"), ("x.cdn.test", "AAAA"), ("evil.test", "TXT")]]


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=FUZZ_EXAMPLES <= 1000,
          suppress_health_check=list(HealthCheck))
@given(seed=st.sampled_from(SEEDS), flips=st.lists(st.tuples(st.integers(0, 80),
                                                              st.integers(0, 255)), max_size=6),
       tail=st.binary(max_size=40), cut=st.integers(0, 80))
def test_fuzz_queries_never_raise(seed, flips, tail, cut):
    resolver, _, _ = make_resolver()
    data = bytearray(seed[:max(cut, 1)] if cut < len(seed) else seed + tail)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    decision = resolver.decide(bytes(data), VM_IP)
    assert decision.action in ("reply", "forward", "drop")
    if decision.action == "reply":
        wire.parse_header(decision.reply)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=FUZZ_EXAMPLES <= 1000,
          suppress_health_check=list(HealthCheck))
@given(flips=st.lists(st.tuples(st.integers(0, 120), st.integers(0, 255)), max_size=6),
       cut=st.integers(12, 120))
def test_fuzz_upstream_replies_never_raise(flips, cut):
    resolver, _, d = _forwarded()
    good = bytearray(upstream_reply(d.upstream_query, [
        RR("deb.debian.test", QTYPE.A, rdata=A("203.0.113.7"))])[:cut])
    for pos, value in flips:
        if pos < len(good) and pos > 1:  # keep the ID so the reply is considered at all
            good[pos] = value
    answer = resolver.answer(d, bytes(good))
    assert answer is None or answer.truncated or wire.parse_header(answer.reply)
