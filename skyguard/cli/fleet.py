"""`skyguard fleet ...`: join a fleet of hosts on etcd, push signed policies, see the fleet.
Thin commands over skyguard.fleet."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import click

from skyguard import config
from skyguard.cli.common import emit_json, json_option, state_dir_option, warn

etcd_option = click.option(
    "--etcd", "etcd", required=True, envvar="SKYGUARD_FLEET_ETCD", metavar="URLS",
    help="etcd client URLs, comma-separated (http://10.0.0.1:2379,http://10.0.0.2:2379) "
         "[env SKYGUARD_FLEET_ETCD].")
admin_key_option = click.option(
    "--admin-key", "admin_keys", multiple=True, envvar="SKYGUARD_FLEET_ADMIN_KEY", metavar="VKEY|FILE",
    help="An admin verifier key (as `fleet admin-key` prints) or a file of them: only policies "
         "signed by one of these are applied. Repeatable.")


@click.group("fleet")
def fleet():
    """A fleet of skyguard hosts on etcd: signed policy distribution and mutual log witnessing.

    \b
    Examples:
      skyguard fleet admin-key admin.pem > admin.vkey       once, on the admin's machine
      skyguard up --policy p.yaml --fleet-etcd http://10.0.0.1:2379 --fleet-name host1 \\
                  --fleet-admin-key admin.vkey
      skyguard fleet identity --name host1 > host1.json     on host1, once it runs
      skyguard fleet trust host1 --key host1.json           on every other host
      skyguard fleet trust host1 --key host1.json --state-dir ~/fleet-admin   the admin's pins too
      skyguard fleet policy push new.yaml --sign-key admin.pem --etcd http://10.0.0.1:2379 \\
                  --state-dir ~/fleet-admin
                  (waits until every host signs that it enforces it; exit 1 names those that do not)
      skyguard fleet status --etcd http://10.0.0.1:2379 --state-dir ~/fleet-admin --json
    """


@fleet.command("admin-key")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", default="skyguard-admin", show_default=True, help="The key's name.")
def admin_key(path, name):
    """Create an admin signing key at PATH (0600; refuses to overwrite) and print its verifier
    key, which every host is given with --admin-key.

    \b
    Example:
      skyguard fleet admin-key /secure/admin.pem > admin.vkey
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    from skyguard import fsutil
    from skyguard.errors import BadInput
    from skyguard.tlog.checkpoint import Signer

    if path.exists():
        raise BadInput(f"{path} exists; an admin key is never overwritten (move it away first)")
    key = Ed25519PrivateKey.generate()
    signer = Signer(name, key)   # refuses a bad name before anything is written
    fsutil.create_private(path, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    click.echo(signer.verifier.vkey())


@fleet.command("join")
@etcd_option
@click.option("--name", required=True, help="This host's name in the fleet (unique).")
@admin_key_option
@click.option("--trust-first-use", is_flag=True,
              help="Witness each member under the keys it first shows in etcd, not only those pinned with "
                   "`skyguard fleet trust` (anyone who can write etcd can then add a member).")
@state_dir_option
def join(etcd, name, admin_keys, trust_first_use, state_dir):
    """Join the fleet beside a running daemon (`skyguard up`), until stopped: register under a
    lease, publish status and keys, apply signed policies through the daemon's control socket,
    witness peers' logs, and write fleet events (a tamper alert among them) to the daemon's
    signed log. `skyguard up --fleet-etcd ... --fleet-name ...` does the same inside the daemon.

    \b
    Example:
      skyguard fleet join --etcd http://10.0.0.1:2379 --name host1 --admin-key admin.vkey
    """
    import queue
    import threading

    from skyguard import control
    from skyguard.errors import BadInput, SkyguardError
    from skyguard.fleet.agent import FleetAgent
    from skyguard.fleet.etcd import EtcdStore
    from skyguard.fleet.signing import check_member_name, load_admin_verifiers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    admins = load_admin_verifiers(admin_keys)
    if not admins:
        raise BadInput("give at least one --admin-key: a host applies only policies signed by one")
    state = Path(state_dir or config.STATE_DIR)
    events = state / "fleet" / "events.jsonl"

    def apply(text, source):
        return control.request("policy.load", text=text, source=source, state_dir=state_dir)["sha256"]

    def local_status():
        reply = control.request("status", state_dir=state_dir)
        return {"policy": reply.get("policy"), "programs": len(reply.get("interfaces") or {})}

    pending: queue.SimpleQueue = queue.SimpleQueue()

    def write_events():
        """The daemon owns the signed log: each event is handed to it (`fleet.record`), off the
        agent's loop, and kept in a file as well, saying whether the signed log has it."""
        while True:
            kind, fields = pending.get()
            try:
                control.request("fleet.record", timeout=10, state_dir=state_dir, kind=kind, fields=fields)
                signed = True
            except SkyguardError as e:
                logging.getLogger("skyguard.fleet").warning("fleet event %s not in the daemon's signed "
                                                            "log (%s); kept in %s", kind, e, events)
                signed = False
            events.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(events, "a") as f:
                f.write(json.dumps({"type": kind, "time": time.time(), **fields, "signed_log": signed},
                                   default=str) + "\n")

    threading.Thread(target=write_events, name="fleet-events", daemon=True).start()

    def record(kind, /, **fields):   # must not block the agent's loop
        pending.put((kind, fields))

    agent = FleetAgent(EtcdStore(etcd), check_member_name(name), state, admins, apply=apply,
                       local_status=local_status, record=record, trust_first_use=trust_first_use)

    async def run():
        await agent.start()
        try:
            await asyncio.Event().wait()
        finally:
            await agent.stop()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


@fleet.group("policy")
def policy_group():
    """Signed policies for the whole fleet."""


@policy_group.command("push")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--sign-key", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The admin's private key (from `fleet admin-key`).")
@click.option("--key-name", default="skyguard-admin", show_default=True, help="The admin key's name.")
@click.option("--hosts", default="*", show_default=True, help="Comma-separated member names, or *.")
@click.option("--admin-key", "admin_keys", multiple=True, envvar="SKYGUARD_FLEET_ADMIN_KEY", metavar="VKEY|FILE",
              help="The fleet's other admin keys (the hosts' --admin-key): revisions they signed count "
                   "towards the next one, as the --sign-key's own do. Repeatable.")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=60.0, show_default=True, metavar="SECONDS",
              help="How long to wait for every host named to report enforcing the pushed revision.")
