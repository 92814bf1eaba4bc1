"""Quote verification without a TPM: evidence built here byte by byte as TPM 2.0 Part 2 lays out
TPMS_ATTEST and TPMT_SIGNATURE, signed with keys made here, then checked by skyguard/tpm/quote.py.
Each attack the issue lists fails with a message naming the reason. (The same checks against a
real swtpm, with tpm2_checkquote as the oracle: tests/integration/test_tpm_attest.py.)
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from skyguard.errors import BadInput
from skyguard.tpm import measure, quote
from skyguard.tpm.eventlog import ZERO, line_digest, make_base_line, make_line, replay
from skyguard.tpm.structs import QuoteFormatError, extend, parse_attest, parse_signature

PCR = 13
NONCE = "00c0ffee" * 4  # 16 bytes: the least a verifier's challenge may be
POLICY = "ab" * 32
PACKAGE = "cd" * 32
BPF = "ef" * 32
VKEY = "host+0a1b2c3d+AQID"
TAGS = {"sg_from_vm": "0011223344556677", "sg_to_vm": "8899aabbccddeeff"}


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def attest_bytes(nonce: bytes, pcrs: list[int], digest: bytes, magic=0xFF544347, kind=0x8018) -> bytes:
    bitmap = bytearray(3)
    for p in pcrs:
        bitmap[p // 8] |= 1 << (p % 8)
    return (struct.pack(">IH", magic, kind) + tpm2b(b"\x00\x0b" + bytes(32)) + tpm2b(nonce)
            + struct.pack(">QIIB", 1234, 2, 0, 1) + struct.pack(">Q", 0x2019102300163636)
            + struct.pack(">I", 1) + struct.pack(">HB", 0x000B, 3) + bytes(bitmap) + tpm2b(digest))


class SoftTpm:
    """Just enough of a TPM to make quotes: PCR values and a signing key (ECDSA P-256 or RSA)."""

    def __init__(self, kind="ecc", pcr=PCR):
        self.kind, self.pcr = kind, pcr
        self.key = ec.generate_private_key(ec.SECP256R1()) if kind == "ecc" else \
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.pcrs = {i: bytes(32) for i in range(16)}

    @property
    def ak_pem(self) -> str:
        return self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def sign(self, data: bytes) -> bytes:
        if self.kind == "ecc":
            r, s = utils.decode_dss_signature(self.key.sign(data, ec.ECDSA(hashes.SHA256())))
            return struct.pack(">HH", 0x0018, 0x000B) + tpm2b(r.to_bytes(32, "big")) + tpm2b(s.to_bytes(32, "big"))
        sig = self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        return struct.pack(">HH", 0x0014, 0x000B) + tpm2b(sig)

    def quote(self, nonce: str, lines: list[str]) -> dict:
        selected = [0, 1, 2, 3, 4, 5, 6, 7, self.pcr]
        digest = hashlib.sha256(b"".join(self.pcrs[i] for i in selected)).digest()
        attest = attest_bytes(bytes.fromhex(nonce), selected, digest)
        return {"type": "skyguard_tpm_quote", "version": 1, "nonce": nonce, "pcr": self.pcr, "bank": "sha256",
                "pcrs": {str(i): self.pcrs[i].hex() for i in selected},
                "quote": {"attest": base64.b64encode(attest).decode(),
                          "signature": base64.b64encode(self.sign(attest)).decode(), "tss_pcrs": ""},
                "event_log": lines, "ak_public": self.ak_pem}


def measured(tpm: SoftTpm, policy=POLICY, tags=TAGS) -> list[str]:
    """The lines a daemon start writes, extended into the soft TPM's PCR."""
    events = [("package", PACKAGE, {"files": 80}), ("bpf_object", BPF, {"source": "bpf/sg_datapath.c"}),
              ("log_key", measure.log_key_digest(VKEY), {"key": VKEY})]
    events += [("program", measure.program_digest(tag), {"name": name, "tag": tag}) for name, tag in tags.items()]
    events += [("policy", policy, {"name": "keysystems"}),
               ("attach", measure.attach_digest({"tc_egress": tags["sg_to_vm"]}),
                {"interface": "sg-web1", "programs": {"tc_egress": tags["sg_to_vm"]}})]
    lines = []
    for seq, (kind, digest, detail) in enumerate(events):
        line = make_line(seq, tpm.pcr, kind, digest, detail, 1_700_000_000_000_000_000 + seq)
        tpm.pcrs[tpm.pcr] = extend(tpm.pcrs[tpm.pcr], line_digest(line))
        lines.append(line)
    return lines


