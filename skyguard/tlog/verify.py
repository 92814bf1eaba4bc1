"""Full verification of a log directory: every record, every leaf, every checkpoint.

Recomputes each leaf hash and the tree from the segments alone, compares the derived caches, and
checks every stored checkpoint (head.bin and checkpoints.log: signature, origin, root at its
size) and any checkpoints saved elsewhere (a witness's copy), which is what catches a rewrite by
someone without the key: edits, truncation, reordering, and forks. Reports the first bad index
and what is wrong; where only a signed root can tell (a careful rewrite), the index is the start
of the smallest range that the checkpoints prove bad.

Entries no signed checkpoint covers are never called verified. A non-empty log with no
checkpoint of its own fails, and so do more than MAX_UNPROVEN entries past the last checkpoint:
a crash cannot leave either (store.py's docstring). Up to MAX_UNPROVEN are what a crash leaves
before acknowledging them: reported, not counted as verified, set aside by the writer on open.
Read-only. Not here: repair (the writer cuts torn tails and sets unproven entries aside).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from skyguard.fsutil import open_regular, read_regular_file
from skyguard.tlog import records
from skyguard.tlog.checkpoint import Checkpoint, Verifier, split_note
from skyguard.tlog.errors import BadLogInput, VerificationError
from skyguard.tlog.files import os_reason
from skyguard.tlog.hashing import HASH_SIZE, hash_leaf
from skyguard.tlog.head import HEAD_FILE, read_head
from skyguard.tlog.reader import _SEGMENT_RE, CHECKPOINTS_FILE, LEAVES_FILE, MAX_UNPROVEN, NODES_FILE, _read_meta, segment_name
from skyguard.tlog.tree import NODE_LEVEL, NODE_SPAN, CompactRange, fold_perfect


@dataclass
class VerifyReport:
    ok: bool = True
    size: int = 0
    root: bytes = b""
    origin: str = ""
    covered: int = 0          # entries [0, covered) are proven by a signed checkpoint
    checkpoints_checked: int = 0
    head_checked: int = 0
    external_checked: int = 0
    first_bad_index: int | None = None
    bad_range: tuple[int, int] | None = None   # [start, end): where the bad entries must be
    problem: str | None = None
    problems: list[str] = field(default_factory=list)   # further failures (checkpoint-level)
    notes: list[str] = field(default_factory=list)      # not failures: torn tail, stale caches

    def fail(self, problem: str, index: int | None = None,
             bad_range: tuple[int, int] | None = None) -> None:
        if self.ok or (index is not None and (self.first_bad_index is None
                                              or index < self.first_bad_index)):
            if self.problem:
                self.problems.append(self.problem)
            self.ok, self.problem, self.first_bad_index = False, problem, index
            self.bad_range = bad_range or ((index, index + 1) if index is not None else None)
        else:
            self.problems.append(problem)

    def as_dict(self) -> dict:
        import base64
        return {"ok": self.ok, "size": self.size, "origin": self.origin,
                "root": base64.b64encode(self.root).decode(), "covered": self.covered,
                "unproven": self.size - self.covered,
                "checkpoints_checked": self.checkpoints_checked,
                "head_checkpoints_checked": self.head_checked,
                "external_checkpoints_checked": self.external_checked,
                "first_bad_index": self.first_bad_index,
                "bad_range": list(self.bad_range) if self.bad_range else None,
                "problem": self.problem, "other_problems": self.problems, "notes": self.notes}


@dataclass
class _Expected:
    size: int
    root: bytes
    label: str


def _parse_external(notes: Sequence[str], verifier: Verifier, origin: str) -> list[Checkpoint]:
    out = []
    for note in notes:
        text = verifier.verify(note)   # VerificationError: another key, or altered
        checkpoint = Checkpoint.parse_body(text)
        if checkpoint.origin != origin:
            raise VerificationError(f"the external checkpoint is for log {checkpoint.origin!r}, "
                                    f"not for this log ({origin!r})")
        out.append(checkpoint)
    return out


def verify_log(directory: Path | str, verifier: Verifier,
               checkpoints: Sequence[str] = (),
               progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Verify the log in directory; `checkpoints` are signed notes saved elsewhere."""
    directory = Path(directory)
    meta = _read_meta(directory)
    report = VerifyReport(origin=meta["origin"])
    seg = meta["segment_entries"]
    if verifier.vkey() != meta["verifier_key"]:
        report.notes.append(f"the log names key {meta['verifier_key']}; checking with "
                            f"{verifier.vkey()}")
    external = _parse_external(checkpoints, verifier, meta["origin"])

    # Stored checkpoints: each must be signed by the key, for this origin, sizes never shrinking.
    expected: list[_Expected] = []
    cp_path = directory / CHECKPOINTS_FILE
    try:
        cp_scan = records.scan(read_regular_file(cp_path) if cp_path.exists() else b"", 0)
    except OSError as e:
        raise VerificationError(f"{cp_path} cannot be read: {os_reason(e)}") from None
    if cp_scan.problem:
        report.notes.append(f"{CHECKPOINTS_FILE}: {cp_scan.problem}")
    last_size = 0
    for number, payload in enumerate(cp_scan.payloads):
        try:
            note = payload.decode("utf-8")
            checkpoint = Checkpoint.parse_body(verifier.verify(note))
        except (UnicodeDecodeError, BadLogInput, VerificationError) as e:
            report.fail(f"stored checkpoint #{number} does not verify: {e}")
            continue
        if checkpoint.origin != meta["origin"]:
            report.fail(f"stored checkpoint #{number} is for another log ({checkpoint.origin!r})")
            continue
        if checkpoint.size < last_size:
            report.fail(f"stored checkpoint #{number} (size {checkpoint.size}) is smaller than "
                        f"the one before it ({last_size}): checkpoints were reordered")
        last_size = max(last_size, checkpoint.size)
        expected.append(_Expected(checkpoint.size, checkpoint.hash, f"stored checkpoint #{number}"))
    try:
        head = read_head(directory)
    except OSError as e:
        raise VerificationError(f"{directory / HEAD_FILE} cannot be read: {os_reason(e)}") from None
    report.notes.extend(f"{problem} (a write torn by a crash, or damage; the other slot "
                        f"holds the head)" for problem in head.problems)
    for sequence, note in head.notes:
        try:
            checkpoint = Checkpoint.parse_body(verifier.verify(note))
        except (BadLogInput, VerificationError) as e:
            report.fail(f"head checkpoint #{sequence} does not verify: {e}")
            continue
        if checkpoint.origin != meta["origin"]:
            report.fail(f"head checkpoint #{sequence} is for another log ({checkpoint.origin!r})")
            continue
        expected.append(_Expected(checkpoint.size, checkpoint.hash, f"head checkpoint #{sequence}"))
    own_checkpoints = len(expected)
    for number, checkpoint in enumerate(external):
        expected.append(_Expected(checkpoint.size, checkpoint.hash,
                                  f"external checkpoint #{number}"))
    report.checkpoints_checked = 0
    covered = max((e.size for e in expected), default=0)
    expected.sort(key=lambda e: e.size)

    # Segments, in order; a missing one is a hole at its first index.
    firsts = sorted(int(m.group(1)) for p in directory.iterdir()
                    if (m := _SEGMENT_RE.match(p.name)))
    leaves_path = directory / LEAVES_FILE
    leaves_map = _map(leaves_path)
    leaves_len = len(leaves_map) // HASH_SIZE
    nodes_path = directory / NODES_FILE
    nodes_map = _map(nodes_path)
    nodes_len = len(nodes_map) // HASH_SIZE if nodes_map else 0
    total = len(firsts) * seg
    tree = CompactRange()
    verified_size = 0          # the largest size whose root matched a signed checkpoint
    next_expected = 0          # position in `expected`
    stop = False

    verified_external = 0      # the same, counting only checkpoints saved elsewhere

    def check_roots_at(size: int) -> bool:
        # A mismatch is bounded below by the last size a checkpoint vouched for. For a saved
        # (external) checkpoint only other saved ones count: in a fork, the log's own stored
        # checkpoints are part of the other history.
        nonlocal next_expected, verified_size, verified_external
        root = None
        external_here = False
        while next_expected < len(expected) and expected[next_expected].size == size:
            e = expected[next_expected]
            next_expected += 1
            root = root or tree.root()
            external = e.label.startswith("external")
            if root != e.root:
                low = verified_external if external else verified_size
                what = "the log's history differs from it (entries edited, reordered or a fork)"
                report.fail(f"root at size {size} does not match {e.label}: {what}; the bad "
                            f"entries are in [{low}, {size})", low, (low, size))
                return False
            if external:
                report.external_checked += 1
                external_here = True
            elif e.label.startswith("head"):
                report.head_checked += 1
            else:
                report.checkpoints_checked += 1
        if root is not None:
            verified_size = size   # only once every checkpoint of this size matched
            if external_here:
                verified_external = size
        return True

    if not check_roots_at(0):
        stop = True
    for position, first in enumerate(firsts):
        if stop:
            break
        if first != position * seg:
            report.fail(f"segment {segment_name(position * seg)} is missing (entries removed)",
                        position * seg)
            break
        name = segment_name(first)
        try:
            buf = read_regular_file(directory / name)
        except OSError as e:
            report.fail(f"segment {name} cannot be read: {os_reason(e)}", first)
            break
        scan = records.scan(buf, first, seg)
        if scan.problem:
            scan.problem = f"segment {name}: {scan.problem}"
        elif len(scan.payloads) < seg and position < len(firsts) - 1:
            # A segment holds exactly `seg` entries before the next one starts: one that ends
            # early inside the log lost its tail (no crash cuts a sealed segment).
            scan.problem, scan.problem_kind = (
                f"segment {name} ends after {len(scan.payloads)} of its {seg} entries, and the "
                f"next segment follows it (entries removed)", "order")
        hashes = [hash_leaf(p) for p in scan.payloads]
        end = first + len(hashes)
        # Caches: derived data, but a mismatch under a checkpoint means someone wrote there.
        cached_end = min(end, leaves_len)
        if first < cached_end and leaves_map[first * HASH_SIZE:cached_end * HASH_SIZE] != \
                b"".join(hashes[:cached_end - first]):
            bad = next(first + i for i in range(cached_end - first)
                       if leaves_map[(first + i) * HASH_SIZE:(first + i + 1) * HASH_SIZE]
                       != hashes[i])
            message = f"stored leaf hash of entry {bad} does not match the entry"
            # The last segment's cache is not fsynced before acknowledgement (it is rebuilt on
            # open), so after a crash it may lag: only sealed segments' caches must match.
            if bad < covered and position < len(firsts) - 1:
                report.fail(message + " (the entry or leaves.bin was edited)", bad)
                break
            report.notes.append(message + " (after the last checkpoint; rebuilt on next open)")
        # The tree: whole 256-leaf subtrees at once where no checkpoint falls inside them.
        i = 0
        while i < len(hashes):
            size = tree.size
            nxt = expected[next_expected].size if next_expected < len(expected) else None
            if (size % NODE_SPAN == 0 and i + NODE_SPAN <= len(hashes)
                    and (nxt is None or nxt >= size + NODE_SPAN or nxt <= size)):
                node = fold_perfect(hashes[i:i + NODE_SPAN])
                node_index = size // NODE_SPAN
                if node_index < nodes_len and nodes_map[node_index * HASH_SIZE:
                                                        (node_index + 1) * HASH_SIZE] != node:
                    message = f"stored subtree hash for entries [{size}, {size + NODE_SPAN})" \
                              f" does not match them"
                    if size < covered and position < len(firsts) - 1:
                        report.fail(message + " (nodes8.bin was edited)", size,
                                    (size, size + NODE_SPAN))
                        stop = True
                        break
                    report.notes.append(message)
                tree.append_subtree(NODE_LEVEL, node)
                i += NODE_SPAN
            else:
                tree.append(hashes[i])
                i += 1
            if not check_roots_at(tree.size):
                stop = True
                break
        if stop:
            break
        if scan.problem:
            bad = end
            is_last = position == len(firsts) - 1
            if is_last and scan.problem_kind == "torn" and bad >= covered:
                report.notes.append(f"torn tail at index {bad} ({scan.problem}), not covered by "
                                    f"any checkpoint: a crash left it; the writer cuts it on open")
            else:
                report.fail(scan.problem, bad)
            break
        if progress:
            progress(end, total)
    report.size = tree.size
    report.root = tree.root()
    if report.ok and next_expected < len(expected):
        missing = expected[next_expected]
        report.fail(f"the log has {tree.size} entries but {missing.label} covers {missing.size}: "
                    f"entries from {tree.size} on were removed (truncation)", tree.size,
                    (tree.size, missing.size))
    report.covered = min(covered, tree.size) if report.ok else 0
    _check_unproven(report, tree.size, covered, own_checkpoints)
    if progress:
        progress(report.size, report.size)
    return report


