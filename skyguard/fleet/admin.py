"""What an operator does to the fleet from anywhere that reaches the store: push a signed
policy, and read the fleet's view (members, their status, cosignatures, alerts).

Not here: what a host does with a pushed policy (agent.py).
"""

from __future__ import annotations

import math
import time

from skyguard.fleet import keys
from skyguard.fleet.signing import SignedPolicy, open_policy, sign_policy
from skyguard.fleet.store import FleetError, Store, load_value
from skyguard.tlog.checkpoint import Signer


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


async def fleet_view(store: Store, admins=None) -> dict:
    """{members: {name: status + heartbeat_age_s + cosignatures received}, policy, alerts}."""
    members, revision = await store.get_prefix(keys.MEMBERS)
    cosigs, _ = await store.get_prefix(keys.COSIGNATURES)
    alerts, _ = await store.get_prefix(keys.ALERTS)
    now = time.time()
    view: dict = {"revision": revision, "members": {}, "alerts": [], "policy": None}
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
    for item in alerts:
        try:
            alert = load_value(item.value)
        except ValueError:
            alert = None
        if not isinstance(alert, dict):
            peer, _, witness = item.key[len(keys.ALERTS):].partition("/")
            alert = {"witness": witness, "peer": peer, "problem": "the alert record is not a JSON object"}
        view["alerts"].append(alert)
    # A host's record lists its alerts too ("peer: problem"), and the host rewrites it every
    # period: an alert whose key whoever writes the store deleted is still shown.
    shown = {(a.get("witness"), a.get("peer")) for a in view["alerts"]
             if isinstance(a.get("witness"), str) and isinstance(a.get("peer"), str)}
    for name, status in view["members"].items():
        listed = status.get("alerts")
        for text in listed if isinstance(listed, list) else []:
            peer, sep, problem = text.partition(": ") if isinstance(text, str) else ("", "", "")
            if sep and (name, peer) not in shown:
                shown.add((name, peer))
                view["alerts"].append({"witness": name, "peer": peer, "problem": problem,
                                       "from": "member record (the alert key is missing)"})
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
