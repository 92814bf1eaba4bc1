"""`skyguard tpm`: the TPM's identity, what skyguard measured into it, and the store key's sealing.

Thin commands over skyguard.tpm. They talk to the TPM themselves (tpm2-tools), not to the daemon:
they work whether or not it runs, and serialise with it through the TPM lock in the state dir.
"""

from __future__ import annotations

from pathlib import Path

import click

from skyguard import config
from skyguard.cli.common import emit_json, json_option, state_dir_option
from skyguard.errors import BadInput

tcti_option = click.option("--tcti", default=None, envvar="SKYGUARD_TPM_TCTI", metavar="TCTI",
                           help="The TPM, as tpm2-tools name it: device:/dev/tpmrm0 (default when present) "
                                "or swtpm:host=127.0.0.1,port=2321 [env SKYGUARD_TPM_TCTI].")


def _state(state_dir: Path | None) -> Path:
    return Path(state_dir or config.STATE_DIR)


@click.group("tpm")
def tpm():
    """The TPM-rooted chain of trust: identity, measured launch, sealed store key.

    \b
    Examples:
      skyguard tpm init                               EK, AK (bound by make/activate credential)
      skyguard tpm init --tcti swtpm:host=127.0.0.1,port=2321 --pcr 13
      skyguard tpm status                             PCR, event log, which store key is in use
      skyguard tpm seal-store                         move the store key from its file into the TPM
      skyguard tpm reference ref.json                 what continuous attestation checks quotes against
      skyguard attest --quote --nonce $(openssl rand -hex 16) > evidence.json
    """


@tpm.command("init")
@tcti_option
@click.option("--pcr", type=int, default=None,
              help="skyguard's PCR, one of 8-15 (default 13; never 16 or 23, which root could reset).")
@click.option("--ek-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Check that the EK certificate certifies this TPM's EK and was issued by this CA "
                   "certificate (PEM: the TPM maker's, or swtpm's local CA).")
@state_dir_option
@json_option
def init(tcti, pcr, ek_ca, state_dir, as_json):
    """Create or reuse the EK and a persistent AK bound to it; print their public keys.

    The AK (ECC P-256, restricted signing, at 0x81010002) is made under the EK and proven resident
    in the same TPM by make/activate credential. Give the AK public key (and the EK certificate,
    where the TPM has one) to the verifiers, kept off this host.
    """
    from skyguard.tpm import identity
    from skyguard.tpm.device import Tpm

    state = _state(state_dir)
    device = Tpm.for_state_dir(state, tcti)
    info = identity.init(device, state, pcr)
    if ek_ca is not None:
        from skyguard.tpm.device import TpmError

        if not info["ek_certificate"]:
            raise TpmError("--ek-ca given, but this TPM holds no EK certificate (NV index 0x01c00002)")
        problems = identity.check_ek_certificate(info["ek_certificate"], info["ek_public"], ek_ca.read_text())
        if problems:
            raise TpmError("the EK certificate does not check out: " + "; ".join(problems))
        info["ek_certificate_checked"] = str(ek_ca)
    if as_json:
        emit_json(info)
        return
    click.echo(f"TPM {info['tcti']}: AK at {info['ak_handle']} ({'reused' if info['ak_reused'] else 'created'}), "
               f"skyguard's PCR {info['pcr']}")
    click.echo(f"AK name {info['ak_name']}; {info['bound']}")
    click.echo("AK public key (give it to verifiers: `attest --verify ... --ak FILE`):")
    click.echo(info["ak_public"].rstrip())
    click.echo("EK public key:")
    click.echo(info["ek_public"].rstrip())
    if info["ek_certificate"]:
        click.echo("EK certificate" + (f" (issued by {info['ek_certificate_checked']}, certifies this EK):"
                                       if info.get("ek_certificate_checked") else ":"))
        click.echo(info["ek_certificate"].rstrip())
    else:
        click.echo("EK certificate: none in this TPM's NV (index 0x01c00002)")