@click.option("--no-wait", is_flag=True, help="Return once the policy is stored in etcd, as a script that "
                                              "checks the hosts itself wants.")
@etcd_option
@state_dir_option
@json_option
def push(file, sign_key, key_name, hosts, admin_keys, wait_s, no_wait, etcd, state_dir, as_json):
    """Validate FILE, sign it with the admin key as the next revision, store it in etcd, then wait
    until every host it names reports enforcing it: exit 0 then, 1 when a host refused it (with
    the reason it reports: not newer than what it runs, not signed by an admin key it has, does
    not load there...) or did not report it within --wait seconds, each such host named.

    The hosts named are those of --hosts; with *, the members of the fleet once the policy is
    stored (a host down then is listed as absent, not waited for: it applies the newest revision
    when it joins again; name hosts with --hosts to wait for them). What a host reports is its
    member record in etcd, which anyone who can write etcd could write: a host counts only by
    what its host key signed, pinned in --state-dir (`fleet trust`; on a fleet host, its own
    too), after the push began. A host whose key is not pinned there is UNVERIFIED, a record its
    key did not sign (or changed) FORGED, an old signed one put back STALE: never enforcing,
    named so once the wait is over. Its signed log (`skyguard log verify`) and `skyguard attest`
    prove what it enforces.

    The next revision is one above the highest signed by the --sign-key or an --admin-key among
    the policy key's values in etcd (its history too) and what the hosts report running (with
    the signed note of it); revisions anyone else wrote to etcd are not counted, and said so. A
    fleet of several admins: give each other admin's key with --admin-key, or the hosts refuse
    the push as a rollback when another admin pushed last.

    \b
    Examples:
      skyguard fleet policy push site.yaml --sign-key admin.pem --etcd http://10.0.0.1:2379
        pushed revision 7 (3f0c12ab34cd) to *; waiting up to 60 s for the fleet's members to enforce it
        1/3 hosts enforce revision 7 (host1)
        2/3 hosts enforce revision 7 (host2)
        host3 refused revision 7 (rollback): revision 7 is not newer than the revision 7 ...
        error: revision 7 is not enforced by 1 of the 3 hosts named; not enforcing: host3 (refused it ...
      skyguard fleet policy push site.yaml --sign-key admin.pem --admin-key other-admin.vkey \\
          --hosts host1,host2 --wait 120 --json | jq '.results'
      skyguard fleet policy push site.yaml --sign-key admin.pem --no-wait    store it, wait for nothing
      skyguard fleet trust host3 --key host3.json --state-dir ~/fleet-admin     the admin's pins, once a host
      skyguard fleet policy push site.yaml --sign-key admin.pem --state-dir ~/fleet-admin   hosts checked on them
    """
    from skyguard.fleet.admin import local_trust, push_policy
    from skyguard.fleet.etcd import EtcdStore
    from skyguard.fleet.rollout import DOUBTED, wait_for_hosts
    from skyguard.fleet.signing import admin_signer, load_admin_verifiers
    from skyguard.policy.parse import parse_policy

    text = file.read_text(encoding="utf-8")
    parse_policy(text, source=str(file))   # nothing invalid is ever pushed
    signer = admin_signer(sign_key, key_name)
    host_list = tuple(h.strip() for h in hosts.split(",") if h.strip()) or ("*",)
    state = Path(state_dir or config.STATE_DIR)
    host_keys = local_trust(state).member_keys   # the hosts' keys `fleet trust` pinned there
    say = warn if as_json else click.echo   # progress: stderr beside --json's one document

    def progress(name, result, rollout):
        if result.outcome == "enforcing":
            say(f"{len(rollout.enforcing)}/{len(rollout.named)} hosts enforce revision {rollout.revision} ({name})")
        elif result.outcome == "refused":
            say(f"{name} refused revision {rollout.revision} ({_cell(result.reason)}): {_cell(result.problem)}")
        elif result.outcome in ("superseded", *DOUBTED) or result.reason:
            say(f"{name}: {_cell(result.detail)}")

    async def run():
        store = EtcdStore(etcd)
        signed, ignored = await push_policy(store, text, signer, host_list, load_admin_verifiers(admin_keys))
        if no_wait:
            return signed, ignored, None
        named = "the fleet's members" if signed.hosts == ("*",) else ", ".join(signed.hosts)
        say(f"pushed revision {signed.revision} ({signed.sha256[:12]}) to {hosts}; waiting up to {wait_s:g} s "
            f"for {named} to enforce it")
        return signed, ignored, await wait_for_hosts(store, signed, wait_s, host_keys, progress)

    signed, ignored, rollout = asyncio.run(run())
    result = {"revision": signed.revision, "sha256": signed.sha256, "hosts": list(signed.hosts), "ignored": ignored,
              "waited": rollout is not None, **(rollout.to_json() if rollout else {})}
    if as_json:
        emit_json(result)
    if rollout is None:
        if not as_json:
            click.echo(f"pushed revision {signed.revision} ({signed.sha256[:12]}) to {hosts}; `skyguard fleet status` "
                       "shows which hosts enforce it and which refused it")
        return
    _report_rollout(rollout, as_json, state)


