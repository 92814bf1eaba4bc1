"""Bounded, allocation-light parsing of DNS wire messages: the proxy's only view of raw bytes.

It exists because the proxy must read hostile bytes (compression loops, lying counts, truncation)
without ever raising anything but WireError, and because the hot path (a query in, an answer out)
must not pay for a full object model. It parses headers, questions and resource-record positions,
and patches TTLs and IDs in place. It is not a DNS library: building test messages and rewriting
answers that need records removed is left to dnslib.
"""

from __future__ import annotations

import secrets
import struct
from typing import NamedTuple

HEADER_LEN = 12
MAX_NAME_LEN = 255  # RFC 1035 2.3.4, in wire octets
MAX_POINTER_HOPS = 32  # a legitimate name never needs more; a loop would need infinitely many
MAX_RECORDS = 512  # per message; a 64 KiB TCP message of minimal RRs holds ~5k, real ones < 100

QTYPE_A, QTYPE_NS, QTYPE_CNAME, QTYPE_SOA, QTYPE_NULL = 1, 2, 5, 6, 10
QTYPE_PTR, QTYPE_MX, QTYPE_TXT, QTYPE_AAAA, QTYPE_OPT, QTYPE_ANY = 12, 15, 16, 28, 41, 255
CLASS_IN = 1

RCODE_NOERROR, RCODE_FORMERR, RCODE_SERVFAIL, RCODE_NXDOMAIN = 0, 1, 2, 3
RCODE_NOTIMP, RCODE_REFUSED = 4, 5

FLAG_QR = 0x8000
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
OPCODE_MASK = 0x7800

QTYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 10: "NULL", 12: "PTR", 15: "MX", 16: "TXT",
               28: "AAAA", 33: "SRV", 41: "OPT", 65: "HTTPS", 64: "SVCB", 255: "ANY", 252: "AXFR",
               251: "IXFR", 99: "SPF", 257: "CAA"}
# The query types the proxy forwards: what real software asks (addresses, mail, services,
# DNSSEC, TLS and SSH keys, text). Any other type is refused: the type a VM picks reaches the
# upstream, so 65,536 of them would carry 16 bits a query past every name-based check.
SERVED_QTYPES = frozenset({
    1, 2, 5, 6, 10, 12, 13, 15, 16, 28, 29, 33, 35, 39, 43, 44, 46, 48, 52, 53, 61, 64, 65, 99,
    255, 256, 257})

_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_U16 = struct.Struct("!H")

# Label bytes a policy can name: letters, digits, hyphen, underscore (service labels such as
# _dmarc). Anything else (a dot inside a label, NUL, non-ASCII) could make two different wire
# names print as the same text and so fool a name-based policy: such queries are refused.
_LDH = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


class WireError(ValueError):
    """The bytes are not a DNS message this proxy accepts. Never escapes the resolver."""


def qtype_name(qtype: int) -> str:
    return QTYPE_NAMES.get(qtype, f"TYPE{qtype}")


# Header, Question and Record are NamedTuples, not frozen dataclasses: every query and answer
# builds several, and a NamedTuple is built in C (a frozen dataclass pays one object.__setattr__
# per field, ~1 us per record). They stay immutable.

class Header(NamedTuple):
    id: int
    flags: int
    qdcount: int
    ancount: int
    nscount: int
    arcount: int

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> 11

    @property
    def rcode(self) -> int:
        return self.flags & 0xF


def parse_header(buf: bytes) -> Header:
    if len(buf) < HEADER_LEN:
        raise WireError("shorter than a DNS header")
    return Header._make(_HEADER.unpack_from(buf, 0))


def read_name(buf: bytes, offset: int) -> tuple[list[bytes], int]:
    """Read a possibly compressed name at offset. Returns (labels, offset after the name in the
    original position). Pointers must point strictly backwards, which rules out loops; the hop
    count and total length are bounded as well."""
    labels: list[bytes] = []
    total = 1
    end_after: int | None = None
    hops = 0
    pos = offset
    n = len(buf)
    while True:
        if pos >= n:
            raise WireError("name runs past the end of the message")
        length = buf[pos]
        if length == 0:
            pos += 1
            break
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= n:
                raise WireError("truncated compression pointer")
            target = ((length & 0x3F) << 8) | buf[pos + 1]
            if end_after is None:
                end_after = pos + 2
            if target >= pos:
                raise WireError("compression pointer does not point backwards (loop)")
            if target < HEADER_LEN:
                raise WireError("compression pointer into the header")
            hops += 1
            if hops > MAX_POINTER_HOPS:
                raise WireError("too many compression pointers")
            pos = target
            continue
        if kind != 0:
            raise WireError("unsupported label type")
        if pos + 1 + length > n:
            raise WireError("label runs past the end of the message")
        total += length + 1
        if total > MAX_NAME_LEN:
            raise WireError("name longer than 255 octets")
        labels.append(buf[pos + 1:pos + 1 + length])
        pos += 1 + length
    return labels, (end_after if end_after is not None else pos)


def labels_to_text(labels: list[bytes]) -> str:
    """Lower-case dotted text of a name whose labels are all LDH; WireError otherwise."""
    for label in labels:
        if not _LDH.issuperset(label):
            raise WireError("name has characters a policy cannot name")
    return b".".join(labels).decode("ascii").lower()


# 0x20 in every ASCII letter's position, 0 elsewhere (length octets are <= 63: never letters)
_LETTER_BITS = bytes(0x20 if 65 <= b <= 90 or 97 <= b <= 122 else 0 for b in range(256))


