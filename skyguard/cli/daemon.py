"""`skyguard up`, `down` and `status`: run, stop and inspect the daemon."""

from __future__ import annotations

import logging
import subprocess
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
    import faulthandler

    from skyguard.daemon import Daemon
    from skyguard.doctor import require_privileges

    faulthandler.enable()  # a crash in C (bcc, libbpf) still leaves every thread's stack on stderr
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
    from skyguard.credproxy import steering as credential_steering
    from skyguard.datapath import guard
    from skyguard.datapath.datapath import Datapath
    from skyguard.dns import steering as dns_steering

    # What a killed daemon left in nftables: the interface guard and the DNS and credential
    # steering (left on purpose so that a crash fails closed).
    guard.remove()
    dns_steering.remove(None)
    subprocess.run(["nft", "delete", "table", "inet", credential_steering.TABLE], capture_output=True)
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
    from skyguard.cli.render import print_status

    reply = control.request("status")
    reply.pop("ok", None)
    if as_json:
        emit_json(reply)
    else:
        print_status(reply)
