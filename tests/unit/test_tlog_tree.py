"""The fast tree and proofs against a naive RFC 6962 reference written here from the RFC text.

The reference (MTH, PATH, SUBPROOF of RFC 6962 section 2.1) recurses over lists of entries and
shares no code with skyguard.tlog.tree except the two hash functions, which are checked against
their definitions first.
"""

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skyguard.tlog.errors import BadLogInput, VerificationError
from skyguard.tlog.hashing import EMPTY_ROOT, hash_children, hash_leaf, hash_leaves, hash_pairs
from skyguard.tlog.tree import (
    NODE_SPAN,
    CompactRange,
    MemorySource,
    consistency_proof,
    fold_perfect,
    inclusion_proof,
    range_root,
    root_from_inclusion_proof,
    verify_consistency,
    verify_inclusion,
)


# --- the naive reference, straight from RFC 6962 2.1 -------------------------------------------
def ref_k(n):
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def MTH(D):
    if len(D) == 0:
        return hashlib.sha256(b"").digest()
    if len(D) == 1:
        return hashlib.sha256(b"\x00" + D[0]).digest()
    k = ref_k(len(D))
    return hashlib.sha256(b"\x01" + MTH(D[:k]) + MTH(D[k:])).digest()


def PATH(m, D):
    n = len(D)
    if n == 1:
        return []
    k = ref_k(n)
    if m < k:
        return PATH(m, D[:k]) + [MTH(D[k:])]
    return PATH(m - k, D[k:]) + [MTH(D[:k])]


def SUBPROOF(m, D, b):
    n = len(D)
    if m == n:
        return [] if b else [MTH(D)]
    k = ref_k(n)
    if m <= k:
        return SUBPROOF(m, D[:k], b) + [MTH(D[k:])]
    return SUBPROOF(m - k, D[k:], False) + [MTH(D[:k])]


def PROOF(m, D):
    return SUBPROOF(m, D, True)


# --- sources -----------------------------------------------------------------------------------
ENTRIES = [f"entry {i}".encode() for i in range(2100)]
LEAVES = [hash_leaf(e) for e in ENTRIES]


class NodesSource(MemorySource):
    """Like the store: serves stored 256-leaf subtree roots where they are complete."""

    def level_nodes(self, start, end):
        if end * NODE_SPAN > len(self.leaves):
            return None
        return [fold_perfect(self.leaves[i * NODE_SPAN:(i + 1) * NODE_SPAN])
                for i in range(start, end)]


def sources(size):
    return [MemorySource(LEAVES[:size]), NodesSource(LEAVES[:size])]


def test_hashes_match_their_definitions():
    assert hash_leaf(b"abc") == hashlib.sha256(b"\x00abc").digest()
    assert hash_children(b"L" * 32, b"R" * 32) == hashlib.sha256(b"\x01" + b"L" * 32 + b"R" * 32).digest()
    assert EMPTY_ROOT == MTH([])
    assert hash_leaves([b"abc", b"", b"d" * 5000]) == [hash_leaf(b"abc"), hash_leaf(b""), hash_leaf(b"d" * 5000)]
    four = [bytes([i]) * 32 for i in range(4)]
    assert hash_pairs(four) == [hash_children(four[0], four[1]), hash_children(four[2], four[3])]


def test_compact_range_root_matches_mth_for_every_size_up_to_300():
    tree = CompactRange()
    assert tree.root() == MTH([])
    for size in range(1, 301):
        tree.append(LEAVES[size - 1])
        assert tree.root() == MTH(ENTRIES[:size]), size
        assert CompactRange.for_size(MemorySource(LEAVES[:size]), size).hashes == tree.hashes


def test_compact_range_from_stored_nodes_and_subtree_appends():
    for size in (256, 257, 511, 512, 1000, 2048, 2100):
        expected = MTH(ENTRIES[:size])
        assert CompactRange.for_size(NodesSource(LEAVES[:size]), size).root() == expected
        tree = CompactRange()
        i = 0
        while i < size:
            if i % NODE_SPAN == 0 and i + NODE_SPAN <= size:
                tree.append_subtree(8, fold_perfect(LEAVES[i:i + NODE_SPAN]))
                i += NODE_SPAN
            else:
                tree.append(LEAVES[i])
                i += 1
        assert tree.root() == expected


