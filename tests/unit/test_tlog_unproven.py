"""Entries no signed checkpoint proves: a crash's unacknowledged tail verifies (and is set aside,
never signed); the same files with the signatures removed or outrun do not.

Every log here is written by the real LogWriter. Crashes are real process deaths at a chosen
instant (os._exit where the head would be written: the entries are on disk, their signature is
not); attacks edit the real files (an entry rewritten with its checksum fixed, checkpoints and
caches deleted), as issue 15 describes.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from skyguard.errors import LogError
from skyguard.tlog import records
from skyguard.tlog.checkpoint import Checkpoint, Signer
from skyguard.tlog.entries import decode, entry
from skyguard.tlog.head import HEAD_FILE, SLOT_SIZE, read_head
from skyguard.tlog.hostkey import host_signer
from skyguard.tlog.store import (
    CHECKPOINTS_FILE,
    LEAVES_FILE,
    MAX_UNPROVEN,
    NODES_FILE,
    TORN_DIR,
    LogReader,
    LogWriter,
    segment_name,
)
from skyguard.tlog.verify import verify_log

REPO = Path(__file__).resolve().parents[2]
SEGMENT = 1024
NAME = "unproven.test/log"

# Appends `before` entries (acknowledged), then a batch of `batch` during which the process dies
# at its `crash_at`-th head write: what a power cut between the segment fsync and the signature
# leaves. With batch 0 it dies right after the acknowledgements (no close, no final checkpoint).
CRASHER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from skyguard.tlog import head
    from skyguard.tlog.entries import entry
    from skyguard.tlog.hostkey import host_signer
    from skyguard.tlog.store import LogWriter
    state, log_dir = Path(sys.argv[1]), sys.argv[2]
    before, batch, crash_at = map(int, sys.argv[3:6])
    writer = LogWriter(log_dir, host_signer(state, name=sys.argv[6]), segment_entries=1024)
    for start in range(0, before, 100):
        writer.append_batch([entry("flow_start", time=1, n=i)
                             for i in range(start, min(before, start + 100))])
    print(writer.size, flush=True)
    if not batch:
        os._exit(0)
    real_write, calls = head.HeadWriter.write, [0]
    def write_or_die(self, note):
        calls[0] += 1
        if calls[0] >= crash_at:
            os._exit(9)
        real_write(self, note)
    head.HeadWriter.write = write_or_die
    writer.append_batch([entry("flow_start", time=2, n=before + i) for i in range(batch)])
    print("the batch was acknowledged", flush=True)
""")


def crash(state: Path, before: int, batch: int, crash_at: int = 1) -> Path:
    log_dir = state / "log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", CRASHER, str(state), str(log_dir), str(before),
                          str(batch), str(crash_at), NAME], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.split() == [str(before)], out.stderr
    assert out.returncode == (9 if batch else 0), out.stderr
    return log_dir


def run_cli(state: Path, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO), SKYGUARD_STATE_DIR=str(state / "nowhere"))
    return subprocess.run([sys.executable, "-m", "skyguard.cli.main", "log", *args,
                           "--state-dir", str(state)], env=env, capture_output=True, text=True)


@pytest.fixture
def state(tmp_path):
    return tmp_path / "state"


def signer_of(state: Path) -> Signer:
    return host_signer(state, name=NAME)


def rewrite_entry(log_dir: Path, index: int, payload: bytes) -> None:
    """An edit by someone without the key: the record rewritten with a correct checksum."""
    first = index - index % SEGMENT
    path = log_dir / segment_name(first)
    payloads = records.scan(path.read_bytes(), first, SEGMENT).payloads
    payloads[index - first] = payload
    path.write_bytes(b"".join(records.frame(first + i, p) for i, p in enumerate(payloads)))


def entries_of(log_dir: Path) -> list[dict]:
    return [decode(p) for _, p in LogReader(log_dir).entries()]


# --- crashes: they verify, and nothing unacknowledged is ever signed --------------------------

def test_crash_before_the_head_is_signed_verifies_and_the_tail_is_set_aside(state):
    log_dir = crash(state, before=300, batch=100)
    report = verify_log(log_dir, signer_of(state).verifier)
    assert report.ok, report.problem
    assert (report.size, report.covered) == (400, 300)
    assert any("[300, 400)" in n and "crash" in n for n in report.notes)
    out = run_cli(state, "verify")
    assert out.returncode == 0, out.stderr
    assert "300 entries proven" in out.stdout and "100 unacknowledged" in out.stdout

    with LogWriter(log_dir, signer_of(state), segment_entries=SEGMENT) as writer:
        assert writer.size == 301   # the 300 acknowledged, then the record of what was cut
    recorded = entries_of(log_dir)
    assert [r["n"] for r in recorded[:300]] == list(range(300))
    assert recorded[300]["type"] == "log_recovery"
    assert (recorded[300]["first_index"], recorded[300]["count"]) == (300, 100)
    kept = log_dir / recorded[300]["kept"][0]
    assert [decode(p)["n"] for p in records.scan(kept.read_bytes(), 300).payloads] == \
        list(range(300, 400))
    report = verify_log(log_dir, signer_of(state).verifier)
    assert report.ok and report.size == report.covered == 301


