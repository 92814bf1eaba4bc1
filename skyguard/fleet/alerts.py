"""The alerts a fleet witness raised (a refusal to cosign a peer's log: a tamper event), and
those an operator cleared.

Besides the signed log entry and the metric, each alert is kept in the state dir
(fleet/alerts.json) and published again in the store whenever it is missing there, so whoever
can write the store cannot erase it by deleting its key, nor a restart make the host forget it.
Each is published with a note by which the witness's host key signs it (alert_note): whoever can
write the store can write an alert record too, so `fleet status` shows as the fleet's only the
alerts its host raised and those a host key an operator pinned there signed (open_alert,
admin.py); the rest is unverified. At most MAX_ALERTS are kept (AlertBook): past it the oldest on
a peer no operator pinned goes first, else the oldest; it is deleted from the store, counted, and
not raised again while the agent runs. The signed log keeps every one.

An operator clears one with `skyguard fleet clear-alert PEER` (request_clear): the agent takes the
request at its next round, logs it in the signed log, drops the alert and remembers the clearing
(fleet/cleared.json: when, per witness and peer), which it publishes signed beside its alerts
(cleared_note). The alert's signed record put back in the store (whoever copied it can) is older
than its clearing: `fleet status` never shows it, nor does the agent keep or publish it. Each
host keeps the clearings its pinned peers signed, so deleting one from the store brings nothing
back either. A peer that still fails the checks is alerted on again, later than its clearing.

Not here: what raises an alert (agent.py, witnessing.py), the view (admin.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from skyguard import fsutil
from skyguard.fleet import keys
from skyguard.fleet.store import Store, load_value
from skyguard.tlog.checkpoint import Signer, Verifier, split_note
from skyguard.tlog.errors import BadLogInput, VerificationError

log = logging.getLogger("skyguard.fleet")

ALERTS_FILE = "fleet/alerts.json"   # under the state dir: {peer: the alert as published}
CLEARED_FILE = "fleet/cleared.json"   # under the state dir: {"<witness>/<peer>": when cleared}
CLEAR_DIR = "fleet/clear"   # under the state dir: one file per alert an operator cleared, naming its peer
# Alerts a host keeps (SKYGUARD_FLEET_MAX_ALERTS); clearings it remembers (the oldest go first).
MAX_ALERTS = int(os.environ.get("SKYGUARD_FLEET_MAX_ALERTS", "256"))
MAX_CLEARED = 4 * MAX_ALERTS
NOTES_PUBLISHED = 20   # alert and clearing notes in a member record, each
EVICTED_REMEMBERED = 4096   # peers whose alert was dropped, not alerted on again while the agent runs


def load_alerts(state_dir: Path) -> dict[str, dict]:
    """The alerts this host raised, kept in its state dir ({} when none, or unreadable: said)."""
    path = Path(state_dir) / ALERTS_FILE
    try:
        if not path.exists():   # (a state dir this user may not read: said, below)
            return {}
        kept = json.loads(fsutil.read_regular_file(path))
    except (OSError, ValueError) as e:
        log.error("the fleet alerts kept in %s are unreadable (%s); the signed log holds them", path, e)
        return {}
    return {peer: alert for peer, alert in kept.items() if isinstance(alert, dict)} if isinstance(kept, dict) else {}


def keep_alerts(state_dir: Path, alerts: dict[str, dict]) -> None:
    fsutil.write_private(Path(state_dir) / ALERTS_FILE, json.dumps(alerts, indent=1, sort_keys=True).encode())


def request_clear(state_dir: Path, peer: str) -> None:
    """Ask the agent of this state dir to drop its alert on `peer` (taken at its next round, or
    at its start). The agent is the one writer of the alerts file; this only leaves a request."""
    directory = Path(state_dir) / CLEAR_DIR
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fsutil.write_private(directory / hashlib.sha256(peer.encode()).hexdigest()[:32], peer.encode())


def clear_requests(state_dir: Path) -> list[tuple[str, Path]]:
    """(peer, request file) for each alert an operator cleared; the agent removes a request once
    it is done with it (so one it could not finish, the store unreachable, is taken again). What
    is not a request (not a regular file, not a short printable name) is removed, said."""
    directory = Path(state_dir) / CLEAR_DIR
    requests = []
    for path in sorted(directory.iterdir()) if directory.is_dir() else ():
        try:
            peer = fsutil.read_regular_file(path).decode()
            if not (0 < len(peer) <= 255 and peer.isprintable()):
                raise ValueError("not a peer's name")
            requests.append((peer, path))
        except (OSError, ValueError) as e:
            log.error("fleet: ignoring %s, not a clear-alert request (%s)", path, e)
            path.unlink(missing_ok=True)
    return requests


async def republish_alerts(store: Store, me: str, alerts: dict[str, dict], signer: Signer) -> None:
    """Each alert of `alerts` (this witness's, by peer) put back in the store where its key is
    missing or holds something else."""
    if not alerts:
        return
    stored = {item.key: item.value for item in (await store.get_prefix(keys.ALERTS))[0]}
    for peer, alert in sorted(alerts.items()):
        key, value = keys.alert(peer, me), alert_value(signer, alert)
        try:
            same = key in stored and load_value(stored[key]) == json.loads(value)
        except ValueError:
            same = False
        if not same:
            log.warning("fleet: the alert on %s is gone or changed in the store; publishing it again", peer)
            await store.put(key, value)


ALERT_HEADER = "skyguard.fleet/alert/v1"
CLEARED_HEADER = "skyguard.fleet/cleared/v1"


def alert_note(signer: Signer, alert: dict) -> str:
    """The note by which a witness's host key (its log key) signs an alert it raised: a header
    line, then the alert as one line of JSON (ASCII: whatever text it quotes stays one line)."""
    return signer.sign(f"{ALERT_HEADER}\n{json.dumps(alert, sort_keys=True)}\n")


def alert_value(signer: Signer, alert: dict) -> bytes:
    """An alert as the store holds it: its fields, and their signed note."""
    return json.dumps({**alert, "note": alert_note(signer, alert)}, sort_keys=True).encode()


def open_alert(note, host_keys: dict[str, Verifier], own: Verifier | None = None) -> dict:
    """The alert `note` states, if the host key known here for the witness it names signed it
    (`host_keys`: witness name -> its log key; `own`: this host's, whatever name it signs under);
    ValueError saying why not."""
    return _open_note(note, host_keys, ALERT_HEADER, "alert", own)


def cleared_note(signer: Signer, witness: str, peer: str, when: float) -> str:
    """The note by which a witness's host key signs that an operator cleared its alert on `peer`."""
    return signer.sign(f"{CLEARED_HEADER}\n{json.dumps({'witness': witness, 'peer': peer, 'cleared': when}, sort_keys=True)}\n")


def open_cleared(note, host_keys: dict[str, Verifier], own: Verifier | None = None) -> tuple[str, float]:
    """("<witness>/<peer>", when) of a clearing `note` the witness's host key signed; ValueError."""
    cleared = _open_note(note, host_keys, CLEARED_HEADER, "clearing", own)
    when, peer = cleared.get("cleared"), cleared.get("peer")
    if not (isinstance(when, (int, float)) and math.isfinite(when) and isinstance(peer, str) and len(peer) <= 255):
        raise ValueError("not a signed clearing")
    return f"{cleared['witness']}/{peer}", float(when)


def _open_note(note, host_keys: dict[str, Verifier], header: str, what: str, own: Verifier | None) -> dict:
    try:
        text, _ = split_note(note)
        head, line, end = text.split("\n") if text.count("\n") == 2 else ("", "", "x")
        fields = load_value(line.encode()) if head == header and not end else None
        if not isinstance(fields, dict) or not isinstance(fields.get("witness"), str):
            raise ValueError(f"not a signed {what}")
        key = host_keys.get(fields["witness"], own)
        if key is None:
            raise ValueError(f"signed by no host key known here for {fields['witness']!r}")
        key.verify(note)
    except (BadLogInput, VerificationError) as e:
        raise ValueError(f"not signed by a host key known here ({e})"[:300]) from None
    return fields


def load_cleared(state_dir: Path) -> dict[str, float]:
    """The clearings known in a state dir ({} when none, or unreadable: said)."""
    path = Path(state_dir) / CLEARED_FILE
    try:
        kept = json.loads(fsutil.read_regular_file(path)) if path.exists() else {}
    except (OSError, ValueError) as e:
        log.error("the fleet alert clearings kept in %s are unreadable (%s)", path, e)
        return {}
    return {k: float(v) for k, v in kept.items() if isinstance(v, (int, float))} if isinstance(kept, dict) else {}


def is_cleared(alert: dict, cleared: dict[str, float]) -> bool:
    """Whether `alert` (by its witness, on its peer) was raised no later than its clearing."""
    when = cleared.get(f"{alert.get('witness')}/{alert.get('peer')}")
    raised = alert.get("time")
    return when is not None and not (isinstance(raised, (int, float)) and raised > when)


class AlertBook:
    """This witness's alerts by peer (`records`), kept in the state dir, at most `limit`; and the
    clearings known here (`cleared`). `pinned(peer)`: an operator pinned it (alerts on the
    others go first); `dropped(n)`: n alerts dropped over the limit (a metric)."""

    def __init__(self, state_dir: Path, me: str, pinned: Callable[[str], bool] = lambda peer: True,
                 dropped: Callable[[int], None] = lambda n: None, limit: int | None = None):
        self.state_dir, self.me, self.pinned, self.dropped = Path(state_dir), me, pinned, dropped
        self.limit = MAX_ALERTS if limit is None else limit
        self.cleared = load_cleared(state_dir)
        self.records = {peer: a for peer, a in load_alerts(state_dir).items() if not is_cleared(a, self.cleared)}
        self.evicted: dict[str, None] = {}   # peers whose alert was dropped: not raised again while running
        self._learnt: dict[str, list] = {}   # peer -> its clearing notes as last read

    def add(self, peer: str, alert: dict) -> list[str]:
        """Keep `alert` on `peer`; the peers whose alerts were dropped to make room (maybe it)."""
        self.records[peer] = alert
        out = []
        while len(self.records) > self.limit:
            victim = min(self.records, key=lambda p: (self.pinned(p), _time(self.records[p]), p))
            del self.records[victim]
            out.append(victim)
            self.evicted[victim] = None
            while len(self.evicted) > EVICTED_REMEMBERED:
                del self.evicted[next(iter(self.evicted))]
        if out:
            self.dropped(len(out))
            log.warning("fleet: %d alerts kept already; dropped those on %s (the signed log keeps them)",
                        self.limit, ", ".join(out)[:300])
        return out

    def clear(self, peer: str) -> dict | None:
        alert = self.records.pop(peer, None)
        if alert is not None:
            self._remember(f"{self.me}/{peer}", time.time())
        return alert

    def learn(self, peer: str, notes, vkey) -> bool:
        """Take the clearings pinned `peer` signed with its log key `vkey` (`notes`, from its member
        record); True if one is new here."""
        notes = notes[:NOTES_PUBLISHED] if isinstance(notes, list) and isinstance(vkey, str) else []
        if self._learnt.get(peer) == notes:
            return False
        self._learnt[peer] = notes
        new = False
        for note in notes:
            try:
                which, when = open_cleared(note, {peer: Verifier.from_vkey(vkey)})
            except (ValueError, BadLogInput):
                continue
            if when > self.cleared.get(which, -math.inf):
                new = self._remember(which, when) or new
        return new

    def _remember(self, which: str, when: float) -> bool:
        self.cleared[which] = when
        while len(self.cleared) > MAX_CLEARED:
            del self.cleared[min(self.cleared, key=lambda k: self.cleared[k])]
        return which in self.cleared

    def keep(self) -> None:
        """Both files written (blocking: run in a worker thread)."""
        keep_alerts(self.state_dir, self.records)
        fsutil.write_private(self.state_dir / CLEARED_FILE, json.dumps(self.cleared, sort_keys=True).encode())

    def notes(self, signer: Signer) -> tuple[list[str], list[str]]:
        """(alert notes, clearing notes) this host publishes in its member record."""
        alerts = [alert_note(signer, a) for _, a in sorted(dict(self.records).items())][-NOTES_PUBLISHED:]
        mine = sorted((when, which) for which, when in self.cleared.items() if which.startswith(self.me + "/"))
        return alerts, [cleared_note(signer, self.me, which.split("/", 1)[1], when) for when, which in mine[-NOTES_PUBLISHED:]]


def _time(alert: dict) -> float:
    value = alert.get("time")
    return float(value) if isinstance(value, (int, float)) else 0.0