def _report_rollout(rollout, as_json: bool, state: Path) -> None:
    """A push's outcome: a line when every host named enforces it; else FleetError (exit 1)
    naming each host that does not, and why."""
    from skyguard.fleet.report import UNVERIFIED
    from skyguard.fleet.store import FleetError

    if rollout.absent:
        warn(f"not members of the fleet, not waited for: {', '.join(_cell(n) for n in rollout.absent)} (down, or "
             "gone for good; a host applies the newest revision when it joins again)")
    if not rollout.named:
        raise FleetError(f"no host is a member of the fleet: none enforces revision {rollout.revision} yet (each "
                         "applies it when it joins; --no-wait pushes without waiting)")
    if rollout.ok:
        if not as_json:
            click.echo(f"{len(rollout.enforcing)}/{len(rollout.named)} hosts enforce revision {rollout.revision} "
                       f"({rollout.waited_s:.1f} s)")
        return
    failed = rollout.failed
    lines = [f"{_cell(name)} ({_why(r, rollout.waited_s)})" for name, r in sorted(failed.items())]
    hint = ""
    if any(r.reason == "rollback" for r in failed.values()):
        hint = ("\na host refuses a revision no newer than the one it runs: another admin's revision was not "
                "counted; push again giving each of the fleet's other admin keys with --admin-key")
    if any(r.outcome == UNVERIFIED for r in failed.values()):
        hint += (f"\na host's member record counts only when its host key is pinned in {_cell(str(state))}: "
                 "`skyguard fleet trust HOST --key HOST.json` there (or --state-dir: a fleet host's)")
    raise FleetError(f"revision {rollout.revision} is not enforced by {len(failed)} of the {len(rollout.named)} "
                     f"hosts named; not enforcing: " + "; ".join(lines) + hint)


