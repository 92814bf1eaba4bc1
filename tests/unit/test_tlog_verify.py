"""Tampering with a log on disk is detected by `verify_log`, which names the first bad index.

Each kind from the threat model: a one-byte edit (naive, with the checksum recomputed, and with
every derived cache recomputed too), truncation, reordering, a removed segment, forks, and
checkpoints signed by another key. The log is a real store written by LogWriter.
"""

import shutil

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from skyguard.tlog import records
from skyguard.tlog.checkpoint import Checkpoint, Signer
from skyguard.tlog.entries import entry
from skyguard.tlog.errors import VerificationError
from skyguard.tlog.hashing import hash_leaf
from skyguard.tlog.head import HEAD_FILE
from skyguard.tlog.store import CHECKPOINTS_FILE, LEAVES_FILE, NODES_FILE, LogReader, LogWriter, segment_name
from skyguard.tlog.tree import NODE_SPAN, fold_perfect
from skyguard.tlog.verify import verify_log

SEGMENT = 256
SIZE = 600
EVERY = 10


def entries(start, end, tag="a"):
    return [entry("flow_start", time=1_000_000 + i, n=i, tag=tag) for i in range(start, end)]


@pytest.fixture(scope="module")
def signer():
    return Signer("test.example/log", Ed25519PrivateKey.generate())


def build(path, signer, batches):
    with LogWriter(path, signer, checkpoint_every=EVERY, segment_entries=SEGMENT) as writer:
        for batch in batches:
            writer.append_batch(batch)
    return LogReader(path).checkpoint_notes()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, signer):
    path = tmp_path_factory.mktemp("pristine") / "log"
    notes = build(path, signer, [entries(i, i + EVERY) for i in range(0, SIZE, EVERY)])
    return path, notes


@pytest.fixture
def log(tmp_path, pristine):
    path, notes = pristine
    copy = tmp_path / "log"
    shutil.copytree(path, copy)
    return copy, notes


def seg_path(path, index):
    return path / segment_name(index - index % SEGMENT)


def read_payloads(path, first):
    return records.scan(seg_path(path, first).read_bytes(), first, SEGMENT).payloads


def write_payloads(path, first, payloads):
    seg_path(path, first).write_bytes(b"".join(records.frame(first + i, p)
                                               for i, p in enumerate(payloads)))


def rebuild_caches(path):
    """What a careful attacker does after rewriting entries: recompute the derived files."""
    # Straight from the segments: the attacker need not use (or satisfy) skyguard's reader,
    # which refuses a log shorter than its head checkpoint.
    leaves = [hash_leaf(p) for seg in sorted(path.glob("seg-*.log"))
              for p in records.scan(seg.read_bytes(), int(seg.name[4:24]), SEGMENT).payloads]
    (path / LEAVES_FILE).write_bytes(b"".join(leaves))
    (path / NODES_FILE).write_bytes(b"".join(fold_perfect(leaves[i:i + NODE_SPAN])
                                             for i in range(0, len(leaves) - NODE_SPAN + 1, NODE_SPAN)))


def test_pristine_log_verifies(log, signer):
    path, notes = log
    report = verify_log(path, signer.verifier, notes)
    assert report.ok, report.problem
    assert report.size == SIZE
    assert report.checkpoints_checked == len(notes) == SIZE // EVERY
    assert report.external_checked == len(notes)


def test_one_byte_edit_is_found_at_its_index(log, signer):
    path, _ = log
    index = 300
    buf = bytearray(seg_path(path, index).read_bytes())
    needle = b'"n":300,'
    buf[buf.index(needle) + 5] ^= 0x01   # 300 -> 310 ("0" ^ 1 = "1")
    seg_path(path, index).write_bytes(bytes(buf))
    report = verify_log(path, signer.verifier)
    assert not report.ok
    assert report.first_bad_index == index
    assert "checksum" in report.problem


def test_edit_with_recomputed_checksum_is_found_by_the_leaf_cache(log, signer):
    path, _ = log
    index = 301
    first = index - index % SEGMENT
    payloads = read_payloads(path, first)
    payloads[index - first] = payloads[index - first].replace(b'"n":301', b'"n":999')
    write_payloads(path, first, payloads)
    report = verify_log(path, signer.verifier)
    assert (report.ok, report.first_bad_index) == (False, index)


@pytest.mark.parametrize("index", [0, 7, 255, 256, 301, 599])
def test_careful_rewrite_is_bounded_by_the_signed_checkpoints(log, signer, index):
    path, notes = log
    first = index - index % SEGMENT
    payloads = read_payloads(path, first)
    payloads[index - first] = entry("flow_start", time=1, n=index, tag="forged")
    write_payloads(path, first, payloads)
    rebuild_caches(path)
    report = verify_log(path, signer.verifier)
    assert not report.ok
    start, end = report.bad_range
    assert report.first_bad_index == start == index - index % EVERY
    assert start <= index < end <= start + EVERY


def test_truncation_is_found_by_the_stored_checkpoints(log, signer):
    path, _ = log
    payloads = read_payloads(path, 512)
    write_payloads(path, 512, payloads[:40])   # keep 552 entries
    report = verify_log(path, signer.verifier)
    assert (report.ok, report.first_bad_index) == (False, 552)
    assert "truncation" in report.problem


