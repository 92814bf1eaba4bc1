"""The durable store: indexes, group commit from many threads, checkpoints, reopening, segment
rotation, torn-tail repair, cache rebuild, and refusal to extend a damaged log."""

import gc
import logging
import threading
import traceback
import weakref

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from skyguard.errors import LogError
from skyguard.tlog import intake, records
from skyguard.tlog.checkpoint import Signer, parse_and_verify
from skyguard.tlog.entries import canonical, decode, entry
from skyguard.tlog.errors import BadLogInput, LogSpaceLow
from skyguard.tlog.hashing import hash_leaf
from skyguard.tlog.store import CHECKPOINTS_FILE, LEAVES_FILE, NODES_FILE, TORN_DIR, LogReader, LogWriter, segment_name
from skyguard.tlog.tree import CompactRange, MemorySource, inclusion_proof, range_root, verify_inclusion
from skyguard.tlog.verify import verify_log


@pytest.fixture(scope="module")
def signer():
    return Signer("store.example/log", Ed25519PrivateKey.generate())


def test_entries_are_canonical_json():
    e = entry("deny", time=5, zone="auth", b=[1, {"z": 1, "a": "é"}], ok=True)
    assert e == '{"b":[1,{"a":"é","z":1}],"ok":true,"time":5,"type":"deny","zone":"auth"}'.encode()
    assert decode(e)["type"] == "deny"
    assert isinstance(decode(entry("daemon_start"))["time"], int)


@pytest.mark.parametrize("bad", [{"x": 1.5}, {"x": [float("nan")]}, {"x": b"bytes"}, {"x": {1: 2}}])
def test_entries_reject_what_has_no_canonical_form(bad):
    with pytest.raises(BadLogInput):
        canonical(bad)


@pytest.mark.parametrize("name", ["", "Flow", "flow-start", "x" * 80, 3])
def test_entry_types_are_lower_snake_case(name):
    with pytest.raises(BadLogInput):
        entry(name)


def test_append_returns_consecutive_indexes_and_reopen_keeps_them(tmp_path, signer):
    with LogWriter(tmp_path / "log", signer, segment_entries=256) as w:
        assert w.append(entry("daemon_start", time=1)) == 0
        assert w.append_batch([entry("deny", time=2, n=i) for i in range(300)]) == 1
        assert w.append(entry("daemon_stop", time=3)) == 301
        root = w._tree.root()
    reader = LogReader(tmp_path / "log")
    assert reader.size == 302
    assert reader.segments == [0, 256]
    assert decode(reader.entry(301))["type"] == "daemon_stop"
    note = reader.latest_checkpoint_note()
    checkpoint = parse_and_verify(note, signer.verifier, "store.example/log")
    assert (checkpoint.size, checkpoint.hash) == (302, root)
    with LogWriter(tmp_path / "log", signer, segment_entries=256) as w:
        assert w.size == 302
        assert w.append(entry("daemon_start", time=4)) == 302
    assert verify_log(tmp_path / "log", signer.verifier).ok


def test_concurrent_appenders_get_unique_contiguous_indexes(tmp_path, signer):
    got = []
    lock = threading.Lock()
    with LogWriter(tmp_path / "log", signer) as w:
        def work(t):
            for i in range(50):
                index = w.append_batch([entry("dns", time=1, t=t, i=i, k=k) for k in range(3)])
                with lock:
                    got.extend(range(index, index + 3))
        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(got) == list(range(8 * 50 * 3))
    # Each batch's entries are contiguous and in submission order.
    for index, payload in LogReader(tmp_path / "log").entries():
        record = decode(payload)
        assert index % 3 == record["k"]


def test_checkpoints_every_n_entries_and_each_matches_the_tree(tmp_path, signer):
    with LogWriter(tmp_path / "log", signer, checkpoint_every=100) as w:
        for i in range(10):
            w.append_batch([entry("deny", time=1, n=i, k=k) for k in range(50)])
    reader = LogReader(tmp_path / "log")
    sizes = [parse_and_verify(n, signer.verifier).size for n in reader.checkpoint_notes()]
    assert sizes == [100, 200, 300, 400, 500]
    leaves = [hash_leaf(p) for _, p in reader.entries()]
    for note in reader.checkpoint_notes():
        cp = parse_and_verify(note, signer.verifier)
        assert range_root(MemorySource(leaves), 0, cp.size) == cp.hash