REFERENCE = {"pcr": PCR, "package_sha256": [PACKAGE], "bpf_object_sha256": [BPF],
             "program_tags": sorted(TAGS.values()), "policy_sha256": [POLICY], "log_keys": [VKEY]}


@pytest.fixture(params=["ecc", "rsa"])
def host(request):
    tpm = SoftTpm(request.param)
    return tpm, tpm.quote(NONCE, measured(tpm))


def test_a_good_quote_verifies_and_says_what_was_measured(host):
    tpm, evidence = host
    verdict = quote.verify(evidence, tpm.ak_pem, NONCE, REFERENCE)
    assert verdict.ok, verdict.failures
    assert verdict.notes == []
    assert verdict.state["policy"] == {"name": "keysystems", "sha256": POLICY}
    assert verdict.state["programs"] == TAGS
    assert verdict.state["attached"] == {"sg-web1": {"tc_egress": TAGS["sg_to_vm"]}}
    assert verdict.state["log_key"] == VKEY


def test_nonce_is_case_insensitive_but_must_match(host):
    tpm, evidence = host
    assert quote.verify(evidence, tpm.ak_pem, NONCE.upper(), REFERENCE).ok
    other = NONCE[:-1] + "f"
    verdict = quote.verify(evidence, tpm.ak_pem, other, REFERENCE)
    assert verdict.failures == [f"nonce: the quote answers nonce {NONCE}, not {other} "
                                f"(a replayed or foreign quote)"]


@pytest.mark.parametrize("index", [str(PCR), "0", "7"])
def test_an_edited_pcr_value_fails_on_the_pcr_digest(host, index):
    tpm, evidence = host
    evidence["pcrs"][index] = "11" * 32
    verdict = quote.verify(evidence, tpm.ak_pem, NONCE, REFERENCE)
    assert verdict.failures == ["pcr digest: the PCR values in the evidence do not hash to the quote's PCR "
                                "digest (a PCR value was edited after the quote)"]


def test_an_edited_event_log_line_fails_the_replay(host):
    tpm, evidence = host
    policy_line = next(i for i, line in enumerate(evidence["event_log"]) if '"kind":"policy"' in line)
    evidence["event_log"][policy_line] = evidence["event_log"][policy_line].replace(POLICY, "12" * 32)
    verdict = quote.verify(evidence, tpm.ak_pem, NONCE, REFERENCE)
    assert len(verdict.failures) == 1 and verdict.failures[0].startswith("event log: replaying its 7 lines"), \
        verdict.failures


def test_a_reordered_event_log_fails_naming_the_line(host):
    tpm, evidence = host
    log = evidence["event_log"]
    log[3], log[4] = log[4], log[3]
    verdict = quote.verify(evidence, tpm.ak_pem, NONCE, REFERENCE)
    assert verdict.failures == ["event log: event log line 4 has seq 4, expected 3: lines were reordered, "
                                "dropped or added"]


def test_a_reordered_log_with_renumbered_seqs_still_fails_the_replay(host):
    tpm, evidence = host
    events = [json.loads(line) for line in evidence["event_log"]]
    events[3], events[4] = events[4], events[3]
    for seq, event in enumerate(events):
        event["seq"] = seq
    evidence["event_log"] = [json.dumps(e, sort_keys=True, separators=(",", ":")) for e in events]
    verdict = quote.verify(evidence, tpm.ak_pem, NONCE, REFERENCE)
    assert verdict.failures and verdict.failures[0].startswith("event log: replaying"), verdict.failures


