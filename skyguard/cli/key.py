"""`skyguard key`: keys held in a PKCS#11 token (or sealed in the store), used by VMs only through
the crypto proxy. Thin commands over skyguard.keys; each change is an entry in the signed log.

Where keys live comes from the policy's `keys:` section: the running daemon's policy, or the file
given with --policy. No command prints or exports a private key.
"""

from __future__ import annotations

from pathlib import Path

import click

from skyguard import config
from skyguard.cli.common import emit_json, json_option, state_dir_option
from skyguard.errors import BadInput
from skyguard.keys.types import KEY_TYPES

policy_option = click.option(
    "--policy", "policy_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
    help="Read the `keys:` section from this policy [default: the running daemon's policy].")


def _keys_config(policy_file: Path | None, state_dir: Path | None):
    from skyguard import control
    from skyguard.policy.parse import load_policy, parse_policy

    if policy_file is not None:
        policy = load_policy(policy_file)
    elif control.daemon_running():
        reply = control.request("policy.get", state_dir=state_dir)
        policy = parse_policy(reply["text"], source=reply.get("source", "<daemon>"))
    else:
        raise BadInput("no skyguard daemon is running to say where keys live; give --policy FILE "
                       "(its `keys:` section names the backend)")
    if policy.keys is None:
        raise BadInput(f"policy {policy.name!r} has no `keys:` section; add one (backend: pkcs11 or file)")
    return policy.keys


def _open(policy_file, state_dir):
    from skyguard.keys.backends import open_backend

    state = state_dir or config.STATE_DIR
    return open_backend(_keys_config(policy_file, state_dir), state), state


@click.group("key")
def key():
    """Keys in a PKCS#11 token (SoftHSM or hardware) that VMs use through the crypto proxy.

    \b
    Examples:
      skyguard key create release --type ec-p256
      skyguard key list --json
      skyguard key public release > release.pub.pem
      skyguard key rm release
    """


@key.command("create")
@click.argument("name")
@click.option("--type", "key_type", type=click.Choice(KEY_TYPES), required=True,
              help="The key's algorithm: ECDSA P-256, Ed25519 or RSA 3072 (RSA also decrypts).")
@policy_option
@json_option
@state_dir_option
def create_command(name, key_type, policy_file, as_json, state_dir):
    """Generate the key NAME inside the token (non-extractable, sensitive).

    \b
    Examples:
      skyguard key create release --type ed25519
      skyguard key create wrap --type rsa-3072 --policy site.yaml
    """
    from skyguard.keys.record import record_key_event

    backend, state = _open(policy_file, state_dir)
    try:
        info = backend.create(name, key_type)
    finally:
        backend.close()
    record_key_event(state, "key_create", name=info.name, key_type=info.type, backend=info.backend,
                     extractable=info.extractable)
    if as_json:
        emit_json(info.as_dict())
    else:
        click.echo(f"created {info.name} ({info.type}) in the {info.backend} backend", err=True)


@key.command("list")
@policy_option
@json_option
@state_dir_option
def list_command(policy_file, as_json, state_dir):
    """List the keys: name, type, backend, whether the token would let the key out."""
    backend, _ = _open(policy_file, state_dir)
    try:
        keys = backend.list()
    finally:
        backend.close()
    if as_json:
        emit_json([k.as_dict() for k in keys])
        return
    if not keys:
        click.echo("no keys (create one with `skyguard key create NAME --type ec-p256`)", err=True)
        return
    width = max(len(k.name) for k in keys)
    click.echo(f"{'NAME':<{width}}  {'TYPE':<9}  {'BACKEND':<7}  EXTRACTABLE")
    for k in keys:
        click.echo(f"{k.name:<{width}}  {k.type:<9}  {k.backend:<7}  {'yes' if k.extractable else 'no'}")


@key.command("public")
@click.argument("name")
@policy_option
@state_dir_option
def public_command(name, policy_file, state_dir):
    """Print the public key of NAME as PEM (SubjectPublicKeyInfo), for `openssl` and verifiers.

    \b
    Example:
      skyguard key public release > release.pem
      openssl pkeyutl -verify -pubin -inkey release.pem -in digest.bin -sigfile sig.der
    """
    backend, _ = _open(policy_file, state_dir)
    try:
        pem = backend.public_pem(name)
    finally:
        backend.close()
    click.echo(pem.decode(), nl=False)


@key.command("rm")
@click.argument("name")
@policy_option
@state_dir_option
def rm_command(name, policy_file, state_dir):
    """Destroy the key NAME in the token (its public half too). This cannot be undone."""
    from skyguard.keys.record import record_key_event

    backend, state = _open(policy_file, state_dir)
    try:
        kind = backend.name
        backend.remove(name)
    finally:
        backend.close()
    record_key_event(state, "key_remove", name=name, backend=kind)
    click.echo(f"removed {name}", err=True)
