"""The lab's authoritative DNS answers for `.test`, as a dnslib resolver that does no I/O.

Every name strictly under `.test` gets one A and one AAAA derived from the name
(addressing.addresses_for_name), for ANSWER_TTL seconds, or N seconds for a name whose first label
is `ttlN` (`ttl5.cdn.test`: tests of how TTLs are honoured); anything else is NXDOMAIN. This is the sealed internet's DNS,
not skyguard's DNS proxy (skyguard/dns), which forwards to it.

Thread safety: `resolve` keeps no state, so any number of transport threads may call it.
"""

from __future__ import annotations

import re

from dnslib import AAAA, QTYPE, RCODE, RR, SOA, A, DNSRecord

from skyguard.lab.addressing import TEST_DOMAIN, addresses_for_name, is_test_name, normalize_name

ANSWER_TTL = 300
NEGATIVE_TTL = 60
_TTL_LABEL = re.compile(r"ttl([0-9]{1,5})")


def answer_ttl(name: str) -> int:
    """The TTL of `name`'s addresses: N for a first label `ttlN`, else ANSWER_TTL."""
    chosen = _TTL_LABEL.fullmatch(normalize_name(name).split(".", 1)[0])
    return int(chosen.group(1)) if chosen else ANSWER_TTL


class LabResolver:
    """dnslib's resolver interface (`resolve(request, handler)`), usable without any server."""

    def resolve(self, request: DNSRecord, handler=None) -> DNSRecord:
        reply = request.reply()  # copies id and question, sets QR, AA and RD as asked
        reply.header.ra = 0  # authoritative only: no recursion offered
        if not request.questions:
            reply.header.rcode = RCODE.FORMERR
            return reply
        question = request.q
        qname = str(question.qname)
        name = normalize_name(qname)
        in_zone = name == TEST_DOMAIN or name.endswith("." + TEST_DOMAIN)
        if not in_zone:
            # The sealed internet has no other names: NXDOMAIN, so lookups fail fast and plainly.
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if name == TEST_DOMAIN:
            if question.qtype in (QTYPE.SOA, QTYPE.ANY):
                reply.add_answer(self._soa())
            else:
                reply.add_auth(self._soa())
            return reply
        if not is_test_name(name):
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(self._soa())
            return reply
        v4, v6 = addresses_for_name(name)
        ttl = answer_ttl(name)
        if question.qtype in (QTYPE.A, QTYPE.ANY):
            reply.add_answer(RR(qname, QTYPE.A, rdata=A(str(v4)), ttl=ttl))
        if question.qtype in (QTYPE.AAAA, QTYPE.ANY):
            reply.add_answer(RR(qname, QTYPE.AAAA, rdata=AAAA(str(v6)), ttl=ttl))
        if not reply.rr:
            reply.add_auth(self._soa())  # NODATA: the name exists, this type does not
        return reply

    @staticmethod
    def _soa() -> RR:
        return RR(TEST_DOMAIN + ".", QTYPE.SOA, ttl=NEGATIVE_TTL,
                  rdata=SOA("ns.lab.test.", "hostmaster.lab.test.",
                            (1, 3600, 600, 86400, NEGATIVE_TTL)))

    def answer_bytes(self, query: bytes) -> bytes | None:
        """Wire in, wire out; None for a packet that is not a DNS query (dropped, not answered)."""
        try:
            request = DNSRecord.parse(query)
        except Exception:  # dnslib raises several types on garbage; a server must not die on it
            return None
        if request.header.qr:
            return None
        return self.resolve(request).pack()
