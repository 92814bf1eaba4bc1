"""RFC 6962 hashing for the signed log: leaf and interior-node hashes, and nothing else.

Domain separation (0x00 for leaves, 0x01 for nodes) keeps a leaf from ever being passed off as an
interior node. This module knows nothing about files, trees or checkpoints.
"""

from __future__ import annotations

import hashlib

HASH_SIZE = 32
_sha256 = hashlib.sha256

# MTH({}) in RFC 6962: the root of the empty tree is the hash of the empty string.
EMPTY_ROOT = _sha256(b"").digest()


def hash_leaf(entry: bytes) -> bytes:
    """SHA-256(0x00 || entry)."""
    return _sha256(b"\x00" + entry).digest()


def hash_children(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return _sha256(b"\x01" + left + right).digest()


def hash_pairs(hashes: list[bytes]) -> list[bytes]:
    """[hash_children(hashes[0], hashes[1]), hash_children(hashes[2], hashes[3]), ...] (an even
    count), without a call per pair: a level of a tree built bottom up."""
    sha = _sha256
    pairs = iter(hashes)
    return [sha(b"\x01" + left + right).digest() for left, right in zip(pairs, pairs)]


def hash_leaves(entries) -> list[bytes]:
    """[hash_leaf(e) for e in entries], without a call per entry (the writer's hot path)."""
    sha = _sha256
    return [sha(b"\x00" + e).digest() for e in entries]
