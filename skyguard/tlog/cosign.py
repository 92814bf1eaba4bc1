"""Cosignatures in the C2SP tlog-cosignature format (cosignature/v1, Ed25519), and the witness
that makes them: it cosigns a log's checkpoint only once it has checked that the checkpoint
extends the last one it cosigned for that log, and it remembers that durably.

https://c2sp.org/tlog-cosignature: a cosignature is a signed-note signature line by the cosigner
key, `— <name> base64(key ID || u64 big-endian timestamp || Ed25519 signature)`, with key ID
SHA-256(name || "\\n" || 0x04 || public key)[:4], over the message
"cosignature/v1\\n" "time <timestamp>\\n" followed by the whole checkpoint body. Verifier keys
travel as vkeys with algorithm byte 0x04. The witness key is its own Ed25519 key
(witness-ed25519.pem in the state dir): the spec forbids reusing one key for two cosigners, and a
separate key keeps "this host signed its log" and "this host vouches for another's" apart.

Witness state: one small JSON file per log origin (size, root hash and the log's verifier key as
first seen), written and fsynced before a cosignature leaves, so that a crash can never lead the
witness to cosign two forks of one log. Refusals that prove a rewrite (another root at the same
size, a failing consistency proof the log's key attested, another key for a known origin) raise
Tamper; a failing proof nobody attested raises Unproven (whoever relays proofs can change one). A smaller tree
raises Stale, not Tamper: a checkpoint the log genuinely signed earlier is no evidence of a
rollback (whoever relays checkpoints can replay an old one), and a log really cut that goes on
signing shows either another root at a size already cosigned or a larger size whose proof fails.

Not here: how checkpoints and proofs travel between hosts (skyguard/fleet/).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from skyguard import fsutil
from skyguard.errors import LogError
from skyguard.tlog.checkpoint import SIGNATURE_PREFIX, Checkpoint, Verifier, b64decode_canonical, split_note, valid_key_name
from skyguard.tlog.errors import BadLogInput, VerificationError
from skyguard.tlog.files import read_log_file
from skyguard.tlog.tree import verify_consistency

ALG_COSIGNATURE_V1 = 0x04
COSIGNATURE_HEADER = "cosignature/v1\n"
WITNESS_KEY_FILE = "witness-ed25519.pem"
MAX_TIMESTAMP = (1 << 63) - 1


class Tamper(LogError):
    """A log presented a checkpoint its witness must not cosign: it rewrote or forked history."""


class Unproven(LogError):
    """A consistency proof that fails but that the log's key did not attest (whoever relays
    proofs could have changed it): the checkpoint is not cosigned, and it is no evidence."""


class Stale(LogError):
    """A checkpoint older (smaller) than the one already cosigned for its log: not cosigned, and
    not evidence of tampering (an old, genuinely signed checkpoint replayed by its relay)."""


def cosigner_key_id(name: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_COSIGNATURE_V1]) + public_key).digest()[:4]


def signed_message(body: str, timestamp: int) -> bytes:
    return f"{COSIGNATURE_HEADER}time {timestamp}\n{body}".encode()


class CosignerVerifier:
    """A witness's public key under its name (vkey `name+keyid+base64(0x04 || key)`)."""

    def __init__(self, name: str, public_key: bytes):
        if not valid_key_name(name) or len(public_key) != 32:
            raise BadLogInput("a cosigner key is a valid key name and a 32-byte Ed25519 key")
        self.name, self.public_key = name, public_key
        self.key_id = cosigner_key_id(name, public_key)
        self._key = Ed25519PublicKey.from_public_bytes(public_key)

    def __repr__(self):
        return f"CosignerVerifier({self.vkey()!r})"

    def vkey(self) -> str:
        blob = base64.b64encode(bytes([ALG_COSIGNATURE_V1]) + self.public_key).decode()
        return f"{self.name}+{self.key_id.hex()}+{blob}"

    @classmethod
    def from_vkey(cls, vkey: str) -> CosignerVerifier:
        usage = "a witness key has the form name+keyid+base64(0x04 || key) (`skyguard fleet status --json`)"
        if not isinstance(vkey, str) or vkey.count("+") < 2:
            raise BadLogInput(usage)
        name, key_id, blob = vkey.strip().split("+", 2)
        raw = b64decode_canonical(blob, "the witness key")
        if len(raw) != 33 or raw[0] != ALG_COSIGNATURE_V1:
            raise BadLogInput("witness key is not a cosignature/v1 Ed25519 key (algorithm byte 0x04)")
        verifier = cls(name, raw[1:])
        if verifier.key_id.hex() != key_id.lower():
            raise BadLogInput("witness key ID does not match its name and key")
        return verifier

    def verify(self, note: str) -> tuple[Checkpoint, int]:
        """(checkpoint, timestamp) if note carries a valid cosignature by this key; raises."""
        text, signatures = split_note(note)
        for name, blob in signatures:
            if name != self.name or blob[:4] != self.key_id:
                continue
            if len(blob) != 4 + 8 + 64:
                raise VerificationError(f"cosignature by {self.name!r} is not 76 bytes")
            (timestamp,) = struct.unpack(">Q", blob[4:12])
            if timestamp > MAX_TIMESTAMP:
                raise VerificationError(f"cosignature by {self.name!r} has a timestamp over 2**63-1")
            try:
                self._key.verify(blob[12:], signed_message(text, timestamp))
            except InvalidSignature:
                raise VerificationError(f"cosignature by {self.name!r} is invalid") from None
            return Checkpoint.parse_body(text), timestamp
        raise VerificationError(f"note carries no cosignature by witness {self.name!r}")