def _check_unproven(report: VerifyReport, size: int, covered: int, own: int) -> None:
    """Entries past every signed checkpoint: a crash's unacknowledged tail, or not a crash."""
    if not report.ok:
        return
    if own == 0 and size > 0:   # even if a witness's checkpoint covers the entries
        report.fail(f"the log has {size} entries and no signed checkpoint of its own: nothing "
                    f"it holds proves them (a log is signed at size 0 before its first entry, "
                    f"so its checkpoints were removed)", 0, (0, size))
        return
    if size <= covered:
        return
    unproven = size - covered
    if unproven > MAX_UNPROVEN:
        report.fail(f"entries [{covered}, {size}) are covered by no signed checkpoint: more "
                    f"than a crash leaves ({MAX_UNPROVEN}); they were added or rewritten without "
                    f"the key, or the checkpoints that covered them were removed",
                    covered, (covered, size))
    else:
        report.notes.append(f"entries [{covered}, {size}) are covered by no signed checkpoint "
                            f"yet: a group the writer is committing now, or one a crash "
                            f"interrupted before it was acknowledged; they are not verified, and "
                            f"after a crash the writer sets them aside when it next opens")


def _map(path: Path):
    if not path.exists():
        return b""
    try:
        with open_regular(path) as f:
            if os.fstat(f.fileno()).st_size == 0:
                return b""
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise VerificationError(f"{path} cannot be read: {os_reason(e)}") from None


def read_notes_file(path: Path | str) -> list[str]:
    """Signed notes from a file a witness saved (one note, or several concatenated)."""
    from skyguard.tlog.checkpoint import split_notes
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadLogInput(f"cannot read checkpoint file {path}: {e}") from None
    notes = split_notes(text)
    for note in notes:
        split_note(note)
    return notes
