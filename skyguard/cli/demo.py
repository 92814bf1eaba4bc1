"""`skyguard demo`: see skyguard/demo.py."""

import sys

import click


@click.command("demo")
@click.option("--keep-lab", is_flag=True, help="Leave the lab up afterwards (`skyguard lab down` removes it).")
def demo(keep_lab):
    """Build the lab, enforce policies/keysystems.yaml, play a scenario, show every decision and
    why, verify the signed log, tear down. Exit 1 if anything was not decided as the policy says.

    \b
    Examples:
      skyguard demo
      skyguard demo --keep-lab && skyguard lab exec agent1 -- ping -c1 10.10.2.2
    """
    from skyguard.demo import Demo
    from skyguard.doctor import require_privileges

    require_privileges("skyguard demo")
    sys.exit(Demo(keep=keep_lab).run())
