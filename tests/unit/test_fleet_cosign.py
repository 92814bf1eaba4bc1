"""Cosignatures (C2SP tlog-cosignature, cosignature/v1) and the witness: the exact bytes the spec
defines, checked by hand; a witness that cosigns only consistent growth, remembers it across
restarts, and refuses (Tamper) a fork, an inconsistent tree and a changed key, and a smaller
tree (Stale, not tamper); `log verify --witnesses N` counts distinct trusted witnesses; the log's unique origin."""

import base64
import hashlib
import struct

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from skyguard.cli.main import cli
from skyguard.tlog import LogWriter, entry
from skyguard.tlog.checkpoint import Checkpoint, Signer
from skyguard.tlog.cosign import (
    COSIGNED_DIR,
    PEERS_FILE,
    Cosigner,
    CosignerVerifier,
    Stale,
    Tamper,
    Unproven,
    Witness,
    witnessed_by,
    write_cosigned,
)
from skyguard.tlog.errors import VerificationError
from skyguard.tlog.hashing import hash_leaf
from skyguard.tlog.hostkey import default_key_name, host_signer
from skyguard.tlog.tree import MemorySource, consistency_proof, range_root


def _tree(n, salt=b""):
    leaves = [hash_leaf(b"e%d" % i + salt) for i in range(n)]
    return MemorySource(leaves)


def _note(signer, source, size):
    return Checkpoint(signer.name, size, range_root(source, 0, size)).sign(signer)


@pytest.fixture
def log_signer():
    return Signer("h1-0011223344556677.skyguard/log", Ed25519PrivateKey.generate())


@pytest.fixture
def cosigner():
    return Cosigner("w1.skyguard/witness", Ed25519PrivateKey.generate())


def test_cosignature_bytes_are_the_spec(cosigner, log_signer):
    note = _note(log_signer, _tree(5), 5)
    body = note.split("\n\n")[0] + "\n"
    line = cosigner.line(body, timestamp=1679315147)
    name, blob = line[2:].rstrip("\n").split(" ")
    raw = base64.b64decode(blob)
    public = cosigner.verifier.public_key
    assert line.startswith("\u2014 w1.skyguard/witness ")
    assert raw[:4] == hashlib.sha256(b"w1.skyguard/witness\n\x04" + public).digest()[:4]
    assert struct.unpack(">Q", raw[4:12])[0] == 1679315147
    message = b"cosignature/v1\ntime 1679315147\n" + body.encode()
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    Ed25519PublicKey.from_public_bytes(public).verify(raw[12:], message)   # raises if not
    vkey = cosigner.verifier.vkey()
    assert base64.b64decode(vkey.split("+", 2)[2])[0] == 0x04
    assert CosignerVerifier.from_vkey(vkey).verify(note + line)[1] == 1679315147


def test_cosignature_of_an_edited_checkpoint_fails(cosigner, log_signer):
    note = _note(log_signer, _tree(5), 5)
    cosigned = note + cosigner.line(note.split("\n\n")[0] + "\n")
    with pytest.raises(VerificationError):
        cosigner.verifier.verify(cosigned.replace("\n5\n", "\n6\n", 1))


def test_witness_cosigns_consistent_growth_and_remembers(tmp_path, cosigner, log_signer):
    source = _tree(40)
    witness = Witness(tmp_path / "w", cosigner)
    vkey = log_signer.verifier.vkey()
    cosigned, cp = witness.cosign(_note(log_signer, source, 10), vkey, None)
    assert cp.size == 10 and cosigner.verifier.verify(cosigned)[0].size == 10
    witness.cosign(_note(log_signer, source, 25), vkey, consistency_proof(source, 10, 25))
    again = Witness(tmp_path / "w", cosigner)   # a restart: the state is on disk
    assert again.state(log_signer.name).size == 25
    # An older checkpoint the log really signed (replayed by whoever relays them) is stale:
    # refused, but no evidence of a rollback, and the state does not move.
    with pytest.raises(Stale, match="smaller"):
        again.cosign(_note(log_signer, source, 20), vkey, None)
    assert again.state(log_signer.name).size == 25


def test_witness_refuses_a_fork_and_a_rewrite(tmp_path, cosigner, log_signer):
    # A log really cut that goes on signing: another root at a size already cosigned, or a
    # larger size whose proof from the cosigned size fails. Both stay Tamper.
    honest, forged = _tree(40), _tree(40, salt=b"forged")
    witness = Witness(tmp_path / "w", cosigner)
    vkey = log_signer.verifier.vkey()
    witness.cosign(_note(log_signer, honest, 10), vkey, None)
    with pytest.raises(Tamper, match="fork"):
        witness.cosign(_note(log_signer, forged, 10), vkey, None)
    # The rewritten log signs its own new tree and offers a proof computed over it.
    with pytest.raises(Tamper, match="not consistent"):
        witness.cosign(_note(log_signer, forged, 30), vkey, consistency_proof(forged, 10, 30))
    # The same failing proof, not signed by the log's key (whoever relays proofs could have
    # changed it): no evidence, refused all the same.
    with pytest.raises(Unproven, match="not consistent"):
        witness.cosign(_note(log_signer, forged, 30), vkey, consistency_proof(forged, 10, 30), proof_attested=False)
    assert witness.state(log_signer.name).size == 10   # a refusal changes nothing


