"""What an operator does to the fleet from anywhere that reaches the store: push a signed
policy, and read the fleet's view (members, their status, cosignatures, alerts: only those the
host running it raised or a host key it pinned signed are the fleet's, the rest unverified).

Not here: what a host does with a pushed policy (agent.py).
"""

from __future__ import annotations

import math
import time

from skyguard.fleet import keys
from skyguard.fleet.signing import SignedPolicy, open_policy, sign_policy
from skyguard.fleet.store import FleetError, Store, load_value
from skyguard.fleet.witnessing import open_alert
from skyguard.tlog.checkpoint import Signer, Verifier


async def push_policy(store: Store, text: str, signer: Signer, hosts: tuple[str, ...] = ("*",)) -> SignedPolicy:
    """Sign `text` as the next revision and store it; a concurrent push makes this one retry
    with the revision after it (compare-and-swap on the key's store revision)."""
    for _ in range(20):
        item, _ = await store.get(keys.POLICY)
        current = 0
        if item is not None:
            try:
                current = _revision_of(item.value)
            except (ValueError, KeyError, TypeError):
                current = 0   # an unreadable record is replaced; its revision is unknown
        # Never below what any host runs: the stored record may be a replayed older one.
        signed = sign_policy(text, max(current, await _highest_running(store)) + 1, signer, hosts)
        if await store.put_if(keys.POLICY, signed.to_json(), item.mod_revision if item else 0):
            return signed
    raise FleetError("another push kept winning; try again")


async def _highest_running(store: Store) -> int:
    members, _ = await store.get_prefix(keys.MEMBERS)
    highest = 0
    for item in members:
        try:
            highest = max(highest, int(load_value(item.value)["policy"]["revision"]))
        except (ValueError, KeyError, TypeError, OverflowError):
            continue
    return highest


def _revision_of(value: bytes) -> int:
    """The revision in a stored record, read without trusting it (any admin's signature will do
    for counting; hosts check signatures themselves)."""
    note = load_value(value)["note"]
    if not isinstance(note, str):
        raise TypeError("the stored policy note is not text")
    for line in note.split("\n"):
        if line.startswith("revision "):
            return int(line.split(" ", 1)[1])
    return 0


async def fleet_view(store: Store, admins=None, own_alerts: dict[str, dict] | None = None,
                     host_keys: dict[str, Verifier] | None = None) -> dict:
    """{members: {name: status + heartbeat_age_s + cosignatures received}, policy, alerts,
    unverified_alerts}. `alerts` are the fleet's: `own_alerts` (those the host running this
    raised, from its state dir) and those signed by a host key of `host_keys` (witness name ->
    its log key, pinned by that host); every other alert record of the store, which anyone who
    can write it could have put there, is in `unverified_alerts` (at most MAX_UNVERIFIED)."""
    members, revision = await store.get_prefix(keys.MEMBERS)
    cosigs, _ = await store.get_prefix(keys.COSIGNATURES)
    alerts, _ = await store.get_prefix(keys.ALERTS)
    now = time.time()
    view: dict = {"revision": revision, "members": {}, "alerts": [], "unverified_alerts": [], "policy": None,
                  "host_keys_known": sorted(host_keys or {})}
    # Each host writes its own record (and any alert): what one writes must not stop the view
    # of the others, so a record of the wrong shape is shown as such, never raised.
    for item in members:
        try:
            status = load_value(item.value)
        except ValueError:
            status = None
        if not isinstance(status, dict):
            status = {"problem": "the member record is not a JSON object"}
        try:
            age = round(now - float(status.get("heartbeat", 0)), 1)
        except (ValueError, TypeError, OverflowError):
            age = None
        status["heartbeat_age_s"] = age if age is not None and math.isfinite(age) else None
        status["witnessed_by"] = {}
        view["members"][item.key[len(keys.MEMBERS):]] = status
    for item in cosigs:
        log_name, _, witness = item.key[len(keys.COSIGNATURES):].partition("/")
        try:
            size = int(load_value(item.value).get("size", 0))
        except (ValueError, TypeError, AttributeError, OverflowError):
            continue
        if log_name in view["members"]:
            view["members"][log_name]["witnessed_by"][witness] = size
    _alerts(view, alerts, own_alerts or {}, host_keys or {})
    item, _ = await store.get(keys.POLICY)
    if item is not None:
        try:
            view["policy"] = {"revision": _revision_of(item.value)}
            if admins:
                signed = open_policy(item.value, admins)
                view["policy"].update(sha256=signed.sha256, hosts=list(signed.hosts), signed=True)
        except (ValueError, KeyError, TypeError, FleetError) as e:
            view["policy"] = {"problem": str(e)}
    return view


MAX_UNVERIFIED = 100   # unverified alert records listed (whoever writes the store can write many)


def _alerts(view: dict, items: list, own: dict[str, dict], host_keys: dict[str, Verifier]) -> None:
    """The fleet's alerts and the unverified ones into `view`. Signed alerts come from the
    alerts/ keys and from each host's own record (`alert_notes`, rewritten every period: an
    alert whose key was deleted is still shown); a record's plain `alerts` list is unsigned."""
    trusted: dict[tuple, dict] = {}
    for alert in own.values():
        trusted[(alert.get("witness"), alert.get("peer"))] = dict(alert, verified="raised by this host")
    claims = []   # (where, witness, peer, what it says, the signed note if any)
    for item in items:
        peer, _, witness = item.key[len(keys.ALERTS):].partition("/")
        try:
            record = load_value(item.value)
        except ValueError:
            record = None
        record = record if isinstance(record, dict) else {"problem": "the alert record is not a JSON object"}
        claims.append((item.key, witness, peer, record.get("problem"), record.get("note")))
    for name, status in view["members"].items():
        notes, listed = status.get("alert_notes"), status.get("alerts")
        for note in notes if isinstance(notes, list) else []:
            claims.append((keys.member(name), name, None, None, note))
        for text in listed if isinstance(listed, list) else []:
            peer, sep, problem = text.partition(": ") if isinstance(text, str) else ("", "", "")
            if sep:
                claims.append((keys.member(name), name, peer, problem, None))
    unverified = []
    for where, witness, peer, problem, note in claims:
        try:
            alert = open_alert(note, host_keys)
        except ValueError as e:
            if peer is not None:   # a record's notes that fail: its plain list says the same, unsigned
                unverified.append({"record": where, "witness": witness, "peer": peer,
                                   "problem": str(problem)[:500], "why": str(e) if note is not None else "unsigned"})
            continue
        trusted.setdefault((alert.get("witness"), alert.get("peer")),
                           dict(alert, verified=f"signed by {alert['witness']}'s host key, pinned here"))
    view["alerts"] = [trusted[k] for k in sorted(trusted, key=str)]
    unverified = [u for u in unverified if (u["witness"], u["peer"]) not in trusted]
    view["unverified_alerts"] = unverified[:MAX_UNVERIFIED]
    view["unverified_total"] = len(unverified)
