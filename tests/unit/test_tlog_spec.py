"""Checkpoints and signed notes held to c2sp.org/tlog-checkpoint and c2sp.org/signed-note to the
letter: the specs' own examples, the Go reference's test vectors (golang.org/x/mod/sumdb/note
note_test.go: TestNewVerifier, TestSign, TestOpen), and the looseness issue 15 found (digits
that are not ASCII, a superscript that crashed `log verify`, empty extension lines, invalid key
names in signature lines, control characters signed, a consistency proof from size 0)."""

import base64
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from skyguard.tlog.checkpoint import MAX_TREE_SIZE, Checkpoint, Signer, Verifier, parse_and_verify, split_note, valid_key_name
from skyguard.tlog.errors import BadLogInput, VerificationError
from skyguard.tlog.verify import read_notes_file

REPO = Path(__file__).resolve().parents[2]
ROOT = hashlib.sha256(b"root").digest()
ROOT_B64 = base64.b64encode(ROOT).decode()

# --- the specs' own examples --------------------------------------------------------------------

# c2sp.org/signed-note, "Example": this verifier key verifies this note.
SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_NOTE = ("This is an example message.\n\n"
             "\u2014 example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZ"
             "XsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n")
# c2sp.org/signed-note, the opening example: a text with an empty line inside it.
QUASIMODO = ("Ognuno sta solo sul cuor della terra\ntrafitto da un raggio di sole:\n\n"
             "ed \u00e8 subito sera.\n\n"
             "\u2014 quasimodo.example/salvatore NnugSzTjtVAewIS+Z/iJhUPeFDkO/5QQ2i5ddnGITLlC+EhfL"
             "W9oJKONrMouFSQU0xMcXxj99ihAQwaqP3ZekRwNtIc=\n")
# c2sp.org/tlog-checkpoint, the opening example.
SPEC_CHECKPOINT = ("example.com/behind-the-sofa\n20852163\n"
                   "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n\n"
                   "\u2014 example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRD"
                   "eOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n")

# golang.org/x/mod/sumdb/note, note_test.go.
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_SKEY_SEED = "AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"   # from PRIVATE+KEY+PeterNeumann+...
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = ("If you think cryptography is the answer to your problem,\n"
        "then you don't know what your problem is.\n")
PETER_SIG = ("\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNX"
             "gKvqfqdngotpRZb6KE6RyyBwJnAM=\n")
ENOCH_SIG = ("\u2014 EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01"
             "oOTGwnWLox33WWd1RvMc+QQ=\n")


def test_signed_note_spec_example_verifies():
    verifier = Verifier.from_vkey(SPEC_VKEY)
    assert verifier.verify(SPEC_NOTE) == "This is an example message.\n"
    assert verifier.vkey() == SPEC_VKEY


def test_signed_note_text_ends_at_the_last_empty_line():
    text, signatures = split_note(QUASIMODO)
    assert text.endswith("sole:\n\ned \u00e8 subito sera.\n")
    assert [name for name, _ in signatures] == ["quasimodo.example/salvatore"]


def test_tlog_checkpoint_spec_example_parses():
    text, signatures = split_note(SPEC_CHECKPOINT)
    checkpoint = Checkpoint.parse_body(text)
    assert (checkpoint.origin, checkpoint.size) == ("example.com/behind-the-sofa", 20852163)
    assert base64.b64encode(checkpoint.hash).decode() == \
        "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="
    assert checkpoint.body() == text
    assert signatures[0][0] == "example.com/behind-the-sofa"
    # Signed by a key we do not hold: refused, never trusted.
    with pytest.raises(VerificationError, match="not signed by key"):
        parse_and_verify(SPEC_CHECKPOINT, Signer("example.com/behind-the-sofa",
                                                 Ed25519PrivateKey.generate()).verifier)


# --- the Go reference's vectors ---------------------------------------------------------------

def test_go_sign_is_byte_identical():
    seed = base64.b64decode(PETER_SKEY_SEED)[1:]
    signer = Signer("PeterNeumann", Ed25519PrivateKey.from_private_bytes(seed))
    assert signer.verifier.vkey() == PETER_VKEY
    assert signer.sign(TEXT) == TEXT + "\n" + PETER_SIG


