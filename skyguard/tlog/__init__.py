"""The append-only signed log: RFC 6962 Merkle tree, C2SP checkpoints, durable store, verify.

    from skyguard.tlog import LogWriter, entry, host_signer
    signer = host_signer(config.STATE_DIR)             # Ed25519 host key, created on first use
    with LogWriter(config.STATE_DIR / "log", signer) as w:
        index = w.append(entry("policy_load", name="keysystems", hash="sha256:..."))
        first = w.append_batch([entry("flow_start", ...), ...])   # one fsync for the batch
    report = verify_log(config.STATE_DIR / "log", signer.verifier)

An append returns once its entries are durable and under a signed checkpoint (store.py says
why that lets `log verify` tell a crash from a rewrite), or raises when the log refuses them (no
space, a stalled disk: intake.py). Not here: what the other parts decide to
log (they call entry() and append()).
"""

from skyguard.tlog.checkpoint import Checkpoint, Signer, Verifier, parse_and_verify
from skyguard.tlog.entries import entry
from skyguard.tlog.hashing import hash_children, hash_leaf
from skyguard.tlog.hostkey import host_signer, load_or_create_host_key
from skyguard.tlog.store import LogReader, LogWriter
from skyguard.tlog.tree import consistency_proof, inclusion_proof, root_from_inclusion_proof, verify_consistency, verify_inclusion

__all__ = [
    "Checkpoint", "Signer", "Verifier", "parse_and_verify", "entry", "hash_children", "hash_leaf",
    "host_signer", "load_or_create_host_key", "LogReader", "LogWriter", "consistency_proof",
    "inclusion_proof", "root_from_inclusion_proof", "verify_consistency", "verify_inclusion",
]
