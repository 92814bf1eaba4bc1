"""The signed log's writer on a disk that stalls (a real ext4 image frozen with fsfreeze:
tests/support/frozen_disk.py), not full: it refuses new entries once a write has waited past its
bound, a wait for durability ends then, its backlog is bounded, close() returns while the disk is
still frozen, and once the disk answers what was queued is written, the writer says how long it
was behind, and the log verifies with every acknowledged entry. Opening a log at the daemon's start
fails within the same bound when its disk does not answer, before it or in the middle of it."""

import logging
import threading
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from skyguard.tlog.checkpoint import Signer
from skyguard.tlog.entries import decode, entry
from skyguard.tlog.errors import LogStalled
from skyguard.tlog.opening import open_log
from skyguard.tlog.store import LogReader, LogWriter
from skyguard.tlog.verify import verify_log
from support.frozen_disk import FrozenDisk, blocked_in_the_kernel

STALL_AFTER = 0.5  # seconds a write may wait here before the writer counts as stalled: a bound, not a timing


@pytest.fixture
def disk(tmp_path):
    with FrozenDisk(tmp_path / "disk") as frozen:
        yield frozen


@pytest.fixture(scope="module")
def signer():
    return Signer("stall.example/log", Ed25519PrivateKey.generate())


def kept(path) -> list[dict]:
    reader = LogReader(path)
    return [decode(reader.entry(i)) for i in range(reader.size)]


def until(predicate, what: str, bound: float = 60.0) -> None:
    """Poll predicate() until it holds; fail naming `what` after `bound` seconds (against hangs)."""
    deadline = time.monotonic() + bound
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def wait_blocked():
    until(blocked_in_the_kernel, "the writer waiting on the frozen disk")


def test_a_stalled_writer_refuses_ends_waits_and_resumes_when_the_disk_answers(disk, signer, caplog):
    path = disk.path / "log"
    with LogWriter(path, signer, stall_after=STALL_AFTER) as w:
        assert w.append(entry("deny", n=0)) == 0
        disk.freeze()
        try:
            queued = w.submit([entry("deny", n=1)])  # the writer takes it and waits on the disk
            wait_blocked()
            with caplog.at_level(logging.WARNING, "skyguard.tlog"):
                with pytest.raises(LogStalled, match="its writer has waited on its disk for more than"):
                    w.append(entry("deny", n=2))  # not acknowledged: its wait ends
                with pytest.raises(LogStalled):
                    w.submit([entry("deny", n=3), entry("deny", n=4)])  # refused at once
                head = w.head()
                assert head["refusing"].startswith(f"the signed log at {path} refuses new entries")
                assert head["queued_entries"] >= 1 and head["write_wait_s"] > 0
                assert head["stall_refused_entries"] >= 2
                assert w.stalled() and not queued.done()
        finally:
            disk.thaw()
        assert queued.result(60) == 1  # written once the disk answers
        until(lambda: w.head()["refusing"] is None, "the writer accepting entries again")
        assert w.append(entry("deny", n=5)) > 1
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "skyguard.tlog"]
    assert [level for level, _ in said] == ["CRITICAL", "WARNING"], said  # once each, not per entry
    entries = kept(path)
    assert [e.get("n") for e in entries if e["type"] == "deny"][:2] == [0, 1] and entries[-1].get("n") == 5
    [ended] = [e for e in entries if e["type"] == "log_stall_ended"]
    assert ended["refused"] >= 2
    assert verify_log(path, signer.verifier).ok


def test_entries_waiting_behind_a_stalled_writer_are_bounded(disk, signer):
    path = disk.path / "log"
    with LogWriter(path, signer, stall_after=3600, max_entries=8) as w:
        disk.freeze()
        try:
            futures = [w.submit([entry("deny", n=0)])]
            wait_blocked()
            futures += [w.submit([entry("deny", n=n)]) for n in range(1, 8)]
            with pytest.raises(LogStalled, match="8 entries .* wait to be written, its bound"):
                w.submit([entry("deny", n=8)])
            assert w.head()["queued_entries"] == 8
        finally:
            disk.thaw()
        assert [f.result(60) for f in futures] == list(range(8))
    entries = kept(path)
    assert [e.get("n") for e in entries[:8]] == list(range(8))
    assert [e["refused"] for e in entries if e["type"] == "log_stall_ended"] == [1]
    assert verify_log(path, signer.verifier).ok


def test_close_returns_while_the_disk_is_frozen_and_the_log_verifies_once_it_answers(disk, signer, caplog):
    path = disk.path / "log"
    w = LogWriter(path, signer, stall_after=STALL_AFTER)
    w.append(entry("deny", n=0))
    disk.freeze()
    try:
        w.submit([entry("deny", n=1)])
        wait_blocked()
        with caplog.at_level(logging.ERROR, "skyguard.tlog"):
            w.close()  # returned, the disk still frozen
        assert disk.frozen
        assert "its final checkpoint was not written, nor 1 entries waiting" in caplog.text
    finally:
        disk.thaw()
    # Called again once the disk answers: the writer finished, its files are let go. (At once after
    # the thaw the writer thread may not have run yet, so its write still counts as stalled and close()
    # would give up again: wait until the writer is past it.)
    deadline = time.monotonic() + 60
    while w.stalled():
        assert time.monotonic() < deadline, "the writer never got past its write after the thaw"
        time.sleep(0.01)
    w.close()
    with LogWriter(path, signer) as again:
        assert again.size >= 1
    assert kept(path)[0]["n"] == 0
    assert verify_log(path, signer.verifier).ok


def test_opening_a_log_whose_disk_does_not_answer_fails_within_the_bound(disk, signer):
    """At the daemon's start (tlog/opening.py): the disk is asked before the log is opened, by a
    child process, so a frozen disk fails the open with nothing of this process waiting on it."""
    path = disk.path / "log"
    with LogWriter(path, signer) as w:
        w.append(entry("deny", n=0))
    opened = []
    disk.freeze()
    try:
        with pytest.raises(LogStalled, match=f"the signed log at {path}: its disk does not answer"):
            open_log(path, lambda: opened.append(LogWriter(path, signer)), stall_after=STALL_AFTER)
        assert opened == [] and not blocked_in_the_kernel()
    finally:
        disk.thaw()
    assert verify_log(path, signer.verifier).ok


def test_an_open_the_disk_stops_answering_in_the_middle_of_fails_and_lets_go_of_the_log_after(disk, signer):
    """The disk answers when asked, then stops while the log is being opened: the open fails the
    same way once it has not answered for the bound; once it answers, what the abandoned open made
    is closed (its lock let go) and the log opens and verifies."""
    path = disk.path / "log"
    with LogWriter(path, signer) as w:
        w.append(entry("deny", n=0))

    def opener():
        disk.freeze()  # after the disk was asked
        return LogWriter(path, signer)

    try:
        with pytest.raises(LogStalled, match=f"the signed log at {path}: its disk does not answer"):
            open_log(path, opener, stall_after=STALL_AFTER)
        assert blocked_in_the_kernel()  # the abandoned open waits there
    finally:
        disk.thaw()
    until(lambda: not any(t.name == "skyguard-tlog-open" for t in threading.enumerate()), "the abandoned open to end")
    with LogWriter(path, signer) as again:
        assert again.append(entry("deny", n=1)) == 1
    assert [e.get("n") for e in kept(path)] == [0, 1]
    assert verify_log(path, signer.verifier).ok
