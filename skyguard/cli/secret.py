"""`skyguard secret`: the sealed secret and key store from the command line.

Thin commands over skyguard.custody.store. Values come from stdin or a file and are never echoed,
printed or logged; `list` shows names and metadata only. Not the credential proxy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from skyguard import config
from skyguard.cli.common import emit_json, json_option, state_dir_option
from skyguard.custody.store import MAX_VALUE_BYTES, SecretStore, validate_secret_name
from skyguard.errors import BadInput


def open_store(state_dir: Path | None) -> SecretStore:
    return SecretStore((state_dir or config.STATE_DIR) / "secrets")


@click.group("secret")
def secret():
    """The sealed store of secrets and keys (encrypted at rest under a host key).

    \b
    Examples:
      printf %s "$GITHUB_TOKEN" | skyguard secret set github
      skyguard secret set web1 --file web1-key.pem
      skyguard secret list --json
      skyguard secret rm github
    """


@secret.command("set")
@click.argument("name")
@click.option("--file", "value_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Read the value from this file (exact bytes) instead of stdin.")
@state_dir_option
def set_command(name, value_file, state_dir):
    """Seal a value under NAME, replacing any previous value.

    The value is read from stdin (one trailing newline is dropped, so `echo TOKEN |` works) or,
    with --file, byte for byte from a file. On a terminal it is asked for without echo. It is
    never printed. An empty value is refused.

    \b
    Examples:
      printf %s "$TOKEN" | skyguard secret set github
      skyguard secret set sdnctl1 --file sdnctl1.key
    """
    validate_secret_name(name)
    if value_file is not None:
        value = value_file.read_bytes()
    elif sys.stdin.isatty():
        value = click.prompt(f"value for {name}", hide_input=True, confirmation_prompt=True,
                             prompt_suffix=": ", show_default=False).encode()
    else:
        value = sys.stdin.buffer.read(MAX_VALUE_BYTES + 2)
        if value.endswith(b"\r\n"):
            value = value[:-2]
        elif value.endswith(b"\n"):
            value = value[:-1]
    if not value:
        raise BadInput(f"refusing to seal an empty value for {name!r}: pipe the value on stdin or use --file")
    meta = open_store(state_dir).set(name, value)
    click.echo(f"sealed {name} ({meta['size']} bytes)", err=True)


@secret.command("list")
@json_option
@state_dir_option
def list_command(as_json, state_dir):
    """List the secrets: names, sizes and times (never values)."""
    entries = open_store(state_dir).list()
    if as_json:
        emit_json(entries)
        return
    if not entries:
        click.echo("no secrets (add one with `skyguard secret set NAME`)", err=True)
        return
    width = max(len(e["name"]) for e in entries)
    click.echo(f"{'NAME':<{width}}  {'BYTES':>7}  {'CREATED':<27}  UPDATED")
    for e in entries:
        click.echo(f"{e['name']:<{width}}  {e['size']:>7}  {e['created']:<27}  {e['updated']}")


@secret.command("rm")
@click.argument("name")
@state_dir_option
def rm_command(name, state_dir):
    """Remove the secret NAME."""
    open_store(state_dir).remove(name)
    click.echo(f"removed {name}", err=True)
