"""Session recording (asciicast v2 transcripts, metadata, hashes in the decision log), tamper
detection, recovery after a dead proxy, replay timing, VM host key pinning and the admin CLI."""

import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import asyncssh
import pytest

from skyguard.admin import keys
from skyguard.admin.connection import VmHostKeys
from skyguard.admin.decisionlog import JsonLinesDecisionLog
from skyguard.admin.proxy import parse_listen
from skyguard.admin.recording import SessionArchive, TerminalFilter, caret, replay, sha256_file, validate_session_id
from skyguard.admin.transcript import PAUSE_AT, RecordingError, Transcript
from skyguard.custody.store import SecretStore
from skyguard.errors import AdminError, BadInput

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def log(tmp_path):
    return JsonLinesDecisionLog(tmp_path / "decisions.jsonl")


@pytest.fixture
def archive(tmp_path, log):
    return SessionArchive(tmp_path / "sessions", log)


def begin(archive, **kw):
    args = dict(operator="alice", key_fingerprint="SHA256:abc", workload="dc1", zone="directory",
                source="192.0.2.7", kind="shell", command=None, width=100, height=30, term="xterm")
    args.update(kw)
    return archive.begin(**args)


def test_recording_is_asciicast_v2_with_hash_in_metadata_and_log(archive, log):
    rec = begin(archive)
    rec.output(b"hello \xe2\x82")  # a euro sign split across two reads
    rec.output(b"\xac world\r\n")
    rec.resize(120, 40)
    rec.input(b"secret-typed-at-no-echo-prompt\n")
    meta = rec.finish("ok", exit_status=0)
    lines = rec.cast_path.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 2 and (header["width"], header["height"]) == (100, 30)
    assert header["env"] == {"TERM": "xterm"}
    events = [json.loads(line) for line in lines[1:]]
    assert "".join(e[2] for e in events if e[1] == "o") == "hello € world\r\n"
    assert [e[2] for e in events if e[1] == "r"] == ["120x40"]
    assert all(isinstance(e[0], float) for e in events)
    assert "secret-typed" not in rec.cast_path.read_text()
    assert meta["bytes_in"] == 31 and meta["bytes_out"] == 17
    assert meta["transcript_sha256"] == sha256_file(rec.cast_path)
    start, end = list(log.entries())
    assert start["type"] == "admin_session_start" and end["type"] == "admin_session_end"
    assert end["session"] == meta["id"] and end["transcript_sha256"] == meta["transcript_sha256"]
    assert end["operator"] == "alice" and end["key_fingerprint"] == "SHA256:abc" and end["exit_status"] == 0
    assert archive.verify(meta["id"], list(log.entries())) == meta["transcript_sha256"]
    assert oct(os.stat(rec.cast_path).st_mode & 0o777) == "0o600"


def test_edited_transcript_is_detected_even_when_its_record_is_edited_too(archive, log):
    rec = begin(archive)
    rec.output(b"rm -rf /important\r\n")
    meta = rec.finish("ok", exit_status=0)
    rec.cast_path.write_text(rec.cast_path.read_text().replace("important", "nothing!!"))
    with pytest.raises(AdminError, match="was modified.*session record says"):
        archive.verify(meta["id"])
    # The attacker also fixes the metadata: the log still disagrees.
    record = json.loads((archive.directory / f"{meta['id']}.json").read_text())
    record["transcript_sha256"] = sha256_file(rec.cast_path)
    (archive.directory / f"{meta['id']}.json").write_text(json.dumps(record))
    archive.verify(meta["id"])  # metadata alone is fooled ...
    with pytest.raises(AdminError, match="the log says"):
        archive.verify(meta["id"], list(log.entries()))  # ... the log is not


def test_session_of_a_dead_proxy_is_closed_complete_up_to_then(archive, log):
    rec = begin(archive, kind="exec", command="long-job")
    rec.output(b"step 1 done\r\n")
    while rec.queued:  # written behind (transcript.py): with the kernel an instant later
        time.sleep(0.001)
    # The proxy is killed here: no finish(). The next proxy's archive recovers it at start.
    restarted = SessionArchive(archive.directory, log)
    recovered = restarted.recover_interrupted()
    assert recovered == [rec.id]
    meta = archive.load(rec.id)
    assert meta["result"] == "interrupted" and meta["end"]
    assert "step 1 done" in rec.cast_path.read_text()
    assert archive.verify(rec.id, list(log.entries())) == meta["transcript_sha256"]
    assert SessionArchive(archive.directory, log).recover_interrupted() == []  # once only