def _why(result, waited_s: float) -> str:
    """Why a host does not enforce a push: what it reports, or that the wait ran out and on what
    (a record not taken as its host's word is named so: UNVERIFIED, FORGED, STALE)."""
    from skyguard.fleet.rollout import FINAL, TIMED_OUT

    if result.outcome in FINAL:
        return _cell(result.detail)
    doubt = "" if result.outcome == TIMED_OUT else f"{result.outcome.upper()}: "
    return f"timed out after {waited_s:.0f} s: {doubt}{_cell(result.detail)}"


@fleet.command("clear-alert")
@click.argument("peer")
@state_dir_option
def clear_alert(peer, state_dir):
    """Clear this host's tamper alert on PEER once it is looked into: its agent (inside `skyguard
    up` or `fleet join`) drops it at its next round (a second), records that in the signed log and
    deletes it from etcd. A peer that still fails the checks is alerted on again.

    \b
    Examples:
      skyguard fleet clear-alert charlie
    """
    from skyguard.errors import BadInput
    from skyguard.fleet.alerts import load_alerts, request_clear

    state = Path(state_dir or config.STATE_DIR)
    if peer not in load_alerts(state):
        raise BadInput(f"this host holds no alert on {peer!r} (see `skyguard fleet status`)")
    request_clear(state, peer)
    click.echo(f"asked the fleet agent to clear the alert on {peer}; it does at its next round")


@fleet.command("identity")
@click.option("--name", required=True, help="This host's name in the fleet (as given to `up` or `join`).")
@state_dir_option
def identity(name, state_dir):
    """Print this host's fleet identity (its log origin, log key and witness key: public) as one
    line of JSON, for `skyguard fleet trust NAME --key FILE` on every other host. The daemon
    must have started once (its log names the origin).

    \b
    Example:
      skyguard fleet identity --name host1 > host1.json
    """
    from skyguard.errors import BadInput, LogError
    from skyguard.fleet.signing import check_member_name
    from skyguard.tlog.cosign import Cosigner, load_or_create_witness_key
    from skyguard.tlog.hostkey import host_signer
    from skyguard.tlog.reader import LogReader

    state = Path(state_dir or config.STATE_DIR)
    check_member_name(name)
    try:
        origin = LogReader(state / "log").origin
        log_vkey = host_signer(state, create=False).verifier.vkey()
    except (LogError, OSError, KeyError, ValueError) as e:
        raise BadInput(f"no log of a started daemon in {state} ({e}): start `skyguard up` first") from None
    witness = Cosigner(f"{name}.skyguard/witness", load_or_create_witness_key(state))   # as the agent names it
    click.echo(json.dumps({"name": name, "origin": origin, "log_vkey": log_vkey, "witness_vkey": witness.verifier.vkey()}))


@fleet.command("trust")
@click.argument("peer")
@click.option("--key", "key_file", required=True, type=click.File("r"),
              help="The peer's identity, as `skyguard fleet identity` printed it on the peer (- for stdin).")
@state_dir_option
def trust_peer(peer, key_file, state_dir):
    """Pin PEER's keys on this host: only then is it witnessed, and its cosignatures and alerts
    count here (and in `fleet status` and `log verify --witnesses` run with this state dir). A
    member no one pinned is listed as unverified. Pinned keys are never replaced: a peer that
    presents others is alerted on (`fleet untrust` first if they really changed).

    \b
    Example:
      skyguard fleet trust host2 --key host2.json
    """
    from skyguard.errors import BadInput, LogError
    from skyguard.fleet.peers import trust
    from skyguard.tlog.reader import LogReader

    state = Path(state_dir or config.STATE_DIR)
    try:
        identity = json.loads(key_file.read(65536))
    except ValueError:
        raise BadInput("the --key file is not the JSON `skyguard fleet identity` prints") from None
    try:
        own = LogReader(state / "log").origin
    except (LogError, OSError, KeyError, ValueError):
        own = None
    pin = trust(state, peer, identity, own_origin=own)
    click.echo(f"pinned {peer}: log origin {_cell(pin['origin'])}")


@fleet.command("untrust")
@click.argument("peer")
@state_dir_option
def untrust_peer(peer, state_dir):
    """Forget PEER's pinned keys on this host: it is unverified from then on.

    \b
    Example:
      skyguard fleet untrust host2
    """
    from skyguard.errors import BadInput
    from skyguard.fleet.peers import untrust

    if not untrust(Path(state_dir or config.STATE_DIR), peer):
        raise BadInput(f"no keys of {peer!r} are pinned here")
    click.echo(f"forgot {peer}'s keys")


