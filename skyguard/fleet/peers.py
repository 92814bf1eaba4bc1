"""The peers a host trusts: each peer's log origin, log key and witness key, pinned in the state
dir (tlog/cosign.py's PEERS_FILE, which `skyguard log verify --witnesses` and `skyguard fleet
status` read too). Another key or origin later is a problem, never an update; an operator's
`untrust` then `trust` of new keys is a rotation (the agent starts that peer's witness record anew).

A peer is pinned by an operator: `skyguard fleet identity --name H` on host H prints its keys,
`skyguard fleet trust H --key FILE` on each other host pins them (trust()). A member of the store
that no one pinned here is unverified: not witnessed, its cosignatures and alerts count for
nothing, whatever it wrote (whoever can write the store can register one). Pinning at first sight
(the keys a member first shows in the store) happens only when the agent is told to
(--fleet-trust-first-use); such pins count for the agent alone, never for `log verify` or `fleet
status`, and at most MAX_FIRST_SIGHT of them are kept (those of peers gone from the store go first,
counted, and what the agent kept of them with them; past that a new member is not pinned, nor
witnessed).

Read again only when the file changed (its inode: it is replaced whole), not several times per
peer and round; every writer (the agent, `fleet trust`) holds a lock beside it.

Not here: which records may be pinned (witnessing.peer_keys), the witness state (tlog/cosign.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from skyguard import fsutil
from skyguard.errors import BadInput
from skyguard.fleet.signing import check_member_name
from skyguard.fleet.witnessing import peer_keys
from skyguard.tlog.checkpoint import Verifier
from skyguard.tlog.cosign import PEERS_FILE, PINNED_BY_OPERATOR, CosignerVerifier
from skyguard.tlog.errors import BadLogInput

log = logging.getLogger("skyguard.fleet")

KEY_FIELDS = ("origin", "log_vkey", "witness_vkey")
FIRST_SIGHT = "first sight"
# First-sight pins kept (SKYGUARD_FLEET_MAX_FIRST_SIGHT_PINS): each is a member whoever writes the
# store can make up.
MAX_FIRST_SIGHT = int(os.environ.get("SKYGUARD_FLEET_MAX_FIRST_SIGHT_PINS", "256"))
LOG_EVERY_S = 60.0


def fingerprint(vkey: str) -> str:
    """How a log or witness key is named in a log line or entry: its hash, short."""
    return "sha256:" + hashlib.sha256(vkey.encode()).hexdigest()[:16]


def keys_of(record: dict) -> dict:
    return {name: record.get(name) for name in KEY_FIELDS}


def by_operator(pin) -> bool:
    return isinstance(pin, dict) and pin.get("pinned") == PINNED_BY_OPERATOR


class PeerPins:
    """`first_sight`: pin a member's keys when first seen (the opt-in); `dropped()` is called
    for each first-sight pin dropped or refused over MAX_FIRST_SIGHT (a metric), `forgotten(peer,
    pin)` once a pin was dropped (what the agent kept of that peer goes with it)."""

    def __init__(self, state_dir: Path, first_sight: bool = False, max_first_sight: int | None = None,
                 dropped: Callable[[], None] = lambda: None,
                 forgotten: Callable[[str, dict], None] = lambda peer, pin: None):
        self.path = Path(state_dir) / PEERS_FILE
        self.first_sight = first_sight
        self.max_first_sight = MAX_FIRST_SIGHT if max_first_sight is None else max_first_sight
        self.dropped, self.forgotten = dropped, forgotten
        self._pins: dict = {}
        self._trusted: dict = {}
        self._seen: tuple | None = None   # the file as last read: (inode, size, mtime), or () if none
        self._refused: tuple[frozenset, set] = (frozenset(), set())   # (members then, refused a pin since)
        self._logged = -LOG_EVERY_S

    def _read(self) -> dict:
        try:
            st = self.path.stat()
            now: tuple = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            now = ()
        if now != self._seen:
            try:
                pins = json.loads(fsutil.read_regular_file(self.path)) if now else {}
            except (OSError, ValueError) as e:
                log.error("fleet: the pinned peers in %s are unreadable (%s): none trusted", self.path, e)
                pins = {}
            self._pins = {peer: pin for peer, pin in pins.items() if isinstance(pin, dict)} if isinstance(pins, dict) else {}
            self._trusted = {peer: pin for peer, pin in self._pins.items() if self.first_sight or by_operator(pin)}
            self._seen = now
        return self._pins

    def all(self) -> dict:
        """{peer: {origin, log_vkey, witness_vkey, ...}} of the peers trusted here: pinned by an
        operator, or at first sight when that is on (the caller must not change it)."""
        self._read()
        return self._trusted

    def check(self, peer: str, record: dict, present: Iterable[str] = ()) -> str | None:
        """The problem if trusted `peer` presents other keys in its member record than pinned;
        a peer not trusted yet is pinned now when first sight is on (`present`: the store's
        members now, whose first-sight pins are kept before those of peers gone)."""
        pinned = self.all().get(peer)
        if pinned is None:
            if self.first_sight:
                self._pin_first_sight(peer, record, set(present))
            return None
        if keys_of(pinned) != keys_of(record):
            how = "pinned here" if by_operator(pinned) else "first seen"
            return f"peer {peer} now presents other keys or origin than {how} ({pinned.get('origin')})"
        return None

    def _pin_first_sight(self, peer: str, record: dict, present: set[str]) -> None:
        if self._refused[0] != present:   # a member came or went: maybe room now
            self._refused = (frozenset(present), set())
        if peer in self._refused[1]:
            return   # refused already (counted once), while the same members are there
        gone_pin = None
        with _locked(self.path):
            self._seen = None
            pins = dict(self._read())
            if peer in pins:
                return
            first = sorted((_at(pin), name) for name, pin in pins.items() if not by_operator(pin))
            if len(first) >= self.max_first_sight:
                gone = [name for _, name in first if name not in present]
                if not gone:
                    self._refused[1].add(peer)
                    self.dropped()
                    if time.monotonic() - self._logged >= LOG_EVERY_S:
                        self._logged = time.monotonic()
                        log.warning("fleet: not pinning %s at first sight (nor others for a minute): %d first-sight "
                                    "pins already, all of members still in the store", peer, len(first))
                    return
                gone_pin = (gone[0], pins.pop(gone[0]))
                self.dropped()
                log.warning("fleet: first-sight pin of %s dropped (gone from the store) for %s", gone[0], peer)
            pins[peer] = {**keys_of(record), "pinned": FIRST_SIGHT, "at": time.time()}
            _write(self.path, pins)
            self._seen = None
        if gone_pin is not None:
            self.forgotten(*gone_pin)


def _at(pin: dict) -> float:
    return float(pin["at"]) if isinstance(pin.get("at"), (int, float)) else 0.0


def trust(state_dir: Path, name: str, identity: dict, own_origin: str | None = None) -> dict:
    """Pin `identity` (as `fleet identity` prints it: name, origin, log_vkey, witness_vkey) as the
    keys of peer `name` in `state_dir`; BadInput says why not. A first-sight pin of the same keys
    becomes an operator's; one of other keys, or an operator's pin, is never replaced (`untrust`
    first). `own_origin`: this host's log origin, which no peer may take."""
    check_member_name(name)
    if not isinstance(identity, dict) or not peer_keys(identity):
        raise BadInput("a peer's identity is the JSON object `skyguard fleet identity` prints on it: "
                       "origin, log_vkey and witness_vkey, each short printable text")
    if identity.get("name", name) != name:
        raise BadInput(f"this identity is {str(identity.get('name'))[:64]!r}'s, not {name!r}'s")
    try:
        Verifier.from_vkey(identity["log_vkey"])
        CosignerVerifier.from_vkey(identity["witness_vkey"])
    except (BadLogInput, ValueError) as e:
        raise BadInput(f"the identity's keys are not a log key and a witness key: {e}"[:300]) from None
    if identity["origin"] == own_origin:
        raise BadInput(f"{identity['origin']!r} is this host's own log origin")
    path = Path(state_dir) / PEERS_FILE
    with _locked(path):
        pins = _load(path)
        holder = next((peer for peer, pin in sorted(pins.items())
                       if peer != name and by_operator(pin) and pin.get("origin") == identity["origin"]), None)
        if holder is not None:
            raise BadInput(f"the log origin {identity['origin']!r} is pinned here for {holder}")
        old = pins.get(name)
        if old is not None and keys_of(old) != keys_of(identity):
            raise BadInput(f"{name} is pinned here with other keys (origin {str(old.get('origin'))[:200]!r}); "
                           f"`skyguard fleet untrust {name}` first if they really changed")
        pins[name] = {**keys_of(identity), "pinned": PINNED_BY_OPERATOR, "at": time.time()}
        _write(path, pins)
    return pins[name]


def untrust(state_dir: Path, name: str) -> bool:
    """Forget peer `name`'s pinned keys; False if none were pinned."""
    path = Path(state_dir) / PEERS_FILE
    with _locked(path):
        pins = _load(path)
        if pins.pop(name, None) is None:
            return False
        _write(path, pins)
    return True


def _load(path: Path) -> dict:
    try:
        pins = json.loads(fsutil.read_regular_file(path)) if path.exists() else {}
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError:
        raise BadInput(f"{path} is not JSON; move it away to pin peers anew") from None
    return {peer: pin for peer, pin in pins.items() if isinstance(pin, dict)} if isinstance(pins, dict) else {}


def _write(path: Path, pins: dict) -> None:
    fsutil.write_private(path, json.dumps(pins, indent=1, sort_keys=True).encode())


class _locked:
    """The lock every writer of the pins file holds (a file beside it)."""

    def __init__(self, path: Path):
        self.path = path.with_name(path.name + ".lock")

    def __enter__(self):
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        os.close(self.fd)
