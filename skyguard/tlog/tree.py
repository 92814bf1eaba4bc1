"""The Merkle tree of the signed log: compact state for appends, proofs, and proof verification.

Vocabulary of transparency-dev/merkle. `CompactRange` holds only the roots of the perfect
subtrees covering [0, size), so an append and a root cost O(log n) and no leaf is kept in memory.
Proofs are built over a `NodeSource` (the stored leaf hashes, plus stored roots of aligned
256-leaf subtrees so a proof over millions of leaves hashes thousands of nodes, not millions).
Verification follows RFC 9162 section 2.1.3 / 2.1.4 and needs only hashes.

Not here: reading or writing files (store.py), signatures (checkpoint.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from skyguard.tlog.errors import BadLogInput, VerificationError
from skyguard.tlog.hashing import EMPTY_ROOT, HASH_SIZE, hash_children, hash_pairs

# Stored interior nodes are the roots of aligned subtrees of 2**NODE_LEVEL leaves. 256 leaves
# means 32 bytes of node per 8 KiB of leaf hashes: negligible space, 256x fewer hashes per proof.
NODE_LEVEL = 8
NODE_SPAN = 1 << NODE_LEVEL


def split_point(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2): RFC 6962's k."""
    return 1 << ((n - 1).bit_length() - 1)


class NodeSource(Protocol):
    """Read access to a tree's stored hashes. Ranges are half-open, in units of their level."""

    def leaf_hashes(self, start: int, end: int) -> Sequence[bytes]: ...

    def level_nodes(self, start: int, end: int) -> Sequence[bytes] | None:
        """Roots of the aligned NODE_SPAN-leaf subtrees start..end, or None if not stored."""
        ...


class MemorySource:
    """A NodeSource over leaf hashes held in a list (tests, small trees, the tail of a log)."""

    def __init__(self, leaves: Sequence[bytes] = ()):
        self.leaves = list(leaves)

    def leaf_hashes(self, start, end):
        return self.leaves[start:end]

    def level_nodes(self, start, end):
        return None


def fold_perfect(hashes: Sequence[bytes]) -> bytes:
    """Root of a perfect subtree given its 2**k bottom hashes, left to right."""
    level = list(hashes)
    while len(level) > 1:
        level = hash_pairs(level)
    return level[0]


def perfect_root(source: NodeSource, level: int, index: int) -> bytes:
    """Root of the aligned perfect subtree of 2**level leaves starting at leaf index << level."""
    if level >= NODE_LEVEL:
        first = index << (level - NODE_LEVEL)
        nodes = source.level_nodes(first, first + (1 << (level - NODE_LEVEL)))
        if nodes is not None:
            return fold_perfect(nodes)
    start = index << level
    return fold_perfect(source.leaf_hashes(start, start + (1 << level)))


def range_root(source: NodeSource, start: int, end: int) -> bytes:
    """MTH(D[start:end]) for a range that RFC 6962's recursion produces (aligned left parts)."""
    n = end - start
    if n == 0:
        return EMPTY_ROOT
    if n & (n - 1) == 0 and start % n == 0:
        return perfect_root(source, n.bit_length() - 1, start // n)
    k = split_point(n)
    return hash_children(range_root(source, start, start + k), range_root(source, start + k, end))


class CompactRange:
    """The roots of the perfect subtrees that cover leaves [0, size), largest first."""

    __slots__ = ("size", "hashes")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()):
        if len(hashes) != bin(size).count("1"):
            raise ValueError("a compact range of size n has one hash per set bit of n")
        self.size = size
        self.hashes = list(hashes)

    @classmethod
    def for_size(cls, source: NodeSource, size: int) -> CompactRange:
        hashes, start = [], 0
        for level in range(size.bit_length() - 1, -1, -1):
            if size >> level & 1:
                hashes.append(perfect_root(source, level, start >> level))
                start += 1 << level
        return cls(size, hashes)

    def append(self, leaf_hash: bytes) -> None:
        hashes = self.hashes
        hashes.append(leaf_hash)
        size = self.size
        # Each trailing 1 bit of the old size is a perfect subtree the new leaf completes.
        while size & 1:
            right = hashes.pop()
            hashes[-1] = hash_children(hashes[-1], right)
            size >>= 1
        self.size += 1

    def append_subtree(self, level: int, subtree_root: bytes) -> None:
        """Append a whole perfect subtree of 2**level leaves; size must be aligned to it."""
        if self.size % (1 << level):
            raise ValueError("a subtree can only be appended at a size aligned to it")
        hashes = self.hashes
        hashes.append(subtree_root)
        size = self.size >> level
        while size & 1:
            right = hashes.pop()
            hashes[-1] = hash_children(hashes[-1], right)
            size >>= 1
        self.size += 1 << level

    def extend(self, leaf_hashes: Sequence[bytes], level: int = NODE_LEVEL) -> list[bytes]:
        """Append leaves; returns the roots of the aligned perfect subtrees of 2**level leaves
        they complete, left to right. The merges are the same hashes as fold_perfect over those
        leaves: the writer stores them as nodes instead of hashing every leaf twice.

        Level by level, as the tree is built: at level k the new nodes start at position
        size >> k; if that is odd, the range's smallest root (the one of level k) is their left
        sibling and joins them; pairs make level k + 1, and an odd one out is a root of the new
        range. Each interior hash is computed once, a level at a time."""
        hashes = self.hashes
        nodes = list(leaf_hashes)
        position = self.size
        self.size += len(nodes)
        odd_ones: list[bytes] = []  # the new range's roots below the levels still merging, lowest first
        completed: list[bytes] = []
        k = 0
        while nodes:
            if k == level:
                completed = list(nodes)  # every node made at this level roots a whole new subtree
            if position & 1:
                nodes.insert(0, hashes.pop())
                position -= 1
            if len(nodes) & 1:
                odd_ones.append(nodes.pop())
            nodes = hash_pairs(nodes)
            position >>= 1
            k += 1
        hashes.extend(reversed(odd_ones))
        return completed

    def root(self) -> bytes:
        if not self.hashes:
            return EMPTY_ROOT
        it = reversed(self.hashes)
        root = next(it)
        for h in it:
            root = hash_children(h, root)
        return root

    def copy(self) -> CompactRange:
        return CompactRange(self.size, self.hashes)


