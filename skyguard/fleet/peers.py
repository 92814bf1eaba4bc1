"""The peers' keys a host pinned at first sight: each peer's log origin, log key and witness key,
kept in the state dir (tlog/cosign.py's PEERS_FILE, which `skyguard log verify --witnesses` and
`skyguard fleet status` read too). Another key or origin later is a problem, never an update.

Read again only when the file changed (its inode: it is replaced whole), not several times per
peer and round: the agent is its one writer, but an operator may move it away.

Not here: which records may be pinned (witnessing.peer_keys), the witness state (tlog/cosign.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from skyguard import fsutil
from skyguard.tlog.cosign import PEERS_FILE


class PeerPins:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / PEERS_FILE
        self._pins: dict = {}
        self._seen: tuple | None = None   # the file as last read: (inode, size, mtime), or () if none

    def all(self) -> dict:
        """{peer: {origin, log_vkey, witness_vkey}} (the caller must not change it)."""
        try:
            st = self.path.stat()
            now: tuple = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            now = ()
        if now != self._seen:
            self._pins = json.loads(self.path.read_text()) if now else {}
            self._seen = now
        return self._pins

    def pin(self, peer: str, record: dict) -> str | None:
        """Pin `peer`'s keys from its member record if new; the problem if it presents others."""
        pinned = self.all()
        keys_now = {"origin": record.get("origin"), "log_vkey": record.get("log_vkey"),
                    "witness_vkey": record.get("witness_vkey")}
        if peer not in pinned:
            fsutil.write_private(self.path, json.dumps({**pinned, peer: keys_now}, indent=1, sort_keys=True).encode())
            return None
        if pinned[peer] != keys_now:
            return f"peer {peer} now presents other keys or origin than first seen ({pinned[peer]['origin']})"
        return None
