"""What an operator does to the fleet from anywhere that reaches the store: push a signed
policy, and read the fleet's view as a host sees it (`Trust`: what its state dir vouches for).
Members no operator pinned there are unverified, and so are cosignatures not made by a witness
key pinned there; alerts are the fleet's only when that host raised them or a host key pinned
there signed them, the rest unverified; a member record is its host's word only as far as its
host key known there signed it (report.py: `record` verified, else unverified, forged, stale),
and so is what it says of the newest revision: whether it enforces or refused it (standing.py).

Not here: what a host does with a pushed policy (agent.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from skyguard.errors import SkyguardError
from skyguard.fleet import keys
from skyguard.fleet.alerts import is_cleared, load_alerts, load_cleared, open_alert, open_cleared
from skyguard.fleet.peers import by_operator, keys_of
from skyguard.fleet.report import MAX_AGE_S, HostKeys, MemberReport, RecordDoubt, fresh, open_member
from skyguard.fleet.signing import PolicyRefused, SignedPolicy, claimed, claimed_hosts, open_note, open_policy, sign_policy
from skyguard.fleet.standing import REFUSING, Newest, standing
from skyguard.fleet.store import Compacted, FleetError, Item, Store, load_value
from skyguard.tlog.checkpoint import Signer, Verifier
from skyguard.tlog.cosign import PEERS_FILE, CosignerVerifier
from skyguard.tlog.errors import BadLogInput, VerificationError

log = logging.getLogger("skyguard.fleet")

HISTORY_STEPS = 32   # the policy key's earlier values a push reads back for the highest revision


async def push_policy(store: Store, text: str, signer: Signer, hosts: tuple[str, ...] = ("*",),
                      admins: Sequence[Verifier] = ()) -> tuple[SignedPolicy, dict]:
    """Sign `text` as the next revision and store it; a concurrent push makes this one retry
    with the revision after it (compare-and-swap on the key's store revision). The next revision
    is one above the highest the fleet's admins signed (`admins`, and `signer`'s own key) among
    the policy key's values and the policies the hosts report running; also returned: what was
    not counted, {"records"|"reports": {reason: count}}."""
    trusted = [signer.verifier, *admins]
    for _ in range(20):
        item, _ = await store.get(keys.POLICY)
        ignored: dict[str, dict[str, int]] = {"records": {}, "reports": {}}
        # Never below what any host runs: the stored record may be a replayed older one.
        found = await _signed_stored(store, item, trusted, ignored["records"]) + \
            await _signed_running(store, trusted, ignored["reports"])
        signed = sign_policy(text, max((n.revision for n in found), default=0) + 1, signer, hosts)
        if await store.put_if(keys.POLICY, signed.to_json(), item.mod_revision if item else 0):
            ignored = {kind: counts for kind, counts in ignored.items() if counts}
            for kind, counts in ignored.items():
                log.warning("fleet push: %d %s not counted for the next revision (%s): none signed by a trusted "
                            "admin key (--sign-key, --admin-key)", sum(counts.values()),
                            "policy records in the store's history" if kind == "records" else "members' reports",
                            ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())))
            return signed, ignored
    raise FleetError("another push kept winning; try again")


async def newest_signed(store: Store, admins: Sequence[Verifier]) -> Newest | None:
    """The fleet's newest revision as far as `admins` signed it (standing.py): the highest among
    the policy key's values and the hosts' reports (what a push numbers the next one from), of
    two under one number the one stored last."""
    item, _ = await store.get(keys.POLICY)
    found = await _signed_stored(store, item, list(admins), {}) + await _signed_running(store, list(admins), {})
    return max(found, key=lambda n: n.revision, default=None)   # the first of the highest: stored last


async def _signed_stored(store: Store, item: Item | None, admins: list[Verifier],
                         ignored: dict[str, int]) -> list[Newest]:
    """The revisions `admins` signed among the policy key's values the store still keeps, from
    `item` (its value now) back through its history, at most HISTORY_STEPS of them; the others
    counted in `ignored` by reason (whoever writes the store can put any revision there).
    A record put back by whoever writes the store hides the newer ones from a read of the key,
    not from its history; the hosts' reports (_signed_running) cover what the history no longer
    holds, but lag up to a heartbeat behind what a host runs, and are gone while a host is away
    (its lease expired)."""
    found = []
    for _ in range(HISTORY_STEPS):
        if item is None:
            break
        try:
            signed = open_policy(item.value, admins)
            found.append(Newest(signed.revision, signed.sha256, signed.hosts))
        except PolicyRefused as e:   # the check hosts make before applying one
            ignored[e.reason] = ignored.get(e.reason, 0) + 1
        if item.mod_revision <= 1:
            break
        try:
            item, _ = await store.get(keys.POLICY, revision=item.mod_revision - 1)
        except Compacted:
            break
    return found


async def _signed_running(store: Store, admins: list[Verifier], ignored: dict[str, int]) -> list[Newest]:
    """The revisions members report running, counted only with the note `admins` signed
    for it that the member reports beside it (agent.py): anyone who writes the store can make a
    member record up or put an old one back (the host key signing one is not pinned everywhere a
    push runs), but not sign a revision."""
    members, _ = await store.get_prefix(keys.MEMBERS)
    found = []
    for item in members:
        try:
            policy = load_value(item.value)["policy"]
            revision, note = policy["revision"], policy.get("note")
        except (ValueError, KeyError, TypeError, AttributeError):
            ignored["malformed"] = ignored.get("malformed", 0) + 1
            continue
        if not revision:
            continue   # runs no fleet policy yet
        try:
            if note is None:
                raise PolicyRefused("no_note", "no signed note beside the revision reported")
            signed_revision, sha256, hosts = open_note(note, admins)
            if signed_revision != revision:
                raise PolicyRefused("revision_mismatch", "the revision reported is not the one its note signs")
        except PolicyRefused as e:
            ignored[e.reason] = ignored.get(e.reason, 0) + 1
            continue
        found.append(Newest(signed_revision, sha256, hosts))
    return found


def _revision_of(value: bytes) -> int:
    """The revision a stored record claims, read without checking its signature (`fleet status`
    without --admin-key shows it so; a push counts only what open_policy opens)."""
    note = load_value(value)["note"]
    if not isinstance(note, str):
        raise TypeError("the stored policy note is not text")
    for line in note.split("\n"):
        if line.startswith("revision "):
            return int(line.split(" ", 1)[1])
    return 0


@dataclass
class Trust:
    """What a host's state dir vouches for: the alerts it raised (by peer), the peers' keys an
    operator pinned there, its own keys when it has them (log_vkey; witness_key: the last part
    of its witness's vkey, which does not depend on the member name), and the alert clearings
    it knows ("<witness>/<peer>" -> when)."""

    own_alerts: dict[str, dict] = field(default_factory=dict)
    pins: dict[str, dict] = field(default_factory=dict)
    own: dict[str, str] = field(default_factory=dict)
    cleared: dict[str, float] = field(default_factory=dict)

    @property
    def host_keys(self) -> dict[str, Verifier]:
        """{peer: its log key, which signs its alerts}."""
        found = {}
        for peer, pin in self.pins.items():
            try:
                found[peer] = Verifier.from_vkey(pin["log_vkey"])
            except (BadLogInput, KeyError, TypeError, ValueError):
                continue
        return found

    @property
    def member_keys(self) -> HostKeys:
        """The keys that vouch for member records here (report.py): pinned, and this host's own."""
        try:
            own = Verifier.from_vkey(self.own["log_vkey"]) if self.own.get("log_vkey") else None
        except BadLogInput:
            own = None
        return HostKeys(self.host_keys, own)


def local_trust(state_dir: Path) -> Trust:
    """The Trust of the state dir `state_dir` (empty parts where it holds none)."""
    from skyguard.tlog.cosign import WITNESS_KEY_FILE, Cosigner, load_or_create_witness_key
    from skyguard.tlog.hostkey import host_signer, key_path

    path, pins, own = Path(state_dir) / PEERS_FILE, {}, {}
    try:
        kept = json.loads(path.read_text()) if path.is_file() else {}
        pins = {peer: keys_of(pin) for peer, pin in kept.items() if by_operator(pin)} if isinstance(kept, dict) else {}
    except (OSError, ValueError) as e:
        log.error("the peers' keys pinned in %s are unreadable (%s)", path, e)
    try:
        if key_path(state_dir).is_file():
            own["log_vkey"] = host_signer(state_dir, create=False).verifier.vkey()
        if (Path(state_dir) / WITNESS_KEY_FILE).is_file():
            # its public key as a vkey ends with it, whatever the witness's name
            own["witness_key"] = Cosigner("x", load_or_create_witness_key(state_dir)).verifier.vkey().rpartition("+")[2]
    except (SkyguardError, OSError, ValueError) as e:
        log.error("this host's keys in %s are unreadable (%s)", state_dir, e)
    return Trust(load_alerts(state_dir), pins, own, load_cleared(state_dir))


def member_trust(name: str, status: dict, trust: Trust) -> str:
    """How far `trust` vouches for the member record `status` of `name`."""
    pin = trust.pins.get(name)
    if pin is not None:
        return "pinned here" if keys_of(status) == pin else "UNVERIFIED: presents other keys than pinned here"
    if trust.own.get("log_vkey") and status.get("log_vkey") == trust.own["log_vkey"]:
        return "this host"
    return "UNVERIFIED: not pinned here"


def _witness_key(witness: str, view: dict, trust: Trust) -> CosignerVerifier | None:
    """The key that vouches for `witness`'s cosignatures: pinned here, or this host's own (for
    the member that presents it)."""
    vkey = (trust.pins.get(witness) or {}).get("witness_vkey")
    record = view["members"].get(witness) or {}
    if (vkey is None and record.get("trust") == "this host" and isinstance(record.get("witness_vkey"), str)
            and record["witness_vkey"].rpartition("+")[2] == trust.own.get("witness_key")):
        vkey = record["witness_vkey"]
    try:
        return CosignerVerifier.from_vkey(vkey) if isinstance(vkey, str) else None
    except (BadLogInput, ValueError):
        return None


def _cosigned(log_name: str, witness: str, value: bytes, view: dict, trust: Trust) -> int | None:
    """The size of `log_name`'s checkpoint the record `value` shows cosigned by `witness`, if a
    witness key known here made it for the origin that log presents; else None."""
    verifier = _witness_key(witness, view, trust)
    origin = (trust.pins.get(log_name) or view["members"].get(log_name) or {}).get("origin")
    if verifier is None or origin is None:
        return None
    try:
        checkpoint, _ = verifier.verify(load_value(value)["note"])
    except (ValueError, KeyError, TypeError, BadLogInput, VerificationError):
        return None
    return checkpoint.size if checkpoint.origin == origin else None


async def fleet_view(store: Store, admins=None, trust: Trust | None = None) -> dict:
    """{members: {name: status + heartbeat_age_s + trust + cosignatures received + standing},
    policy, newest, alerts, unverified_alerts, refusing, not_verified, ok}, as the host whose
    `trust` is given sees it. `newest` is the fleet's newest revision (standing.py) as far as
    `admins` signed it; without admin keys, what the policy key's record claims (`signed`
    false). A member's `standing` says whether it enforces it or refused it (and which later
    revisions it refused, why and when), as far as its record is verified; `refusing` names the
    members refusing it, `not_verified` those whose record is not verified, and `ok` is true
    when neither names any. A member's
    `witnessed_by` holds the cosignatures made by a witness key known there (pinned, or its
    own), `witnessed_by_unverified` counts the others. `alerts` are the fleet's: those the host
    raised and those signed by a host key pinned there; every other alert record of the store,
    which anyone who can write it could have put there, is in `unverified_alerts` (at most
    MAX_UNVERIFIED)."""
    trust = trust or Trust()
    member_keys = trust.member_keys
    members, revision = await store.get_prefix(keys.MEMBERS)
    cosigs, _ = await store.get_prefix(keys.COSIGNATURES)
    alerts, _ = await store.get_prefix(keys.ALERTS)
    newest = await _newest(store, admins)
    now = time.time()
    view: dict = {"revision": revision, "members": {}, "alerts": [], "unverified_alerts": [], "policy": None,
                  "host_keys_known": sorted(trust.pins), "newest": newest and newest.to_json()}
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
        status["witnessed_by"], status["witnessed_by_unverified"] = {}, 0
        name = item.key[len(keys.MEMBERS):]
        status["trust"] = member_trust(name, status, trust)
        report = _check_record(name, status, member_keys, now)
        status["standing"] = standing(name, report, newest, now) if report else \
            {"state": status["record"], "enforces": None, "refused": []}
        view["members"][name] = status
    for item in cosigs:
        log_name, _, witness = item.key[len(keys.COSIGNATURES):].partition("/")
        if log_name not in view["members"]:
            continue
        size = _cosigned(log_name, witness, item.value, view, trust)
        if size is None:
            view["members"][log_name]["witnessed_by_unverified"] += 1
        else:
            view["members"][log_name]["witnessed_by"][witness] = size
    _alerts(view, alerts, trust)
    item, _ = await store.get(keys.POLICY)
    if item is not None:
        try:
            view["policy"] = {"revision": _revision_of(item.value)}
            if admins:
                signed = open_policy(item.value, admins)
                view["policy"].update(sha256=signed.sha256, hosts=list(signed.hosts), signed=True)
        except (ValueError, KeyError, TypeError, FleetError) as e:
            view["policy"] = {"problem": str(e)}
    view["refusing"] = sorted(n for n, m in view["members"].items() if m["standing"]["state"] == REFUSING)
    view["not_verified"] = sorted(n for n, m in view["members"].items() if m["record"] != "verified")
    view["ok"] = not view["refusing"] and not view["not_verified"]
    return view


async def _newest(store: Store, admins) -> Newest | None:
    """The newest revision `admins` signed; without them, the one the policy key's record claims."""
    if admins:
        return await newest_signed(store, admins)
    item, _ = await store.get(keys.POLICY)
    revision, sha256 = claimed(item.value) if item is not None else (None, None)
    if revision is None or sha256 is None:
        return None
    return Newest(revision, sha256, claimed_hosts(item.value), signed=False)


def _check_record(name: str, status: dict, member_keys: HostKeys, now: float) -> MemberReport | None:
    """`record`: whether the member record `status` is what its host key known here signed, and
    recent (report.py): "verified" (`signed_by` says which key: pinned here, this host), else
    "unverified", "forged" or "stale", with `record_problem`. The heartbeat's age shown is the
    signed one's when it is verified."""
    try:
        report = open_member(name, status, member_keys)
        fresh(report, now, what="`fleet status` read it", allowed=MAX_AGE_S)
    except RecordDoubt as e:
        status["record"], status["record_problem"] = e.kind, str(e)
        return None
    status["record"], status["signed_by"] = "verified", report.key
    status["heartbeat_age_s"] = round(now - report.time, 1)
    return report


MAX_UNVERIFIED = 100   # unverified alert records listed (whoever writes the store can write many)


def _alerts(view: dict, items: list, trust: Trust) -> None:
    """The fleet's alerts and the unverified ones into `view`. Signed alerts come from the
    alerts/ keys and from each host's own record (`alert_notes`, rewritten every period: an
    alert whose key was deleted is still shown); a record's plain `alerts` list is unsigned. An
    alert raised no later than its clearing (known here, or signed in its witness's record) is
    not shown, only counted (`cleared_alerts_hidden`)."""
    host_keys = trust.host_keys
    own = Verifier.from_vkey(trust.own["log_vkey"]) if trust.own.get("log_vkey") else None   # its own in the store
    cleared = dict(trust.cleared)
    for status in view["members"].values():
        notes = status.get("cleared_notes")
        for note in notes[:100] if isinstance(notes, list) else []:
            try:
                which, when = open_cleared(note, host_keys, own)
            except ValueError:
                continue
            cleared[which] = max(when, cleared.get(which, when))
    trusted: dict[tuple, dict] = {}
    hidden: set[tuple] = set()
    for alert in trust.own_alerts.values():
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
            alert = open_alert(note, host_keys, own)
        except ValueError as e:
            if peer is not None:   # a record's notes that fail: its plain list says the same, unsigned
                unverified.append({"record": where, "witness": witness, "peer": peer,
                                   "problem": str(problem)[:500], "why": str(e) if note is not None else "unsigned"})
            continue
        trusted.setdefault((alert.get("witness"), alert.get("peer")),
                           dict(alert, verified=f"signed by {alert['witness']}'s host key, known here"))
    for pair, alert in list(trusted.items()):
        if is_cleared(alert, cleared):   # e.g. its signed record put back in the store
            hidden.add(pair)
            del trusted[pair]
    view["cleared_alerts_hidden"] = len(hidden)
    view["alerts"] = [trusted[k] for k in sorted(trusted, key=str)]
    unverified = [u for u in unverified if (u["witness"], u["peer"]) not in trusted.keys() | hidden]
    view["unverified_alerts"] = unverified[:MAX_UNVERIFIED]
    view["unverified_total"] = len(unverified)