def test_checkpoint_after_an_interval_without_more_entries(tmp_path, signer):
    import time
    with LogWriter(tmp_path / "log", signer, checkpoint_every=10**6,
                   checkpoint_interval=0.05) as w:
        w.append_batch([entry("deny", time=1, n=i) for i in range(3)])
        reader_notes = []
        for _ in range(200):   # poll: the writer thread signs on its own once the interval passes
            reader_notes = LogReader(tmp_path / "log").checkpoint_notes()
            if reader_notes:
                break
            time.sleep(0.05)
        assert [parse_and_verify(n, signer.verifier).size for n in reader_notes] == [3]


def test_explicit_checkpoint_covers_everything_acknowledged(tmp_path, signer):
    with LogWriter(tmp_path / "log", signer, checkpoint_every=10**6) as w:
        w.append_batch([entry("deny", time=1, n=i) for i in range(7)])
        cp = parse_and_verify(w.checkpoint(), signer.verifier)
        assert cp.size == 7


def test_proofs_from_the_store_match_a_recomputation(tmp_path, signer):
    with LogWriter(tmp_path / "log", signer, segment_entries=256) as w:
        w.append_batch([entry("flow_end", time=1, n=i) for i in range(1000)])
    reader = LogReader(tmp_path / "log")
    leaves = [hash_leaf(p) for _, p in reader.entries()]
    source = reader.source()
    for size in (1, 255, 256, 257, 768, 1000):
        root = range_root(MemorySource(leaves), 0, size)
        assert range_root(source, 0, size) == root
        for index in {0, size // 2, size - 1}:
            proof = inclusion_proof(source, index, size)
            assert proof == inclusion_proof(MemorySource(leaves), index, size)
            verify_inclusion(index, size, leaves[index], proof, root)
    assert CompactRange.for_size(source, 1000).root() == range_root(MemorySource(leaves), 0, 1000)


def _tail_segment(path):
    return max(p for p in path.iterdir() if p.name.startswith("seg-"))


@pytest.mark.parametrize("garbage", [
    b"\x00" * 5,                                  # a header cut short
    b"\x00" * 64,                                 # zeros where the filesystem lost data
    records.frame(500, b'{"type":"deny"}')[:-3],  # a record cut short
    records.frame(500, b'{"type":"deny"}')[:-1] + b"X",   # a record with a wrong last byte
])
def test_torn_tail_is_cut_kept_aside_and_logged(tmp_path, signer, caplog, garbage):
    path = tmp_path / "log"
    with LogWriter(path, signer, checkpoint_every=100) as w:
        w.append_batch([entry("deny", time=1, n=i) for i in range(450)])
        w.append_batch([entry("deny", time=1, n=i) for i in range(450, 500)])
    # Simulate a crash mid-write: keep only the checkpoints up to 400 (as if the writer died
    # before its close-time checkpoint) and leave a torn record after the last entry.
    notes = LogReader(path).checkpoint_notes()
    (path / CHECKPOINTS_FILE).write_bytes(b"".join(records.frame(i, n.encode())
                                                   for i, n in enumerate(notes[:4])))
    with open(_tail_segment(path), "ab") as f:
        f.write(garbage)
    with caplog.at_level(logging.WARNING, logger="skyguard.tlog"):
        with LogWriter(path, signer, checkpoint_every=100) as w:
            assert w.size == 500
            assert w.append(entry("daemon_start", time=2)) == 500
    assert "torn tail" in caplog.text
    kept = list((path / TORN_DIR).iterdir())
    assert len(kept) == 1 and kept[0].read_bytes() == garbage
    assert verify_log(path, signer.verifier).ok


def test_damage_under_a_checkpoint_is_not_cut_but_refused(tmp_path, signer):
    path = tmp_path / "log"
    with LogWriter(path, signer) as w:
        w.append_batch([entry("deny", time=1, n=i) for i in range(20)])
    seg = _tail_segment(path)
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    before = seg.read_bytes()
    with pytest.raises(LogError, match="damaged at index"):
        LogWriter(path, signer)
    assert seg.read_bytes() == before   # evidence left in place


def test_truncated_below_checkpoint_is_refused(tmp_path, signer):
    path = tmp_path / "log"
    with LogWriter(path, signer) as w:
        w.append_batch([entry("deny", time=1, n=i) for i in range(20)])
    seg = _tail_segment(path)
    payloads = records.scan(seg.read_bytes(), 0).payloads[:10]
    seg.write_bytes(b"".join(records.frame(i, p) for i, p in enumerate(payloads)))
    with pytest.raises(LogError, match="truncated"):
        LogWriter(path, signer)


def test_caches_are_rebuilt_when_missing_or_stale(tmp_path, signer):
    path = tmp_path / "log"
    with LogWriter(path, signer, segment_entries=256) as w:
        w.append_batch([entry("deny", time=1, n=i) for i in range(700)])
    (path / LEAVES_FILE).unlink()
    (path / NODES_FILE).write_bytes(b"\x00" * 10)
    with LogWriter(path, signer, segment_entries=256) as w:
        assert w.size == 700
    assert verify_log(path, signer.verifier).ok
    assert (path / LEAVES_FILE).stat().st_size == 700 * 32


def test_a_log_signed_by_another_key_is_not_extended(tmp_path, signer):
    path = tmp_path / "log"
    with LogWriter(path, signer) as w:
        w.append(entry("deny", time=1))
    other = Signer(signer.name, Ed25519PrivateKey.generate())
    with pytest.raises(LogError, match="signed by key"):
        LogWriter(path, other)


def test_missing_segment_is_refused(tmp_path, signer):
    path = tmp_path / "log"
    with LogWriter(path, signer, segment_entries=256) as w:
        w.append_batch([entry("deny", time=1, n=i) for i in range(600)])
    (path / segment_name(256)).unlink()
    with pytest.raises(LogError, match="not contiguous"):
        LogWriter(path, signer, segment_entries=256)


def test_bad_entries_are_refused_before_queueing(tmp_path, signer):
    with LogWriter(tmp_path / "log", signer) as w:
        with pytest.raises(BadLogInput):
            w.append("not bytes")
        with pytest.raises(BadLogInput):
            w.append(b"x" * (records.MAX_PAYLOAD + 1))
        assert w.append(entry("deny", time=1)) == 0


def test_append_after_close_is_an_error(tmp_path, signer):
    w = LogWriter(tmp_path / "log", signer)
    w.close()
    with pytest.raises(LogError, match="closed"):
        w.append(entry("deny", time=1))


def test_missing_log_is_a_clear_error(tmp_path):
    with pytest.raises(LogError, match="no signed log"):
        LogReader(tmp_path / "nothing")


def test_same_key_under_another_name_keeps_the_logs_key_name(tmp_path, signer):
    path = tmp_path / "log"
    with LogWriter(path, signer) as w:
        w.append(entry("deny", time=1))
    renamed = Signer("renamed-host.skyguard/log", signer._key)
    with LogWriter(path, renamed) as w:
        w.append(entry("deny", time=2))
    assert verify_log(path, signer.verifier).ok


def test_a_second_writer_on_the_same_log_is_refused(tmp_path, signer):
    # It would take the first one's group in flight for a crash's leftovers.
    with LogWriter(tmp_path / "log", signer) as w:
        w.append(entry("deny", time=1))
        with pytest.raises(LogError, match="another writer"):
            LogWriter(tmp_path / "log", signer)
        assert w.append(entry("deny", time=2)) == 1
    with LogWriter(tmp_path / "log", signer) as w:   # free again once closed
        assert w.size == 2


def test_a_refused_log_keeps_no_lock(tmp_path, signer):
    path = tmp_path / "log"
    with LogWriter(path, signer) as w:
        w.append(entry("deny", time=1))
    other = Signer(signer.name, Ed25519PrivateKey.generate())
    with pytest.raises(LogError, match="signed by key"):
        LogWriter(path, other)
    with LogWriter(path, signer) as w:
        assert w.size == 1


def test_fields_measured_in_seconds_become_fixed_point_strings():
    """Entries take no floats; the daemon passes parts' fields through without_floats first."""
    from skyguard.tlog.entries import decode, entry, without_floats

    fields = without_floats({"took_s": 0.12345, "nested": {1: [2.5, "x", 3]}, "ok": True})
    assert fields == {"took_s": "0.123", "nested": {"1": ["2.500", "x", 3]}, "ok": True}
    assert decode(entry("part_degraded", **fields))["took_s"] == "0.123"


def test_below_its_reserve_the_writer_refuses_without_writing_and_resumes_on_its_own(tmp_path, signer, monkeypatch,
                                                                                     caplog):
    monkeypatch.setattr(intake, "SPACE_RECHECK_S", 0.0)
    with LogWriter(tmp_path / "log", signer) as w:
        w.append(entry("deny", n=0))
        assert w.head()["refusing"] is None and w.head()["filesystem_free_bytes"] > 0
        w.reserve_bytes = w.head()["filesystem_free_bytes"] + (1 << 40)  # as if the disk were full
        with caplog.at_level(logging.WARNING, "skyguard.tlog"):
            with pytest.raises(LogSpaceLow, match="refuses new entries: its filesystem has"):
                w.append(entry("deny", n=1))
            with pytest.raises(LogSpaceLow):
                w.submit([entry("deny", n=2), entry("deny", n=3)])  # refused at once, never queued
            head = w.head()
            assert head["refusing"].startswith(f"the signed log at {tmp_path / 'log'} refuses")
            assert head["refused_entries"] == 3
            w.reserve_bytes = 0  # space is back: no restart
            assert w.append(entry("deny", n=4)) == 3
        assert w.head()["refusing"] is None
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in said] == ["CRITICAL", "WARNING"], said  # once each, not per entry
    reader = LogReader(tmp_path / "log")
    kept = [decode(reader.entry(i)) for i in range(reader.size)]
    assert [(e["type"], e.get("n"), e.get("refused")) for e in kept] == [
        ("deny", 0, None), ("log_space_low", None, None), ("log_space_restored", None, 3), ("deny", 4, None)]
    assert verify_log(tmp_path / "log", signer.verifier).ok


