"""The DNS policy engine: what to do with one query from one VM, and what to release of one
upstream answer. Sans-io: it never touches a socket or the clock on its own (time is passed in);
the server (server.py) moves bytes and calls it.

Flow: `decide(query, client_ip, now)` parses the query (hostile input gives FORMERR, REFUSED or a
silent drop, never an exception), finds the VM's workload and zone, runs tunnelling detection,
applies the zone's FQDN rules (a deny rule naming the name beats any allow) and returns a
Decision: reply these bytes, drop, or forward this upstream query. For a forward,
`answer(decision, upstream_reply, now)` checks the reply matches (ID, question), clamps TTLs,
follows the CNAME chain inside the answer (refused whole if a deny rule of the zone names a name
in it) and strips every record outside it (and every A/AAAA the question's type did not ask
for: ADDRESS_TYPES_ASKED), strips rebinding addresses (rebinding.py: loopback, link-local,
metadata, the host's own, and private ranges unless the rule says allow_private) unless a rule
names their network, caps addresses per name, logs the decision, and only then learns (the
Learner, synchronously: learning.py) and returns the bytes to release. If the log refuses the
entry or the Learner raises, the VM gets SERVFAIL and nothing else: fail closed; if the log
refuses the queued entry after the answer left, learning.py takes back what it opened.

An allowed question the VM's answer cache (answercache.py) holds is not forwarded: decide()
returns a forward whose `cached` reply the server feeds to answer() at once, so a hit takes the
same path (policy re-check, learning, logging) as an upstream reply, with TTLs aged. A miss for
a name the VM asked before is charged to its re-ask budget (tunnel.py); past it, the expired
entry answers (serve-stale) or no records do (NODATA). Not a recursive resolver or transport.
One event loop owns one (not thread-safe).
"""

from __future__ import annotations

import ipaddress
import secrets
import struct
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from skyguard.dns import rebinding, wire
from skyguard.dns.answercache import AnswerCache
from skyguard.dns.interfaces import DecisionLog, Learner, WorkloadDirectory
from skyguard.dns.learned import MAX_IPS_PER_NAME, LearnedStore
from skyguard.dns.learning import Learning
from skyguard.dns.metrics import DnsMetrics
from skyguard.dns.names import pattern_matches
from skyguard.dns.tunnel import TunnelDetector, Verdict
from skyguard.errors import LogError
from skyguard.parts import NullLog
from skyguard.policy.model import Policy, Rule

LEARN_GRACE_SECONDS = 2  # datapath entries outlive the VM's cached answer by this much, so a VM
# that connects right at the end of its TTL is not dropped by a race with our own expiry
MAX_CNAME_CHAIN = 16  # links followed inside one answer
# The address records a question may learn, by question type. ANY asks for every type, so it
# learns what an A and an AAAA question for the same name would; every other type learns nothing.
ADDRESS_TYPES_ASKED = {wire.QTYPE_A: (wire.QTYPE_A,), wire.QTYPE_AAAA: (wire.QTYPE_AAAA,),
                       wire.QTYPE_ANY: (wire.QTYPE_A, wire.QTYPE_AAAA)}
UPSTREAM_EDNS_SIZE = 1232  # the DNS flag day 2020 value: avoids IP fragmentation upstream
MATCH_CACHE_SIZE = 65536  # (zone, name) policy verdicts remembered until the next policy swap
MAX_ADDITIONAL = 2  # OPT and maybe TSIG; more is not a real client's query
_OPT_FIXED = struct.Struct("!BHHIH")  # root name, type OPT, class = payload size, ttl, rdlen
_ADDRESS = (wire.QTYPE_A, wire.QTYPE_AAAA)
_TTL = struct.Struct("!I")


@dataclass
class Decision:
    action: Literal["reply", "forward", "drop"]
    verdict: str  # allowed, refused, denied, tunnel, formerr, unknown-client, notimp, dropped
    reason: str = ""
    reply: bytes = b""  # for action == "reply"
    upstream_query: bytes = b""  # for action == "forward"
    upstream_id: int = 0
    client_id: int = 0
    question: wire.Question | None = None
    name: str = ""
    qtype: int = 0
    workload: str = ""
    zone: str = ""
    client_ip: str = ""
    rules: tuple[Rule, ...] = ()
    max_udp: int = 512  # the client's UDP buffer (EDNS payload size or 512)
    tunnel: Verdict | None = None
    started: float = 0.0
    policy: Policy | None = None  # the policy a forward was decided under (answer() re-checks)
    # For a forward: the client's question as the VM wrote it (its letter case), uncompressed;
    # what its answer carries, while upstream_query asks it in a random case (DNS 0x20).
    client_question: bytes = b""
    cached: bytes = b""  # for a forward: the cached upstream reply to answer() with, if a hit


