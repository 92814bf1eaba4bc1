"""Attestation: a statement, signed with the host key, of what this skyguard enforces right now.

The statement names the programs this daemon loaded (kernel id and tag of each), what is
attached to every workload interface (id, name and tag per hook, and whether it is ours), the
active policy's name and sha256, and the signed log's latest checkpoint (made at that moment,
and embedded as its own signed note). A verifier needs only the host's verifier key, the same
key that signs the log's checkpoints (`skyguard log checkpoint --public-key`).

Format: a C2SP signed note whose text is the line `skyguard-attestation/v1` followed by one line
of canonical JSON (sorted keys, no spaces), so any byte changed breaks the signature and a script
can read it without this code.

TPM: when a TPM exists (a device, or one `skyguard tpm init` configured) the statement carries
the PCR values as read (platform PCRs 0-7 and skyguard's PCR: not a quote; `skyguard attest
--quote` makes the TPM sign them, skyguard/tpm/quote.py); when none does, it says so. It never
pretends. Evidence, not defence: a kernel-level attacker can lie to this code (SPEC.md section 2).
Not here: the key itself (tlog.hostkey) or the note format (tlog.checkpoint).
"""

from __future__ import annotations

import base64
import json
import socket
import time
from pathlib import Path

from skyguard.errors import BadInput
from skyguard.tlog.checkpoint import Signer, Verifier, parse_and_verify
from skyguard.tlog.entries import canonical
from skyguard.tlog.errors import BadLogInput, VerificationError

HEADER = "skyguard-attestation/v1"
TPM_DEVICES = ("/dev/tpmrm0", "/dev/tpm0")
MAX_NONCE = 128  # hex characters: a verifier's challenge, bounded
# hex characters (16 bytes): a shorter challenge lets statements made ahead for every nonce be replayed
MIN_NONCE = 32


def check_nonce(nonce) -> str:
    """A verifier's challenge, lower-case; BadInput unless it is MIN_NONCE to MAX_NONCE hex digits."""
    if not isinstance(nonce, str) or not MIN_NONCE <= len(nonce) <= MAX_NONCE or \
            any(c not in "0123456789abcdef" for c in nonce.lower()):
        raise BadInput(f"nonce must be {MIN_NONCE} to {MAX_NONCE} hex digits (a verifier's fresh challenge, "
                       f"e.g. `openssl rand -hex 16`; a shorter one lets old statements be replayed)")
    return nonce.lower()


def program_identities(datapath) -> dict:
    """{program name: {"id", "tag"}} of the programs this Datapath loaded (from the kernel's
    bpf_prog_info of each fd, so they match what `bpftool prog` and `ip link` show)."""
    return {name: {"id": info.id, "tag": info.tag} for name, info in datapath.program_infos().items()}


def tpm_evidence(state_dir: Path | None = None) -> dict:
    """PCR values as read (platform PCRs 0-7 and skyguard's PCR), or why there are none. Not a
    quote: `skyguard attest --quote --nonce N` makes the TPM sign them (skyguard/tpm/quote.py)."""
    from skyguard.tpm.device import PLATFORM_PCRS, Tpm, TpmConfig, TpmError, find_tcti

    try:
        tcti = find_tcti(state_dir)
        if tcti is None:
            return {"available": False, "why": f"no TPM device ({', '.join(TPM_DEVICES)}; swtpm can provide one) "
                                               f"and none configured (`skyguard tpm init --tcti T`)"}
        pcr = TpmConfig.load(state_dir).pcr if state_dir is not None else TpmConfig().pcr
        values = Tpm(tcti).pcr_read([*PLATFORM_PCRS, pcr])
    except (TpmError, OSError) as e:
        return {"available": False, "why": f"the TPM cannot be read: {e}"}
    return {"available": True, "device": tcti, "skyguard_pcr": pcr,
            "pcrs_sha256": {str(i): v.hex() for i, v in sorted(values.items())},
            "kind": "PCR values as read; not a TPM quote (`skyguard attest --quote --nonce N` makes one)"}