def test_a_batch_of_frames_is_the_frames_one_by_one():
    payloads = [b'{"type":"flow_start"}', b"", b"x" * 70_000]
    assert records.frames(41, payloads) == b"".join(records.frame(41 + i, p) for i, p in enumerate(payloads))
    assert records.scan(records.frames(41, payloads), 41).payloads == payloads


def test_a_refusal_raised_again_keeps_no_frames_of_the_callers_it_refused_before(tmp_path, signer, monkeypatch):
    """The writer raised one kept LogSpaceLow (likewise LogStalled, a failed write) for every entry
    it refused: each raise chained that caller's frames onto the one traceback, so while the log
    refused, every refused caller's locals (a proxy's request with the secret swapped in) stayed in
    memory and each traceback the host log printed was longer than the last."""
    monkeypatch.setattr(intake, "SPACE_RECHECK_S", 0.0)

    class Held:  # what a refused caller holds
        pass

    def refused_caller(held):
        try:
            w.submit([entry("deny", n=1)])
        except LogSpaceLow as e:
            return len(traceback.extract_tb(e.__traceback__))

    with LogWriter(tmp_path / "log", signer) as w:
        w.append(entry("deny", n=0))
        w.reserve_bytes = w.head()["filesystem_free_bytes"] + (1 << 40)  # as if the disk were full
        with pytest.raises(LogSpaceLow):
            w.append(entry("deny", n=1))  # found below the reserve: refusing from now on
        held = Held()
        kept = weakref.ref(held)
        first = refused_caller(held)
        del held
        gc.collect()
        depths = [refused_caller(Held()) for _ in range(3)]
        assert depths == [first] * 3  # no frame of an earlier caller
        assert kept() is None  # what the first caller held is let go
        w.reserve_bytes = 0