EARLIER_PROCESS = """import os, sys, time
from skyguard.admin.recording import SessionArchive
rec = SessionArchive(sys.argv[1]).begin(operator="alice", key_fingerprint="SHA256:abc", workload="dc1",
                                        zone="directory", source="192.0.2.1:1", kind="exec", command="job")
rec.output(b"first line\\r\\n")
print(rec.id, flush=True)
sys.stdin.readline()
rec.output(b"last line\\r\\n")  # the write a stalled disk held, returning as the process ends
while rec.queued:
    time.sleep(0.001)
os._exit(0)  # never finished: its record is left active
"""


def transcript_lock_waited(path: Path) -> bool:
    """Some process waits for a lock on `path` (a '->' line of /proc/locks for its inode)."""
    inode = f":{os.stat(path).st_ino} "
    return any("->" in line and inode in line for line in Path("/proc/locks").read_text().splitlines())


def test_recovery_waits_for_an_earlier_process_still_writing_a_transcript(tmp_path, log):
    """`skyguard down` returns while the old daemon's process lingers, the kernel holding its last
    write to a stalled disk: the next start's recovery must not hash that transcript before the
    write lands (the hash would not be the file's). It waits for the earlier process to let go of
    the transcript, then closes the record with the hash of the file as it ended up."""
    directory = tmp_path / "sessions"
    earlier = subprocess.Popen([sys.executable, "-c", EARLIER_PROCESS, str(directory)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        session_id = earlier.stdout.readline().strip()
        cast = directory / f"{session_id}.cast"
        while "first line" not in cast.read_text():
            time.sleep(0.01)
        recovered = []
        recovery = threading.Thread(target=lambda: recovered.extend(SessionArchive(directory, log).recover_interrupted()))
        recovery.start()
        while recovery.is_alive() and not transcript_lock_waited(cast):
            time.sleep(0.01)
        assert recovery.is_alive()  # waiting for the earlier process
        earlier.stdin.write("\n")
        earlier.stdin.close()
        earlier.wait(30)
        recovery.join(30)
    finally:
        earlier.kill()
        earlier.wait()
    assert recovered == [session_id]
    meta = SessionArchive(directory).load(session_id)
    assert meta["result"] == "interrupted" and "last line" in cast.read_text()
    assert SessionArchive(directory).verify(session_id, list(log.entries())) == meta["transcript_sha256"]


def test_a_transcript_is_written_behind_in_order_and_hashed_as_written(tmp_path):
    """Events are queued, not written, by whoever records them (the event loop); the
    transcript's thread writes them in order, and the hash is of exactly those bytes."""
    transcript = Transcript(tmp_path / "t.cast")
    events = [os.urandom(n) for n in (1, 10, 4096, 70_000, 3, PAUSE_AT + 1, 5)] * 20
    for event in events:
        transcript.write(event)
    digest = transcript.close()
    written = (tmp_path / "t.cast").read_bytes()
    assert written == b"".join(events) and transcript.written == len(written)
    assert digest == hashlib.sha256(written).hexdigest() and transcript.queued == 0
    with pytest.raises(RecordingError, match="is closed"):
        transcript.write(b"late")
    assert oct(os.stat(tmp_path / "t.cast").st_mode & 0o777) == "0o600"


def test_active_sessions_of_this_proxy_are_not_recovered(archive):
    rec = begin(archive)
    assert archive.recover_interrupted() == []
    rec.finish("ok", 0)


def test_replay_plays_output_with_scaled_and_capped_timing(tmp_path):
    cast = tmp_path / "s.cast"
    cast.write_text("\n".join(json.dumps(x) for x in [
        {"version": 2, "width": 80, "height": 24},
        [0.5, "o", "one "], [1.5, "r", "100x30"], [2.5, "o", "two "], [30.5, "o", "three"]]) + "\n")
    out, sleeps = io.StringIO(), []
    assert replay(cast, out, speed=2, idle_limit=5, sleep=sleeps.append) == 3
    assert out.getvalue() == "one two three"
    assert sleeps == [0.25, 0.5, 0.5, 5]
    with pytest.raises(BadInput):
        replay(cast, out, speed=0, sleep=sleeps.append)
    (tmp_path / "bad.cast").write_text("not json\n")
    with pytest.raises(AdminError, match="not an asciicast v2"):
        replay(tmp_path / "bad.cast", out, sleep=sleeps.append)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "20261130T031500Z-1a2b3c4d/../x", "", "x"])
