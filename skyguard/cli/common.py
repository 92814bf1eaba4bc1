"""Options and output helpers shared by every command (one place for --json and friends)."""

from __future__ import annotations

import json
import sys

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def emit_json(value) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def warn(message: str) -> None:
    click.echo(message, err=True)


def is_tty() -> bool:
    return sys.stdout.isatty()
