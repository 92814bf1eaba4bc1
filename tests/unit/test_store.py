"""The sealed secret store and `skyguard secret`: encryption at rest, file modes, tamper
detection, atomic replacement, and that a value never shows in a repr, an error or CLI output."""

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from skyguard.custody.store import Secret, SecretStore
from skyguard.errors import BadInput, CredentialError

VALUE = b"ghp_Sup3rS3cretTok3nValue_1234567890"


@pytest.fixture
def store(tmp_path):
    return SecretStore(tmp_path / "state" / "secrets")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_round_trip_and_metadata(store):
    meta = store.set("github", VALUE, {"purpose": "api"})
    assert meta["size"] == len(VALUE)
    value = store.get("github")
    assert value == VALUE and value.reveal() == VALUE and type(value.reveal()) is bytes
    [listed] = store.list()
    assert listed["name"] == "github" and listed["size"] == len(VALUE)
    assert listed["metadata"] == {"purpose": "api"}
    assert VALUE.decode() not in json.dumps(store.list())


def test_files_are_private_and_ciphertext_hides_the_value(store):
    store.set("github", VALUE)
    assert mode(store.directory) == 0o700
    assert mode(store.key_file) == 0o600
    sealed = store.directory / "github.sealed"
    assert mode(sealed) == 0o600
    raw = sealed.read_bytes()
    assert VALUE not in raw
    import base64
    assert base64.b64encode(VALUE) not in raw and VALUE.hex().encode() not in raw


def test_update_keeps_created_and_changes_value(store):
    first = store.set("github", b"one")
    second = store.set("github", b"two")
    assert second["created"] == first["created"]
    assert store.get("github") == b"two"
    assert [p.name for p in store.directory.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("field", ["ciphertext", "nonce", "size", "name"])
def test_tampered_file_is_a_clear_error(store, field):
    store.set("github", VALUE)
    path = store.directory / "github.sealed"
    record = json.loads(path.read_text())
    if field == "ciphertext":
        import base64
        data = bytearray(base64.b64decode(record["ciphertext"]))
        data[0] ^= 1
        record["ciphertext"] = base64.b64encode(bytes(data)).decode()
    elif field == "nonce":
        record["nonce"] = "AAAAAAAAAAAAAAAA"
    elif field == "size":
        record["size"] += 1
    else:
        record["name"] = "other"
    path.write_text(json.dumps(record))
    with pytest.raises(CredentialError) as err:
        store.get("github")
    assert "failed authentication" in str(err.value) and "github" in str(err.value)
    assert VALUE.decode() not in str(err.value)


def test_secret_moved_to_another_name_fails(store):
    store.set("github", VALUE)
    store.set("other", b"x")
    os.replace(store.directory / "github.sealed", store.directory / "other.sealed")
    with pytest.raises(CredentialError, match="failed authentication"):
        store.get("other")


def test_another_sealing_key_cannot_open(store, tmp_path):
    store.set("github", VALUE)
    store.key_file.write_bytes(os.urandom(32))
    with pytest.raises(CredentialError, match="sealing key"):
        SecretStore(store.directory).get("github")


@pytest.mark.parametrize("key_name", ["sealing.key", "sealing.key.tpm"])
def test_a_fifo_in_place_of_the_key_is_refused_not_waited_on(store, key_name):
    store.set("github", VALUE)
    key_file = store.directory / key_name
    key_file.unlink(missing_ok=True)
    os.mkfifo(key_file, 0o600)
    outcome: list = []

    def read():
        try:
            SecretStore(store.directory).get("github")
        except CredentialError as e:
            outcome.append(str(e))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)  # a bound against the hang, not a timing
    if reader.is_alive():
        os.close(os.open(key_file, os.O_WRONLY | os.O_NONBLOCK))  # let the blocked reader go
        pytest.fail(f"reading the store waited on a FIFO at {key_file}")
    assert outcome and str(key_file) in outcome[0] and "not a regular file" in outcome[0], outcome


def test_world_readable_key_is_refused(store):
    store.set("github", VALUE)
    os.chmod(store.key_file, 0o644)
    with pytest.raises(CredentialError, match="chmod 600"):
        SecretStore(store.directory).get("github")


def test_value_never_in_repr_str_or_format(store):
    store.set("github", VALUE)
    value = store.get("github")
    assert isinstance(value, Secret) and isinstance(value, bytes)
    for shown in (repr(value), str(value), f"{value}", "%s" % (value,), repr([value]), repr({"k": value})):  # noqa: UP031 (%-formatting is a case)
        assert VALUE.decode() not in shown
    assert repr(value) == "Secret(name='github', ****)"
    assert VALUE.decode() not in repr(store)


@pytest.mark.parametrize("name", ["", "../etc", ".hidden", "UPPER", "a/b", "x" * 65, "sealing.key", "a b", "github\n"])
def test_bad_names_are_refused(store, name):
    with pytest.raises(BadInput, match="invalid secret name"):
        store.set(name, b"v")


def test_empty_and_missing(store):
    with pytest.raises(BadInput, match="empty"):
        store.set("github", b"")
    with pytest.raises(CredentialError, match="no secret named 'nope'"):
        store.get("nope")
    with pytest.raises(CredentialError, match="no secret named 'nope'"):
        store.remove("nope")


def test_remove_and_get_or_create(store):
    calls = []
    made = store.get_or_create("vm-key", lambda: calls.append(1) or b"generated")
    again = store.get_or_create("vm-key", lambda: calls.append(1) or b"other")
    assert made == again == b"generated" and calls == [1]
    store.remove("vm-key")
    assert store.list() == []


def run_cli(args, state_dir, stdin=b""):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.run([sys.executable, "-m", "skyguard.cli.main", "secret", *args,
                           "--state-dir", str(state_dir)], input=stdin, capture_output=True, env=env)


def test_cli_set_list_rm_never_echo(tmp_path):
    out = run_cli(["set", "github"], tmp_path, stdin=VALUE + b"\n")
    assert out.returncode == 0, out.stderr
    assert VALUE not in out.stdout + out.stderr
    assert SecretStore(tmp_path / "secrets").get("github") == VALUE  # trailing newline dropped
    listed = run_cli(["list", "--json"], tmp_path)
    assert listed.returncode == 0 and VALUE not in listed.stdout
    assert [e["name"] for e in json.loads(listed.stdout)] == ["github"]
    value_file = tmp_path / "key.pem"
    value_file.write_bytes(b"-----BEGIN KEY-----\nabc\n")
    assert run_cli(["set", "web1", "--file", str(value_file)], tmp_path).returncode == 0
    assert SecretStore(tmp_path / "secrets").get("web1") == value_file.read_bytes()
    assert run_cli(["rm", "github"], tmp_path).returncode == 0
    gone = run_cli(["rm", "github"], tmp_path)
    assert gone.returncode == 1 and b"no secret named 'github'" in gone.stderr


def test_cli_refuses_empty_value(tmp_path):
    out = run_cli(["set", "github"], tmp_path, stdin=b"\n")
    assert out.returncode == 2 and b"empty" in out.stderr