def test_extending_a_compact_range_returns_the_aligned_subtree_roots_it_completes():
    # The writer stores these as nodes: they must be fold_perfect's roots, and the range the same
    # as leaf-by-leaf appends, from any starting size and in batches of any length.
    leaves = [hash_leaf(str(i).encode()) for i in range(3 * NODE_SPAN + 7)]
    for start in (0, 1, NODE_SPAN - 1, NODE_SPAN, 300):
        for batch in (1, 7, NODE_SPAN, 500):
            tree = CompactRange.for_size(MemorySource(leaves), start)
            completed = []
            for i in range(start, len(leaves), batch):
                completed += tree.extend(leaves[i:i + batch])
            first = start // NODE_SPAN  # the first block with a leaf at or after start
            assert completed == [fold_perfect(leaves[n * NODE_SPAN:(n + 1) * NODE_SPAN])
                                 for n in range(first, len(leaves) // NODE_SPAN)], (start, batch)
            assert tree.hashes == CompactRange.for_size(MemorySource(leaves), len(leaves)).hashes
            assert tree.size == len(leaves)


def _indexes(size):
    k = ref_k(size) if size > 1 else 0
    picks = {0, size - 1, size // 2, k, k - 1, max(0, size - 2)}
    picks.update(random.Random(size).sample(range(size), min(size, 4)))
    return sorted(i for i in picks if 0 <= i < size)


def test_inclusion_proofs_match_path_for_every_size_up_to_300():
    for size in range(1, 301):
        root = MTH(ENTRIES[:size])
        for index in _indexes(size):
            expected = PATH(index, ENTRIES[:size])
            proof = inclusion_proof(MemorySource(LEAVES[:size]), index, size)
            assert proof == expected, (index, size)
            assert root_from_inclusion_proof(index, size, LEAVES[index], proof) == root
            verify_inclusion(index, size, LEAVES[index], proof, root)


def test_consistency_proofs_match_proof_for_every_pair_up_to_64():
    for new in range(1, 65):
        new_root = MTH(ENTRIES[:new])
        for old in range(1, new + 1):
            expected = PROOF(old, ENTRIES[:new]) if old < new else []
            proof = consistency_proof(MemorySource(LEAVES[:new]), old, new)
            assert proof == expected, (old, new)
            verify_consistency(old, new, MTH(ENTRIES[:old]), new_root, proof)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=257, max_value=2100), st.data())
def test_larger_random_trees_with_stored_nodes(size, data):
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    old = data.draw(st.integers(min_value=1, max_value=size))
    root = MTH(ENTRIES[:size])
    for source in sources(size):
        assert range_root(source, 0, size) == root
        proof = inclusion_proof(source, index, size)
        assert proof == PATH(index, ENTRIES[:size])
        verify_inclusion(index, size, LEAVES[index], proof, root)
        cproof = consistency_proof(source, old, size)
        assert cproof == (PROOF(old, ENTRIES[:size]) if old < size else [])
        verify_consistency(old, size, MTH(ENTRIES[:old]), root, cproof)


def _flip(h, bit=0):
    return bytes([h[0] ^ (1 << bit)]) + h[1:]


def inclusion_mutations(index, size, proof, root):
    """(description, index, size, leaf, proof, root) variants that must all be rejected."""
    leaf = LEAVES[index]
    yield "wrong leaf", index, size, LEAVES[(index + 1) % len(LEAVES)], proof, root
    yield "wrong root", index, size, leaf, proof, _flip(root)
    # A size mutation is checked against the true root of the mutated size: RFC 9162
    # verification does not bind the size to a root by itself (the root does, via the checkpoint).
    yield "size + 1", index, size + 1, leaf, proof, MTH(ENTRIES[:size + 1])
    if size > 1 and index < size - 1:
        yield "size - 1", index, size - 1, leaf, proof, MTH(ENTRIES[:size - 1])
        yield "other index", (index + 1) % size, size, leaf, proof, root
    yield "extra hash", index, size, leaf, proof + [LEAVES[0]], root
    yield "extra hash first", index, size, leaf, [LEAVES[0]] + proof, root
    if proof:
        yield "missing hash", index, size, leaf, proof[:-1], root
        yield "missing first hash", index, size, leaf, proof[1:], root
        for i in range(len(proof)):
            yield f"bit flip in hash {i}", index, size, leaf, proof[:i] + [_flip(proof[i], 7)] + proof[i + 1:], root
        yield "short hash", index, size, leaf, [proof[0][:31]] + proof[1:], root


def test_mutated_inclusion_proofs_are_rejected():
    for size in (1, 2, 3, 7, 8, 9, 100, 256, 257):
        root = MTH(ENTRIES[:size])
        for index in _indexes(size):
            proof = inclusion_proof(MemorySource(LEAVES[:size]), index, size)
            for what, i, s, leaf, p, r in inclusion_mutations(index, size, proof, root):
                with pytest.raises(VerificationError):
                    verify_inclusion(i, s, leaf, p, r)
                    pytest.fail(f"{what} accepted for index {index} size {size}")


def test_mutated_consistency_proofs_are_rejected():
    for old, new in [(1, 2), (3, 7), (4, 8), (6, 8), (7, 100), (256, 300), (100, 257)]:
        old_root, new_root = MTH(ENTRIES[:old]), MTH(ENTRIES[:new])
        proof = consistency_proof(MemorySource(LEAVES[:new]), old, new)
        variants = [
            ("wrong old root", old, new, _flip(old_root), new_root, proof),
            ("wrong new root", old, new, old_root, _flip(new_root), proof),
            ("new size + 1", old, new + 1, old_root, MTH(ENTRIES[:new + 1]), proof),
            ("old size + 1", old + 1, new, MTH(ENTRIES[:old + 1]), new_root, proof),
            ("extra hash", old, new, old_root, new_root, proof + [LEAVES[5]]),
            ("missing hash", old, new, old_root, new_root, proof[:-1]),
            ("empty", old, new, old_root, new_root, []),
        ]
        variants += [(f"flip {i}", old, new, old_root, new_root,
                      proof[:i] + [_flip(proof[i], 3)] + proof[i + 1:]) for i in range(len(proof))]
        for what, o, n, orr, nr, p in variants:
            with pytest.raises(VerificationError):
                verify_consistency(o, n, orr, nr, p)
                pytest.fail(f"{what} accepted for {old}->{new}")


def test_equal_sizes_with_different_roots_is_a_fork():
    with pytest.raises(VerificationError, match="fork"):
        verify_consistency(5, 5, MTH(ENTRIES[:5]), MTH(ENTRIES[1:6]), [])


def test_consistency_from_the_empty_tree_is_refused_as_the_reference_does():
    # transparency-dev/merkle: "consistency proof from empty tree is meaningless", both ways.
    with pytest.raises(BadLogInput, match="empty tree"):
        consistency_proof(MemorySource(LEAVES[:5]), 0, 5)
    with pytest.raises(BadLogInput, match="empty tree"):
        consistency_proof(MemorySource([]), 0, 0)
    for proof in ([], [LEAVES[0]]):
        with pytest.raises(VerificationError, match="empty tree"):
            verify_consistency(0, 5, EMPTY_ROOT, MTH(ENTRIES[:5]), proof)
    with pytest.raises(VerificationError, match="empty tree"):
        verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])


def test_proofs_outside_the_tree_are_clear_errors():
    with pytest.raises(BadLogInput, match="outside a tree of size 5"):
        inclusion_proof(MemorySource(LEAVES[:5]), 5, 5)
    with pytest.raises(BadLogInput):
        inclusion_proof(MemorySource(LEAVES[:5]), -1, 5)
    with pytest.raises(BadLogInput):
        consistency_proof(MemorySource(LEAVES[:5]), 6, 5)
    with pytest.raises(VerificationError):
        root_from_inclusion_proof(9, 5, LEAVES[0], [])
