"""How the daemon hosts the fleet agent: the three hooks it gives the agent (apply a policy
through the daemon's hot swap, read its status, write its signed log), in one function the
daemon calls from its list of part slots; and the control operation `fleet.record` through which
an agent beside the daemon (`skyguard fleet join`) writes the fleet's events (a tamper alert
among them) to the daemon's signed log. Only the fleet's kinds, with short scalar fields, pass:
it is not a general way to write the log.

Not here: the agent (agent.py).
"""

from __future__ import annotations

from pathlib import Path


def make_fleet_agent(daemon, registry, etcd: str, name: str, admin_keys: list[str], trust_first_use: bool = False):
    """The FleetAgent part for `daemon` (skyguard.daemon.Daemon), joining etcd at `etcd` as
    `name` and applying only policies signed by one of `admin_keys` (vkeys or files); peers
    pinned at first sight too when `trust_first_use` (peers.py)."""
    from skyguard.fleet.agent import FleetAgent
    from skyguard.fleet.etcd import EtcdStore
    from skyguard.fleet.signing import check_member_name, load_admin_verifiers

    def apply(text: str, source: str) -> str:
        from skyguard.policy.parse import parse_policy

        policy = parse_policy(text, source=source)   # an invalid policy changes nothing
        daemon._apply(policy, text)                  # the control socket's hot swap
        return policy.sha256

    def local_status() -> dict:
        policy = daemon.policy
        attached = daemon.datapath.attached() if daemon.datapath else {}
        return {"policy": {"name": policy.name, "sha256": policy.sha256} if policy else None,
                "programs": len(attached)}

    def record(kind: str, /, **fields) -> None:
        _record(daemon, daemon.record_nowait, kind, fields)

    return FleetAgent(EtcdStore(etcd), check_member_name(name), Path(daemon.state_dir),
                      load_admin_verifiers(admin_keys), apply=apply, local_status=local_status,
                      record=record, registry=registry, trust_first_use=trust_first_use,
                      head_note=lambda: daemon.tlog.latest_note() if daemon.tlog else None)


def fleet_options(etcd: str | None, name: str | None, admin_keys, trust_first_use: bool = False) -> dict | None:
    """`skyguard up --fleet-etcd/--fleet-name/--fleet-admin-key/--fleet-trust-first-use`, checked before the daemon
    starts (BadInput names what is wrong); None when no fleet is asked for."""
    from skyguard.errors import BadInput
    from skyguard.fleet.etcd import parse_endpoints
    from skyguard.fleet.signing import check_member_name, load_admin_verifiers

    if not etcd and not name:
        return None
    if not (etcd and name and admin_keys):
        raise BadInput("--fleet-etcd, --fleet-name and --fleet-admin-key go together: a host joins "
                       "a fleet under a name and applies only policies signed by an admin key")
    parse_endpoints(etcd)
    check_member_name(name)
    load_admin_verifiers(list(admin_keys))
    return {"etcd": etcd, "name": name, "admin_keys": list(admin_keys), "trust_first_use": bool(trust_first_use)}


def kept_fleet_policy(state_dir: Path, admin_keys) -> tuple[str, str] | None:
    """(text, source) of the last fleet policy this host applied, if it is still signed by one of
    `admin_keys`: what `skyguard up` with a fleet starts enforcing instead of its --policy file,
    so a restart never runs an older policy, not even until the agent restores the kept one."""
    from skyguard import fsutil
    from skyguard.fleet.agent import FLEET_DIR
    from skyguard.fleet.signing import PolicyRefused, load_admin_verifiers, open_policy

    path = Path(state_dir) / FLEET_DIR / "policy.json"
    if not path.exists():
        return None
    try:
        signed = open_policy(fsutil.read_regular_file(path), load_admin_verifiers(list(admin_keys)))
    except (OSError, PolicyRefused):
        return None   # the agent logs why when it starts, and waits for a pushed one
    return signed.text, f"fleet revision {signed.revision}"


# The entries the fleet agent writes (agent.py), all a `fleet join` agent may hand the daemon.
RECORD_KINDS = ("tamper", "fleet_policy_applied", "fleet_policy_refused", "fleet_store_lost",
                "fleet_store_back", "fleet_task_failed", "fleet_alert_cleared", "fleet_witness_restarted")
MAX_FIELD = 1000


def _record(daemon, write, kind: str, fields: dict) -> None:
    if kind == "tamper":   # a peer's rewritten log: skyguard_tamper_events_total too
        daemon.tamper_events += 1
    write(kind, **fields)


def record_handler(daemon):
    """The daemon's `fleet.record` operation: {kind, fields} appended to its signed log (and
    durable) once checked; BadInput names what is refused."""
    from skyguard.errors import BadInput

    def handle(args: dict) -> dict:
        kind, fields = args.get("kind"), args.get("fields")
        if kind not in RECORD_KINDS:
            raise BadInput(f"fleet.record takes one of {', '.join(RECORD_KINDS)}, not {str(kind)[:40]!r}")
        if not isinstance(fields, dict) or len(fields) > 12:
            raise BadInput("fleet.record: fields are an object of at most 12 names")
        checked = {}
        for name, value in fields.items():
            if not (isinstance(name, str) and name.isidentifier() and len(name) <= 40) or name in ("type", "time"):
                raise BadInput(f"fleet.record: field name {str(name)[:40]!r} is not allowed")
            if value is not None and not isinstance(value, (str, int, float, bool)):
                raise BadInput(f"fleet.record: field {name} is not a string, number or boolean")
            checked[name] = value[:MAX_FIELD] if isinstance(value, str) else value
        _record(daemon, daemon.record, kind, checked)
        return {"recorded": kind}
    return handle