def test_crash_in_the_first_group_of_a_new_log(state):
    log_dir = crash(state, before=0, batch=50)
    assert [size for size in (Checkpoint.parse_body(n.split("\n\n")[0] + "\n").size
                              for _, n in read_head(log_dir).notes)] == [0]
    report = verify_log(log_dir, signer_of(state).verifier)
    assert report.ok and (report.size, report.covered) == (50, 0), report.problem
    with LogWriter(log_dir, signer_of(state), segment_entries=SEGMENT):
        pass
    assert [r["type"] for r in entries_of(log_dir)] == ["log_recovery"]


def test_a_batch_larger_than_the_bound_is_signed_in_blocks(state):
    # Dies at the second head of one big batch: the first block is signed, one block is not.
    log_dir = crash(state, before=0, batch=2 * MAX_UNPROVEN + 10, crash_at=2)
    report = verify_log(log_dir, signer_of(state).verifier)
    assert report.ok, report.problem
    assert (report.size, report.covered) == (2 * MAX_UNPROVEN, MAX_UNPROVEN)


def test_every_acknowledged_entry_is_under_the_head_without_a_close(state):
    log_dir = crash(state, before=250, batch=0)
    report = verify_log(log_dir, signer_of(state).verifier)
    assert report.ok and report.size == report.covered == 250
    assert report.head_checked >= 1


def test_a_torn_head_slot_falls_back_to_the_other(state):
    log_dir = crash(state, before=300, batch=0)
    newest = read_head(log_dir).notes[-1][0]
    with open(log_dir / HEAD_FILE, "r+b") as f:
        f.seek((newest % 2) * SLOT_SIZE + 20)
        f.write(b"\xff")
    report = verify_log(log_dir, signer_of(state).verifier)
    assert report.ok, report.problem
    assert (report.size, report.covered) == (300, 200)
    assert any("torn" in n for n in report.notes)


# --- attacks: signatures removed or outrun --------------------------------------------------

def build(state: Path, count: int, every: int) -> Path:
    log_dir = state / "log"
    with LogWriter(log_dir, signer_of(state), checkpoint_every=every,
                   segment_entries=SEGMENT) as writer:
        for start in range(0, count, 500):
            writer.append_batch([entry("flow_start", time=1, n=i)
                                 for i in range(start, min(count, start + 500))])
    return log_dir


FORGED = entry("flow_start", time=1, n=5, forged=True)


def test_edit_with_every_signature_and_cache_deleted_fails_and_is_never_signed(state):
    # Issue 15: edit an entry, fix its CRC, delete the checkpoint and index files.
    log_dir = build(state, 600, every=100)
    witness = LogReader(log_dir).latest_checkpoint_note()
    rewrite_entry(log_dir, 5, FORGED)
    for name in (CHECKPOINTS_FILE, HEAD_FILE, LEAVES_FILE, NODES_FILE):
        (log_dir / name).unlink()
    report = verify_log(log_dir, signer_of(state).verifier)
    assert (report.ok, report.first_bad_index) == (False, 0)
    assert "no signed checkpoint" in report.problem
    out = run_cli(state, "verify")
    assert out.returncode == 1 and "no signed checkpoint" in out.stderr
    assert not verify_log(log_dir, signer_of(state).verifier, [witness]).ok

    # The next writer signs none of it: the entries go to torn/, a tamper entry says so.
    with LogWriter(log_dir, signer_of(state), segment_entries=SEGMENT) as writer:
        writer.append(entry("daemon_start", time=3))
    recorded = entries_of(log_dir)
    assert [r["type"] for r in recorded] == ["tamper", "daemon_start"]
    assert (recorded[0]["first_index"], recorded[0]["count"]) == (0, 600)
    assert all(not r.get("forged") for r in recorded)
    kept = b"".join(p.read_bytes() for p in (log_dir / TORN_DIR).iterdir())
    assert FORGED in kept
    assert verify_log(log_dir, signer_of(state).verifier).ok