def test_go_new_verifier_rejects_every_mangling():
    assert Verifier.from_vkey(PETER_VKEY).vkey() == PETER_VKEY
    bad = [PETER_VKEY[i:j] for i in range(len(PETER_VKEY) + 1)
           for j in range(i + 1, len(PETER_VKEY) + 1) if (i, j) != (0, len(PETER_VKEY))]
    bad += [PETER_VKEY[:i] + chr(ord(c) + 1) + PETER_VKEY[i + 1:] for i, c in enumerate(PETER_VKEY)]
    bad += ["PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
            "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"]
    accepted = []
    for vkey in bad:
        try:
            Verifier.from_vkey(vkey)
            accepted.append(vkey)
        except BadLogInput:
            pass
    assert accepted == []


def test_go_open_with_one_known_and_one_unknown_signature():
    note = TEXT + "\n" + PETER_SIG + ENOCH_SIG
    assert Verifier.from_vkey(PETER_VKEY).verify(note) == TEXT
    assert Verifier.from_vkey(ENOCH_VKEY).verify(note) == TEXT
    # Repeats of a verified signature, and a broken one from a key we do not hold: accepted.
    broken_enoch = ENOCH_SIG[:60] + "ABCD" + ENOCH_SIG[60:]
    assert Verifier.from_vkey(PETER_VKEY).verify(
        TEXT + "\n" + PETER_SIG + PETER_SIG + ENOCH_SIG + ENOCH_SIG + broken_enoch) == TEXT


def test_go_open_refuses_too_many_signatures_and_a_bad_known_one():
    verifier = Verifier.from_vkey(PETER_VKEY)
    verifier.verify(TEXT + "\n" + PETER_SIG * 100)
    with pytest.raises(BadLogInput, match="at most 100"):
        verifier.verify(TEXT + "\n" + PETER_SIG * 101)
    with pytest.raises(VerificationError, match="invalid"):
        verifier.verify(TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:])


@pytest.mark.parametrize("note", [
    TEXT,
    TEXT + "\n",
    TEXT + "\n" + PETER_SIG[:-1],
    "\x01" + TEXT + "\n" + PETER_SIG,
    TEXT + "\n" + "\u2014 Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZS"
                  "NXgKvqfqdngotpRZb6KE6RyyBwJnAM=",
    TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
], ids=["no-signatures", "blank-line-only", "no-final-newline", "control-char", "bad-name",
        "unexpected-line"])
def test_go_open_malformed_notes(note):
    with pytest.raises(BadLogInput):
        Verifier.from_vkey(PETER_VKEY).verify(note)


def test_a_note_file_that_is_not_utf8_is_bad_input(tmp_path):
    path = tmp_path / "bad.note"
    path.write_bytes(b"\xff" + (TEXT + "\n" + PETER_SIG).encode())
    with pytest.raises(BadLogInput):
        read_notes_file(path)


# --- issue 15's cases: stricter than we were, as strict as the specs --------------------------

@pytest.fixture(scope="module")
def signer():
    return Signer("example.com/log", Ed25519PrivateKey.generate())


def signed_body(signer, body: str) -> str:
    """A note signed over an arbitrary body, as someone holding the key could make one."""
    blob = base64.b64encode(signer.verifier.key_hash + signer._key.sign(body.encode())).decode()
    return f"{body}\n\u2014 {signer.name} {blob}\n"


@pytest.mark.parametrize("size", [
    "\u0661\u0660\u0660\u0660",   # Arabic-Indic digits: verified as 1000 before
    "\u00b2",                     # a superscript two: a ValueError crashed `log verify` before
    "\uff11",                     # a fullwidth one
    "01", "00", "+1", "-1", " 1", "1 ", "1_000", "0x10", "1e3", "",
    str(MAX_TREE_SIZE + 1),       # does not fit the reference's uint64
])
def test_size_lines_that_are_not_ascii_decimal_are_refused(signer, size):
    note = signed_body(signer, f"example.com/log\n{size}\n{ROOT_B64}\n")
    with pytest.raises(BadLogInput, match="size"):
        parse_and_verify(note, signer.verifier)


