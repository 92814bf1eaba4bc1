"""This host's log as the fleet's witnesses see it: its latest signed checkpoint (from the daemon's
log writer, or read from the log directory), with a consistency proof from each size a witness
cosigned and the note by which the log's key signs those proofs (witnessing.sign_proofs), as the
store's value under checkpoints/<name>.

Not here: the store (agent.py), what a witness checks (witnessing.py, tlog/cosign.py).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

from skyguard.errors import SkyguardError
from skyguard.fleet.witnessing import sign_proofs
from skyguard.tlog.checkpoint import Checkpoint, Signer, split_note


class CheckpointPublisher:
    """`head_note() -> note or None` is the daemon's LogWriter.latest_note, when hosted."""

    def __init__(self, log_dir: Path, signer: Signer, head_note: Callable[[], str | None] | None = None):
        self.log_dir, self.signer, self.head_note = Path(log_dir), signer, head_note
        self.published: tuple | None = None   # (note, witness sizes, value) last published

    def head(self) -> dict:
        """The log's latest signed checkpoint: {origin, size, root, note}, or {} when none yet."""
        from skyguard.tlog.store import LogReader

        try:
            note = self.head_note() if self.head_note else LogReader(self.log_dir).latest_checkpoint_note()
            if not note:
                return {}
            checkpoint = Checkpoint.parse_body(split_note(note)[0])
        except (SkyguardError, OSError, ValueError):   # no log yet (or unreadable): nothing to report
            return {}
        return {"origin": checkpoint.origin, "size": checkpoint.size,
                "root": base64.b64encode(checkpoint.hash).decode(), "note": note}

    def value(self, cosigned_sizes: set[int]) -> bytes | None:
        """This log's latest checkpoint, with consistency proofs from each size a witness last
        cosigned (so each can check it extends what it vouched for), as the store's value; None
        when it is what was last published (forget() makes it publish again)."""
        from skyguard.tlog.store import LogReader
        from skyguard.tlog.tree import consistency_proof

        head = self.head()
        published = (head.get("note"), tuple(sorted(cosigned_sizes)))
        if not head or published == (self.published or ())[:2]:
            return None   # nothing new: the proofs cost a pass over the log's tail, so not again
        proofs = {}
        try:
            source = LogReader(self.log_dir).source()
        except (SkyguardError, OSError):
            return None
        for old in sorted(cosigned_sizes):
            if 0 < old < head["size"]:
                try:
                    proofs[str(old)] = [base64.b64encode(h).decode()
                                        for h in consistency_proof(source, old, head["size"])]
                except SkyguardError:
                    continue
        checkpoint = Checkpoint.parse_body(split_note(head["note"])[0])
        value = json.dumps({"note": head["note"], "proofs": proofs,
                            "proofs_note": sign_proofs(self.signer, checkpoint, proofs)}).encode()
        self.published = (*published, value)
        return value

    def forget(self) -> None:
        self.published = None