@tpm.command("status")
@tcti_option
@state_dir_option
@json_option
def status(tcti, state_dir, as_json):
    """Which TPM, skyguard's PCR and whether its event log replays to it, the AK, the store key."""
    from skyguard.tpm.device import Tpm, TpmConfig, TpmError, find_tcti
    from skyguard.tpm.eventlog import EventLog, EventLogError, replay
    from skyguard.tpm.sealing import key_in_use

    state = _state(state_dir)
    out: dict = {"store_key": key_in_use(state / "secrets")}
    found = find_tcti(state, tcti)
    out["tcti"] = found
    if found is not None:
        config_ = TpmConfig.load(state)
        out.update(pcr=config_.pcr, attestation_key=bool(config_.ak_public))
        try:
            device = Tpm.for_state_dir(state, tcti)
            with device.locked():
                value = device.pcr_read([config_.pcr])[config_.pcr]
                lines = EventLog(state / "tpm").lines()
            out["pcr_value"] = value.hex()
            out["event_log_lines"] = len(lines)
            from skyguard.tpm.measure import stopped

            if stopped(state):
                out["measurement_stopped"] = stopped(state)
            try:
                base, replayed, _ = replay(lines, config_.pcr)
                out["event_log_replays"] = replayed == value
                out["event_log_base_zero"] = not any(base)
            except EventLogError as e:
                out["event_log_replays"], out["event_log_problem"] = False, str(e)
        except TpmError as e:
            out["problem"] = str(e)
    if as_json:
        emit_json(out)
        return
    click.echo(f"store key: {_store_key_text(out['store_key'])}")
    if found is None:
        click.echo("TPM: none (no /dev/tpmrm0, none configured): nothing is measured or quoted")
        return
    click.echo(f"TPM: {found}; skyguard's PCR {out['pcr']}; attestation key: "
               f"{'yes' if out['attestation_key'] else 'none (run `skyguard tpm init`)'}")
    if "problem" in out:
        click.echo(f"TPM problem: {out['problem']}")
        return
    click.echo(f"PCR {out['pcr']} = {out['pcr_value']}; event log: {out['event_log_lines']} lines, "
               + ("replays to it" if out.get("event_log_replays") else
                  f"DOES NOT replay to it {out.get('event_log_problem', '')}".rstrip()))
    if out.get("measurement_stopped"):
        click.echo(f"measurement STOPPED (quotes are refused until the daemon restarts): {out['measurement_stopped']}")


def _store_key_text(kind: str) -> str:
    return {"tpm": "sealed by the TPM (secrets/sealing.key.tpm)",
            "file": "a file (secrets/sealing.key); `skyguard tpm seal-store` moves it into the TPM",
            "none": "none yet (no secret stored)"}[kind]


@tpm.command("seal-store")
@tcti_option
@click.option("--pcrs", default="0,1,2,3,4,5,6,7", show_default=True,
              help="The sha256 PCRs whose current values the key is sealed to.")
@state_dir_option
@json_option
def seal_store(tcti, pcrs, state_dir, as_json):
    """Move the secret store's key from its file into the TPM, sealed to the PCRs' current values.

    The sealed copy is unsealed and compared before the file key is removed. Afterwards the
    secrets open only with this TPM, in this measured state: a copied state dir on another host,
    or this host booted into another state, cannot open them. Stop the daemon first.
    """
    from skyguard.tpm.device import Tpm
    from skyguard.tpm.sealing import migrate

    try:
        selected = [int(p) for p in pcrs.split(",") if p.strip()]
    except ValueError:
        raise BadInput(f"--pcrs takes PCR numbers separated by commas, not {pcrs!r}") from None
    state = _state(state_dir)
    result = migrate(state / "secrets", Tpm.for_state_dir(state, tcti), selected)
    if as_json:
        emit_json(result)
    elif result["changed"]:
        click.echo(f"the store key is now sealed by the TPM to sha256 PCRs {','.join(map(str, result['pcrs']))} "
                   f"({result['sealed_file']}); the file key was removed")
    else:
        click.echo(f"the store key was already sealed by the TPM ({result['sealed_file']})")


@tpm.command("reference")
@click.argument("reference_file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--clear", is_flag=True, help="Remove the reference: quotes are then checked without one.")
@state_dir_option
def reference(reference_file, clear, state_dir):
    """Set the reference the daemon's continuous attestation checks each quote against.

    Make it with `skyguard attest --reference-from` (from a known-good host's evidence) and review
    it first. Without one, each quote's signature and event-log replay are still checked.
    """
    from skyguard import fsutil
    from skyguard.tpm import quote
    from skyguard.tpm.monitor import REFERENCE_FILE

    target = _state(state_dir) / "tpm" / REFERENCE_FILE
    if clear:
        target.unlink(missing_ok=True)
        click.echo(f"removed {target}")
        return
    if reference_file is None:
        raise BadInput("give the reference file (from `skyguard attest --reference-from`), or --clear")
    ref = quote.load_json(reference_file, "reference")
    unknown = set(ref) - {"pcr", "pcrs", *quote.REFERENCE_KEYS}
    if unknown or not any(isinstance(ref.get(k), list) for k in quote.REFERENCE_KEYS):
        raise BadInput(f"{reference_file} is not a skyguard reference (keys {', '.join(quote.REFERENCE_KEYS)}"
                       + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else "") + ")")
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fsutil.write_private(target, reference_file.read_bytes())
    click.echo(f"continuous attestation now checks quotes against {target} (the daemon reads it at each quote)")