def test_largest_and_smallest_sizes_are_accepted(signer):
    for size in (0, 1, MAX_TREE_SIZE):
        note = signed_body(signer, f"example.com/log\n{size}\n{ROOT_B64}\n")
        assert parse_and_verify(note, signer.verifier).size == size


@pytest.mark.parametrize("body", [
    f"example.com/log\n5\n{ROOT_B64}\n\n",             # an empty extension line
    f"example.com/log\n5\n{ROOT_B64}\nextension\n\n",  # a non-empty one, then an empty one
    f"\n5\n{ROOT_B64}\n",                              # empty origin
    f"example.com/log\n5\n{ROOT_B64[:-1]}\n",          # root hash without its padding
    f"example.com/log\n5\n{ROOT_B64[:-2]}F=\n",        # root hash with non-zero padding bits
    f"example.com/log\n5\n{ROOT_B64}==\n",             # extra padding (Python alone took it)
    "example.com/log\n5\nAAAA\n",                      # not 32 bytes
    "example.com/log\n5\n",                            # too few lines
])
def test_malformed_checkpoint_texts_are_refused(signer, body):
    with pytest.raises(BadLogInput):
        parse_and_verify(signed_body(signer, body), signer.verifier)


def test_non_empty_extension_lines_are_accepted_and_kept(signer):
    note = signed_body(signer, f"example.com/log\n5\n{ROOT_B64}\nwitness: a\nmore\n")
    checkpoint = parse_and_verify(note, signer.verifier)
    assert checkpoint.extensions == ("witness: a", "more")
    assert checkpoint.sign(signer) == note


@pytest.mark.parametrize("name", ["", "a b", "a+b", "a\u00a0b", "a\u3000b", "a\u2028b",
                                  "a\u0085b", "a\tb", "a\x1fb"])
def test_signature_lines_with_invalid_key_names_are_refused(signer, name):
    assert not valid_key_name(name)
    note = signed_body(signer, f"example.com/log\n5\n{ROOT_B64}\n")
    good_line = note.split("\n\n")[1]
    bad_line = good_line.replace(f"\u2014 {signer.name} ", f"\u2014 {name} ")
    with pytest.raises(BadLogInput):
        parse_and_verify(note + bad_line, signer.verifier)


def test_key_names_the_reference_accepts():
    for name in ("example.com/log", "PeterNeumann", "\u00e9t\u00e9.example/log", "a/b?c=d"):
        assert valid_key_name(name)


@pytest.mark.parametrize("text", ["bell \x07\n", "nul \x00\n", "cr \r\n", "esc \x1b[31m\n",
                                  "tab\tinside\n", "surrogate \udc80\n"])
def test_the_signer_refuses_what_a_verifier_must_not_open(signer, text):
    with pytest.raises(BadLogInput, match="U\\+"):
        signer.sign(text)


@pytest.mark.parametrize("origin", ["bad\x07origin", "zero\u200bwidth", "line\u2028sep",
                                    "nel\u0085", "private\ue000use", "two\nlines", ""])
def test_the_signer_refuses_unprintable_origins(signer, origin):
    with pytest.raises(BadLogInput, match="origin"):
        Checkpoint(origin, 1, ROOT).sign(signer)


@pytest.mark.parametrize("name", ["zero\u200bwidth", "bell\x07", "with space", "a+b", ""])
def test_signer_key_names_must_be_valid_and_printable(name):
    with pytest.raises(BadLogInput):
        Signer(name, Ed25519PrivateKey.generate())


def test_log_consistency_from_size_zero_is_bad_input(tmp_path):
    from skyguard.tlog.entries import entry
    from skyguard.tlog.hostkey import host_signer
    from skyguard.tlog.store import LogWriter
    with LogWriter(tmp_path / "log", host_signer(tmp_path), segment_entries=256) as w:
        w.append_batch([entry("deny", time=1, n=i) for i in range(5)])
    env = dict(os.environ, PYTHONPATH=str(REPO), SKYGUARD_STATE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "skyguard.cli.main", "log", "consistency", "0",
                          "5"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "empty tree" in out.stderr
