"""Tunnelling detection on real-looking tunnel traffic and real-looking benign names, both on
the detector alone and through the resolver (block / alert / off)."""

from __future__ import annotations

import base64
import random

import pytest
from dnslib import RCODE, DNSRecord

from skyguard.dns.tunnel import TunnelDetector, score_name
from tests.unit.test_dns_resolver import VM_IP, make_policy, make_resolver

rng = random.Random(7)


def labels(name: str) -> list[bytes]:
    return [label.encode() for label in name.split(".")]


def dnscat_names(n, domain="x.cdn.test"):
    """dnscat2 style: hex-encoded session/seq/payload, split into labels."""
    out = []
    for _ in range(n):
        payload = bytes(rng.randrange(256) for _ in range(28)).hex()
        out.append(f"{payload[:30]}.{payload[30:]}.{domain}")
    return out


def iodine_names(n, domain="t.cdn.test"):
    """iodine style: base32/base128-ish upstream data in long labels."""
    out = []
    for _ in range(n):
        data = base64.b32encode(bytes(rng.randrange(256) for _ in range(36))).decode()
        out.append(f"p{data.lower().rstrip('=')}.{domain}")
    return out


def short_exfil_names(n, domain="ex.cdn.test"):
    """A careful exfiltrator: short base32 chunks that look ordinary one by one."""
    return [base64.b32encode(bytes(rng.randrange(256) for _ in range(8))).decode().lower()
            .rstrip("=") + f".{domain}" for _ in range(n)]


BENIGN = ["deb.debian.test", "security.debian.test", "ftp.us.debian.test", "www.example.test",
          "d111111abcdef8.cloudfront.test", "r3---sn-4g5e6nze.googlevideo.test",
          "e1234.dscb.akamaiedge.test", "files.pythonhosted.test", "_dmarc.example.test",
          "xn--bcher-kva.example.test", "a1b2c3d4e5.cdn.example.test", "login.microsoftonline.test",
          "fonts-gstatic-com.cdn.ampproject.test", "1.0.0.127.in-addr.arpa",
          "prod-eu-west-1-api-gateway.internal.corp.test", "ec2-203-0-113-25.compute-1.aws.test"]


@pytest.mark.parametrize("name", BENIGN)
def test_benign_names_score_below_threshold(name):
    detector = TunnelDetector()
    verdict = detector.observe("vm", labels(name), 1, now=0.0)
    assert not verdict.detected, verdict.parts


def test_benign_browsing_of_many_distinct_sites_is_not_detected():
    detector = TunnelDetector()
    now = 0.0
    for i in range(200):
        name = BENIGN[i % len(BENIGN)]
        now += 0.1
        assert not detector.observe("vm", labels(name), 1 if i % 2 else 28, now).detected


@pytest.mark.parametrize("make", [dnscat_names, iodine_names])
def test_encoded_tunnels_are_detected_on_the_first_query(make):
    detector = TunnelDetector()
    verdict = detector.observe("vm", labels(make(1)[0]), 16, now=0.0)
    assert verdict.detected
    assert "encoded" in verdict.parts and {"long_label", "long_name"} & set(verdict.parts)


def test_hex_and_base32_are_caught_although_their_entropy_per_char_is_low():
    hex_name = "0123456789abcdef0123456789abcdef.c.cdn.test"
    parts, _ = score_name(labels(hex_name), 1)
    assert "encoded" in parts


def test_short_chunks_are_caught_by_unique_subdomain_count_within_a_few_dozen():
    detector = TunnelDetector()
    detected_at = None
    for i, name in enumerate(short_exfil_names(60)):
        if detector.observe("vm", labels(name), 1, now=i * 0.05).detected:
            detected_at = i
            break
    assert detected_at is not None and detected_at < 40


def test_window_slides_and_vms_are_separate():
    detector = TunnelDetector()
    names = short_exfil_names(30)
    for i, name in enumerate(names):  # one query a minute: never 20 in one window
        assert not detector.observe("vm", labels(name), 1, now=i * 61.0).detected
    for i, name in enumerate(names[:15]):
        assert not detector.observe("other-vm", labels(name), 1, now=i).detected


