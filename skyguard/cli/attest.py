"""`skyguard attest`: get a signed statement of what the daemon enforces, or check one.

Thin: the statement is built and signed by the daemon (control op "attest", skyguard/attest.py);
checking needs no daemon and no root, only the note and the host's verifier key.
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
                   "or a file holding it. Use a copy kept off this host.")
@click.option("--nonce", default=None, metavar="HEX",
              help="A fresh challenge to include (when making) or to require (with --verify).")
@state_dir_option
@json_option
def attest(verify_file, key, nonce, state_dir, as_json):
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
    """
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