_ENTROPY_CHUNK = 4096
_entropy = b""
_entropy_at = 0


def random_bytes(n: int) -> bytes:
    """n bytes from the OS's CSPRNG, fetched 4 KiB at a time: a getrandom(2) call per query
    costs ~3 us on a VM, on the path every answer waits on. (Bytes are never handed out twice
    by one thread; the proxy's parts share one event loop.)"""
    global _entropy, _entropy_at
    at = _entropy_at
    if at + n > len(_entropy):
        _entropy, at = secrets.token_bytes(max(_ENTROPY_CHUNK, n)), 0
    _entropy_at = at + n
    return _entropy[at:at + n]


def random_case(name: bytes) -> bytes:
    """name (wire form, uncompressed) with each ASCII letter in a random case, cryptographically
    random and independent of the case it came in (DNS 0x20, draft-vixie-dnsext-dns0x20)."""
    n = len(name)
    flips = int.from_bytes(name.translate(_LETTER_BITS), "big") \
        & int.from_bytes(random_bytes(n), "big")
    return (int.from_bytes(name.lower(), "big") ^ flips).to_bytes(n, "big")


def labels_key(labels: list[bytes]) -> bytes:
    """A case-insensitive comparison key for names of any bytes (used for answer owners)."""
    return b".".join(label.lower() for label in labels)


class Question(NamedTuple):
    labels: tuple[bytes, ...]
    qtype: int
    qclass: int
    end: int  # offset just after the question
    key: bytes  # labels_key() of the name: case-insensitive comparisons


def read_question(buf: bytes, offset: int = HEADER_LEN) -> Question:
    labels, pos = read_name(buf, offset)
    if pos + 4 > len(buf):
        raise WireError("question truncated")
    qtype, qclass = struct.unpack_from("!HH", buf, pos)
    return Question(tuple(labels), qtype, qclass, pos + 4, labels_key(labels))


class Record(NamedTuple):
    section: int  # 0 answer, 1 authority, 2 additional
    owner: bytes  # labels_key() of the owner name
    rtype: int
    rclass: int
    ttl: int  # 0 for one with the top bit set (RFC 2181 section 8); the wire keeps what came
    ttl_offset: int
    rdata_offset: int
    rdlength: int


def read_records(buf: bytes, header: Header, offset: int) -> list[Record]:
    """Positions of every record after the question. Raises WireError on any inconsistency."""
    counts = (header.ancount, header.nscount, header.arcount)
    if sum(counts) > MAX_RECORDS:
        raise WireError("too many records")
    records: list[Record] = []
    pos = offset
    n = len(buf)
    for section, count in enumerate(counts):
        for _ in range(count):
            labels, pos = read_name(buf, pos)
            if pos + 10 > n:
                raise WireError("record header truncated")
            rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(buf, pos)
            if ttl & 0x80000000 and rtype != QTYPE_OPT:  # RFC 2181 section 8: read as zero (OPT's
                ttl = 0  # "TTL" is its extended RCODE and flags)
            rdata = pos + 10
            if rdata + rdlength > n:
                raise WireError("record data truncated")
            records.append(Record(section, labels_key(labels), rtype, rclass, ttl, pos + 4, rdata,
                                  rdlength))
            pos = rdata + rdlength
    return records


def edns_payload_size(buf: bytes, records: list[Record]) -> int | None:
    """The requester's UDP payload size from its OPT record, if any (class field of OPT)."""
    for record in records:
        if record.section == 2 and record.rtype == QTYPE_OPT:
            return record.rclass
    return None


def with_id(buf: bytes, new_id: int) -> bytes:
    return _U16.pack(new_id) + buf[2:]


def error_reply(query: bytes, rcode: int, question_end: int | None) -> bytes:
    """A reply to query carrying rcode and only the question (or nothing if it could not be
    parsed). RD is echoed, RA is set: we are the VM's recursive resolver."""
    header = parse_header(query)
    flags = FLAG_QR | (header.flags & (OPCODE_MASK | FLAG_RD)) | FLAG_RA | (rcode & 0xF)
    if question_end is None:
        return _HEADER.pack(header.id, flags, 0, 0, 0, 0)
    return _HEADER.pack(header.id, flags, 1, 0, 0, 0) + query[HEADER_LEN:question_end]


def truncated_reply(reply: bytes, question_end: int) -> bytes:
    """The header and question of reply with TC set, for a UDP client whose buffer is too small:
    it will retry over TCP, which the steering also sends to us."""
    header = parse_header(reply)
    flags = header.flags | FLAG_TC
    return _HEADER.pack(header.id, flags, 1, 0, 0, 0) + reply[HEADER_LEN:question_end]


def without_records(reply: bytes, indexes: list[int]) -> bytes:
    """Slow path (rare): drop records by their index over all sections (answer, authority,
    additional, in wire order) and re-encode with dnslib, because removing bytes in place would
    break compression pointers into the removed records."""
    from dnslib import DNSRecord  # imported here: the fast path never needs it

    record = DNSRecord.parse(reply)
    drop = set(indexes)
    sections = (record.rr, record.auth, record.ar)
    position = 0
    kept = []
    for section in sections:
        kept.append([rr for i, rr in enumerate(section, position) if i not in drop])
        position += len(section)
    record.rr, record.auth, record.ar = kept
    record.header.a, record.header.auth, record.header.ar = (len(x) for x in kept)
    return record.pack()
