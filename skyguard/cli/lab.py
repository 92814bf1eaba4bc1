"""`skyguard lab ...`: thin click commands over skyguard.lab.Lab (build, inspect, use, tear down
the namespaces that stand in for VMs). No lab logic lives here."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from skyguard import config
from skyguard.cli.common import emit_json, json_option


def _lab(policy=None):
    from skyguard.lab import Lab

    return Lab(policy_path=policy or config.DEFAULT_POLICY, prefix=config.LAB_PREFIX)


@click.group("lab", epilog="""\b
Examples:
  skyguard lab up                                 one namespace per workload of the default policy
  skyguard lab up --policy mypolicy.yaml
  skyguard lab up --vms qemu                      a real QEMU guest per workload, on taps
  skyguard lab status --json                      names, addresses, server pids, CA, requests log
  skyguard lab exec radius1 -- ping -c1 10.10.2.2
  skyguard lab exec agent1 -- curl https://pypi.sandbox.test/
  skyguard lab exec internet -- tail -f /run/skyguard-lab/default/requests.jsonl
  skyguard lab down
""")
def lab():
    """Network namespaces (or real QEMU guests, `up --vms qemu`) as VMs, a lab host and a sealed
    internet, for trying and testing skyguard.

    Namespaces get the prefix in SKYGUARD_LAB_PREFIX (none by default). Needs root.
    """


@lab.command("up", epilog="""\b
Examples:
  skyguard lab up
  SKYGUARD_LAB_PREFIX=t1- skyguard lab up --policy policies/keysystems.yaml
  skyguard lab up --vms qemu                      every workload a QEMU guest
  skyguard lab up --vms qemu=agent1,dc1           those two guests, the others namespaces
""")
@click.option("--policy", type=click.Path(path_type=Path, dir_okay=False),
              help=f"Policy whose workloads become lab VMs [default: {config.DEFAULT_POLICY}].")
@click.option("--vms", default="netns", show_default=True, metavar="netns|qemu|qemu=NAME,..",
              help="What a workload is: a network namespace, or a real QEMU guest (Debian's cloud "
                   "kernel, busybox) on a tap named by its interface; KVM when it works, else "
                   "software emulation.")
@json_option
def up(policy, vms, as_json):
    """Build the lab (idempotent: a second run changes nothing; leftovers are cleaned)."""
    status = _lab(policy).up(vms=vms)
    if as_json:
        emit_json(status)
    else:
        _print_status(status)


@lab.command("down", epilog="""\b
Examples:
  skyguard lab down
""")
def down():
    """Remove everything the lab made (no error if nothing is up)."""
    _lab().down()


@lab.command("status", epilog="""\b
Examples:
  skyguard lab status
  skyguard lab status --json | jq -r .requests_log
""")
@json_option
def status(as_json):
    """Show namespaces, interfaces, addresses, server pids and health, CA path and requests log.

    Exits 1 when the lab is not up (or its servers do not answer), 0 otherwise.
    """
    result = _lab().status(probe=True)
    if as_json:
        emit_json(result)
    else:
        _print_status(result)
    guests_ok = all(vm.get("answering", True) for vm in result["vms"])
    if not (result["up"] and result["internet"]["servers"]["healthy"] and guests_ok):
        sys.exit(1)


@lab.command("exec", context_settings={"ignore_unknown_options": True,
                                       "allow_interspersed_args": False},
             epilog="""\b
Examples:
  skyguard lab exec radius1 -- ip addr
  skyguard lab exec dc1 -- dig foo.test
  skyguard lab exec host -- ip route
  skyguard lab exec agent1 -- cat /proc/cmdline      in a QEMU guest: through its agent
""")
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def exec_(name, command):
    """Run COMMAND inside lab VM NAME (or `host` or `internet`); its exit status is passed through.
    In a QEMU guest, COMMAND runs with the guest's sh and its output comes back when it ends."""
    argv = list(command)
    if argv and argv[0] == "--":  # click passes the separator through once parsing has stopped
        argv = argv[1:]
    completed = _lab().exec(name, argv)
    sys.exit(completed.returncode)


def _print_status(s: dict) -> None:
    state = "up" if s["up"] else "not up"
    click.echo(f"lab {s['prefix'] or 'default'}: {state}" + (f" (policy {s['policy']})" if s["policy"] else ""))
    if not s["vms"] and not s["up"]:
        click.echo("  run `skyguard lab up` to build it")
        return
    click.echo(f"  host      netns {s['host']['netns']}, uplink {s['host']['uplink']} "
               f"{' '.join(s['host']['addresses'])}, VM gateway {' '.join(s['host']['vm_gateway'])}")
    for vm in s["vms"]:
        if vm.get("kind") == "qemu":
            answering = {True: ", answering", False: ", NOT answering"}.get(vm.get("answering"), "")
            click.echo(f"  {vm['name']:<9} QEMU guest pid {vm['pid']} {vm['state']}{answering} "
                       f"({vm['accel']}), zone {vm['zone']}, tap {vm['interface']}, {vm['mac']}, "
                       f"{' '.join(vm['addresses'])}; console {vm['console_log']}")
            continue
        click.echo(f"  {vm['name']:<9} netns {vm['netns']}, zone {vm['zone']}, host side {vm['interface']}, "
                   f"{vm['mac']}, {' '.join(vm['addresses'])}")
    inet = s["internet"]
    srv = inet["servers"]
    health = ("NOT running" if not srv["running"] else "running" if srv["healthy"] is None
              else "healthy" if srv["healthy"] else "running but NOT answering")
    click.echo(f"  internet  netns {inet['netns']}, owns {' '.join(inet['owns'])}")
    click.echo(f"            DNS {' '.join(inet['dns'])} ({inet['names']})")
    click.echo(f"            servers pid {srv['pid']} {health}; log {srv['log']}")
    click.echo(f"  CA        {s['ca_cert']}")
    click.echo(f"  requests  {s['requests_log']}")
    missing = [n for n, ok in s["namespaces"].items() if not ok]
    if missing:
        click.echo(f"  missing namespaces: {', '.join(missing)} (run `skyguard lab up` to repair)")