@fleet.command("status")
@etcd_option
@admin_key_option
@state_dir_option
@json_option
def status(etcd, admin_keys, state_dir, as_json):
    """Per host: policy hash and revision, heartbeat age, log size, cosignatures given and
    received, alerts, as this host sees it (its state dir): anyone who can write etcd can add a
    member, a cosignature or an alert record. A member whose keys are not pinned here (`fleet
    trust`) is marked UNVERIFIED, and so are cosignatures by witness keys not pinned here; an
    alert is shown as the fleet's (ALERT) only when this host raised it or a host key pinned here
    signed it, the rest listed apart as UNVERIFIED. A member record whose revision, hash,
    refusals and heartbeat its host key pinned here did not sign is marked [record UNVERIFIED],
    [record FORGED] (changed, or another key's), or [record STALE] (signed long ago: put back).

    Then the fleet's newest revision: the highest an --admin-key signed (of two under one
    number, the one pushed last) among the policy key's values in etcd and what the hosts report
    running, as a push counts them; without --admin-key, the one the stored policy record
    claims, its signature unchecked (said so). A host that refused it is named on a REFUSED
    line with the revision, the reason it reports (rollback: not newer than what it runs;
    not_admin: not signed by an admin key it has; invalid: does not load there; apply_failed:
    the swap failed, it tries again) and when it first refused it; a host's refusals of other
    revisions later than the one it enforces are listed too. --json gives `newest`, each
    member's `standing` (state: enforcing, refusing, behind, newer, not_named, or the record's
    unverified/forged/stale; `enforces`; `refused`), `refusing`, `not_verified` and `ok`.

    Exit status: 0 when no host refuses the newest revision and every member record is
    verified; 1 when a host refuses it or a member record is UNVERIFIED, FORGED or STALE (each
    named on stderr), or etcd does not answer; 2 on bad input. A host still applying it, or one
    it does not name, does not change the exit status.

    \b
    Examples:
      skyguard fleet status --etcd http://10.0.0.1:2379 --state-dir ~/fleet-admin --admin-key admin.vkey
        ...
        newest revision 8 (3f0c12ab34cd, for *, signed by an admin key given): enforced by 2 of 3 members
        REFUSED: host-b refuses revision 8 (not_admin, 42 s ago): the policy is not signed by a configured ...
        error: 1 member refuses revision 8, the newest: host-b (not_admin)
      skyguard fleet status --etcd http://10.0.0.1:2379 --json | jq '.members[].standing'
      skyguard fleet status --etcd http://10.0.0.1:2379 --state-dir ~/fleet-admin >/dev/null || page-the-admin
    """
    from skyguard.fleet.admin import fleet_view, local_trust
    from skyguard.fleet.etcd import EtcdStore
    from skyguard.fleet.signing import load_admin_verifiers

    trust = local_trust(Path(state_dir or config.STATE_DIR))
    view = asyncio.run(fleet_view(EtcdStore(etcd), load_admin_verifiers(admin_keys), trust))
    if as_json:
        emit_json(view)
    else:
        _print_status(view, state_dir)
    _status_verdict(view, state_dir)


