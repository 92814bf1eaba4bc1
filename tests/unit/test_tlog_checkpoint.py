"""C2SP signed notes and checkpoints: interop with the Go note package's published example, the
key hash as signed-note defines it, rejection of other keys, origins and edits; the host key."""

import base64
import hashlib
import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from skyguard.errors import LogError
from skyguard.tlog.checkpoint import Checkpoint, Signer, Verifier, parse_and_verify, split_note, split_notes
from skyguard.tlog.errors import BadLogInput, VerificationError
from skyguard.tlog.hostkey import host_signer, key_path, load_or_create_host_key

# From the documentation of golang.org/x/mod/sumdb/note (the reference signed-note code).
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_NOTE = ("If you think cryptography is the answer to your problem,\n"
           "then you don't know what your problem is.\n\n"
           "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgK"
           "vqfqdngotpRZb6KE6RyyBwJnAM=\n")


@pytest.fixture
def signer():
    return Signer("example.com/log", Ed25519PrivateKey.generate())


def test_go_reference_note_verifies():
    verifier = Verifier.from_vkey(GO_VKEY)
    assert verifier.verify(GO_NOTE).startswith("If you think cryptography")
    assert verifier.vkey() == GO_VKEY


def test_go_reference_note_edited_fails():
    with pytest.raises(VerificationError):
        Verifier.from_vkey(GO_VKEY).verify(GO_NOTE.replace("answer", "Answer"))


def test_key_hash_is_sha256_of_name_newline_alg_key(signer):
    raw = signer.verifier.public_key
    expected = hashlib.sha256(b"example.com/log\n\x01" + raw).digest()[:4]
    assert signer.verifier.key_hash == expected
    name, hash_hex, blob = signer.verifier.vkey().split("+", 2)
    assert (name, hash_hex, base64.b64decode(blob)) == ("example.com/log", expected.hex(), b"\x01" + raw)


def test_checkpoint_round_trip(signer):
    cp = Checkpoint("example.com/log", 12345, hashlib.sha256(b"root").digest())
    note = cp.sign(signer)
    lines = note.split("\n")
    assert lines[:3] == ["example.com/log", "12345", base64.b64encode(cp.hash).decode()]
    assert lines[3] == "" and lines[4].startswith("\u2014 example.com/log ")
    assert parse_and_verify(note, signer.verifier) == cp
    assert parse_and_verify(note, Verifier.from_vkey(signer.verifier.vkey()), "example.com/log") == cp


def test_note_signed_by_another_key_fails(signer):
    other = Signer("example.com/log", Ed25519PrivateKey.generate())
    note = Checkpoint("example.com/log", 1, bytes(32)).sign(other)
    with pytest.raises(VerificationError, match="not signed by key"):
        parse_and_verify(note, signer.verifier)


def test_signature_of_same_name_and_hash_but_wrong_bytes_fails(signer):
    note = Checkpoint("example.com/log", 10, bytes(32)).sign(signer)
    tampered = note.replace("\n10\n", "\n11\n")
    with pytest.raises(VerificationError, match="invalid"):
        parse_and_verify(tampered, signer.verifier)


def test_other_origin_is_rejected(signer):
    note = Checkpoint("other.example/log", 1, bytes(32)).sign(signer)
    with pytest.raises(VerificationError, match="other.example/log"):
        parse_and_verify(note, signer.verifier, origin="example.com/log")


@pytest.mark.parametrize("note", [
    "", "no blank line\n", "a\n1\nAAAA\n\n- wrong dash sig\n", "a\n1\n\n\u2014 k notbase64!\n",
    "a\n\n\u2014 k AAAA\n",
])
def test_malformed_notes_are_bad_input(note, signer):
    with pytest.raises((BadLogInput, VerificationError)):
        parse_and_verify(note, signer.verifier)


@pytest.mark.parametrize("body", ["\n1\nAAAA\n", "o\n01\n" + "A" * 44 + "\n", "o\n-1\nAAAA\n",
                                  "o\n1\nAAAA\n", "o\n1\n"])
def test_malformed_checkpoint_bodies(body):
    with pytest.raises(BadLogInput):
        Checkpoint.parse_body(body)


@pytest.mark.parametrize("vkey", ["nope", "a+b+c", "name+00000000+AQ==",
                                  GO_VKEY.replace("c74f20a3", "c74f20a4")])
def test_malformed_verifier_keys(vkey):
    with pytest.raises(BadLogInput):
        Verifier.from_vkey(vkey)


def test_several_notes_in_one_file_split_back(signer):
    notes = [Checkpoint("example.com/log", n, bytes([n]) * 32).sign(signer) for n in (1, 2, 3)]
    assert split_notes("".join(notes)) == notes
    assert split_notes("\n".join(notes)) == notes
    assert [parse_and_verify(n, signer.verifier).size for n in split_notes("".join(notes))] == [1, 2, 3]
    text, signatures = split_note(notes[0])
    assert signatures[0][0] == "example.com/log"


def test_signer_repr_never_shows_the_private_key(signer):
    raw = signer._key.private_bytes_raw()
    assert base64.b64encode(raw).decode() not in repr(signer)
    assert raw.hex() not in repr(signer)


def test_host_key_created_private_and_reloaded(tmp_path):
    state = tmp_path / "state"
    first = host_signer(state, name="host.example/log")
    assert stat.S_IMODE(key_path(state).stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    again = host_signer(state, name="host.example/log")
    assert again.verifier.vkey() == first.verifier.vkey()


def test_host_key_readable_by_others_is_refused(tmp_path):
    load_or_create_host_key(tmp_path)
    os.chmod(key_path(tmp_path), 0o644)
    with pytest.raises(LogError, match="chmod 600"):
        load_or_create_host_key(tmp_path)


def test_missing_host_key_without_create_is_a_clear_error(tmp_path):
    with pytest.raises(LogError, match="no host key"):
        load_or_create_host_key(tmp_path, create=False)


def test_a_size_of_thousands_of_digits_is_bad_input_and_does_not_stop_the_log_commands(tmp_path):
    # Python's int() refuses more than 4300 digits with a ValueError: before the fix such a
    # size escaped parse_body as ValueError, and a record planted in checkpoints.log (read
    # unverified to pick the latest note) made `log checkpoint` and `log prove` crash instead
    # of using the log's real latest checkpoint.
    import subprocess
    import sys

    from skyguard.tlog import records
    from skyguard.tlog.entries import entry
    from skyguard.tlog.store import CHECKPOINTS_FILE, LogReader, LogWriter

    root = base64.b64encode(b"\0" * 32).decode()
    with pytest.raises(BadLogInput):
        Checkpoint.parse_body(f"o\n{'9' * 5000}\n{root}\n")
    state = tmp_path / "state"
    with LogWriter(state / "log", host_signer(state)) as writer:
        writer.append(entry("daemon_start", time=1))
    count = len(LogReader(state / "log").checkpoint_notes())
    with open(state / "log" / CHECKPOINTS_FILE, "ab") as f:
        f.write(records.frame(count, f"o\n{'9' * 5000}\n{root}\n\n\u2014 o AAAAAAAA\n".encode()))
    assert LogReader(state / "log").latest_checkpoint_note().split("\n")[1] == "1"
    from pathlib import Path
    env = dict(os.environ, SKYGUARD_STATE_DIR=str(state),
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run([sys.executable, "-m", "skyguard.cli.main", "log", "checkpoint"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split("\n")[1] == "1", out.stderr
