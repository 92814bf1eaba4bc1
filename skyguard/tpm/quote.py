"""Quotes: evidence a remote verifier checks, and the check itself.

Evidence (`skyguard attest --quote --nonce N`, JSON) holds a TPM2 quote by the AK over the platform
PCRs (0-7) and skyguard's PCR with the verifier's nonce, the PCR values quoted, skyguard's event
log, and the AK public key:

    {"type": "skyguard_tpm_quote", "version": 1, "nonce": "...", "pcr": 13, "bank": "sha256",
     "pcrs": {"0": "<hex>", ..., "13": "<hex>"},
     "quote": {"attest": "<base64 TPMS_ATTEST>", "signature": "<base64 TPMT_SIGNATURE>",
               "tss_pcrs": "<base64 tpm2_quote -o file, for tpm2_checkquote>"},
     "event_log": ["<line>", ...], "ak_public": "<PEM>"}

verify() checks, in order, and names each failure: the signature by the AK the verifier holds
(not the one in the evidence), the nonce, the PCR selection, the PCR values against the quote's
digest, the replay of the event log to skyguard's PCR, then every measurement in the log against
the reference (allowed package, BPF object, program tags, policy hashes, log keys, and optionally
platform PCR values). Every measurement since the PCR was last zero counts: a host that ran an
unknown policy once is outside the reference until it reboots, as the TPM itself remembers.

Not here: the TPM structures (structs.py), the TPM commands (device.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from skyguard import fsutil
from skyguard.errors import BadInput
from skyguard.tpm import measure
from skyguard.tpm.device import (
    BANK,
    DEFAULT_PCR,
    PLATFORM_PCRS,
    Tpm,
    TpmConfig,
    TpmError,
    TpmUnavailable,
    check_pcr,
    parse_pcr_listing,
)
from skyguard.tpm.eventlog import ZERO, EventLog, EventLogError, replay
from skyguard.tpm.structs import QuoteFormatError, parse_attest, pcr_digest, verify_signature

EVIDENCE_TYPE = "skyguard_tpm_quote"
# TPM2B_DATA (a quote's qualifying data) holds up to sizeof(TPMT_HA): 34 bytes on a TPM whose
# largest bank is SHA-256, 66 with SHA-512 (tpm2_quote takes 64): 32 fits every TPM with SHA-256.
MAX_NONCE_BYTES = 32
# The least a verifier's challenge may be: with a short one, an attacker who once held the TPM can
# make a quote for every possible nonce ahead of time and replay the one asked for (256 for 1 byte).
MIN_NONCE_BYTES = 16
REFERENCE_KEYS = ("package_sha256", "bpf_object_sha256", "program_tags", "policy_sha256", "log_keys")


def check_nonce(nonce) -> str:
    """The nonce, lower-case; BadInput unless it is 16 to 32 bytes in hex."""
    ok = isinstance(nonce, str) and 2 * MIN_NONCE_BYTES <= len(nonce) <= 2 * MAX_NONCE_BYTES and len(nonce) % 2 == 0
    if not ok or any(c not in "0123456789abcdef" for c in nonce.lower()):
        raise BadInput(f"the nonce must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes in hex (an even number of "
                       f"hex digits, e.g. `openssl rand -hex 16`): a shorter one lets old quotes be replayed; "
                       f"not {str(nonce)[:80]!r}")
    return nonce.lower()


def make(tpm: Tpm, state_dir: Path, nonce: str) -> dict:
    """Quote now, with the event log as it is at this instant (under the TPM lock, so no extend
    falls between the quote and the log read)."""
    nonce = check_nonce(nonce)
    config = TpmConfig.load(state_dir)
    if not config.ak_public:
        raise TpmUnavailable(f"no attestation key in {TpmConfig.path(state_dir)}: run `skyguard tpm init` first")
    selection = f"{BANK}:" + ",".join(str(p) for p in (*PLATFORM_PCRS, config.pcr))
    msg, sig, pcrs_file = tpm.file("quote.msg"), tpm.file("quote.sig"), tpm.file("quote.pcrs")
    with tpm.locked():
        why = measure.stopped(state_dir)
        if why is not None and why.startswith(measure.PENDING):  # the daemon retries it (hook.py)
            raise TpmError(f"{why}; a quote would show a stale state until it is in: try again shortly")
        if why is not None:  # the PCR shows an older state than the one enforced (measure.py)
            raise TpmError(f"measurement stopped, so a quote would show a stale state: {why}; restart the "
                           f"daemon with a working TPM (it measures everything again)")
        out = tpm.run("tpm2_quote", "-c", f"{config.ak_handle:#x}", "-l", selection, "-q", nonce, "-g", BANK,
                      "-m", str(msg), "-s", str(sig), "-o", str(pcrs_file))
        lines = EventLog(Path(state_dir) / "tpm").lines()
    values = parse_pcr_listing(out)
    b64 = lambda path: base64.b64encode(path.read_bytes()).decode()  # noqa: E731
    return {"type": EVIDENCE_TYPE, "version": 1, "nonce": nonce, "pcr": config.pcr, "bank": BANK,
            "pcrs": {str(i): v.hex() for i, v in sorted(values.items())},
            "quote": {"attest": b64(msg), "signature": b64(sig), "tss_pcrs": b64(pcrs_file)},
            "event_log": lines, "ak_public": config.ak_public}


def digest(evidence: dict) -> str:
    """What the signed log keeps of a quote: SHA-256 over its attest and signature bytes."""
    q = evidence["quote"]
    return hashlib.sha256(base64.b64decode(q["attest"]) + base64.b64decode(q["signature"])).hexdigest()


@dataclass
class Verdict:
    failures: list[str] = field(default_factory=list)  # each names what differs
    notes: list[str] = field(default_factory=list)  # what was not compared, and why
    state: dict = field(default_factory=dict)  # what the quote proves the host measured

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        return {"ok": self.ok, "failures": self.failures, "notes": self.notes, "state": self.state}


def load_json(path: Path, what: str, regular: bool = False) -> dict:
    """The JSON object in `path`. regular: a file of the state dir, which must be a regular file
    (a FIFO put there is refused, never waited on); else anything readable (a pipe a shell gives
    the CLI)."""
    try:
        raw = fsutil.read_regular_file(Path(path)) if regular else Path(path).read_bytes()
        value = json.loads(raw.decode("utf-8"))
    except OSError as e:
        raise BadInput(f"cannot read the {what} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise BadInput(f"cannot read the {what} {path}: {e}") from None
    except ValueError as e:
        raise BadInput(f"the {what} {path} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise BadInput(f"the {what} {path} is not a JSON object")
    return value


def evidence_of(document: dict) -> dict:
    """The evidence inside what `attest --quote` printed (it may wrap it beside the statement)."""
    evidence = document.get("tpm_quote", document)
    if not isinstance(evidence, dict) or evidence.get("type") != EVIDENCE_TYPE:
        raise BadInput(f"not skyguard TPM evidence (no object of type {EVIDENCE_TYPE!r}); "
                       f"make it with `skyguard attest --quote --nonce N`")
    return evidence


def verify(evidence: dict, ak_pem: str, nonce: str, reference: dict | None) -> Verdict:
    verdict = Verdict()
    nonce = check_nonce(nonce)
    reference = reference or {}
    pcr = check_pcr(reference.get("pcr", DEFAULT_PCR))  # never 16 or 23: root could reset and refill them
    try:
        attest = base64.b64decode(evidence["quote"]["attest"], validate=True)
        signature = base64.b64decode(evidence["quote"]["signature"], validate=True)
        info = parse_attest(attest)
        if not verify_signature(ak_pem, attest, signature):
            verdict.failures.append("signature: the quote is not signed by the given AK (made by another AK, "
                                    "or its bytes were edited)")
            return verdict
    except (KeyError, TypeError, ValueError, QuoteFormatError) as e:  # the evidence's bytes, not the AK's
        detail = str(e) if isinstance(e, QuoteFormatError) else f"{type(e).__name__}: {e}"
        verdict.failures.append(f"format: the quote cannot be read ({detail})")
        return verdict
    if info.extra_data != bytes.fromhex(nonce):
        verdict.failures.append(f"nonce: the quote answers nonce {info.extra_data.hex() or '(none)'}, not {nonce} "
                                f"(a replayed or foreign quote)")
    wanted = (*PLATFORM_PCRS, pcr)
    if info.selection.get(BANK) != tuple(sorted(wanted)) or len(info.selection) != 1:
        verdict.failures.append(f"selection: the quote covers {info.selection}, not {BANK} PCRs "
                                f"{','.join(map(str, wanted))}")
        return verdict
    try:
        values = {int(k): bytes.fromhex(v) for k, v in evidence["pcrs"].items()}
        listed = [values[i] for i in sorted(wanted)]
    except (KeyError, TypeError, ValueError, AttributeError):
        verdict.failures.append(f"pcrs: the evidence does not list every quoted PCR ({','.join(map(str, wanted))})")
        return verdict
    if pcr_digest(listed) != info.pcr_digest:
        verdict.failures.append("pcr digest: the PCR values in the evidence do not hash to the quote's PCR digest "
                                "(a PCR value was edited after the quote)")
        return verdict
    verdict.state["pcrs"] = {str(i): values[i].hex() for i in sorted(wanted)}
    verdict.state["clock"] = {"reset_count": info.reset_count, "restart_count": info.restart_count}
    lines = evidence.get("event_log")
    if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
        verdict.failures.append("event log: missing or not a list of lines")
        return verdict
    try:
        base, replayed, events = replay(lines, pcr)
    except EventLogError as e:
        verdict.failures.append(f"event log: {e}")
        return verdict
    if replayed != values[pcr]:
        verdict.failures.append(f"event log: replaying its {len(lines)} lines gives PCR {pcr} = {replayed.hex()}, "
                                f"but the quoted PCR {pcr} is {values[pcr].hex()} (a line was edited, "
                                f"reordered, dropped or added, or something else extended PCR {pcr})")
        return verdict
    if base != ZERO:
        verdict.failures.append(f"event log: it starts from a base value of PCR {pcr} ({base.hex()[:16]}...), not "
                                f"zero: {events[0].get('why', 'PCR extended outside skyguard')}")
    _compare(events, values, reference, verdict)
    return verdict


def _compare(events: list[dict], values: dict[int, bytes], reference: dict, verdict: Verdict) -> None:
    """Every measurement in the log against the reference; the state the log proves."""
    state = verdict.state
    allowed = {key: reference.get(key) for key in REFERENCE_KEYS}
    for key, value in allowed.items():
        if value is None:
            verdict.notes.append(f"{key}: not compared (the reference does not list it)")
        elif not isinstance(value, list):
            raise BadInput(f"the reference's {key} must be a list")

    def check(key: str, value: str, what: str, number: int) -> None:
        if allowed[key] is not None and value not in allowed[key]:
            verdict.failures.append(f"{what} (event log line {number}): {value} is not in the reference's {key}")

    for number, event in enumerate(events, start=1):
        kind, digest_hex, detail = event["kind"], event.get("digest"), event.get("detail") or {}
        if kind == "base":
            continue
        if kind == "package":
            check("package_sha256", digest_hex, "package", number)
            state["package_sha256"] = digest_hex
        elif kind == "bpf_object":
            check("bpf_object_sha256", digest_hex, "BPF object", number)
            state["bpf_object_sha256"] = digest_hex
        elif kind == "program":
            tag = str(detail.get("tag", ""))
            if _safe(measure.program_digest, tag) != digest_hex:
                verdict.failures.append(f"program (event log line {number}): digest does not match tag {tag!r}")
            check("program_tags", tag, f"program {detail.get('name')!r} tag", number)
            state.setdefault("programs", {})[str(detail.get("name"))] = tag
        elif kind == "policy":
            check("policy_sha256", digest_hex, f"policy {detail.get('name')!r} sha256", number)
            state["policy"] = {"name": detail.get("name"), "sha256": digest_hex}
        elif kind == "log_key":
            key = str(detail.get("key", ""))
            if measure.log_key_digest(key) != digest_hex:
                verdict.failures.append(f"log key (event log line {number}): digest does not match the key")
            check("log_keys", key, "log verifier key", number)
            state["log_key"] = key
        elif kind == "attach":
            programs = detail.get("programs") or {}
            if not isinstance(programs, dict) or measure.attach_digest(programs) != digest_hex:
                verdict.failures.append(f"attach (event log line {number}): digest does not match its programs")
                continue
            for hook, tag in sorted(programs.items()):
                check("program_tags", tag, f"program at {detail.get('interface')} {hook} tag", number)
            state.setdefault("attached", {})[str(detail.get("interface"))] = programs
        else:
            verdict.failures.append(f"event log line {number}: unknown measurement kind {kind!r}")
    for state_key, ref_key, what in (("package_sha256", "package_sha256", "package"),
                                     ("bpf_object_sha256", "bpf_object_sha256", "BPF object"),
                                     ("log_key", "log_keys", "log verifier key"), ("policy", "policy_sha256", "policy")):
        if allowed[ref_key] is not None and state_key not in state:
            verdict.failures.append(f"event log: no {what} measurement (skyguard's launch was not measured)")
    for index, expected in sorted((reference.get("pcrs") or {}).items(), key=lambda kv: int(kv[0])):
        actual = values.get(int(index))
        if actual is None or actual.hex() != str(expected).lower():
            verdict.failures.append(f"platform PCR {index}: {actual.hex() if actual else 'not quoted'} is not "
                                    f"the reference's {expected}")


def cross_check(statement: dict, state: dict, vkey: str) -> list[str]:
    """Differences between the daemon's signed statement (skyguard/attest.py, signed with the host
    key `vkey`) and what the TPM's quote proves was measured: the policy in force, the programs
    loaded, the programs at each interface's hooks, the key that signs the log. Empty when they agree."""
    out = []
    said = (statement.get("policy") or {}).get("sha256")
    measured = (state.get("policy") or {}).get("sha256")
    if said != measured:
        out.append(f"statement: the daemon says it enforces policy sha256 {said}, but the last policy the TPM "
                   f"measured is {measured}")
    for name, program in sorted((statement.get("programs") or {}).items()):
        tag = (state.get("programs") or {}).get(name)
        if program.get("tag") != tag:
            out.append(f"statement: program {name} runs with tag {program.get('tag')}, the TPM measured {tag}")
    attached = state.get("attached") or {}
    for ifname, info in sorted((statement.get("interfaces") or {}).items()):
        if not isinstance(info, dict):
            continue
        said = {hook: str((p or {}).get("tag")) for hook, p in (info.get("hooks") or {}).items()}
        measured = attached.get(ifname)
        if not info.get("ours", True) and said:  # something else at its hooks (a bare one is kept dark)
            out.append(f"statement: interface {ifname} runs {said}, not skyguard's programs "
                       f"({info.get('problem', 'not ours')}); the TPM measured {measured} attached")
        elif measured is not None and said and said != measured:
            out.append(f"statement: interface {ifname} runs {said}, but the TPM measured {measured} attached")
    if state.get("log_key") != vkey:
        out.append(f"statement: signed by {vkey.split('+')[0]}'s key {vkey}, but the TPM measured the log key "
                   f"{state.get('log_key')}")
    return out