def _print_status(view: dict, state_dir) -> None:
    click.echo(f"policy: {view['policy']}")   # a dict's repr escapes control characters
    click.echo(f"{'host':<16} {'rev':>4} {'policy':<14} {'beat':>6} {'log':>8} {'given':>6} "
               f"{'witnessed by':<24} alerts")
    for name, m in sorted(view["members"].items()):
        # Every field was written by that host: shown escaped, whatever its type.
        policy = _field(m, "policy")
        witnessed = ",".join(f"{w}@{s}" for w, s in sorted(m.get("witnessed_by", {}).items())) or "-"
        alerts = m.get("alerts")
        refuses = [r for r in m["standing"]["refused"] if r["newest"]]
        click.echo(f"{_cell(name):<16} {_cell(policy.get('revision', 0)):>4} "
                   f"{_cell(policy.get('sha256') or '-')[:12]:<14} "
                   f"{_cell(m.get('heartbeat_age_s', '?')):>5}s {_cell(_field(m, 'log').get('size')):>8} "
                   f"{_cell(_field(m, 'cosignatures').get('given', 0)):>6} {_cell(witnessed):<24} "
                   f"{len(alerts) if isinstance(alerts, list) else _cell(alerts)}"
                   + (f"  ({_cell(m['problem'])})" if "problem" in m else "")
                   + (f"  [REFUSES revision {refuses[0]['revision']}]" if refuses else "")
                   + (f"  [{m['trust']}]" if m["trust"].startswith("UNVERIFIED") else "")
                   + (f"  [record {m['record'].upper()}: {_cell(m['record_problem'])}]" if m["record"] != "verified"
                      else "")
                   + (f"  [{m['witnessed_by_unverified']} cosignatures by witnesses not pinned here]"
                      if m["witnessed_by_unverified"] else ""))
    newest = view["newest"]
    if newest is None:
        click.echo("newest revision: none (no policy pushed that an --admin-key given signed)")
    else:
        enforcing = sum(m["standing"]["state"] == "enforcing" for m in view["members"].values())
        signed = "signed by an admin key given" if newest["signed"] else \
            "as the stored policy record claims: its signature not checked, give --admin-key"
        click.echo(f"newest revision {newest['revision']} ({newest['sha256'][:12]}, for {','.join(newest['hosts'])}, "
                   f"{signed}): enforced by {enforcing} of {len(view['members'])} members")
    for name, m in sorted(view["members"].items()):
        for r in m["standing"]["refused"]:
            click.echo(f"{'REFUSED: ' if r['newest'] else ''}{_cell(name)} {'refuses' if r['newest'] else 'refused'} "
                       f"revision {r['revision']} ({_cell(r['reason'])}, {_ago(r['age_s'])}): {_cell(r['problem'])}")
    for alert in view["alerts"]:
        click.echo(f"ALERT: {_cell(alert.get('witness'))} refuses to cosign {_cell(alert.get('peer'))}: "
                   f"{_cell(alert.get('problem'))} ({_cell(alert.get('verified'))})")
    for claim in view["unverified_alerts"]:
        click.echo(f"UNVERIFIED, not an alert of the fleet ({_cell(claim['why'])}): {_cell(claim['record'])} says "
                   f"{_cell(claim['witness'])} refuses to cosign {_cell(claim['peer'])}: {_cell(claim['problem'])}")
    if view["cleared_alerts_hidden"]:
        click.echo(f"({view['cleared_alerts_hidden']} alerts raised before an operator cleared them not shown)")
    if view["unverified_total"] > len(view["unverified_alerts"]):
        click.echo(f"UNVERIFIED: {view['unverified_total'] - len(view['unverified_alerts'])} more records")
    if view["unverified_total"] and not view["host_keys_known"]:
        click.echo(f"(no peer's host key is pinned in {_cell(str(state_dir or config.STATE_DIR))}: run this on a fleet host, "
                   f"or give its --state-dir, to verify alerts)")


def _ago(age_s) -> str:
    return "when not reported" if age_s is None else f"{max(age_s, 0):.0f} s ago"


def _status_verdict(view: dict, state_dir) -> None:
    """Exit 1 (FleetError, on stderr) naming each host refusing the newest revision and each
    member whose record is not verified; nothing when there is none."""
    from skyguard.fleet.store import FleetError

    if view["ok"]:
        return
    members, problems = view["members"], []
    if view["refusing"]:
        reasons = {n: next(r["reason"] for r in members[n]["standing"]["refused"] if r["newest"])
                   for n in view["refusing"]}
        problems.append(f"{len(reasons)} member{'s' if len(reasons) > 1 else ''} refuse"
                        f"{'' if len(reasons) > 1 else 's'} revision {view['newest']['revision']}, the newest: "
                        + ", ".join(f"{_cell(n)} ({_cell(why)})" for n, why in reasons.items()))
    if view["not_verified"]:
        problems.append("member records not verified: " + ", ".join(
            f"{_cell(n)} ({members[n]['record'].upper()})" for n in view["not_verified"][:20])
            + (", ..." if len(view["not_verified"]) > 20 else "")
            + f" (pin each host's key here with `skyguard fleet trust HOST --key HOST.json`, in "
              f"{_cell(str(state_dir or config.STATE_DIR))} or the --state-dir given)")
    raise FleetError("; ".join(problems))


def _field(record: dict, name: str) -> dict:
    value = record.get(name)
    return value if isinstance(value, dict) else {}


def _cell(value) -> str:
    """A value from the store as one line of printable text: control characters (a newline, an
    escape sequence that would move the cursor and overwrite other lines) are shown escaped."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
