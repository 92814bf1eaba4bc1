"""`skyguard up`, `down` and `status`: run, stop and inspect the daemon."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from skyguard import config
from skyguard.cli.common import emit_json, json_option


@click.command("up")
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False, path_type=Path),
              default=config.DEFAULT_POLICY, show_default=True, help="Policy file to enforce.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Keys, log and learned state [default: {config.STATE_DIR}].")
@click.option("--metrics", "metrics_addr", default=config.DEFAULT_METRICS_ADDR, show_default=True,
              help="Prometheus listen address; 'off' to disable.")
@click.option("--upstream-ca", type=click.Path(dir_okay=False, exists=True), default=None,
              help="CA bundle the credential proxy verifies upstream TLS against [default: the system's].")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def up(policy_path, state_dir, metrics_addr, upstream_ca, verbose):
    """Run the daemon in the foreground (systemd-friendly: logs to stderr, stops on SIGTERM).

    Attaches to every workload interface of the policy that exists and to each that appears
    later. If the daemon dies, the programs keep enforcing the last policy; the next `up`
    re-adopts them without a window. `skyguard down` detaches everything.

    \b
    Examples:
      skyguard up --policy policies/keysystems.yaml
      skyguard up --policy site.yaml --state-dir /var/lib/skyguard --metrics 127.0.0.1:9464
    """
    from skyguard.daemon import Daemon
    from skyguard.doctor import require_privileges

    if state_dir is not None:
        config.STATE_DIR = state_dir  # one state dir for the daemon and every part it starts
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    require_privileges("skyguard up")
    Daemon(policy_path, state_dir=config.STATE_DIR,
           metrics_addr=None if metrics_addr == "off" else metrics_addr, upstream_ca=upstream_ca).run()


@click.command("down")
def down():
    """Stop the daemon and detach every program (enforcement ends).

    Without a running daemon, detaches whatever pinned state a killed daemon left.

    \b
    Example:
      skyguard down
    """
    from skyguard import control
    from skyguard.doctor import require_privileges

    require_privileges("skyguard down")
    if control.daemon_running():
        control.request("down")
        control.wait_gone()
        click.echo("skyguard stopped; programs detached")
        return
    from skyguard.datapath.datapath import Datapath

    datapath = Datapath(pin_dir=config.PIN_DIR)
    detached = datapath.detach_all()
    datapath.close()
    Datapath.remove_pins(config.PIN_DIR)
    click.echo(f"no daemon was running; detached {len(detached)} interfaces left by an earlier one"
               if detached else "no daemon was running and nothing was attached")


@click.command("status")
@json_option
def status(as_json):
    """Interfaces and their programs, policy hash, map occupancy, counters, log head.

    \b
    Examples:
      skyguard status
      skyguard status --json | jq .counters
    """
    from skyguard import control

    reply = control.request("status")
    reply.pop("ok", None)
    if as_json:
        emit_json(reply)
    else:
        _print_status(reply)


def _print_status(s: dict) -> None:
    p = s["policy"]
    click.echo(f"daemon pid {s['pid']}, up {s['uptime_s']}s; policy {p['name']} sha256 {p['sha256'][:16]}... ({p['source']})")
    click.echo("interfaces:")
    for ifname, hooks in sorted(s["interfaces"].items()):
        click.echo(f"  {ifname:15} " + ", ".join(f"{h}={v.get('name')}#{v.get('id')}" for h, v in sorted(hooks.items())))
    click.echo("maps: " + ", ".join(f"{k}={v}" for k, v in sorted(s["maps"].items())))
    click.echo("traffic:")
    for row in s["counters"]["traffic"]:
        click.echo(f"  {row['zone']:12} {row['direction']:8} {row['verdict']:12} {row['packets']:>10} pkts {row['bytes']:>12} bytes")
    click.echo("drops:")
    for row in s["counters"]["drops"]:
        click.echo(f"  {row['zone']:12} {row['direction']:8} {row['reason']:24} {row['packets']:>10} pkts")
    if s.get("log"):
        click.echo(f"log: {s['log']['size']} entries, last checkpoint covers {s['log']['checkpointed_size']}, "
                   f"{s['log']['checkpoint_age_s']:.0f}s old")
