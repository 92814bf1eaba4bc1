"""`skyguard log ...` run as a real process over a real log, and tools/verify_inclusion.py (the
standalone checker) run on the proofs it prints: valid, tampered, and from another key."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from skyguard.tlog.checkpoint import Checkpoint, Signer
from skyguard.tlog.entries import entry
from skyguard.tlog.hostkey import host_signer
from skyguard.tlog.store import LogWriter, segment_name

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "verify_inclusion.py"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    environment = dict(os.environ, PYTHONPATH=str(REPO), SKYGUARD_STATE_DIR=str(base / "state"),
                       SKYGUARD_RUN_DIR=str(base / "run"), SKYGUARD_PIN_DIR=str(base / "pin"))
    signer = host_signer(base / "state")
    with LogWriter(base / "state" / "log", signer, checkpoint_every=100,
                   segment_entries=256) as w:
        w.append_batch([entry("flow_start", time=1_700_000_000_000_000_000 + i, n=i,
                              zone="auth") for i in range(300)])
        w.append_batch([entry("deny", time=1_800_000_000_000_000_000, n=i, reason="no_rule")
                        for i in range(5)])
    return environment, base, signer


def run(env, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "skyguard.cli.main", "log", *args], env=env[0],
                          capture_output=True, text=True, input=stdin)


def test_verify_ok_and_json(env):
    out = run(env, "verify")
    assert out.returncode == 0, out.stderr
    assert "ok: 305 entries" in out.stdout
    report = json.loads(run(env, "verify", "--json").stdout)
    assert report["ok"] and report["size"] == 305 and report["first_bad_index"] is None


def test_verify_with_a_saved_checkpoint_and_a_fork(env, tmp_path):
    _, base, signer = env
    saved = tmp_path / "saved.note"
    saved.write_text(run(env, "checkpoint").stdout)
    assert run(env, "verify", "--checkpoint", str(saved)).returncode == 0
    # A witness that saw size 300 of this log, then a different size-305 history signed by the
    # same key (a fork): the fork is somewhere after 300.
    from skyguard.tlog.store import LogReader
    seen_300 = next(n for n in LogReader(base / "state" / "log").checkpoint_notes()
                    if n.split("\n")[1] == "300")
    fork_note = Checkpoint(signer.name, 305, b"\x01" * 32).sign(signer)
    forked = tmp_path / "fork.note"
    forked.write_text(seen_300 + fork_note)
    out = run(env, "verify", "--checkpoint", str(forked))
    assert out.returncode == 1
    assert "first bad index 300" in out.stderr
    report = json.loads(run(env, "verify", "--checkpoint", str(forked), "--json").stdout)
    assert report["first_bad_index"] == 300 and not report["ok"]


def test_verify_fails_with_index_after_an_edit(env, tmp_path):
    _, base, _ = env
    import shutil
    copy = tmp_path / "log"
    shutil.copytree(base / "state" / "log", copy)
    seg = copy / segment_name(256)
    data = bytearray(seg.read_bytes())
    data[data.index(b'"n":4,"reason"') + 4] = ord("7")
    seg.write_bytes(bytes(data))
    out = run(env, "verify", "--log-dir", str(copy))
    assert out.returncode == 1
    assert "first bad index 304" in out.stderr


def test_bad_checkpoint_file_is_bad_input(env, tmp_path):
    junk = tmp_path / "junk.note"
    junk.write_text("hello\n")
    out = run(env, "verify", "--checkpoint", str(junk))
    assert out.returncode == 2 and "note" in out.stderr
    out = run(env, "verify", "--checkpoint", str(tmp_path / "missing.note"))
    assert out.returncode == 2


def test_checkpoint_from_another_key_fails(env, tmp_path):
    _, _, signer = env
    other = Signer(signer.name, Ed25519PrivateKey.generate())
    note = tmp_path / "other.note"
    note.write_text(Checkpoint(signer.name, 10, b"\x00" * 32).sign(other))
    out = run(env, "verify", "--checkpoint", str(note))
    assert out.returncode == 1 and "not signed by key" in out.stderr


def test_show_filters_and_json(env):
    out = run(env, "show", "--type", "deny", "--json")
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["index"] for line in lines] == [300, 301, 302, 303, 304]
    assert all(line["entry"]["type"] == "deny" for line in lines)
    out = run(env, "show", "--since", "2027-01-01T00:00:00Z", "--limit", "2")
    assert len(out.stdout.splitlines()) == 2 and "deny" in out.stdout
    assert run(env, "show", "--since", "yesterday-ish").returncode == 2


def test_show_and_tail_print_one_line_per_entry_whatever_its_fields_hold(env, tmp_path):
    # Entry fields carry what clients chose (an SSH client's forward destination, a header, a
    # name). Printed raw, a newline forged whole entries in `log show`, and escape sequences
    # moved the cursor and erased the entries before it on the operator's terminal.
    _, _, signer = env
    log_dir = tmp_path / "hostile"
    forged = "x\n       7  2026-01-01T00:00:00.000000Z  policy_load     name=approved"
    with LogWriter(log_dir, signer) as writer:
        writer.append(entry("deny", time=1, reason="no_rule"))
        writer.append(entry("admin_request_refused", time=2, request="port_forward",
                            dest=forged + ":22", operator="\x1b[1A\x1b[2K\r\x9b2K\u202e",
                            nested={"k": "a\nb"}))
    for command in (("show",), ("tail", "-n", "5")):
        out = run(env, *command, "--log-dir", str(log_dir))
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert len(lines) == 2 and "deny" in lines[0] and "admin_request_refused" in lines[1]
        assert not any(c in out.stdout for c in "\x1b\r\x9b\u202e")
        assert "\\n" in lines[1] and "\\x1b" in lines[1]   # shown escaped, not dropped


def test_show_prints_fields_as_their_json_says_them(env, tmp_path):
    # A missing value printed as Python's `None`, a flag as `True` and an object as a Python dict.
    _, _, signer = env
    log_dir = tmp_path / "values"
    with LogWriter(log_dir, signer) as writer:
        writer.append(entry("content_blocked", time=1, mime=None, tls=True, where={"port": 443}))
    out = run(env, "show", "--log-dir", str(log_dir))
    assert out.returncode == 0, out.stderr
    assert 'mime=null tls=true where={"port":443}' in out.stdout


def test_tail_prints_the_last_entries(env):
    out = run(env, "tail", "-n", "3", "--json")
    assert [json.loads(line)["index"] for line in out.stdout.splitlines()] == [302, 303, 304]


def test_tail_follow_prints_new_entries(env, tmp_path):
    _, base, signer = env
    log_dir = tmp_path / "followed"
    writer = LogWriter(log_dir, signer)
    writer.append(entry("daemon_start", time=1))
    proc = subprocess.Popen([sys.executable, "-m", "skyguard.cli.main", "log", "tail", "-n", "1",
                             "--follow", "--json", "--log-dir", str(log_dir)], env=env[0],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(proc.stdout.readline())["index"] == 0
        writer.append(entry("policy_load", time=2, name="keysystems"))
        assert json.loads(proc.stdout.readline())["entry"]["type"] == "policy_load"
    finally:
        proc.kill()
        proc.wait()
        writer.close()


def test_prove_and_the_standalone_checker(env, tmp_path):
    out = run(env, "prove", "123", "--json")
    assert out.returncode == 0, out.stderr
    proof = json.loads(out.stdout)
    assert (proof["index"], proof["size"]) == (123, 305)
    path = tmp_path / "proof.json"
    path.write_text(out.stdout)
    vkey = run(env, "checkpoint", "--public-key").stdout.strip()
    check = subprocess.run([sys.executable, str(TOOL), str(path), "--key", vkey],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "signature checked" in check.stdout

    def tampered(**changes):
        bad = dict(proof, **changes)
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(bad))
        return subprocess.run([sys.executable, str(TOOL), str(p), "--key", vkey],
                              capture_output=True, text=True)

    assert tampered(entry=proof["entry"].replace('"n":123', '"n":124')).returncode == 1
    assert tampered(index=124).returncode == 1
    assert tampered(hashes=proof["hashes"][:-1]).returncode == 1
    assert tampered(hashes=proof["hashes"] + [proof["hashes"][0]]).returncode == 1
    assert tampered(checkpoint=proof["checkpoint"].replace("\n305\n", "\n306\n")).returncode == 1
    other = Signer("x", Ed25519PrivateKey.generate()).verifier.vkey()
    wrong_key = subprocess.run([sys.executable, str(TOOL), str(path), "--key", other],
                               capture_output=True, text=True)
    assert wrong_key.returncode == 1


def test_standalone_checker_imports_no_skyguard():
    source = TOOL.read_text()
    assert "skyguard" not in "".join(line for line in source.splitlines() if line.startswith(("import", "from")))


def test_prove_outside_the_tree_is_bad_input(env):
    out = run(env, "prove", "305")
    assert out.returncode == 2 and "0..304" in out.stderr
    assert run(env, "prove", "-1").returncode == 2


def test_consistency(env):
    out = run(env, "consistency", "100", "305", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["old_size"] == 100
    assert run(env, "consistency", "300", "100").returncode == 2
    assert run(env, "consistency", "1", "306").returncode == 2


def test_checkpoint_and_public_key(env):
    _, _, signer = env
    note = run(env, "checkpoint").stdout
    assert note.splitlines()[:2] == [signer.name, "305"]
    assert run(env, "checkpoint", "--public-key").stdout.strip() == signer.verifier.vkey()


def test_missing_log_is_a_runtime_error(env, tmp_path):
    out = run(env, "verify", "--log-dir", str(tmp_path / "none"))
    assert out.returncode == 1 and "no signed log" in out.stderr


# --- one way to name the state (issue 14 item 6) ----------------------------------------------

@pytest.fixture(scope="module")
def two_states(tmp_path_factory):
    """A log in state dir A; the environment names state dir B, which has another host key."""
    base = tmp_path_factory.mktemp("states")
    a, b = base / "a", base / "b"
    signer = host_signer(a)
    host_signer(b)
    with LogWriter(a / "log", signer, segment_entries=256) as w:
        w.append_batch([entry("deny", time=1, n=i) for i in range(20)])
    environment = dict(os.environ, PYTHONPATH=str(REPO), SKYGUARD_STATE_DIR=str(b),
                       SKYGUARD_RUN_DIR=str(base / "run"), SKYGUARD_PIN_DIR=str(base / "pin"))
    return environment, a, b, signer


def test_log_dir_alone_takes_the_key_beside_it(two_states):
    environment, a, _, _ = two_states
    out = run((environment,), "verify", "--log-dir", str(a / "log"))
    assert out.returncode == 0, out.stderr
    assert f"host key {a / 'host-ed25519.pem'}" in out.stdout


@pytest.mark.parametrize("args", [["verify"], ["show", "--limit", "1"], ["tail", "-n", "1"],
                                  ["prove", "3"], ["consistency", "1", "20"], ["checkpoint"],
                                  ["checkpoint", "--public-key"]])
def test_every_log_command_takes_state_dir(two_states, args):
    environment, a, _, signer = two_states
    out = run((environment,), *args, "--state-dir", str(a))
    assert out.returncode == 0, out.stderr
    if args == ["checkpoint", "--public-key"]:
        assert out.stdout.strip() == signer.verifier.vkey()


def test_state_dir_from_the_environment(two_states):
    environment, a, _, _ = two_states
    out = run((dict(environment, SKYGUARD_STATE_DIR=str(a)),), "verify")
    assert out.returncode == 0, out.stderr
    assert "ok: 20 entries proven" in out.stdout


def test_a_key_error_names_the_file_it_read(two_states):
    environment, a, b, _ = two_states
    out = run((environment,), "verify", "--log-dir", str(a / "log"), "--state-dir", str(b))
    assert out.returncode == 1
    assert "not signed by key" in out.stderr and str(b / "host-ed25519.pem") in out.stderr
    out = run((environment,), "prove", "1", "--log-dir", str(a / "log"), "--state-dir", str(b))
    assert out.returncode == 1 and str(b / "host-ed25519.pem") in out.stderr


def test_verify_never_falls_back_to_the_key_inside_the_log(two_states, tmp_path):
    environment, a, _, _ = two_states
    import shutil
    shutil.copytree(a / "log", tmp_path / "keyless" / "log")
    out = run((environment,), "verify", "--state-dir", str(tmp_path / "keyless"))
    assert out.returncode == 1
    assert f"no host key at {tmp_path / 'keyless' / 'host-ed25519.pem'}" in out.stderr
    assert "not trusted" in out.stderr
    vkey = run((environment,), "checkpoint", "--public-key", "--state-dir", str(a)).stdout.strip()
    out = run((environment,), "verify", "--state-dir", str(tmp_path / "keyless"), "--key", vkey)
    assert out.returncode == 0, out.stderr


def test_show_escapes_what_a_terminal_would_act_on(tmp_path):
    # Fields can hold what a VM or an operator sent (an SFTP path, a header): printed raw, an
    # escape sequence could erase or rewrite the entry on the auditor's terminal.
    state = tmp_path / "state"
    environment = dict(os.environ, PYTHONPATH=str(REPO), SKYGUARD_STATE_DIR=str(state),
                       SKYGUARD_RUN_DIR=str(tmp_path / "run"), SKYGUARD_PIN_DIR=str(tmp_path / "pin"))
    hidden = "/etc/shadow\x1b[2K\r\x1b[1A\u202eupload ok\u0085\x9b2J"
    with LogWriter(state / "log", host_signer(state)) as w:
        w.append(entry("admin_file_transfer", time=1_800_000_000_000_000_000, op="write", path=hidden,
                       paths=[hidden]))
    for command in (["show"], ["tail"]):
        out = run((environment,), *command)
        assert out.returncode == 0, out.stderr
        line = out.stdout.strip()
        assert line.count("\n") == 0 and line.isprintable(), repr(line)
        assert "path=/etc/shadow\\x1b[2K\\r\\x1b[1A\\u202eupload ok" in line, line


# --- a damaged segment file: one line naming it, never a traceback ----------------------------

def _cut_after_records(path: Path, keep: int) -> None:
    """Keep the first `keep` whole records of a segment: a cut no torn write would leave."""
    from skyguard.tlog.records import HEADER, HEADER_SIZE
    data, off = path.read_bytes(), 0
    for _ in range(keep):
        off += HEADER_SIZE + HEADER.unpack_from(data, off)[1]
    path.write_bytes(data[:off])


def _replace_with_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _replace_with_dangling_link(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.parent / "gone")


SEGMENT_DAMAGE = [
    # (what, segment's first index, damage, words the error must hold, first bad index)
    ("sealed segment is a directory", 0, _replace_with_directory, "is a directory", 0),
    ("last segment is a directory", 256, _replace_with_directory, "is a directory", 256),
    ("last segment is a FIFO", 256, _replace_with_fifo, "not a regular file", 256),
    ("last segment is a dangling symlink", 256, _replace_with_dangling_link, "cannot be read", 256),
    ("sealed segment truncated mid-record", 0,
     lambda p: p.write_bytes(p.read_bytes()[:5000]), "incomplete", None),
    ("sealed segment cut after 100 whole records", 0,
     lambda p: _cut_after_records(p, 100), "100 of its 256 entries", 100),
    ("sealed segment emptied", 0, lambda p: p.write_bytes(b""), "0 of its 256 entries", 0),
    ("last segment is garbage", 256, lambda p: p.write_bytes(os.urandom(p.stat().st_size)),
     "", 256),
]


@pytest.mark.parametrize("what,first,damage,words,bad_index", SEGMENT_DAMAGE,
                         ids=[d[0] for d in SEGMENT_DAMAGE])
def test_verify_names_a_damaged_segment_in_one_line(env, tmp_path, what, first, damage, words,
                                                    bad_index):
    # On main a directory, FIFO or dangling link in place of a segment ended `log verify` in a
    # Python traceback (a FIFO: never ended), and a sealed segment cut short at a record boundary
    # was blamed on the entries of the next segment.
    _, base, _ = env
    import shutil
    copy = tmp_path / "log"
    shutil.copytree(base / "state" / "log", copy)
    damage(copy / segment_name(first))
    for json_flag in ((), ("--json",)):
        out = subprocess.run([sys.executable, "-m", "skyguard.cli.main", "log", "verify",
                              "--log-dir", str(copy), *json_flag], env=env[0], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 1, (out.stdout, out.stderr)
        assert "Traceback" not in out.stderr, out.stderr
        if json_flag:
            report = json.loads(out.stdout)
            assert not report["ok"] and segment_name(first) in report["problem"]
            assert words in report["problem"]
            if bad_index is not None:
                assert report["first_bad_index"] == bad_index
            continue
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and out.stderr.strip().splitlines()[-1] == errors[0], out.stderr
        assert "log verification FAILED" in errors[0] and segment_name(first) in errors[0]
        assert words in errors[0], errors[0]
        if bad_index is not None:
            assert f"first bad index {bad_index}:" in errors[0]


@pytest.mark.parametrize("name,damage", [
    ("log.json", _replace_with_directory), ("checkpoints.log", _replace_with_directory),
    ("head.bin", _replace_with_directory), ("head.bin", _replace_with_fifo),
    ("leaves.bin", _replace_with_directory), ("nodes8.bin", _replace_with_fifo)])
def test_verify_names_any_other_unreadable_file_of_the_log_in_one_line(env, tmp_path, name, damage):
    _, base, _ = env
    import shutil
    copy = tmp_path / "log"
    shutil.copytree(base / "state" / "log", copy)
    damage(copy / name)
    out = subprocess.run([sys.executable, "-m", "skyguard.cli.main", "log", "verify",
                          "--log-dir", str(copy)], env=env[0], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr
    assert out.stderr.startswith(f"error: {copy / name} cannot be read"), out.stderr


@pytest.mark.parametrize("what,first,damage,words,bad_index", SEGMENT_DAMAGE,
                         ids=[d[0] for d in SEGMENT_DAMAGE])
@pytest.mark.parametrize("command", ["show", "tail", "prove"])
def test_readers_name_a_damaged_segment_in_one_line(env, tmp_path, command, what, first, damage,
                                                    words, bad_index):
    # On main `log show`, `log tail` and `log prove` read segments with no check: a directory or
    # dangling link ended in a traceback, a FIFO never ended, a sealed segment cut at a record
    # boundary was skipped in silence, and a garbage last segment hid the acknowledged entries.
    _, base, _ = env
    import shutil
    copy = tmp_path / "log"
    shutil.copytree(base / "state" / "log", copy)
    damage(copy / segment_name(first))
    args = {"show": ["show"], "tail": ["tail", "-n", "400"],
            "prove": ["prove", str(min(first + 255, 304))]}[command]
    for json_flag in ((), ("--json",)):
        out = subprocess.run([sys.executable, "-m", "skyguard.cli.main", "log", *args,
                              "--log-dir", str(copy), *json_flag], env=env[0],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, (out.stdout[-500:], out.stderr)
        assert "Traceback" not in out.stderr, out.stderr
        assert out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr
        assert out.stderr.startswith("error: ") and segment_name(first) in out.stderr, out.stderr
        assert words in out.stderr, out.stderr