def test_a_log_without_its_own_checkpoints_fails_even_with_a_witness(state):
    log_dir = build(state, 300, every=100)
    witness = LogReader(log_dir).latest_checkpoint_note()
    (log_dir / CHECKPOINTS_FILE).unlink()
    (log_dir / HEAD_FILE).unlink()
    report = verify_log(log_dir, signer_of(state).verifier, [witness])
    assert (report.ok, report.first_bad_index) == (False, 0)
    assert "no signed checkpoint of its own" in report.problem


def test_edit_with_the_history_and_caches_deleted_is_caught_by_the_head(state):
    log_dir = build(state, 600, every=100)
    rewrite_entry(log_dir, 5, FORGED)
    for name in (CHECKPOINTS_FILE, LEAVES_FILE, NODES_FILE):
        (log_dir / name).unlink()
    report = verify_log(log_dir, signer_of(state).verifier)
    assert (report.ok, report.first_bad_index) == (False, 0)
    with pytest.raises(LogError, match="does not match its own signed checkpoint"):
        LogWriter(log_dir, signer_of(state), segment_entries=SEGMENT)


def test_more_unproven_entries_than_a_crash_leaves_fail_and_are_set_aside(state):
    # Keep only the first stored checkpoint (1000), drop the head, rewrite entry 3000.
    log_dir = build(state, MAX_UNPROVEN + 1500, every=1000)
    notes = LogReader(log_dir).checkpoint_notes()
    (log_dir / CHECKPOINTS_FILE).write_bytes(records.frame(0, notes[0].encode()))
    (log_dir / HEAD_FILE).unlink()
    rewrite_entry(log_dir, 3000, entry("flow_start", time=1, n=3000, forged=True))
    (log_dir / LEAVES_FILE).unlink()
    (log_dir / NODES_FILE).unlink()
    report = verify_log(log_dir, signer_of(state).verifier)
    assert (report.ok, report.first_bad_index) == (False, 1000)
    assert "more than a crash leaves" in report.problem

    with LogWriter(log_dir, signer_of(state), segment_entries=SEGMENT):
        pass
    recorded = entries_of(log_dir)
    assert len(recorded) == 1001 and recorded[1000]["type"] == "tamper"
    assert recorded[1000]["count"] == MAX_UNPROVEN + 500
    assert verify_log(log_dir, signer_of(state).verifier).ok


def test_a_head_signed_by_another_key_fails_and_the_writer_refuses(state):
    log_dir = build(state, 300, every=100)
    intruder = Signer(NAME, Ed25519PrivateKey.generate())
    note = Checkpoint(NAME, 300, bytes(32)).sign(intruder).encode()
    sequence = read_head(log_dir).notes[-1][0] + 1
    with open(log_dir / HEAD_FILE, "r+b") as f:
        f.seek((sequence % 2) * SLOT_SIZE)
        f.write(records.frame(sequence, note))
    report = verify_log(log_dir, signer_of(state).verifier)
    assert not report.ok and "head checkpoint" in report.problem
    with pytest.raises(LogError, match="does not verify"):
        LogWriter(log_dir, signer_of(state), segment_entries=SEGMENT)


def test_verify_json_reports_what_is_proven(state):
    crash(state, before=120, batch=30)
    out = run_cli(state, "verify", "--json")
    report = json.loads(out.stdout)
    assert (report["ok"], report["size"], report["covered"], report["unproven"]) == \
        (True, 150, 120, 30)
    assert "host-ed25519.pem" in report["key"]


def test_a_rollback_with_forged_entries_within_the_bound_is_never_verified_nor_signed(state):
    # The one rewrite the files alone cannot tell from a crash: drop the last signatures and
    # forge at most MAX_UNPROVEN entries after the signed state left. Never called verified,
    # never signed; a witness's checkpoint shows the rollback.
    log_dir = build(state, 600, every=100)
    witness = LogReader(log_dir).latest_checkpoint_note()
    notes = LogReader(log_dir).checkpoint_notes()
    (log_dir / CHECKPOINTS_FILE).write_bytes(records.frame(0, notes[0].encode()))   # size 500
    (log_dir / HEAD_FILE).unlink()
    rewrite_entry(log_dir, 550, FORGED)
    report = verify_log(log_dir, signer_of(state).verifier)
    assert report.ok and (report.covered, report.size) == (500, 600), report.problem
    assert not verify_log(log_dir, signer_of(state).verifier, [witness]).ok
    with LogWriter(log_dir, signer_of(state), segment_entries=SEGMENT):
        pass
    recorded = entries_of(log_dir)
    assert len(recorded) == 501 and recorded[500]["type"] == "log_recovery"
    assert all(not r.get("forged") for r in recorded)
