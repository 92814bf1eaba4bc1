"""What a witness saw the other witnesses cosign of each peer's log: per witness, the largest
cosignature it made, kept in the state dir (fleet/seen/, one file per log) and checked with those
the store shows now (witnessing.unproven_witnesses).

Against a split view hidden by deleting: whoever can write the store can delete a cosignature
(or put an older one back) so that a witness no longer sees what another vouched for, and
cosigns a fork below it. A witness that saw it keeps holding it against every checkpoint of that
log; its absence from the store is logged once and counted. The witness that made it publishes
it again (agent.py), and the log keeps offering a proof from its size.

Not here: the checks themselves (witnessing.py), the witness's own state (tlog/cosign.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from skyguard import fsutil
from skyguard.fleet import keys
from skyguard.fleet.store import Item
from skyguard.fleet.witnessing import cosigned_by
from skyguard.tlog.checkpoint import Verifier

log = logging.getLogger("skyguard.fleet")

SEEN_DIR = "fleet/seen"   # under the state dir: {witness: {"note", "size"}} per peer log


class SeenCosignatures:
    """`vanished()` is called once for each cosignature seen before and missing now (a metric)."""

    def __init__(self, state_dir: Path, vanished: Callable[[], None] = lambda: None):
        self.directory = Path(state_dir) / SEEN_DIR
        self.vanished = vanished
        self.logs: dict[str, dict[str, dict]] = {}           # log name -> witness -> {note, size}
        self._checked: dict[tuple[str, str], tuple[bytes, int]] = {}   # the store's value last verified
        self._missing: dict[tuple[str, str], int] = {}       # (log, witness) -> size said missing

    def _path(self, log_name: str) -> Path:
        return self.directory / (hashlib.sha256(log_name.encode()).hexdigest()[:32] + ".json")

    def _load(self, log_name: str) -> dict[str, dict]:
        if log_name not in self.logs:
            path, kept = self._path(log_name), {}
            try:
                kept = json.loads(fsutil.read_regular_file(path))
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as e:
                log.error("fleet: the cosignatures seen kept in %s are unreadable (%s); starting from the store", path, e)
            self.logs[log_name] = {w: c for w, c in kept.items() if isinstance(c, dict)} if isinstance(kept, dict) else {}
        return self.logs[log_name]

    def merge(self, log_name: str, items: list[Item], pinned: dict, me: str, verifier: Verifier,
              origin: str) -> list[Item]:
        """The store's cosignatures of `log_name` (`items`), and the largest one seen of each
        other pinned witness where the store shows a smaller one or none (as Items too)."""
        seen, grew = self._load(log_name), False
        shown: dict[str, int] = {}   # witness -> largest size the store shows now
        for item in items:
            witness = item.key.rsplit("/", 1)[-1]
            if witness == me or not isinstance(pinned.get(witness), dict):
                continue
            checked = self._checked.get((log_name, witness))
            if checked is not None and checked[0] == item.value:
                size = checked[1]
            else:
                cosigned = cosigned_by(item.value, pinned[witness], verifier, origin)
                if cosigned is None:
                    continue
                size = cosigned[0].size
                self._checked[(log_name, witness)] = (item.value, size)
                if size > int(seen.get(witness, {}).get("size", -1)):
                    seen[witness], grew = {"note": cosigned[1], "size": size}, True
            shown[witness] = max(shown.get(witness, -1), size)
        if grew:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fsutil.write_private(self._path(log_name), json.dumps(seen, sort_keys=True).encode())
        out = list(items)
        for witness, kept in sorted(seen.items()):
            if not isinstance(pinned.get(witness), dict):
                continue   # no longer pinned here: what it cosigned counts for nothing
            size = int(kept.get("size", -1))
            if shown.get(witness, -1) >= size:
                self._missing.pop((log_name, witness), None)
                continue
            out.append(Item(keys.cosignature(log_name, witness), json.dumps({"note": kept.get("note")}).encode(), 0))
            if self._missing.get((log_name, witness)) != size:
                self._missing[(log_name, witness)] = size
                self.vanished()
                log.warning("fleet: %s's cosignature of %s at size %d, seen before, is gone from the store "
                            "(or older there); still holding %s's log to it", witness, log_name, size, log_name)
        return out

    def forget(self, log_name: str) -> None:
        """Drop what was seen of `log_name` (its keys pinned anew: what the other witnesses
        cosigned under the old key proves nothing of the new log)."""
        self.logs.pop(log_name, None)
        for key in [k for k in (*self._checked, *self._missing) if k[0] == log_name]:
            self._checked.pop(key, None)
            self._missing.pop(key, None)
        self._path(log_name).unlink(missing_ok=True)