def test_a_dropped_last_line_fails_the_replay(host):
    tpm, evidence = host
    evidence["event_log"].pop()
    assert quote.verify(evidence, tpm.ak_pem, NONCE, REFERENCE).failures[0].startswith("event log: replaying")


def test_a_quote_by_another_ak_fails_on_the_signature(host):
    tpm, evidence = host
    other = SoftTpm(tpm.kind)
    verdict = quote.verify(evidence, other.ak_pem, NONCE, REFERENCE)
    assert verdict.failures == ["signature: the quote is not signed by the given AK (made by another AK, "
                                "or its bytes were edited)"]
    # and a key of the other type is simply not the signer
    third = SoftTpm("rsa" if tpm.kind == "ecc" else "ecc")
    assert quote.verify(evidence, third.ak_pem, NONCE, REFERENCE).failures[0].startswith("signature:")


def test_an_edited_quote_byte_fails_on_the_signature(host):
    tpm, evidence = host
    attest = bytearray(base64.b64decode(evidence["quote"]["attest"]))
    attest[-1] ^= 1
    evidence["quote"]["attest"] = base64.b64encode(bytes(attest)).decode()
    assert quote.verify(evidence, tpm.ak_pem, NONCE, REFERENCE).failures[0].startswith("signature:")


def test_a_host_that_loaded_another_policy_fails_the_reference():
    tpm = SoftTpm()
    other_policy = "77" * 32
    evidence = tpm.quote(NONCE, measured(tpm, policy=other_policy))
    verdict = quote.verify(evidence, tpm.ak_pem, NONCE, REFERENCE)
    assert verdict.failures == [f"policy 'keysystems' sha256 (event log line 6): {other_policy} is not in the "
                                f"reference's policy_sha256"]


def test_an_unknown_program_tag_fails_naming_the_program():
    tpm = SoftTpm()
    tags = dict(TAGS, sg_to_vm="deadbeefdeadbeef")
    verdict = quote.verify(tpm.quote(NONCE, measured(tpm, tags=tags)), tpm.ak_pem, NONCE, REFERENCE)
    assert "program 'sg_to_vm' tag (event log line 5): deadbeefdeadbeef is not in the reference's program_tags" \
        in verdict.failures
    assert any(f.startswith("program at sg-web1 tc_egress tag") for f in verdict.failures)


def test_a_program_line_whose_digest_is_not_its_tag_fails():
    tpm = SoftTpm()
    lines = measured(tpm)
    # a line that claims an allowed tag while its digest (what a careless verifier would trust) differs
    tpm.pcrs[PCR] = bytes(32)
    forged = []
    for seq, line in enumerate(lines):
        event = json.loads(line)
        if event["kind"] == "program":
            event["digest"] = measure.program_digest("deadbeefdeadbeef")
        new = make_line(seq, PCR, event["kind"], event["digest"], event["detail"], event["time"])
        tpm.pcrs[PCR] = extend(tpm.pcrs[PCR], line_digest(new))
        forged.append(new)
    verdict = quote.verify(tpm.quote(NONCE, forged), tpm.ak_pem, NONCE, REFERENCE)
    assert any("digest does not match tag" in f for f in verdict.failures), verdict.failures


def test_a_log_from_a_foreign_base_fails_naming_it():
    tpm = SoftTpm()
    tpm.pcrs[PCR] = hashlib.sha256(b"someone else").digest()
    base = make_base_line(0, PCR, tpm.pcrs[PCR], "PCR 13 held a value skyguard's event log does not replay to", 1)
    lines = [base] + [make_line(1, PCR, "policy", POLICY, {"name": "keysystems"}, 2)]
    tpm.pcrs[PCR] = extend(tpm.pcrs[PCR], line_digest(lines[1]))
    verdict = quote.verify(tpm.quote(NONCE, lines), tpm.ak_pem, NONCE, {"pcr": PCR, "policy_sha256": [POLICY]})
    assert verdict.failures == [f"event log: it starts from a base value of PCR 13 ({json.loads(base)['value'][:16]}...), "
                                "not zero: PCR 13 held a value skyguard's event log does not replay to"]