@dataclass
class Answer:
    """Result of feeding one upstream reply to answer()."""

    reply: bytes = b""  # bytes to release to the VM (empty if truncated)
    truncated: bool = False  # upstream set TC: retry over TCP
    learned: list[str] = field(default_factory=list)
    stripped: list[str] = field(default_factory=list)  # rebinding targets removed
    denied: list[str] = field(default_factory=list)  # addresses a deny rule names, removed
    unrelated: int = 0  # records removed: outside the CNAME chain, or addresses not asked for
    ttl: int = 0
    # A new address was learned under a decision on record already: on disk before this reply
    # is released, so a restart right after still re-learns it (the server writes it off the
    # loop). Under a queued entry it is saved once the entry is durable (learning.py).
    persist: bool = False


class DnsPolicyResolver:
    def __init__(self, policy: Policy, directory: WorkloadDirectory, learner: Learner,
                 log: DecisionLog | None = None, metrics: DnsMetrics | None = None,
                 store: LearnedStore | None = None, host_addresses=(),
                 detector: TunnelDetector | None = None):
        self.directory = directory
        self.log = log if log is not None else NullLog()
        self.metrics = metrics if metrics is not None else DnsMetrics()
        self.store = store if store is not None else LearnedStore(None)
        self.learning = Learning(learner, self.store, self.metrics)
        self.set_host_addresses(host_addresses)
        self.detector = detector if detector is not None else TunnelDetector()
        self._children: dict[tuple[str, str], tuple] = {}
        self.cache = AnswerCache(self.metrics)
        self.set_policy(policy)

    @property
    def learner(self) -> Learner:
        return self.learning.learner

    def set_host_addresses(self, host_addresses) -> None:
        """The host's own addresses (rebinding targets: never learned unless a rule names them)."""
        self.host_addresses = frozenset(ipaddress.ip_address(a) for a in host_addresses)
        self._host_keys = rebinding.host_keys(self.host_addresses)

    def set_policy(self, policy: Policy) -> None:
        """Swap the policy (hot reload). Queries already forwarded keep their upstreams; their
        answers are decided again under this policy (answer()): nothing it disallows is learned."""
        self.policy = policy
        self.dns = policy.dns
        self.cache.expire_all()  # the old upstreams' answers: only served stale (answercache.py)
        self.refuse_rcode = wire.RCODE_NXDOMAIN if policy.dns.refuse_with == "nxdomain" \
            else wire.RCODE_REFUSED
        self._fqdn_rules: dict[str, tuple[list[Rule], list[Rule]]] = {}
        self._match_cache: dict[tuple[str, str], tuple[str, str, tuple[Rule, ...]]] = {}
        # Per allow rule: the networks it names. An address in them may be learned for that
        # rule's names even if it looks like rebinding (the operator said so). A default route
        # (0.0.0.0/0, "internet") names everything and so whitelists nothing here.
        self._named_networks: dict[str, list] = {}
        for r in policy.rules:
            if r.action == "allow":
                named = list(r.to.cidrs)
                for network_name in r.to.networks:
                    named.extend(policy.networks.get(network_name, ()))
                self._named_networks[r.name] = [n for n in named if n.prefixlen > 0]
        # Per zone: networks a deny rule names. An allowed name's address in them is not learned
        # (the datapath would deny the flow anyway; it would only add a confusing log line).
        self._denied_networks: dict[str, list] = {}
        for zone in policy.zones:
            denied: list = []
            for r in policy.rules:
                if zone in r.from_zones and r.action == "deny":
                    denied.extend(r.to.cidrs)
                    for network_name in r.to.networks:
                        denied.extend(policy.networks.get(network_name, ()))
            self._denied_networks[zone] = denied
        for zone in policy.zones:
            denies = [r for r in policy.rules if zone in r.from_zones and r.to.fqdns
                      and r.action == "deny"]
            allows = [r for r in policy.rules if zone in r.from_zones and r.to.fqdns
                      and r.action == "allow"]
            self._fqdn_rules[zone] = (denies, allows)

    # ---- queries -------------------------------------------------------------------------

    def decide(self, query: bytes, client_ip: str, now: float | None = None) -> Decision:
        now = time.monotonic() if now is None else now
        query = bytes(query)
        try:
            decision = self._decide(query, client_ip, now)
        except wire.WireError as e:  # defensive: _decide handles its own, this is a backstop
            decision = Decision("drop", "dropped", f"malformed: {e}")
        decision.client_ip = client_ip
        decision.started = now
        if decision.action != "forward":
            self._account(decision)
        return decision

    def _decide(self, query: bytes, client_ip: str, now: float) -> Decision:
        try:
            header = wire.parse_header(query)
        except wire.WireError:
            return Decision("drop", "dropped", "shorter than a DNS header")
        if header.flags & wire.FLAG_QR:
            return Decision("drop", "dropped", "a response, not a query")
        if header.opcode != 0:
            return self._error(query, wire.RCODE_NOTIMP, None, "notimp",
                               f"opcode {header.opcode} is not QUERY")
        if header.qdcount != 1:
            return self._error(query, wire.RCODE_FORMERR, None, "formerr",
                               f"{header.qdcount} questions (exactly one is allowed)")
        if header.ancount or header.nscount or header.arcount > MAX_ADDITIONAL:
            return self._error(query, wire.RCODE_FORMERR, None, "formerr",
                               "records in the answer or authority section of a query")
        try:
            question = wire.read_question(query)
        except wire.WireError as e:
            return self._error(query, wire.RCODE_FORMERR, None, "formerr", str(e))
        try:
            extra = wire.read_records(query, header, question.end)
        except wire.WireError as e:
            return self._error(query, wire.RCODE_FORMERR, question.end, "formerr", str(e))
        edns = wire.edns_payload_size(query, extra)
        max_udp = max(512, min(edns, 4096)) if edns is not None else 512
        qtype = question.qtype
        if question.qclass != wire.CLASS_IN:
            return self._error(query, wire.RCODE_REFUSED, question.end, "refused",
                               f"class {question.qclass} is not IN")
        if qtype not in wire.SERVED_QTYPES:  # its 16 bits would reach the upstream unchecked
            return self._error(query, wire.RCODE_REFUSED, question.end, "refused",
                               f"query type {wire.qtype_name(qtype)} is not served")
        try:
            name = wire.labels_to_text(list(question.labels))
        except wire.WireError as e:
            return self._error(query, wire.RCODE_REFUSED, question.end, "refused", str(e))
        who = self.directory.lookup(client_ip)
        if who is None:
            d = self._error(query, wire.RCODE_REFUSED, question.end, "unknown-client", "source address belongs to no workload")
            d.name, d.qtype = name, qtype
            return d
        workload, zone = who
        base: dict[str, Any] = dict(question=question, name=name, qtype=qtype, workload=workload, zone=zone,
                                    client_id=header.id, max_udp=max_udp)

        tunnel = None
        flags = header.flags & (wire.FLAG_RD | 0x0010)  # keep RD and CD, nothing else
        action = self.dns.tunnel_detection.action
        if action != "off":
            tunnel = self.detector.observe(workload, list(question.labels), qtype, now, action == "block", flags == wire.FLAG_RD)
            if tunnel.detected:
                self.metrics.detections.labels(zone, action).inc()
            if action == "block" and (tunnel.detected or tunnel.flagged):
                reason = "tunnelling detected" if tunnel.detected else \
                    f"base domain {tunnel.base} flagged for tunnelling"
                return self._refuse(query, "tunnel", reason, tunnel=tunnel, **base)

        verdict, reason, matching = self._match(zone, name)
        if verdict != "allowed":
            self.detector.refund(workload, tunnel)  # nothing of it leaves: not charged (tunnel.py)
            return self._refuse(query, verdict, reason, tunnel=tunnel, **base)
        if not self.dns.upstreams:  # validate refuses FQDN rules without upstreams: a backstop
            return self._refuse(query, "refused", "the policy has no dns.upstreams",
                                tunnel=tunnel, **base)
        upstream_id = secrets.randbits(16)
        upstream = struct.pack("!HHHHHH", upstream_id, flags, 1, 0, 0, 1 if edns else 0)
        # The client's question is what the VM gets back; upstream, its name goes in a case of
        # our choosing. It is never compressed: a pointer must lead back to a name's end, and
        # nothing before it in a question of letters, digits and hyphens can be one.
        client_question = query[wire.HEADER_LEN:question.end]
        # DNS 0x20: a random letter case the reply must echo (answer()), on top of the ID and
        # the source port: each letter doubles a blind spoofer's guesses; the VM's case is moot.
        upstream += wire.random_case(client_question[:-4]) + client_question[-4:]
        if edns is not None:
            upstream += _OPT_FIXED.pack(0, wire.QTYPE_OPT, UPSTREAM_EDNS_SIZE, 0, 0)
        decision = Decision("forward", "allowed", reason, upstream_query=upstream,
                            upstream_id=upstream_id, rules=matching, tunnel=tunnel,
                            policy=self.policy, client_question=client_question, **base)
        hit = self.cache.lookup((workload, zone), AnswerCache.key(question, upstream), now)
        if hit is None and tunnel is not None and not tunnel.new_name and \
                not self.detector.charge_reask(workload, qtype, flags == wire.FLAG_RD, now):
            self.metrics.reasks_over_budget.labels(zone, action).inc()
            if action == "block":  # nothing more leaves: the expired answer, or no records (NODATA,
                # kinder than REFUSED: a stub asking A and AAAA still uses the one it gets)
                hit = self.cache.lookup_stale((workload, zone), AnswerCache.key(question, upstream), now)
                if hit is None:
                    return Decision("reply", "tunnel", "re-asks over the VM's budget: no records", tunnel=tunnel,
                                    reply=wire.error_reply(query, wire.RCODE_NOERROR, question.end), **base)
                decision.reason += " (stale: re-asks over the VM's budget)"
        if hit is not None:  # the reply and the upstream query it matched (ID and case)
            decision.cached, decision.upstream_query = hit
            decision.upstream_id = wire.parse_header(decision.upstream_query).id
        return decision

    def _match(self, zone: str, name: str) -> tuple[str, str, tuple[Rule, ...]]:
        """(verdict, reason, allow rules naming it) for name in zone; cached per policy."""
        hit = self._match_cache.get((zone, name))
        if hit is not None:
            return hit
        denies, allows = self._fqdn_rules.get(zone, ((), ()))
        result: tuple[str, str, tuple[Rule, ...]] | None = None
        for rule in denies:
            if any(pattern_matches(p, name) for p in rule.to.fqdns):
                result = ("denied", f"deny rule {rule.name}", ())
                break
        if result is None:
            matching = tuple(r for r in allows
                             if any(pattern_matches(p, name) for p in r.to.fqdns))
            result = ("allowed", f"rule {matching[0].name}", matching) if matching else \
                ("refused", "no rule of the zone names it", ())
        if len(self._match_cache) >= MATCH_CACHE_SIZE:
            self._match_cache.clear()  # bounded: random names cannot grow it without limit
        self._match_cache[(zone, name)] = result
        return result

    def _error(self, query, rcode, question_end, verdict, reason) -> Decision:
        return Decision("reply", verdict, reason, reply=wire.error_reply(query, rcode, question_end))

    def _refuse(self, query, verdict, reason, **fields) -> Decision:
        reply = wire.error_reply(query, self.refuse_rcode, fields["question"].end)
        return Decision("reply", verdict, reason, reply=reply, **fields)

    # ---- answers -------------------------------------------------------------------------

    def answer(self, decision: Decision, reply: bytes, now: float | None = None,
               wall: float | None = None) -> Answer | None:
        """Process an upstream reply. None: it does not belong to this query (wrong ID or
        question) and must be ignored; keep waiting for the real one."""
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        reply = bytes(reply)
        try:
            header = wire.parse_header(reply)
            if header.flags & wire.FLAG_QR and header.flags & wire.FLAG_TC \
                    and header.id == decision.upstream_id and header.qdcount == 0:
                # Some servers (dnslib among them) truncate to a bare header. Trusting it costs
                # at most a retry over TCP, where the question is checked again.
                return Answer(truncated=True)
            if not header.flags & wire.FLAG_QR or header.id != decision.upstream_id \
                    or header.qdcount != 1:
                self.metrics.mismatched.inc()
                return None
            question = decision.question
            # Our question must come back octet for octet, including the random letter case
            # we asked in (DNS 0x20): a reply in another case is discarded like one with a
            # wrong ID, because the case is part of what a blind spoofer has to guess.
            # Resolvers that do not preserve the question's case are rare (they would break
            # every 0x20-using resolver); with one, queries time out (SERVFAIL, counted here).
            if reply[wire.HEADER_LEN:question.end] != \
                    decision.upstream_query[wire.HEADER_LEN:question.end]:
                self.metrics.mismatched.inc()
                return None
        except wire.WireError:
            self.metrics.mismatched.inc()
            return None
        if header.flags & wire.FLAG_TC:
            return Answer(truncated=True)
        if decision.policy is not None and decision.policy is not self.policy \
                and not self._still_allowed(decision):
            decision.rules = ()
            self._account(decision, now=now)
            return Answer(reply=self._refusal(decision))
        try:
            records = wire.read_records(reply, header, question.end)
        except wire.WireError as e:
            return Answer(reply=self.fail(decision, "malformed", f"upstream reply: {e}"))
        if not decision.cached:  # a replayed hit is never stored again (that would extend it)
            self.cache.store((decision.workload, decision.zone),
                             AnswerCache.key(question, decision.upstream_query), reply,
                             decision.upstream_query, records, self.dns.min_ttl, self.dns.max_ttl, now)
        return self._release(decision, reply, header, question, records, now, wall)

    def _still_allowed(self, decision: Decision) -> bool:
        """A hot swap happened while the query was upstream: decide it again under the policy
        in force now, so an answer arriving after the swap opens only what the new policy allows
        (the swap has closed what it no longer backs). Updates decision's rules or verdict."""
        decision.policy = self.policy
        who = self.directory.lookup(decision.client_ip)
        if who is None or who != (decision.workload, decision.zone):
            decision.verdict = "refused"
            decision.reason = "the policy changed while the query was upstream: the source " \
                "address is no longer this workload of this zone"
            return False
        verdict, reason, matching = self._match(decision.zone, decision.name)
        if verdict != "allowed" or not self.dns.upstreams:
            decision.verdict = verdict if verdict != "allowed" else "refused"
            decision.reason = f"{reason} (the policy changed while the query was upstream)"
            return False
        decision.rules, decision.reason = matching, reason
        return True

    def _refusal(self, decision: Decision) -> bytes:
        query = _query_like(decision)
        return wire.error_reply(query, self.refuse_rcode, len(query))

    def _release(self, decision, reply, header, question, records, now, wall) -> Answer:
        out = bytearray(reply)
        struct.pack_into("!H", out, 0, decision.client_id)
        if decision.client_question:  # the VM's own letter case back (same length: only case)
            out[wire.HEADER_LEN:question.end] = decision.client_question
        lo, hi = self.dns.min_ttl, self.dns.max_ttl
        for record in records:
            if record.rtype != wire.QTYPE_OPT:
                clamped = min(max(record.ttl, lo), hi)
                # against the wire's value: a TTL with the top bit set reads as 0 (read_records)
                if clamped != _TTL.unpack_from(out, record.ttl_offset)[0]:
                    _TTL.pack_into(out, record.ttl_offset, clamped)

        chain = {question.key}
        has_cname = any(r.rtype == wire.QTYPE_CNAME for r in records)
        for _ in range(MAX_CNAME_CHAIN if has_cname else 0):
            grown = False
            for record in records:
                if record.section == 0 and record.rtype == wire.QTYPE_CNAME \
                        and record.owner in chain:
                    try:
                        target, _ = wire.read_name(reply, record.rdata_offset)
                    except wire.WireError as e:
                        return Answer(reply=self.fail(decision, "malformed", f"upstream CNAME: {e}"))
                    key = wire.labels_key(target)
                    if key not in chain:
                        chain.add(key)
                        grown = True
            if not grown:
                break
        if len(chain) > 1:
            denied_link = self._denied_link(decision.zone, chain - {question.key})
            if denied_link:
                # A deny rule naming a name beats any allow, also when the VM reaches it through
                # an alias of an allowed name: the answer is refused as the query would be.
                decision.verdict, decision.reason, decision.rules = "denied", denied_link, ()
                self._account(decision, now=now)
                return Answer(reply=self._refusal(decision))

        if decision.tunnel is not None and (has_cname or decision.qtype not in _ADDRESS):
            # a tunnel's payload: every record of the chain but addresses (TXT, NULL, HTTPS, CNAME...)
            octets = sum(r.rdlength for r in records
                         if r.section == 0 and r.rtype not in _ADDRESS and r.owner in chain)
            self.detector.observe_answer(decision.workload, decision.tunnel.base, octets, now)

        learn: dict = {}  # (version, int) -> (address, the rules it may be learned under), in order
        strip: list[int] = []  # indexes into records (every section)
        stripped: list[str] = []
        denied_ips: list[str] = []
        unrelated = 0
        denied = self._denied_networks.get(decision.zone)
        wanted = ADDRESS_TYPES_ASKED.get(decision.qtype, ())
        ttl = 0
        for index, record in enumerate(records):
            if record.section != 0 or record.owner not in chain:
                # Only the question's CNAME chain reaches the VM: an extra record for another
                # name (or glue in the other sections) would put in the VM's cache an address
                # this answer never vouched for. NS, SOA and OPT outside the answer stay.
                if record.section == 0 or record.rtype in (wire.QTYPE_A, wire.QTYPE_AAAA):
                    strip.append(index)
                    unrelated += 1
                continue
            if record.rtype in _ADDRESS and (record.rtype not in wanted or record.rclass != wire.CLASS_IN):
                # An address of a type the question did not ask for (an AAAA in an A answer, an
                # A in a TXT answer), or of a class not IN (CHAOS...): the VM asked for no such
                # thing, and the datapath learns no such thing: neither learned nor released.
                strip.append(index)
                unrelated += 1
                continue
            if record.rtype not in _ADDRESS:
                continue
            version = 4 if record.rtype == wire.QTYPE_A else 6
            if record.rdlength != (4 if version == 4 else 16):  # which octets would the VM read?
                return Answer(reply=self.fail(decision, "malformed", f"upstream {wire.qtype_name(record.rtype)} "
                                              f"record of {record.rdlength} octets"))
            value = int.from_bytes(reply[record.rdata_offset:record.rdata_offset + record.rdlength], "big")
            ip = ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)
            if denied and any(ip in n for n in denied if n.version == ip.version):
                strip.append(index)
                denied_ips.append(str(ip))
                continue
            rules = decision.rules
            kind = rebinding.classify_value(value, version, self._host_keys)
            if kind:  # only rules that name its network, or (private) say allow_private
                rules = tuple(r for r in rules if any(ip in n for n in self._named_networks.get(r.name, ()))
                              or (kind == rebinding.PRIVATE_CLASS and r.to.allow_private))
                if not rules:
                    strip.append(index)
                    stripped.append(str(ip))
                    continue
            if (version, value) in learn:
                continue
            if len(learn) >= MAX_IPS_PER_NAME:
                strip.append(index)  # never release an address the datapath does not hold
                continue
            learn[(version, value)] = (ip, rules)
            ttl = max(ttl, min(max(record.ttl, lo), hi))
        if stripped:
            self.metrics.rebinding.labels(decision.zone).inc(len(stripped))
        if strip:
            try:
                out = bytearray(wire.without_records(bytes(out), strip))
            except Exception:  # noqa: BLE001 - dnslib cannot re-encode a hostile upstream reply
                return Answer(reply=self.fail(decision, "malformed-upstream",
                                              "upstream reply could not be re-encoded without stripped records"))

        answer = Answer(reply=bytes(out), learned=[str(ip) for ip, _ in learn.values()], stripped=stripped,
                        denied=denied_ips, ttl=ttl, unrelated=unrelated)
        reason = decision.reason if header.rcode == wire.RCODE_NOERROR else f"{decision.reason}; upstream rcode {header.rcode}"
        try:  # on record (or queued for it) before it opens anything: the datapath never allows
            # what the log does not hold, and takes back what it opened under a queued entry the
            # log refuses later (learning.py)
            logged = self._account(decision, answer=answer, reason=reason, now=now)
        except LogError:  # nothing learned; a learner failing below is on record too (a servfail follows)
            return Answer(reply=self.fail(decision, "log-refused", "the signed log refuses entries"))
        if learn:
            try:
                answer.persist = self.learning.open(decision.zone, decision.workload, decision.name, learn,
                                                    ttl + LEARN_GRACE_SECONDS, wall + ttl + LEARN_GRACE_SECONDS, logged)
            except Exception as e:  # noqa: BLE001 - any learner failure must withhold the answer
                self.metrics.learn_failures.inc()
                return Answer(reply=self.fail(decision, "learn-failed", f"datapath refused: {type(e).__name__}"))
        return answer

    def _denied_link(self, zone: str, names) -> str:
        """Why an answer's CNAME chain is denied (a name in it a deny rule of the zone names), or ""."""
        if not self._fqdn_rules.get(zone, ((), ()))[0]:
            return ""
        for key in sorted(names):
            name = key.decode("ascii", "replace")
            verdict, reason, _ = self._match(zone, name)
            if verdict == "denied":
                return f"CNAME chain reaches {name}: {reason}"
        return ""

    def fail(self, decision: Decision, kind: str, reason: str, now: float | None = None) -> bytes:
        """SERVFAIL for a forwarded query (upstream timeout or error, learner failure, log refusal)."""
        if kind not in ("learn-failed", "log-refused"):
            self.metrics.upstream_errors.labels(kind).inc()
        decision.verdict, decision.reason = "servfail", reason
        query_like = _query_like(decision)
        try:
            self._account(decision, now=now)
        except LogError:  # the signed log refuses entries: the SERVFAIL (no address) still goes
            self.metrics.dropped.labels("log-refused").inc()
        return wire.error_reply(query_like, wire.RCODE_SERVFAIL, len(query_like))

    def _account(self, decision: Decision, answer: Answer | None = None, reason: str | None = None,
                 now: float | None = None) -> Future | None:
        """Count and log the decision; the log's Future of its entry, if it is only queued."""
        zone = decision.zone or "-"
        key = (zone, decision.verdict)
        counter = self._children.get(key)
        if counter is None:  # labels() costs a lock and a tuple build per call: cache children
            counter = self._children[key] = (self.metrics.queries.labels(*key),
                                             self.metrics.latency.labels(decision.verdict))
        counter[0].inc()
        if decision.action == "drop":
            self.metrics.dropped.labels(decision.reason.split(":")[0][:40]).inc()
        if decision.started:
            elapsed = (time.monotonic() if now is None else now) - decision.started
            counter[1].observe(max(0.0, elapsed))
        entry: dict[str, Any] = {"name": decision.name, "qtype": wire.qtype_name(decision.qtype)
                                 if decision.qtype else "", "zone": decision.zone, "workload": decision.workload,
                                 "client": decision.client_ip, "verdict": decision.verdict,
                                 "reason": reason if reason is not None else decision.reason,
                                 "rules": [r.name for r in decision.rules] if decision.verdict == "allowed" else []}
        if answer is not None:
            entry.update(ips=answer.learned, ttl=answer.ttl)
            if answer.stripped:
                entry["rebinding_stripped"] = answer.stripped
            if answer.denied:
                entry["denied_stripped"] = answer.denied
            if answer.unrelated:
                entry["unrelated_stripped"] = answer.unrelated
        if decision.tunnel is not None and (decision.tunnel.parts or decision.tunnel.flagged):
            entry["tunnel"] = {"score": decision.tunnel.score, "parts": decision.tunnel.parts,
                               "detected": decision.tunnel.detected, "base": decision.tunnel.base}
        return self.log.record("dns", **entry)


def _query_like(decision: Decision) -> bytes:
    return struct.pack("!HHHHHH", decision.client_id, wire.FLAG_RD, 1, 0, 0, 0) + _question_bytes(decision.question)


def _question_bytes(question: wire.Question) -> bytes:
    out = b"".join(bytes([len(label)]) + label for label in question.labels) + b"\x00"
    return out + struct.pack("!HH", question.qtype, question.qclass)


def fit_udp(decision: Decision, reply: bytes) -> bytes:
    """What to send a UDP client: the reply, or header + question with TC if it is too big."""
    if len(reply) <= decision.max_udp:
        return reply
    end = decision.question.end if decision.question is not None else wire.HEADER_LEN
    return wire.truncated_reply(reply, end)
