"""What a fleet witness checks of a peer's checkpoint beyond its own witness state (which
skyguard/tlog/cosign.py keeps): that it agrees with what every other witness of the fleet
cosigned of the same log, as their cosignatures in the store show. Against a split view: one
history shown to some witnesses, another to others.

For each other witness's cosigned checkpoint (size n) and the checkpoint shown here (size m):
- n == m: the same root, else Tamper (the log signed two roots at one size);
- n < m: the log's consistency proof from n to m (published with its checkpoint) must verify,
  else Tamper; a proof not published yet leaves it unverified;
- n > m: nothing the log publishes with a checkpoint of size m proves it a prefix of n, so it is
  unverified until the log shows n or more (with a proof from n), never taken as consistent.
A witness cosigns nothing while one is unverified; for a checkpoint it had already cosigned (two
witnesses cosigning at once, neither seeing the other's) the agent reports which are unverified.

Not here: the witness state and cosignatures (tlog/cosign.py), reading the store (agent.py).
"""

from __future__ import annotations

import base64

from skyguard.fleet.store import Item, load_value
from skyguard.tlog.checkpoint import Checkpoint, Verifier, parse_and_verify
from skyguard.tlog.cosign import CosignerVerifier, Tamper
from skyguard.tlog.errors import BadLogInput, VerificationError
from skyguard.tlog.head import MAX_NOTE
from skyguard.tlog.tree import verify_consistency


def unproven_witnesses(items: list[Item], pinned: dict, me: str, verifier: Verifier,
                       checkpoint: Checkpoint, proofs: dict) -> list[str]:
    """The other pinned witnesses whose cosignature of this log (`items`: the store's records
    under cosignatures/<log>/) is not proven consistent with `checkpoint`, which `verifier`
    signed; `proofs` are the log's published ones ({str(old size): [base64 hash]}, to
    checkpoint's size). Raises Tamper when one is proven inconsistent."""
    unproven = []
    for item in items:
        witness = item.key.rsplit("/", 1)[-1]
        if witness == me or not isinstance(pinned.get(witness), dict):
            continue
        try:
            other_note = load_value(item.value)["note"]
            other, _ = CosignerVerifier.from_vkey(pinned[witness]["witness_vkey"]).verify(other_note)
            parse_and_verify(other_note, verifier, origin=checkpoint.origin)
        except (ValueError, KeyError, TypeError, BadLogInput, VerificationError):
            continue
        if other.size == checkpoint.size:
            if other.hash != checkpoint.hash:
                raise Tamper(f"split view: {witness} cosigned another root at size {other.size} "
                             f"of log {checkpoint.origin!r} than the one shown here")
        elif other.size > checkpoint.size:
            unproven.append(witness)   # proven only by a checkpoint of size >= other.size
        elif other.size > 0:
            if str(other.size) not in proofs:
                unproven.append(witness)
                continue
            try:
                proof = [base64.b64decode(h) for h in proofs[str(other.size)]]
                verify_consistency(other.size, checkpoint.size, other.hash, checkpoint.hash, proof)
            except (ValueError, TypeError):   # not a list of base64 hashes: no proof
                unproven.append(witness)
            except VerificationError as e:
                raise Tamper(f"split view: log {checkpoint.origin!r} at size {checkpoint.size} "
                             f"is not consistent with size {other.size} cosigned by {witness}: "
                             f"{e}") from None
    return sorted(unproven)


def peer_keys(record: dict) -> bool:
    """The record names an origin and keys as a log's checkpoint can carry them: non-empty
    printable text of at most a head note's size. Anything else, say JSON nested deep or
    megabytes long, would be pinned into peers.json and reread every round; a lone surrogate
    (valid JSON) would make the tamper entry that quotes it fail to encode."""
    return all(isinstance(record.get(name), str) and 0 < len(record[name]) <= MAX_NOTE
               and record[name].isprintable() for name in ("origin", "log_vkey", "witness_vkey"))