def test_a_log_without_the_launch_measurements_fails():
    tpm = SoftTpm()
    line = make_line(0, PCR, "policy", POLICY, {"name": "keysystems"}, 1)
    tpm.pcrs[PCR] = extend(tpm.pcrs[PCR], line_digest(line))
    verdict = quote.verify(tpm.quote(NONCE, [line]), tpm.ak_pem, NONCE, REFERENCE)
    assert verdict.failures == ["event log: no package measurement (skyguard's launch was not measured)",
                                "event log: no BPF object measurement (skyguard's launch was not measured)",
                                "event log: no log verifier key measurement (skyguard's launch was not measured)"]


def test_platform_pcrs_in_the_reference_are_compared():
    tpm = SoftTpm()
    tpm.pcrs[7] = hashlib.sha256(b"secure boot off").digest()
    evidence = tpm.quote(NONCE, measured(tpm))
    verdict = quote.verify(evidence, tpm.ak_pem, NONCE, dict(REFERENCE, pcrs={"7": "00" * 32}))
    assert verdict.failures == [f"platform PCR 7: {tpm.pcrs[7].hex()} is not the reference's {'00' * 32}"]


def test_a_reference_made_from_good_evidence_accepts_it_and_rejects_another_policy():
    tpm = SoftTpm()
    good = tpm.quote(NONCE, measured(tpm))
    ref = quote.reference_from(good, tpm.ak_pem, NONCE)
    assert ref == {"pcr": PCR, "package_sha256": [PACKAGE], "bpf_object_sha256": [BPF],
                   "program_tags": list(TAGS.values()), "policy_sha256": [POLICY], "log_keys": [VKEY]}
    assert quote.verify(good, tpm.ak_pem, NONCE, ref).ok
    other = SoftTpm()
    other.key = tpm.key
    bad = other.quote(NONCE, measured(other, policy="11" * 32))
    assert not quote.verify(bad, tpm.ak_pem, NONCE, ref).ok
    with pytest.raises(BadInput, match="does not verify"):
        quote.reference_from(good, SoftTpm().ak_pem, NONCE)


def test_the_daemons_statement_must_match_what_the_tpm_measured(host):
    tpm, evidence = host
    state = quote.verify(evidence, tpm.ak_pem, NONCE, REFERENCE).state
    statement = {"policy": {"name": "keysystems", "sha256": POLICY},
                 "programs": {name: {"id": 1, "tag": tag} for name, tag in TAGS.items()}}
    assert quote.cross_check(statement, state, VKEY) == []
    lying = dict(statement, policy={"name": "keysystems", "sha256": "00" * 32})
    assert quote.cross_check(lying, state, VKEY) == [
        f"statement: the daemon says it enforces policy sha256 {'00' * 32}, but the last policy the TPM "
        f"measured is {POLICY}"]
    swapped = dict(statement, programs={"sg_to_vm": {"tag": "ffffffffffffffff"}})
    assert quote.cross_check(swapped, state, VKEY) == [
        f"statement: program sg_to_vm runs with tag ffffffffffffffff, the TPM measured {TAGS['sg_to_vm']}"]
    assert quote.cross_check(statement, state, "other+00000000+AQ==")[0].startswith("statement: signed by other")


def test_a_host_on_another_pcr_is_checked_on_the_pcr_its_reference_pins():
    tpm = SoftTpm(pcr=14)
    evidence = tpm.quote(NONCE, measured(tpm))
    ref = quote.reference_from(evidence, tpm.ak_pem, NONCE)
    assert ref["pcr"] == 14 and quote.verify(evidence, tpm.ak_pem, NONCE, ref).ok
    # a verifier expecting skyguard's default PCR refuses a quote whose log sits on another one
    assert quote.verify(evidence, tpm.ak_pem, NONCE, None).failures[0].startswith("selection:")