def inclusion_proof(source: NodeSource, index: int, size: int) -> list[bytes]:
    """RFC 6962 PATH(index, D[0:size]), leaf side first."""
    if not 0 <= index < size:
        raise BadLogInput(f"index {index} is outside a tree of size {size}; "
                          f"choose an index from 0 to {size - 1}")
    path = []
    start, end = 0, size
    while end - start > 1:
        k = split_point(end - start)
        if index < start + k:
            path.append(range_root(source, start + k, end))
            end = start + k
        else:
            path.append(range_root(source, start, start + k))
            start += k
    path.reverse()
    return path


def consistency_proof(source: NodeSource, old_size: int, new_size: int) -> list[bytes]:
    """RFC 6962 PROOF(old_size, D[0:new_size]); empty when old_size equals new_size.

    From size 0 there is no proof (RFC 9162 2.1.4; transparency-dev/merkle refuses it too):
    every tree extends the empty one, so such a "proof" would claim nothing."""
    if not 0 < old_size <= new_size:
        raise BadLogInput(f"consistency needs 0 < old ({old_size}) <= new ({new_size}); a proof "
                          f"from the empty tree is meaningless")
    if old_size == new_size:
        return []
    proof = []
    start, end, m, complete = 0, new_size, old_size, True
    while True:
        if m == end - start:
            if not complete:
                proof.append(range_root(source, start, end))
            break
        k = split_point(end - start)
        if m <= k:
            proof.append(range_root(source, start + k, end))
            end = start + k
        else:
            proof.append(range_root(source, start, start + k))
            start += k
            m -= k
            complete = False
    proof.reverse()
    return proof


def _check_hashes(proof: Sequence[bytes]) -> None:
    for h in proof:
        if not isinstance(h, (bytes, bytearray)) or len(h) != HASH_SIZE:
            raise VerificationError("proof contains a hash that is not 32 bytes")


def root_from_inclusion_proof(index: int, size: int, leaf_hash: bytes,
                              proof: Sequence[bytes]) -> bytes:
    """The root that proof, index and leaf hash imply (RFC 9162 2.1.3.2); raises if malformed."""
    if not 0 <= index < size:
        raise VerificationError(f"index {index} is outside a tree of size {size}")
    _check_hashes(proof)
    fn, sn, r = index, size - 1, leaf_hash
    for p in proof:
        if sn == 0:
            raise VerificationError("inclusion proof has more hashes than the tree has levels")
        if fn & 1 or fn == sn:
            r = hash_children(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = hash_children(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise VerificationError("inclusion proof has fewer hashes than the tree has levels")
    return r


def verify_inclusion(index: int, size: int, leaf_hash: bytes, proof: Sequence[bytes],
                     root: bytes) -> None:
    """Raises VerificationError unless leaf_hash is at index in the tree of that size and root."""
    if root_from_inclusion_proof(index, size, leaf_hash, proof) != root:
        raise VerificationError(f"inclusion proof of index {index} does not lead to the root "
                                f"of the tree of size {size}")


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> None:
    """Raises VerificationError unless the tree (old_size, old_root) is a prefix of the new one."""
    if not 0 <= old_size <= new_size:
        raise VerificationError(f"old size {old_size} is larger than new size {new_size}")
    if old_size == 0:
        raise VerificationError("a consistency proof from the empty tree is meaningless "
                                "(refused, as the reference does)")
    _check_hashes(proof)
    if old_size == new_size:
        if proof:
            raise VerificationError("proof between equal sizes must be empty")
        if old_root != new_root:
            raise VerificationError(f"two different roots for the same size {old_size}: a fork")
        return
    if not proof:
        raise VerificationError("consistency proof is empty")
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise VerificationError("consistency proof has too many hashes")
        if fn & 1 or fn == sn:
            fr = hash_children(c, fr)
            sr = hash_children(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = hash_children(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise VerificationError("consistency proof has too few hashes")
    if fr != old_root:
        raise VerificationError(f"consistency proof does not lead to the old root (size {old_size})")
    if sr != new_root:
        raise VerificationError(f"consistency proof does not lead to the new root (size {new_size})")