def test_session_ids_are_validated(bad):
    with pytest.raises(BadInput, match="invalid session id"):
        validate_session_id(bad)


def test_vm_host_keys_are_pinned_on_first_use(tmp_path):
    pins = VmHostKeys(tmp_path / "pins.json")
    first, second = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(2))
    assert pins.check("dc1", first) and pins.check("dc1", first)
    assert not pins.check("dc1", second)
    assert pins.check("dc2", second)


def test_parse_listen():
    assert parse_listen("0.0.0.0:2222") == ("0.0.0.0", 2222)
    assert parse_listen("[::1]:22") == ("::1", 22)
    for bad in ("2222", "host:", "host:99999", "host:ssh"):
        with pytest.raises(BadInput, match="HOST:PORT"):
            parse_listen(bad)


def test_keys_are_generated_once_and_sealed(tmp_path):
    store = SecretStore(tmp_path / "secrets")
    vm1, vm2 = keys.vm_key(store), keys.vm_key(store)
    assert keys.public_line(vm1) == keys.public_line(vm2)
    assert keys.public_line(keys.proxy_host_key(store)) != keys.public_line(vm1)
    private = vm1.export_private_key()
    for path in store.directory.iterdir():
        assert private not in path.read_bytes()


def cli(*args, state, env_state=None):
    """`skyguard admin ARGS` with --state-dir STATE (if given) and $SKYGUARD_STATE_DIR ENV_STATE."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("SKYGUARD_STATE_DIR", None)
    if env_state is not None:
        env["SKYGUARD_STATE_DIR"] = str(env_state)
    option = ["--state-dir", str(state)] if state is not None else []
    return subprocess.run([sys.executable, "-m", "skyguard.cli.main", "admin", *args, *option],
                          capture_output=True, text=True, env=env)


def test_cli_reads_the_state_dir_from_the_option_or_the_environment(tmp_path):
    state, elsewhere = tmp_path / "state", tmp_path / "elsewhere"
    archive = SessionArchive(state / "admin" / "sessions", JsonLinesDecisionLog(state / "admin" / "decisions.jsonl"))
    rec = begin(archive)
    rec.output(b"state-dir-marker\r\n")
    rec.finish("ok", 0)
    for how in ({"state": None, "env_state": state}, {"state": state, "env_state": elsewhere}):
        listed = cli("sessions", "--json", **how)
        assert listed.returncode == 0 and [s["id"] for s in json.loads(listed.stdout)] == [rec.id], listed.stderr
        played = cli("replay", rec.id, "--speed", "100", **how)
        assert played.returncode == 0 and "state-dir-marker" in played.stdout, played.stderr
        assert str(state / "admin" / "decisions.jsonl") in played.stderr  # checked against that state's log
    listed = cli("sessions", "--json", state=None, env_state=elsewhere)
    assert listed.returncode == 0 and json.loads(listed.stdout) == []


def test_cli_vm_key_sessions_and_replay_errors(tmp_path):
    first = cli("vm-key", state=tmp_path)
    assert first.returncode == 0 and first.stdout.startswith("ssh-ed25519 ")
    assert "PRIVATE" not in first.stdout + first.stderr
    assert cli("vm-key", state=tmp_path).stdout == first.stdout
    host = cli("host-key", state=tmp_path)
    assert host.returncode == 0 and "SHA256:" in host.stderr
    listed = cli("sessions", "--json", state=tmp_path)
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
    bad = cli("replay", "../../etc/shadow", state=tmp_path)
    assert bad.returncode == 2 and "invalid session id" in bad.stderr
    missing = cli("replay", "20261130T031500Z-1a2b3c4d", state=tmp_path)
    assert missing.returncode == 2 and "no session" in missing.stderr


def test_cli_sessions_table_and_replay(tmp_path):
    archive = SessionArchive(tmp_path / "admin" / "sessions", JsonLinesDecisionLog(tmp_path / "admin" / "decisions.jsonl"))
    rec = begin(archive)
    rec.output(b"uptime output\r\n")
    rec.finish("ok", 0)
    table = cli("sessions", state=tmp_path)
    assert table.returncode == 0 and rec.id in table.stdout and "alice" in table.stdout
    played = cli("replay", rec.id, "--speed", "100", state=tmp_path)
    assert played.returncode == 0 and "uptime output" in played.stdout
    assert "matches the session record and" in played.stderr


def test_proxy_refuses_a_policy_with_a_bad_operator_key(tmp_path):
    from skyguard.admin.proxy import AdminSshProxy
    from skyguard.policy.model import AdminSsh, Policy, SshOperator

    policy = Policy(name="t", zones={}, networks={}, rules=(),
                    admin_ssh=AdminSsh(operators=(SshOperator("mallory", "ssh-ed25519 not-base64!", ()),)))
    with pytest.raises(BadInput, match="operator 'mallory' is not an OpenSSH public key"):
        AdminSshProxy(policy, SecretStore(tmp_path / "secrets"), tmp_path, JsonLinesDecisionLog(tmp_path / "l"))


def test_proxy_without_admin_ssh_does_not_listen_and_creates_no_keys(tmp_path):
    import asyncio

    from skyguard.admin.proxy import AdminSshProxy
    from skyguard.policy.model import AdminSsh, Policy

    store = SecretStore(tmp_path / "secrets")
    bare = Policy(name="t", zones={}, networks={}, rules=())
    proxy = AdminSshProxy(bare, store, tmp_path, JsonLinesDecisionLog(tmp_path / "l"))

    async def lifecycle():
        assert await proxy.start() is None and proxy.address is None
        with pytest.raises(BadInput, match="must be HOST:PORT"):  # refused whole: nothing changes
            await proxy.set_policy(replace(bare, admin_ssh=AdminSsh(listen="nowhere")))
        assert proxy.policy is bare and proxy.address is None
        await proxy.stop()

    asyncio.run(lifecycle())
    assert store.list() == []


def test_the_daemons_ssh_and_console_proxies_never_close_each_others_live_sessions(tmp_path):
    """One archive for both parts, recovered once: starting the console part, moving its listener,
    or remaking the SSH part (admin.ssh dropped and back) leaves every live session active; only
    the dead daemon's session is closed, "interrupted", at the first start."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from skyguard.daemon import Daemon
    from skyguard.policy.console import AdminConsole
    from skyguard.policy.model import AdminSsh, Policy

    dead = begin(SessionArchive(tmp_path / "admin" / "sessions"))  # a session of an earlier, killed daemon
    daemon = Daemon(tmp_path / "policy.yaml", state_dir=tmp_path)
    ssh = Policy(name="t", zones={}, networks={}, rules=(), admin_ssh=AdminSsh(listen="127.0.0.1:0"))
    both = replace(ssh, admin_console=AdminConsole(listen="127.0.0.1:0"))
    moved = replace(ssh, admin_console=AdminConsole(listen="127.0.0.2:0"))

    async def lifecycle():
        admin = daemon._make_admin(ssh, CollectorRegistry())
        await admin.start()
        shell = begin(admin.archive)
        console = daemon._make_console(both, CollectorRegistry())
        await console.start()
        desktop = begin(console.archive, kind="console")
        await console.set_policy(moved)
        await admin.stop()
        admin = daemon._make_admin(moved, CollectorRegistry())
        await admin.start()
        await admin.stop()
        await console.stop()
        return shell, desktop

    shell, desktop = asyncio.run(lifecycle())
    archive = SessionArchive(tmp_path / "admin" / "sessions")
    assert archive.load(dead.id)["result"] == "interrupted"
    assert archive.load(shell.id)["result"] == archive.load(desktop.id)["result"] == "active"


