"""Options and output helpers shared by every command (one place for --json and friends)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")

# The same option, with the same meaning, on every command that reads skyguard's state: `up`'s
# state dir. Commands that ask the running daemon pass it along, and the daemon refuses the
# request if it keeps its state elsewhere (a second daemon's state dir would mislead).
state_dir_option = click.option(
    "--state-dir", type=click.Path(file_okay=False, readable=False, path_type=Path), default=None,
    envvar="SKYGUARD_STATE_DIR",
    help="skyguard's state directory, as given to `skyguard up` [default: $SKYGUARD_STATE_DIR or "
         "/var/lib/skyguard].")


def emit_json(value) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def printable(text: str) -> str:
    """`text` with every character a terminal acts on escaped (controls, C1 codes, line breaks,
    bidi overrides): fields hold what VMs, operators and identity providers sent (an SFTP path, a user name), and printed raw
    an escape sequence could erase or rewrite the entry on the auditor's screen."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def warn(message: str) -> None:
    click.echo(message, err=True)


def is_tty() -> bool:
    return sys.stdout.isatty()