def test_truncation_to_an_earlier_signed_state_needs_the_saved_checkpoint(log, signer):
    # A rollback: truncate the entries and the checkpoints consistently, drop the head. What
    # is left is a log someone signed once; only a witness's saved checkpoint shows the cut.
    path, notes = log
    write_payloads(path, 512, read_payloads(path, 512)[:40])
    rebuild_caches(path)
    (path / CHECKPOINTS_FILE).write_bytes(b"".join(records.frame(i, n.encode())
                                                   for i, n in enumerate(notes[:55])))
    (path / HEAD_FILE).unlink()
    assert verify_log(path, signer.verifier).ok          # nothing left on the host says otherwise
    report = verify_log(path, signer.verifier, [notes[-1]])
    assert (report.ok, report.first_bad_index) == (False, 552)


def test_truncation_with_every_checkpoint_removed_fails_without_a_witness(log, signer):
    path, _ = log
    write_payloads(path, 512, read_payloads(path, 512)[:40])
    rebuild_caches(path)
    (path / CHECKPOINTS_FILE).unlink()
    (path / HEAD_FILE).unlink()
    report = verify_log(path, signer.verifier)
    assert (report.ok, report.first_bad_index) == (False, 0)
    assert "no signed checkpoint" in report.problem


def test_swapped_records_are_found_at_the_first_one(log, signer):
    path, _ = log
    buf = seg_path(path, 256).read_bytes()
    scan = records.scan(buf, 256, SEGMENT)
    i, j = 300, 310
    frames = []
    off = 0
    for p in scan.payloads:
        length = records.HEADER_SIZE + len(p)
        frames.append(buf[off:off + length])
        off += length
    frames[i - 256], frames[j - 256] = frames[j - 256], frames[i - 256]
    seg_path(path, 256).write_bytes(b"".join(frames))
    report = verify_log(path, signer.verifier)
    assert (report.ok, report.first_bad_index) == (False, i)
    assert "reordered" in report.problem


def test_reordering_with_rewritten_framing_is_bounded_by_checkpoints(log, signer):
    path, _ = log
    payloads = read_payloads(path, 256)
    payloads[300 - 256], payloads[310 - 256] = payloads[310 - 256], payloads[300 - 256]
    write_payloads(path, 256, payloads)
    rebuild_caches(path)
    report = verify_log(path, signer.verifier)
    assert (report.ok, report.first_bad_index, report.bad_range) == (False, 300, (300, 310))


def test_removed_segment_is_found_at_its_first_index(log, signer):
    path, _ = log
    seg_path(path, 256).unlink()
    report = verify_log(path, signer.verifier)
    assert (report.ok, report.first_bad_index) == (False, 256)


def test_fork_with_same_prefix_and_same_key_is_found_with_a_witness_copy(tmp_path, log, signer):
    path, witness_notes = log
    fork = tmp_path / "fork"
    build(fork, signer, [entries(i, i + EVERY) for i in range(0, 50, EVERY)]
          + [entries(i, i + EVERY, tag="b") for i in range(50, SIZE, EVERY)])
    assert verify_log(fork, signer.verifier).ok          # a fork is self-consistent...
    report = verify_log(fork, signer.verifier, witness_notes)   # ...but not with what was seen
    assert not report.ok
    assert (report.first_bad_index, report.bad_range) == (50, (50, 60))
    assert "external checkpoint" in report.problem
    latest_only = verify_log(fork, signer.verifier, [witness_notes[-1]])
    assert not latest_only.ok and latest_only.first_bad_index <= 50


def test_stored_checkpoint_signed_by_another_key_fails(log, signer):
    path, _ = log
    intruder = Signer(signer.name, Ed25519PrivateKey.generate())
    forged = Checkpoint(signer.name, SIZE, bytes(32)).sign(intruder).encode()
    with open(path / CHECKPOINTS_FILE, "ab") as f:
        f.write(records.frame(SIZE // EVERY, forged))
    report = verify_log(path, signer.verifier)
    assert not report.ok
    assert "not signed by key" in report.problem


def test_external_checkpoint_from_another_key_or_origin_is_an_error(log, signer):
    path, _ = log
    intruder = Signer(signer.name, Ed25519PrivateKey.generate())
    with pytest.raises(VerificationError, match="not signed by key"):
        verify_log(path, signer.verifier, [Checkpoint(signer.name, 5, bytes(32)).sign(intruder)])
    with pytest.raises(VerificationError, match="other.example"):
        verify_log(path, signer.verifier, [Checkpoint("other.example/log", 5, bytes(32)).sign(signer)])


def test_torn_tail_beyond_every_checkpoint_is_a_note_not_a_failure(log, signer):
    path, _ = log
    with open(seg_path(path, 512), "ab") as f:
        f.write(records.frame(SIZE, b'{"type":"x"}')[:9])
    report = verify_log(path, signer.verifier)
    assert report.ok and report.size == SIZE
    assert any("torn tail" in n for n in report.notes)