def test_without_a_reference_only_the_quote_and_replay_are_checked(host):
    tpm, evidence = host
    verdict = quote.verify(evidence, tpm.ak_pem, NONCE, None)
    assert verdict.ok and len(verdict.notes) == 5 and all("not compared" in n for n in verdict.notes)


@pytest.mark.parametrize("nonce", ["", "0", "xyz0", "00" * 33, None, "0g", "0a", "00" * 15, "0" * 33])
def test_bad_nonces_are_refused(nonce):
    """Short nonces too: a quote over a 1-byte nonce is one of 256 an attacker can make ahead and replay."""
    with pytest.raises(BadInput, match="nonce must be 16 to 32 bytes"):
        quote.check_nonce(nonce)


@pytest.mark.parametrize("nonce", ["ab" * 16, "AB" * 32])
def test_nonces_of_16_to_32_bytes_are_taken(nonce):
    assert quote.check_nonce(nonce) == nonce.lower()


def test_a_short_nonce_is_refused_when_verifying(host):
    tpm, evidence = host
    with pytest.raises(BadInput, match="nonce must be 16"):
        quote.verify(evidence, tpm.ak_pem, "0a", REFERENCE)


@pytest.mark.parametrize("cut", [0, 3, 6, 10, 40, 60, 80])
def test_truncated_attest_structures_name_the_field(cut):
    data = attest_bytes(b"\x01\x02", [0, 13], bytes(32))[:cut]
    with pytest.raises(QuoteFormatError, match="TPMS_ATTEST ends inside"):
        parse_attest(data)


def test_attest_fields_parse():
    info = parse_attest(attest_bytes(b"\x01\x02", [0, 7, 13], b"\xaa" * 32))
    assert info.extra_data == b"\x01\x02" and info.selection == {"sha256": (0, 7, 13)}
    assert info.pcr_digest == b"\xaa" * 32 and info.clock == 1234 and info.reset_count == 2 and info.safe
    with pytest.raises(QuoteFormatError, match="not made by a TPM"):
        parse_attest(attest_bytes(b"", [0], bytes(32), magic=0x12345678))
    with pytest.raises(QuoteFormatError, match="not a quote"):
        parse_attest(attest_bytes(b"", [0], bytes(32), kind=0x8017))
    with pytest.raises(QuoteFormatError, match="after its end"):
        parse_attest(attest_bytes(b"", [0], bytes(32)) + b"\x00")
    with pytest.raises(QuoteFormatError, match="is not RSASSA, RSAPSS or ECDSA"):
        parse_signature(struct.pack(">HH", 0x0001, 0x000B))


def test_garbage_evidence_is_a_named_failure_not_a_crash(host):
    tpm, evidence = host
    not_by_a_tpm = base64.b64encode(b"\x00" + base64.b64decode(evidence["quote"]["attest"])[1:]).decode()
    verdict = quote.verify({**evidence, "quote": {**evidence["quote"], "attest": not_by_a_tpm}}, tpm.ak_pem, NONCE,
                           REFERENCE)
    assert verdict.failures == ["format: the quote cannot be read (TPMS_ATTEST magic is not TPM_GENERATED_VALUE: "
                                "not made by a TPM)"]
    for broken in ({**evidence, "quote": {"attest": "!!", "signature": ""}},
                   {**evidence, "quote": {}}, {**evidence, "pcrs": {"0": "zz"}}, {**evidence, "event_log": "x"}):
        verdict = quote.verify(broken, tpm.ak_pem, NONCE, REFERENCE)
        assert not verdict.ok and verdict.failures[0].split(":")[0] in ("format", "pcrs", "event log"), verdict.failures


