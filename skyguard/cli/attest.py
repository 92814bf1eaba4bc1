"""`skyguard attest`: get a signed statement of what the daemon enforces, or check one; with a
TPM, make a quote a remote verifier checks (`--quote`), or check one (`--verify --ak`).

Thin: the statement is built and signed by the daemon (control op "attest", skyguard/attest.py);
the quote is made by the TPM with the event log (skyguard/tpm/quote.py), without the daemon.
Checking needs no daemon, no TPM and no root: only the file and the key kept off this host.
"""

from __future__ import annotations

from pathlib import Path

import click

from skyguard.cli.common import emit_json, json_option, state_dir_option
from skyguard.errors import BadInput


@click.command("attest")
@click.option("--verify", "verify_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Check a saved attestation (the note, or `attest --json` output) instead of making one.")
@click.option("--key", default=None, metavar="VKEY|FILE",
              help="With --verify: the host's verifier key (`skyguard log checkpoint --public-key`), "
                   "or a file holding it. Use a copy kept off this host. With --ak too: the daemon's "
                   "signed statement in the evidence is checked and must match what the TPM measured.")
@click.option("--nonce", default=None, metavar="HEX",
              help="A fresh challenge to include (when making) or to require (with --verify): 16 to 32 bytes "
                   "in hex for a TPM quote, 16 to 64 for the signed statement.")
@click.option("--quote", "make_quote", is_flag=True,
              help="Make TPM evidence: a quote by the AK over PCRs 0-7 and skyguard's PCR with --nonce, the "
                   "event log and the AK public key (JSON), with the daemon's signed statement when it runs.")
@click.option("--ak", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --verify or --reference-from: the AK public key (PEM) that `skyguard tpm init` printed, "
                   "kept off this host. Makes --verify check TPM evidence.")
@click.option("--reference", "reference_file", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --verify --ak: the reference (JSON) of allowed package, BPF object, program tags, "
                   "policy hashes, log keys and optionally platform PCRs.")
@click.option("--reference-from", "reference_from", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Print a reference accepting exactly what this (verified) evidence of a known-good host "
                   "measured; needs --ak and --nonce.")
@click.option("--platform-pcrs", is_flag=True, help="With --reference-from: pin PCRs 0-7 too.")
@click.option("--tcti", default=None, envvar="SKYGUARD_TPM_TCTI", metavar="TCTI",
              help="With --quote: the TPM (default: as `skyguard tpm init` saved, or /dev/tpmrm0).")
@state_dir_option
@json_option
def attest(verify_file, key, nonce, make_quote, ak, reference_file, reference_from, platform_pcrs, tcti,
           state_dir, as_json):
    """A statement signed with the host key: loaded program ids and tags per interface, the
    policy's sha256 and name, the signed log's latest checkpoint, and TPM evidence when a TPM
    exists (it says so when none does).

    Save the note and check it later, anywhere, with the host's verifier key; any byte changed
    makes the check fail (exit 1).

    \b
    Examples:
      skyguard attest > now.att
      skyguard attest --nonce $(openssl rand -hex 16) --json
      skyguard log checkpoint --public-key > host.vkey      # once, kept elsewhere
      skyguard attest --verify now.att --key host.vkey

    \b
    With a TPM (`skyguard tpm init` once; the verifier keeps ak.pem and a reference):
      skyguard attest --quote --nonce $N > evidence.json
      skyguard attest --verify evidence.json --ak ak.pem --nonce $N --reference ref.json
      skyguard attest --reference-from good.json --ak ak.pem --nonce $N0 > ref.json
    """
    if reference_from is not None:
        _reference_from(reference_from, ak, nonce, platform_pcrs)
        return
    if make_quote:
        _make_quote(nonce, tcti, state_dir)
        return
    if verify_file is not None and ak is not None:
        _verify_quote(verify_file, ak, nonce, reference_file, key, as_json)
        return
    if reference_file is not None:
        raise BadInput("--reference is for --verify FILE --ak AK: checking TPM evidence")
    if verify_file is not None:
        _verify(verify_file, key, nonce, as_json)
        return
    if key:
        raise BadInput("--key is for --verify; making a statement uses the daemon's host key")
    from skyguard import control

    reply = control.request("attest", nonce=nonce, state_dir=state_dir)
    if as_json:
        emit_json({"note": reply["note"], "statement": reply["statement"], "verifier_key": reply["verifier_key"]})
    else:
        click.echo(reply["note"], nl=False)