def test_null_and_any_types_add_to_the_score():
    parts, _ = score_name(labels("a.cdn.test"), 10)
    assert parts["qtype"] == 1.0


def test_block_refuses_the_stream_and_ordinary_names_keep_working():
    resolver, _, log = make_resolver()
    names = dnscat_names(5)
    first = resolver.decide(DNSRecord.question(names[0], "TXT").pack(), VM_IP, now=1.0)
    assert first.verdict == "tunnel"
    assert DNSRecord.parse(first.reply).header.rcode == RCODE.REFUSED
    entry = log.entries[-1]
    assert entry["verdict"] == "tunnel" and entry["tunnel"]["detected"]
    assert set(entry["tunnel"]["parts"]) >= {"long_name", "encoded"}
    # the base domain stays flagged: even an innocent-looking name under it is refused now
    assert resolver.decide(DNSRecord.question("www.cdn.test").pack(), VM_IP,
                           now=2.0).verdict == "tunnel"
    # other names of the zone keep working
    assert resolver.decide(DNSRecord.question("deb.debian.test").pack(), VM_IP,
                           now=2.0).verdict == "allowed"
    assert resolver.metrics.detections.labels("auth", "block")._value.get() == 1


def test_alert_logs_but_forwards():
    resolver, _, log = make_resolver(make_policy(tunnel="alert"))
    d = resolver.decide(DNSRecord.question(dnscat_names(1)[0]).pack(), VM_IP, now=1.0)
    assert d.verdict == "allowed" and d.tunnel.detected


def test_off_does_not_score():
    resolver, _, _ = make_resolver(make_policy(tunnel="off"))
    d = resolver.decide(DNSRecord.question(dnscat_names(1)[0]).pack(), VM_IP, now=1.0)
    assert d.verdict == "allowed" and d.tunnel is None


def test_repeated_long_txt_answers_under_one_base_are_detected_but_one_dkim_record_is_not():
    from dnslib import QTYPE, RR, TXT

    from tests.unit.test_dns_resolver import upstream_reply

    resolver, _, _ = make_resolver()
    verdicts = []
    for i in range(12):  # the same short name each time: only the answers look odd
        d = resolver.decide(DNSRecord.question("c2.cdn.test", "TXT").pack(), VM_IP, now=float(i))
        verdicts.append(d.verdict)
        if d.action == "forward":
            resolver.answer(d, upstream_reply(d.upstream_query, [
                RR("c2.cdn.test", QTYPE.TXT, rdata=TXT(["A" * 250, "B" * 250]))]), now=float(i))
    assert verdicts[0] == "allowed" and verdicts[1] == "allowed"  # one long TXT is ordinary
    assert "tunnel" in verdicts and verdicts[-1] == "tunnel"


def test_a_name_refused_for_the_budget_is_charged_again_once_the_flag_lapses():
    """Short random names spread over 64 bases (no base looks busy) exhaust the VM's budget and
    are refused. A refused name carried nothing out; it used to count as seen all the same, so
    asked again once its base's flag lapsed (5 min, inside the 10 min budget window) it passed
    free: a bench run let 2,496 such names through after the first 300 s."""
    from skyguard.dns.tunnel import FLAG_SECONDS

    names_rng = random.Random(3)
    detector, now = TunnelDetector(), 1000.0
    refused = []
    for i in range(400):
        name = f"{names_rng.getrandbits(40):010x}.b{i % 64}.test"
        verdict = detector.observe("vm1", labels(name), 1, now, blocking=True)
        if verdict.detected or verdict.flagged:
            refused.append(name)
        now += 0.5
    assert len(refused) > 200
    now += FLAG_SECONDS + 1
    again = [detector.observe("vm1", labels(name), 1, now, blocking=True) for name in refused[:20]]
    assert all(v.detected for v in again), [v.parts for v in again]