def test_replay_matches_a_naive_extend_chain():
    tpm = SoftTpm()
    lines = measured(tpm)
    base, value, events = replay(lines, PCR)
    assert base == ZERO and value == tpm.pcrs[PCR] and len(events) == len(lines)
    naive = bytes(32)
    for line in lines:
        naive = hashlib.sha256(naive + hashlib.sha256(line.encode()).digest()).digest()
    assert naive == value


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_GOOD = SoftTpm()
_EVIDENCE = _GOOD.quote(NONCE, measured(_GOOD))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_any_bytes_parse_or_are_refused_with_a_named_field(data):
    try:
        parse_attest(data)
    except QuoteFormatError:
        pass
    try:
        parse_signature(data)
    except QuoteFormatError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=1, max_value=255),
       st.sampled_from(["attest", "signature", "event"]))
def test_any_one_byte_change_fails_the_check_and_never_crashes(position, flip, where):
    """Whatever byte of the quote, its signature or the event log is changed, verify() returns a
    named failure (or, for a byte a parser ignores, still no success with other content)."""
    evidence = json.loads(json.dumps(_EVIDENCE))
    if where == "event":
        lines = evidence["event_log"]
        i = position % len(lines)
        raw = bytearray(lines[i].encode())
        raw[position % len(raw)] = (raw[position % len(raw)] + 1 + flip % 126) % 128  # never the same byte
        lines[i] = raw.decode("ascii")
    else:
        raw = bytearray(base64.b64decode(evidence["quote"][where]))
        raw[position % len(raw)] ^= flip
        evidence["quote"][where] = base64.b64encode(bytes(raw)).decode()
    verdict = quote.verify(evidence, _GOOD.ak_pem, NONCE, REFERENCE)
    assert not verdict.ok and verdict.failures


def test_a_reference_or_evidence_naming_a_resettable_pcr_is_refused():
    # PCR 16 (and 23) can be reset at locality 0: root on the host resets it, extends a clean log
    # into it and quotes. A reference naming it (hand-edited, or made from evidence whose unsigned
    # "pcr" field says 16) would check that PCR instead of skyguard's, and pass.
    tpm = SoftTpm(pcr=16)
    tpm.pcrs[16] = bytes(32)
    evidence = tpm.quote(NONCE, measured(tpm))
    with pytest.raises(BadInput, match="8-15"):
        quote.verify(evidence, tpm.ak_pem, NONCE, {**REFERENCE, "pcr": 16})
    with pytest.raises(BadInput, match="8-15"):
        quote.reference_from(evidence, tpm.ak_pem, NONCE)


def test_a_statement_showing_other_programs_at_an_interface_than_the_tpm_measured_fails(host):
    # Root attaches its own program at a workload's hook (bpftool, tc): the daemon's signed
    # statement shows it (and says the interface is not ours) while the TPM holds skyguard's last
    # attach. The verifier given the host key must not report the two as agreeing.
    tpm, evidence = host
    state = quote.verify(evidence, tpm.ak_pem, NONCE, REFERENCE).state
    statement = {"policy": {"name": "keysystems", "sha256": POLICY},
                 "programs": {name: {"id": 1, "tag": tag} for name, tag in TAGS.items()},
                 "interfaces": {"sg-web1": {"hooks": {"tc_egress": {"id": 9, "name": "sg_to_vm",
                                                                    "tag": TAGS["sg_to_vm"]}}, "ours": True},
                                "sg-new": {"hooks": {}, "ours": False, "problem": "not attached"}}}
    assert quote.cross_check(statement, state, VKEY) == []
    foreign = {"hooks": {"tc_egress": {"id": 10, "name": "sg_to_vm", "tag": "ffffffffffffffff"}}, "ours": False,
               "problem": "programs are not this skyguard's (replaced or tampered with)"}
    tampered = dict(statement, interfaces={**statement["interfaces"], "sg-web1": foreign})
    problems = quote.cross_check(tampered, state, VKEY)
    assert len(problems) == 1 and problems[0].startswith("statement: interface sg-web1") \
        and "ffffffffffffffff" in problems[0], problems
