"""The lab's authoritative `.test` resolver, without sockets (sans-io)."""

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from skyguard.lab.addressing import addresses_for_name
from skyguard.lab.dns import LabResolver


def ask(name, qtype):
    return DNSRecord.parse(LabResolver().answer_bytes(DNSRecord.question(name, qtype).pack()))


def test_a_and_aaaa_are_the_deterministic_addresses():
    v4, v6 = addresses_for_name("deb.debian.test")
    a = ask("deb.debian.test", "A")
    assert a.header.rcode == RCODE.NOERROR and a.header.aa == 1
    assert [str(r.rdata) for r in a.rr] == [str(v4)]
    assert [str(r.rdata) for r in ask("DEB.debian.test.", "AAAA").rr] == [str(v6)]
    assert sorted(QTYPE[r.rtype] for r in ask("deb.debian.test", "ANY").rr) == ["A", "AAAA"]


@pytest.mark.parametrize("name, ttl", [("deb.debian.test", 300), ("ttl5.cdn.test", 5), ("TTL0.cdn.test.", 0),
                                       ("cdn.ttl5.test", 300), ("ttl5x.cdn.test", 300)])
def test_a_first_label_ttl_n_sets_the_answers_ttl(name, ttl):
    reply = ask(name, "ANY")
    assert [r.ttl for r in reply.rr] == [ttl, ttl]
    assert [str(r.rdata) for r in reply.rr] == [str(a) for a in addresses_for_name(name)]


@pytest.mark.parametrize("name", ["example.com", "test.example", "localhost"])
def test_names_outside_test_are_nxdomain(name):
    reply = ask(name, "A")
    assert reply.header.rcode == RCODE.NXDOMAIN and not reply.rr


def test_other_types_of_a_test_name_are_nodata_with_soa():
    reply = ask("foo.test", "MX")
    assert reply.header.rcode == RCODE.NOERROR and not reply.rr
    assert QTYPE[reply.auth[0].rtype] == "SOA"


@pytest.mark.parametrize("garbage", [b"", b"\x00", b"\xff" * 40])
def test_garbage_gets_no_answer(garbage):
    assert LabResolver().answer_bytes(garbage) is None


def test_a_response_is_not_answered():
    response = DNSRecord.question("foo.test").reply().pack()
    assert LabResolver().answer_bytes(response) is None
