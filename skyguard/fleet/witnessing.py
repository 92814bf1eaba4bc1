"""What a fleet witness checks of a peer's checkpoint beyond its own witness state (which
skyguard/tlog/cosign.py keeps): that it agrees with what every other witness of the fleet
cosigned of the same log, as their cosignatures in the store show. Against a split view: one
history shown to some witnesses, another to others.

For each other witness's cosigned checkpoint (size n) and the checkpoint shown here (size m):
- n == m: the same root, else Tamper (the log signed two roots at one size);
- n < m: the log's consistency proof from n to m (published with its checkpoint) must verify,
  else Tamper when the log's key signed the proofs (the agent publishes them with a note, see
  sign_proofs: whoever writes the store could change an unsigned one, which is no evidence) and
  unverified when not; a proof not published yet leaves it unverified;
- n > m: nothing the log publishes with a checkpoint of size m proves it a prefix of n, so it is
  unverified until the log shows n or more (with a proof from n), never taken as consistent.
A witness cosigns nothing while one is unverified; for a checkpoint it had already cosigned (two
witnesses cosigning at once, neither seeing the other's) the agent reports which are unverified.

Also here: which member may not be witnessed under the origin it presents (origin_rival), and
the note by which a log's key signs the proofs it publishes (a failing proof is evidence only
then; Witness.cosign is told whether it is).

Not here: the witness state and cosignatures (tlog/cosign.py), reading the store (agent.py), the
alerts a witness raises (alerts.py).
"""

from __future__ import annotations

import base64
import logging

from skyguard.fleet.store import Item, load_value
from skyguard.tlog.checkpoint import Checkpoint, Signer, Verifier, parse_and_verify
from skyguard.tlog.cosign import CosignerVerifier, Tamper
from skyguard.tlog.errors import BadLogInput, VerificationError
from skyguard.tlog.head import MAX_NOTE
from skyguard.tlog.tree import verify_consistency

log = logging.getLogger("skyguard.fleet")



PROOFS_HEADER = "skyguard.fleet/proofs/v1"


def proofs_text(checkpoint: Checkpoint, proofs: dict) -> str:
    """What a log's key signs of the proofs it publishes: the checkpoint they lead to, then one
    line per old size with its hashes. Raises ValueError/TypeError on proofs of another shape."""
    lines = [PROOFS_HEADER, checkpoint.origin, str(checkpoint.size), base64.b64encode(checkpoint.hash).decode()]
    for old in sorted(proofs, key=int):
        hashes = proofs[old]
        if not isinstance(hashes, list) or not all(isinstance(h, str) and h.isascii() and " " not in h for h in hashes):
            raise TypeError("a proof is a list of base64 hashes")
        lines.append(" ".join([str(int(old)), *hashes]))
    return "\n".join(lines) + "\n"


def sign_proofs(signer: Signer, checkpoint: Checkpoint, proofs: dict) -> str:
    """The note a log publishes beside its proofs (`proofs_note`), signed by its log key."""
    return signer.sign(proofs_text(checkpoint, proofs))


def proofs_attested(note, verifier: Verifier, checkpoint: Checkpoint, proofs: dict) -> bool:
    """True if `note` is the log's signature (by `verifier`) over exactly these proofs to
    `checkpoint`: a failing proof is then evidence against the log, not the relay's doing."""
    if not isinstance(note, str):
        return False
    try:
        return verifier.verify(note) == proofs_text(checkpoint, proofs)
    except (BadLogInput, VerificationError, ValueError, TypeError):
        return False


def cosigned_by(value: bytes, witness: dict, verifier: Verifier, origin: str) -> tuple[Checkpoint, str] | None:
    """(checkpoint, note) if `value` (a record under cosignatures/<log>/) holds the log's
    checkpoint of `origin`, signed by `verifier`, cosigned by the witness whose pinned keys are
    `witness`; None if not."""
    try:
        note = load_value(value)["note"]
        checkpoint, _ = CosignerVerifier.from_vkey(witness["witness_vkey"]).verify(note)
        parse_and_verify(note, verifier, origin=origin)
    except (ValueError, KeyError, TypeError, BadLogInput, VerificationError):
        return None
    return checkpoint, note


def unproven_witnesses(items: list[Item], pinned: dict, me: str, verifier: Verifier,
                       checkpoint: Checkpoint, proofs: dict, attested: bool = True) -> list[str]:
    """The other pinned witnesses whose cosignature of this log (`items`: the store's records
    under cosignatures/<log>/) is not proven consistent with `checkpoint`, which `verifier`
    signed; `proofs` are the log's published ones ({str(old size): [base64 hash]}, to
    checkpoint's size), `attested` whether its key signed them. Raises Tamper when one is
    proven inconsistent."""
    unproven = []
    for item in items:
        witness = item.key.rsplit("/", 1)[-1]
        if witness == me or not isinstance(pinned.get(witness), dict):
            continue
        cosigned = cosigned_by(item.value, pinned[witness], verifier, checkpoint.origin)
        if cosigned is None:
            continue
        other = cosigned[0]
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
                if not attested:   # whoever writes the store could have changed it
                    unproven.append(witness)
                    continue
                raise Tamper(f"split view: log {checkpoint.origin!r} at size {checkpoint.size} "
                             f"is not consistent with size {other.size} cosigned by {witness}: "
                             f"{e}") from None
    return sorted(set(unproven))


def origin_rival(peer: str, record: dict, peers: dict, pinned: dict, own_origin: str | None) -> str | None:
    """Why `peer` must not be witnessed under the origin it presents: this host's own, or
    one another member presents too. A log's origin is unique per host, and the witness
    keeps its state per origin: the first key it saw for an origin is the only one it ever
    cosigns, so a member that takes another's origin would otherwise get that origin's
    first-sight binding at a witness that joins later, and the real host refused for good.
    A member that pinned the origin here keeps it; when none did, both are refused. `pinned`:
    the peers' keys pinned here; `own_origin`: this host's log origin."""
    origin = record.get("origin")
    if not isinstance(origin, str):
        return None
    if origin == own_origin:
        return f"peer {peer} presents this host's own log origin {origin!r}"
    if (pinned.get(peer) or {}).get("origin") == origin:
        holder = peer
    else:
        holder = next((name for name, keys_ in sorted(pinned.items())
                       if name != peer and (keys_ or {}).get("origin") == origin), None)
    if holder is not None and holder != peer:
        return f"peer {peer} presents the log origin {origin!r} first seen from {holder}"
    if holder is None:
        rivals = sorted(name for name, other in peers.items()
                        if name != peer and other.get("origin") == origin)
        if rivals:
            return (f"peers {', '.join([peer, *rivals])} all present the log origin "
                    f"{origin!r}: none is witnessed until one is removed")
    return None


def peer_keys(record: dict) -> bool:
    """The record names an origin and keys as a log's checkpoint can carry them: non-empty
    printable text of at most a head note's size. Anything else, say JSON nested deep or
    megabytes long, would be pinned into peers.json and reread every round; a lone surrogate
    (valid JSON) would make the tamper entry that quotes it fail to encode."""
    return all(isinstance(record.get(name), str) and 0 < len(record[name]) <= MAX_NOTE
               and record[name].isprintable() for name in ("origin", "log_vkey", "witness_vkey"))