def _verify(path: Path, key: str | None, nonce: str | None, as_json: bool) -> None:
    from skyguard import attest as attestation
    from skyguard.tlog.checkpoint import Verifier

    if not key:
        raise BadInput("--verify needs --key VKEY|FILE: the host's verifier key, kept off this host "
                       "(print it once with `skyguard log checkpoint --public-key`)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read {path}: {e}") from None
    key_text = Path(key).read_text().strip() if Path(key).is_file() else key
    from skyguard.tlog.errors import VerificationError

    try:
        statement = attestation.verify(attestation.read_note(text), Verifier.from_vkey(key_text), nonce)
    except VerificationError as e:
        raise VerificationError(f"attestation {path} does NOT verify: {e}") from None
    if as_json:
        emit_json({"ok": True, "statement": statement})
        return
    click.echo(f"attestation OK: signed by {key_text.split('+')[0]}")
    click.echo(f"  host {statement['host']}, made at {statement['time']} ns"
               + (f", nonce {statement['nonce']}" if statement.get("nonce") else ""))
    click.echo(f"  policy {statement['policy']['name']} sha256 {statement['policy']['sha256']}")
    for name, p in sorted(statement["programs"].items()):
        click.echo(f"  program {name}: id {p['id']} tag {p['tag']}")
    for ifname, info in sorted(statement["interfaces"].items()):
        hooks = ", ".join(f"{h}={v.get('name')}#{v.get('id')}/{v.get('tag')}" for h, v in info["hooks"].items())
        click.echo(f"  {ifname}: {'ours' if info['ours'] else 'NOT OURS: ' + info.get('problem', '')} {hooks}")
    lg = statement["log"]
    click.echo(f"  log {lg['origin']} size {lg['size']} root {lg['root']}")
    tpm = statement["tpm"]
    click.echo("  tpm: " + (f"PCRs {', '.join(sorted(tpm['pcrs_sha256']))} read" if tpm["available"]
                            else f"none ({tpm['why']})"))


def _make_quote(nonce: str | None, tcti: str | None, state_dir: Path | None) -> None:
    from skyguard import config, control
    from skyguard.errors import SkyguardError
    from skyguard.tpm import quote
    from skyguard.tpm.device import Tpm

    if not nonce:
        raise BadInput("--quote needs --nonce HEX: the verifier's fresh challenge (e.g. `openssl rand -hex 16`)")
    state = Path(state_dir or config.STATE_DIR)
    evidence = quote.make(Tpm.for_state_dir(state, tcti), state, nonce)
    out: dict = {"tpm_quote": evidence}
    try:
        reply = control.request("attest", nonce=quote.check_nonce(nonce), state_dir=state_dir)
        out.update(note=reply["note"], statement=reply["statement"], verifier_key=reply["verifier_key"])
    except SkyguardError as e:  # the quote stands on its own; say why the statement is missing
        out["statement_missing"] = str(e)
    emit_json(out)


def _verify_quote(path: Path, ak: Path, nonce: str | None, reference_file: Path | None, key: str | None,
                  as_json: bool) -> None:
    from skyguard.tlog.errors import VerificationError
    from skyguard.tpm import quote

    if not nonce:
        raise BadInput("--verify with --ak needs --nonce HEX: the challenge you sent to the host")
    document = quote.load_json(path, "evidence")
    evidence = quote.evidence_of(document)
    reference = quote.load_json(reference_file, "reference") if reference_file else None
    verdict = quote.verify(evidence, ak.read_text(), nonce, reference)
    if key and verdict.ok:  # the daemon's signed statement, bound to what the TPM measured
        verdict.failures += _statement_failures(document, key, nonce, verdict.state)
    if as_json:
        emit_json(verdict.as_dict())
    elif verdict.ok:
        state = verdict.state
        click.echo(f"TPM quote OK: signed by the AK, nonce {nonce.lower()}, event log replays to PCR "
                   f"{evidence.get('pcr')} ({len(evidence.get('event_log', []))} lines)")
        if state.get("policy"):
            click.echo(f"  policy {state['policy']['name']} sha256 {state['policy']['sha256']}")
        for name, tag in sorted(state.get("programs", {}).items()):
            click.echo(f"  program {name} tag {tag}")
        click.echo(f"  package sha256 {state.get('package_sha256')}")
        for note in verdict.notes:
            click.echo(f"  note: {note}")
    if not verdict.ok:
        raise VerificationError(f"TPM evidence {path} does NOT verify:\n  " + "\n  ".join(verdict.failures))


def _statement_failures(document: dict, key: str, nonce: str, state: dict) -> list[str]:
    from skyguard import attest as attestation
    from skyguard.tlog.checkpoint import Verifier
    from skyguard.tlog.errors import BadLogInput, VerificationError
    from skyguard.tpm import quote

    if not isinstance(document.get("note"), str):
        return ["statement: the evidence carries no signed statement (the daemon was not running: "
                f"{document.get('statement_missing', 'no reason given')})"]
    key_text = Path(key).read_text().strip() if Path(key).is_file() else key
    verifier = Verifier.from_vkey(key_text)  # a malformed key is bad input (exit 2), not a failed check
    try:
        statement = attestation.verify(document["note"], verifier, nonce)
    except (VerificationError, BadLogInput) as e:
        return [f"statement: {e}"]
    return quote.cross_check(statement, state, key_text)


def _reference_from(path: Path, ak: Path | None, nonce: str | None, platform_pcrs: bool) -> None:
    from skyguard.tpm import quote

    if ak is None or not nonce:
        raise BadInput("--reference-from needs --ak AK and --nonce N (it verifies the evidence first)")
    evidence = quote.evidence_of(quote.load_json(path, "evidence"))
    emit_json(quote.reference_from(evidence, ak.read_text(), nonce, platform_pcrs))