@pytest.mark.parametrize("events,shown", [
    (["\x1b[38;5;8mgrey\x1b[8mhidden\x1b[1;8;4mx\x1b[0m"], "\x1b[38;5;8mgreyhidden\x1b[1;4mx\x1b[0m"),
    (["a\x1b]52;c;ZWNobwo=", "\x07b"], "a^[]52;c;ZWNobwo=^Gb"),  # split across two events: judged whole
    (["\x1b[?1049h\x1b[2J\x1b[H\x1b[?6n\x1b[>c\x1b[?1;2;0S"], "\x1b[?1049h\x1b[2J\x1b[H^[[?6n^[[>c^[[?1;2;0S"),
    (["\x1bP$qm\x1b\\\x9b6n\x0eso\x1bZ\x1b(0q\x1b(B"], "^[P$qm^[\\M-^[6n^Nso^[Z\x1b(0q\x1b(B"),
    (["\x1b[", "2K\x1b"], "\x1b[2K^["),  # a lone ESC at the end is shown when the replay ends
])
def test_terminal_filter_draws_the_screen_and_nothing_else(events, shown):
    screen = TerminalFilter()
    assert "".join(screen.feed(e) for e in events) + screen.flush() == shown


def test_caret_shows_every_control_character():
    assert caret("a\r\x1b[2K\x07\x9b\x7f\tb\n") == "a^M^[[2K^GM-^[^?\tb\n"