def collect(datapath, policy, writer, nonce: str | None = None) -> dict:
    """The statement (a dict) of what runs now. Makes a fresh checkpoint of the log so the
    statement covers every entry up to this moment."""
    if nonce is not None:
        nonce = check_nonce(nonce)
    ours = program_identities(datapath)
    problems = datapath.verify()
    interfaces = {}
    for ifname, hooks in sorted(datapath.attached().items()):
        interfaces[ifname] = {"hooks": {h: {"id": p.get("id"), "name": p.get("name"), "tag": p.get("tag")}
                                        for h, p in sorted(hooks.items())},
                              "ours": ifname not in problems}
    for ifname, problem in sorted(problems.items()):
        interfaces.setdefault(ifname, {"hooks": {}, "ours": False})["problem"] = problem
    note = writer.checkpoint()
    cp = parse_and_verify(note, writer.signer.verifier)
    return {
        "type": "skyguard_attestation",
        "time": time.time_ns(),
        "host": socket.gethostname(),
        "nonce": nonce,
        "policy": {"name": policy.name, "sha256": policy.sha256},
        "programs": ours,
        "from_vm_hook": datapath.from_vm_hook,
        "interfaces": interfaces,
        "log": {"origin": cp.origin, "size": cp.size, "root": base64.b64encode(cp.hash).decode(),
                "checkpoint": note},
        "tpm": tpm_evidence(getattr(writer, "directory", None) and Path(writer.directory).parent),
    }


def sign(statement: dict, signer: Signer) -> str:
    return signer.sign(f"{HEADER}\n{canonical(statement).decode('utf-8')}\n")


def attest(datapath, policy, writer, nonce: str | None = None) -> dict:
    """What the daemon's control op "attest" returns: the signed note, the statement, the key."""
    statement = collect(datapath, policy, writer, nonce)
    return {"note": sign(statement, writer.signer), "statement": statement,
            "verifier_key": writer.signer.verifier.vkey()}


def verify(note: str, verifier: Verifier, nonce: str | None = None) -> dict:
    """The statement of a note signed by `verifier`; raises VerificationError when the signature,
    the embedded checkpoint or the nonce does not check out, BadLogInput when malformed."""
    if nonce is not None:
        nonce = check_nonce(nonce)
    text = verifier.verify(note)
    header, _, rest = text.partition("\n")
    if header != HEADER:
        raise BadLogInput(f"not a skyguard attestation (first line {header[:40]!r}, expected {HEADER!r})")
    body = rest.rstrip("\n")
    if "\n" in body:
        raise BadLogInput("a skyguard attestation holds exactly one JSON line after its header")
    try:
        statement = json.loads(body)
    except ValueError:
        raise BadLogInput("the attestation's statement is not JSON") from None
    if not isinstance(statement, dict) or statement.get("type") != "skyguard_attestation":
        raise BadLogInput("the attestation's statement is not a skyguard_attestation object")
    if canonical(statement).decode("utf-8") != body:
        raise VerificationError("the attestation's statement is not in canonical form")
    log_part = statement.get("log") or {}
    try:
        cp = parse_and_verify(log_part.get("checkpoint", ""), verifier, log_part.get("origin"))
    except (BadLogInput, VerificationError) as e:
        raise VerificationError(f"the log checkpoint inside the attestation does not verify: {e}") from None
    if cp.size != log_part.get("size") or base64.b64encode(cp.hash).decode() != log_part.get("root"):
        raise VerificationError("the attestation's log size or root differs from its embedded checkpoint")
    if nonce is not None and statement.get("nonce") != nonce:
        raise VerificationError(f"the attestation answers nonce {statement.get('nonce')!r}, not {nonce!r} "
                                f"(a replayed statement?)")
    return statement


def read_note(text: str) -> str:
    """A note from what `skyguard attest` printed: the bare note, or its --json output."""
    if text.lstrip().startswith("{"):
        try:
            note = json.loads(text)["note"]
        except (ValueError, KeyError, TypeError):
            raise BadLogInput("the file is JSON but not `skyguard attest --json` output (no 'note')") from None
        if not isinstance(note, str):
            raise BadLogInput("the 'note' of the JSON file is not text")
        return note
    return text