def test_published_proofs_are_attested_by_the_log_key_only_as_signed(log_signer):
    from skyguard.fleet.witnessing import proofs_attested, sign_proofs

    source = _tree(30)
    checkpoint = Checkpoint(log_signer.name, 30, range_root(source, 0, 30))
    proofs = {str(old): [base64.b64encode(h).decode() for h in consistency_proof(source, old, 30)] for old in (7, 20)}
    note = sign_proofs(log_signer, checkpoint, proofs)
    assert proofs_attested(note, log_signer.verifier, checkpoint, proofs)
    changed = dict(proofs, **{"7": proofs["20"]})
    other = Signer(log_signer.name, Ed25519PrivateKey.generate())
    assert not proofs_attested(note, log_signer.verifier, checkpoint, changed)
    assert not proofs_attested(sign_proofs(other, checkpoint, proofs), log_signer.verifier, checkpoint, proofs)
    assert not proofs_attested(None, log_signer.verifier, checkpoint, proofs)
    assert not proofs_attested(note, log_signer.verifier, Checkpoint(log_signer.name, 31, checkpoint.hash), proofs)


def test_witness_refuses_another_key_for_a_known_origin(tmp_path, cosigner, log_signer):
    source = _tree(8)
    witness = Witness(tmp_path / "w", cosigner)
    witness.cosign(_note(log_signer, source, 4), log_signer.verifier.vkey(), None)
    impostor = Signer(log_signer.name, Ed25519PrivateKey.generate())
    with pytest.raises(Tamper, match="key"):
        witness.cosign(_note(impostor, source, 8), impostor.verifier.vkey(), consistency_proof(source, 4, 8))


def test_witnessed_by_counts_distinct_trusted_witnesses(cosigner, log_signer):
    other = Cosigner("w2.skyguard/witness", Ed25519PrivateKey.generate())
    stranger = Cosigner("w3.skyguard/witness", Ed25519PrivateKey.generate())
    source = _tree(9)
    notes = []
    for c, size in ((cosigner, 3), (cosigner, 9), (other, 9), (stranger, 9)):
        note = _note(log_signer, source, size)
        notes.append(note + c.line(note.split("\n\n")[0] + "\n"))
    seen = witnessed_by(notes, log_signer.name, log_signer.verifier, [cosigner.verifier, other.verifier])
    assert seen == {"w1.skyguard/witness": 9, "w2.skyguard/witness": 9}


def _cosign_log(state, cosigners):
    """A real log in `state`, and each cosigner's cosignature of its latest checkpoint kept where
    the fleet agent keeps them, their keys pinned as peers by an operator (`fleet trust`)."""
    import json

    signer = host_signer(state)
    with LogWriter(state / "log", signer) as writer:
        for i in range(20):
            writer.append(entry("test", i=i))
        note = writer.latest_note()
    peers = {}
    for c in cosigners:
        write_cosigned(state / COSIGNED_DIR, c.name, note + c.line(note.split("\n\n")[0] + "\n"))
        peers[c.name] = {"witness_vkey": c.verifier.vkey(), "pinned": "operator"}
    (state / PEERS_FILE).write_text(json.dumps(peers))
    return signer


def test_log_verify_witnesses_counts_cosignatures(tmp_path, cosigner):
    state = tmp_path / "state"
    _cosign_log(state, [cosigner, Cosigner("w2.skyguard/witness", Ed25519PrivateKey.generate())])
    runner = CliRunner()
    ok = runner.invoke(cli, ["log", "verify", "--state-dir", str(state), "--witnesses", "2"])
    assert ok.exit_code == 0, ok.output
    assert "cosigned by 2 witnesses" in ok.output
    three = runner.invoke(cli, ["log", "verify", "--state-dir", str(state), "--witnesses", "3"])
    assert three.exit_code == 1 and "3 witnesses required" in str(three.exception or three.output)
    # Only the keys given are trusted when given.
    one = runner.invoke(cli, ["log", "verify", "--state-dir", str(state), "--witnesses", "2",
                              "--witness-key", cosigner.verifier.vkey()])
    assert one.exit_code == 1
    # Keys the agent pinned at first sight (its opt-in) are no operator's: they do not count.
    import json

    peers = json.loads((state / PEERS_FILE).read_text())
    (state / PEERS_FILE).write_text(json.dumps({n: dict(pin, pinned="first sight") for n, pin in peers.items()}))
    assert runner.invoke(cli, ["log", "verify", "--state-dir", str(state), "--witnesses", "1"]).exit_code == 1


def test_default_origin_is_unique_per_state_dir_and_configurable(tmp_path, monkeypatch):
    monkeypatch.delenv("SKYGUARD_LOG_ORIGIN", raising=False)
    a, b = default_key_name(tmp_path / "a"), default_key_name(tmp_path / "b")
    assert a != b and a.endswith(".skyguard/log")
    assert default_key_name(tmp_path / "a") == a            # kept in the state dir
    assert host_signer(tmp_path / "a").name == a
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "log-origin").write_text("rack7-host3.example/log\n")
    assert default_key_name(tmp_path / "c") == "rack7-host3.example/log"
    monkeypatch.setenv("SKYGUARD_LOG_ORIGIN", "from-env.example/log")
    assert default_key_name(tmp_path / "a") == "from-env.example/log"
    monkeypatch.setenv("SKYGUARD_LOG_ORIGIN", "bad origin")
    with pytest.raises(Exception, match="no spaces"):
        default_key_name(tmp_path / "a")
