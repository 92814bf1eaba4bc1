"""`skyguard demo`: see skyguard/demo.py."""

import sys

import click


@click.command("demo")
@click.option("--keep-lab", is_flag=True, help="Leave the lab up afterwards (`skyguard lab down` removes it).")
@click.option("--attack", is_flag=True, help="Play a compromised VM's kill chain instead (skyguard/attack.py).")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False), default=None,
              help="Enforce this policy instead of the embedded one (it needs the demo's roles: dc1, agent1, ...).")
def demo(keep_lab, attack, policy_file):
    """Build the lab, enforce policies/keysystems.yaml, play a scenario, show every decision and
    why, verify the signed log, tear down. Exit 1 if anything was not decided as the policy says.

    \b
    Examples:
      skyguard demo
      skyguard demo --keep-lab && skyguard lab exec agent1 -- ping -c1 10.10.2.2
      skyguard demo --policy my-lab.yaml   # the same scenario, addressed by another policy
      skyguard demo --attack     # agent1 is owned: scans, lateral movement, spoofing, ARP/ND
                                 # poisoning, rogue RA, C2; each blocked, with its drop reason
    """
    from skyguard.demo import Demo
    from skyguard.doctor import require_privileges

    require_privileges("skyguard demo")
    if attack:
        from skyguard.attack import run_attack_demo

        sys.exit(run_attack_demo(policy_path=policy_file))
    sys.exit(Demo(keep=keep_lab, policy_path=policy_file).run())
