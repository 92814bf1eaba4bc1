"""The `skyguard` entry point: the click group, command registration, and the one place where
errors are turned into messages and exit codes (0 ok, 1 runtime failure, 2 bad input)."""

from __future__ import annotations

import importlib
import sys

import click

from skyguard import __version__
from skyguard.errors import SkyguardError

# (module under skyguard.cli, attribute): each a click command or group. One line per command.
COMMANDS = [
    ("doctor", "doctor"),
    ("policy", "policy"),
    ("lab", "lab"),
    ("secret", "secret"),
    ("admin", "admin"),
    ("ca", "ca"),
    ("log", "log"),
    ("daemon", "up"),
    ("daemon", "down"),
    ("daemon", "status"),
    ("demo", "demo"),
    ("flows", "flows"),
    ("attest", "attest"),
    ("tpm", "tpm"),
    ("top", "top"),
    ("fleet", "fleet"),
    ("key", "key"),
    ("apps", "apps"),
]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="skyguard")
def cli():
    """skyguard: a zero-trust data path for the VMs of one Linux host.

    \b
    Examples:
      skyguard doctor                      check this machine's prerequisites
      skyguard demo                        build the lab, enforce the default policy, play a scenario
      skyguard up --policy policies/keysystems.yaml
      skyguard policy load new.yaml        hot-swap the running policy atomically
    """


for module_name, attr in COMMANDS:
    cli.add_command(getattr(importlib.import_module(f"skyguard.cli.{module_name}"), attr))


def main() -> None:
    try:
        # standalone_mode=False returns ctx.exit(n)'s code instead of exiting: honour it.
        code = cli(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except SkyguardError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