class Cosigner:
    """Makes cosignature lines. Its repr never shows the key."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey):
        raw = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.verifier = CosignerVerifier(name, raw)
        self.name = name
        self._key = private_key

    def __repr__(self):
        return f"Cosigner(name={self.name!r}, key_id={self.verifier.key_id.hex()})"

    def line(self, body: str, timestamp: int | None = None) -> str:
        timestamp = int(time.time()) if timestamp is None else timestamp
        signature = self._key.sign(signed_message(body, timestamp))
        blob = base64.b64encode(self.verifier.key_id + struct.pack(">Q", timestamp) + signature).decode()
        return f"{SIGNATURE_PREFIX}{self.name} {blob}\n"


def add_signature(note: str, line: str) -> str:
    """The note with one more signature line (notes end with their signature block)."""
    split_note(note)   # refuse to extend what is not a note
    return note + line


def load_or_create_witness_key(state_dir: Path) -> Ed25519PrivateKey:
    """The witness key, beside the host key and held the same way (0600, never printed)."""
    from skyguard.tlog.hostkey import load_or_create_key_file

    return load_or_create_key_file(Path(state_dir) / WITNESS_KEY_FILE, "witness key")


@dataclass
class Witnessed:
    origin: str
    log_vkey: str
    size: int
    root: bytes

    def as_json(self) -> bytes:
        return json.dumps({"origin": self.origin, "log_vkey": self.log_vkey, "size": self.size,
                           "root": base64.b64encode(self.root).decode()}, sort_keys=True).encode()


class Witness:
    """Cosigns checkpoints of other logs, each only after checking it against the last one it
    cosigned for the same origin (state kept durably in `directory`, one file per origin).

    Not thread-safe: one witness per state dir, driven from one task."""

    def __init__(self, directory: Path, cosigner: Cosigner):
        self.directory = Path(directory)
        self.cosigner = cosigner
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, origin: str) -> Path:
        return self.directory / (hashlib.sha256(origin.encode()).hexdigest()[:32] + ".json")

    def state(self, origin: str) -> Witnessed | None:
        path = self._path(origin)
        if not path.exists():
            return None
        data = json.loads(read_log_file(path))  # a FIFO is refused (LogError), never waited on
        if data.get("origin") != origin:
            raise LogError(f"witness state {path} is for another origin; move it away")
        return Witnessed(origin, data["log_vkey"], int(data["size"]), base64.b64decode(data["root"]))

    def forget(self, origin: str) -> None:
        """Drop the state kept for `origin`: the log's next checkpoint is cosigned as a first
        one. Only on an operator's decision (the fleet agent: a peer's keys pinned anew, or a
        pin dropped); a key or fork the state refuses is otherwise refused for good."""
        self._path(origin).unlink(missing_ok=True)

    def refuse_older(self, checkpoint: Checkpoint, last: Witnessed | None = None) -> None:
        """Stale if `checkpoint` is smaller than the one last cosigned for its origin."""
        last = last if last is not None else self.state(checkpoint.origin)
        if last is not None and checkpoint.size < last.size:
            raise Stale(f"log {checkpoint.origin!r} presents size {checkpoint.size}, smaller "
                        f"than the size {last.size} already cosigned (an old checkpoint)")

    def cosign(self, note: str, log_vkey: str, proof: Sequence[bytes] | None,
               timestamp: int | None = None, proof_attested: bool = True) -> tuple[str, Checkpoint]:
        """The note with this witness's cosignature added, or Tamper (never cosign it), Stale
        (older than what was cosigned: nothing to cosign, not tamper) or
        VerificationError/BadLogInput (not a valid checkpoint: nothing to cosign, not tamper).
        `proof` is the consistency proof from the size last cosigned (None: none was offered;
        then only a first checkpoint or one at the same size can be cosigned). A failing proof
        is Tamper when `proof_attested` (the log's key signed it), else Unproven."""
        verifier = Verifier.from_vkey(log_vkey)
        checkpoint = Checkpoint.parse_body(verifier.verify(note))
        last = self.state(checkpoint.origin)
        if last is not None and last.log_vkey != log_vkey:
            raise Tamper(f"log {checkpoint.origin!r} now presents key {log_vkey}, not the key "
                         f"{last.log_vkey} it was first witnessed with")
        if last is not None:
            self.refuse_older(checkpoint, last)
            if checkpoint.size == last.size and checkpoint.hash != last.root:
                raise Tamper(f"log {checkpoint.origin!r} presents another root at size "
                             f"{checkpoint.size} than the one cosigned (a fork)")
            if last.size and checkpoint.size > last.size:
                if proof is None:
                    raise VerificationError(f"no consistency proof from size {last.size} offered")
                try:
                    verify_consistency(last.size, checkpoint.size, last.root, checkpoint.hash, proof)
                except VerificationError as e:
                    problem = (f"log {checkpoint.origin!r} at size {checkpoint.size} is not "
                               f"consistent with size {last.size} already cosigned: {e}")
                    if not proof_attested:
                        raise Unproven(f"{problem} (a proof the log's key did not sign: no evidence)") from None
                    raise Tamper(problem) from None
        state = Witnessed(checkpoint.origin, log_vkey, checkpoint.size, checkpoint.hash)
        # Durable before the cosignature exists: a crash after this never cosigns a fork.
        fsutil.write_private(self._path(checkpoint.origin), state.as_json())
        line = self.cosigner.line(checkpoint.body(), timestamp)
        return add_signature(note, line), checkpoint


def witnessed_by(notes: Sequence[str], origin: str, log_verifier: Verifier,
                 witnesses: Sequence[CosignerVerifier]) -> dict[str, int]:
    """{witness name: largest size it cosigned} over notes of this origin that carry both the
    log's signature and a valid cosignature (each witness counted once; invalid ones skipped)."""
    best: dict[str, int] = {}
    for note in notes:
        try:
            checkpoint = Checkpoint.parse_body(log_verifier.verify(note))
        except (BadLogInput, VerificationError):
            continue
        if checkpoint.origin != origin:
            continue
        for witness in witnesses:
            try:
                witness.verify(note)
            except (BadLogInput, VerificationError):
                continue
            best[witness.name] = max(best.get(witness.name, 0), checkpoint.size)
    return best


def read_cosigned_dir(directory: Path) -> list[str]:
    """Cosigned notes kept by the fleet agent (one file per witness), for `log verify`."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return [p.read_text("utf-8") for p in sorted(directory.iterdir())
            if p.suffix == ".note" and p.is_file()]


def _cosigned_name(witness_name: str) -> str:
    return hashlib.sha256(witness_name.encode()).hexdigest()[:32] + ".note"


def write_cosigned(directory: Path, witness_name: str, note: str) -> None:
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fsutil.write_private(directory / _cosigned_name(witness_name), note.encode("utf-8"))


def remove_cosigned(directory: Path, witness_name: str) -> None:
    """Forget a witness's cosignature kept by write_cosigned (it is trusted here no more)."""
    (Path(directory) / _cosigned_name(witness_name)).unlink(missing_ok=True)


# Where a host keeps its peers' cosignatures of its log and the peers' keys pinned (the fleet
# agent writes the first, `skyguard fleet trust` the second; `skyguard log verify --witnesses N`
# reads them). Only the keys an operator pinned count here (skyguard/fleet/peers.py: those
# pinned at first sight, an opt-in of the agent, do not).
COSIGNED_DIR = "fleet/cosigned"
PEERS_FILE = "fleet/peers.json"
PINNED_BY_OPERATOR = "operator"   # a pin's "pinned" field


def witness_material(state_dir: Path, witness_keys: Sequence[str] = ()) -> tuple[list[str], list[CosignerVerifier]]:
    """(cosigned notes kept in the state dir, witness keys to trust): the keys given (vkeys or
    files of them), else the peers' witness keys an operator pinned in the state dir."""
    verifiers = []
    for value in witness_keys:
        path = Path(value)
        for line in (path.read_text().split() if path.is_file() else [value]):
            verifiers.append(CosignerVerifier.from_vkey(line))
    if not witness_keys:
        peers_path = Path(state_dir) / PEERS_FILE
        peers = json.loads(peers_path.read_text()) if peers_path.exists() else {}
        for record in peers.values():
            if not isinstance(record, dict) or record.get("pinned") != PINNED_BY_OPERATOR:
                continue
            try:
                verifiers.append(CosignerVerifier.from_vkey(record["witness_vkey"]))
            except (BadLogInput, KeyError, TypeError):
                continue
    return read_cosigned_dir(Path(state_dir) / COSIGNED_DIR), verifiers