def _safe(fn, value):
    try:
        return fn(value)
    except ValueError:
        return None


def reference_from(evidence: dict, ak_pem: str, nonce: str, platform_pcrs: bool = False) -> dict:
    """A reference that accepts exactly what this (verified) evidence measured: for a known-good
    host, to be reviewed and kept by the verifier. Raises BadInput if the evidence fails."""
    pcr = check_pcr(evidence.get("pcr", DEFAULT_PCR))  # the known-good host's own PCR choice, to be reviewed
    verdict = verify(evidence, ak_pem, nonce, {"pcr": pcr})
    if not verdict.ok:
        raise BadInput("the evidence does not verify, so it cannot be a reference: " + "; ".join(verdict.failures))
    _, _, events = replay(evidence["event_log"], pcr)
    ref: dict = {"pcr": pcr}
    for key in REFERENCE_KEYS:
        ref[key] = []
    source = {"package": ("package_sha256", lambda e: e["digest"]),
              "bpf_object": ("bpf_object_sha256", lambda e: e["digest"]),
              "program": ("program_tags", lambda e: e["detail"].get("tag")),
              "policy": ("policy_sha256", lambda e: e["digest"]),
              "log_key": ("log_keys", lambda e: e["detail"].get("key"))}
    for event in events:
        if event["kind"] in source:
            key, pick = source[event["kind"]]
            if pick(event) not in ref[key]:
                ref[key].append(pick(event))
    if platform_pcrs:
        ref["pcrs"] = {k: v for k, v in evidence["pcrs"].items() if int(k) in PLATFORM_PCRS}
    return ref
