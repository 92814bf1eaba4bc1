"""`skyguard up`, `down` and `status`: run, stop and inspect the daemon."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import click

from skyguard import config
from skyguard.cli.common import emit_json, json_option, state_dir_option

if TYPE_CHECKING:
    from skyguard.tlog.holder import LogHolder

STARTING_TIMEOUT_S = 300  # how long `down` waits for a starting daemon: loading a policy may take 180 s


@click.command("up")
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False, path_type=Path),
              default=config.DEFAULT_POLICY, show_default=True, help="Policy file to enforce.")
@state_dir_option
@click.option("--metrics", "metrics_addr", default=config.DEFAULT_METRICS_ADDR, show_default=True,
              help="Prometheus listen address; 'off' to disable.")
@click.option("--upstream-ca", type=click.Path(dir_okay=False, exists=True), default=None,
              help="CA bundle the credential proxy trusts for upstream TLS, in addition to the system's "
                   "(in a lab's host namespace, the lab's CA is added by itself).")
@click.option("--fleet-etcd", metavar="URLS", envvar="SKYGUARD_FLEET_ETCD", default=None,
              help="Join the fleet on these etcd client URLs (comma-separated); with --fleet-name "
                   "and --fleet-admin-key (see `skyguard fleet --help`).")
@click.option("--fleet-name", default=None, help="This host's name in the fleet (unique).")
@click.option("--fleet-admin-key", "fleet_admin_keys", multiple=True, metavar="VKEY|FILE",
              envvar="SKYGUARD_FLEET_ADMIN_KEY",
              help="Admin verifier key (or a file of them): only policies one signed are applied.")
@click.option("--fleet-trust-first-use", is_flag=True,
              help="Witness each fleet member under the keys it first shows in etcd, not only those pinned "
                   "with `skyguard fleet trust` (anyone who can write etcd can then add a member).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def up(policy_path, state_dir, metrics_addr, upstream_ca, fleet_etcd, fleet_name, fleet_admin_keys,
       fleet_trust_first_use, verbose):
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
    from skyguard.fleet.daemon_hook import fleet_options

    faulthandler.enable()  # a crash in C (bcc, libbpf) still leaves every thread's stack on stderr
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    require_privileges("skyguard up")
    fleet = fleet_options(fleet_etcd, fleet_name, fleet_admin_keys, fleet_trust_first_use)  # BadInput before start
    Daemon(policy_path, state_dir=state_dir or config.STATE_DIR,
           metrics_addr=None if metrics_addr == "off" else metrics_addr, upstream_ca=upstream_ca,
           fleet=fleet).run()


@click.command("down")
@state_dir_option
def down(state_dir):
    """Stop the daemon and detach every program (enforcement ends).

    A daemon still starting is stopped once it answers. Without a daemon, detaches whatever
    pinned state a killed daemon left.

    \b
    Example:
      skyguard down
    """
    from skyguard import control
    from skyguard.doctor import require_privileges

    require_privileges("skyguard down")
    if not control.daemon_running() and control.run_dir_held():
        # `up` is still starting (compiling, loading its policy): stop it once it answers. The
        # cleanup below would race it for the pins and leave it enforcing after `down`.
        click.echo("a daemon is starting; stopping it once it answers", err=True)
        control.wait_started(timeout=STARTING_TIMEOUT_S)
    if control.daemon_running():
        reply = control.request("down", state_dir=state_dir)
        control.wait_gone()
        click.echo("skyguard stopped; programs detached")
        holder = _left_waiting(Path(reply["log"])) if reply.get("log") else None
        if holder is not None and holder.pid == reply.get("pid"):  # its log's disk does not answer (tlog/store.py close)
            click.echo(f"its process (pid {holder.pid}) {holder.waits_on(Path(reply['log']))}: it ends once the "
                       "disk answers (its final checkpoint is then not written: see its log), and `skyguard up` "
                       "can start then", err=True)
        return
    from skyguard.credproxy import steering as credential_steering
    from skyguard.datapath import guard
    from skyguard.datapath.datapath import Datapath
    from skyguard.dns import steering as dns_steering

    control.claim_pin_dir(config.PIN_DIR)  # not the pins of a daemon that runs with another run dir
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
    said = _still_waiting(state_dir)
    if said:
        click.echo(said, err=True)


def _left_waiting(log_dir: Path) -> LogHolder | None:
    """The process holding the log at `log_dir` if it waits on the log's disk (tlog/holder.py), else None."""
    from skyguard.tlog.holder import log_holder

    holder = log_holder(log_dir)
    return holder if holder is not None and holder.waiting else None


def _still_waiting(state_dir) -> str | None:
    """With no daemon running: what `down` and `status` say of a previous daemon's process that a
    `down` left waiting on its log's disk (it holds the log, and a new `up` is refused, until then)."""
    log_dir = Path(state_dir or config.STATE_DIR) / "log"
    holder = _left_waiting(log_dir)
    return (f"{holder.who} {holder.waits_on(log_dir)}; it ends once the disk answers, and `skyguard up` can "
            "start then") if holder is not None else None


@click.command("status")
@click.option("--wait", "wait_s", type=click.FloatRange(0, 3600), default=0, metavar="SECONDS",
              help="Wait up to this long for a daemon that is still starting to answer.")
@state_dir_option
@json_option
def status(wait_s, state_dir, as_json):
    """Interfaces and their programs, policy hash, map occupancy, counters, log head.

    \b
    Examples:
      skyguard status
      skyguard status --json | jq .counters
      skyguard status --wait 60      # right after `skyguard up &`
    """
    import time

    from skyguard import control
    from skyguard.cli.render import print_status
    from skyguard.errors import DaemonError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            reply = control.request("status", state_dir=state_dir)
            break
        except DaemonError:
            if time.monotonic() >= deadline:
                said = None if control.daemon_running() else _still_waiting(state_dir)
                if said:
                    raise DaemonError(f"no skyguard daemon is running: {said}") from None
                raise
            time.sleep(0.2)
    reply.pop("ok", None)
    if as_json:
        emit_json(reply)
    else:
        print_status(reply)
