"""SSH into VMs only through skyguard, end to end in the lab: the daemon runs the access proxy
for the policy's admin.ssh section, operators use the real OpenSSH client from outside (the lab's
internet namespace), a real sshd runs in the dc1 lab VM, and the datapath lets only this host's
proxy reach tcp/22 of a VM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_support import RunningDaemon, wait_for

from skyguard import config
from skyguard.admin.recording import SessionArchive
from support.client_waits import ssh_wait_options
from support.frozen_disk import FrozenDisk, blocked_in_the_kernel

PROXY_PORT = 24299
LOG_FS_BYTES = 32 << 20  # the signed log's own small filesystem: its reserve is 1/50 of it
UPLINK = "100.64.0.1"  # the lab host's address toward the internet namespace


def sh(*args, **kw):
    return subprocess.run(args, capture_output=True, text=True, **kw)


def keygen(path: Path) -> str:
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path), check=True)
    return Path(str(path) + ".pub").read_text().strip()


@pytest.fixture(scope="module")
def admin_lab(lab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("admin")
    alice, bob = keygen(tmp / "alice"), keygen(tmp / "bob")
    policy = tmp / "policy.yaml"
    admin = f"""
admin:
  ssh:
    listen: "0.0.0.0:{PROXY_PORT}"
    port_forwarding: true
    operators:
      - {{name: alice, public_key: "{alice}", may_access: [directory]}}
      - {{name: bob, public_key: "{bob}", may_access: [sandbox]}}
"""
    policy.write_text(config.DEFAULT_POLICY.read_text() + admin)
    # The same policy without alice (bob's line alone), for `policy load`.
    (tmp / "without-alice.yaml").write_text(config.DEFAULT_POLICY.read_text()
                                            + "".join(line + "\n" for line in admin.splitlines() if "alice" not in line))
    daemon = RunningDaemon(lab, tmp / "daemon", policy_path=policy)
    (tmp / "daemon" / "state").mkdir(parents=True, mode=0o700)
    log_disk = FrozenDisk(daemon.state_dir / "log", size=f"{LOG_FS_BYTES}")  # filled by one test
    vm_key = daemon.cli("admin", "vm-key")  # made in the sealed store on first use, before `up`
    assert vm_key.returncode == 0, vm_key.stderr
    (tmp / "authorized_keys").write_text(vm_key.stdout.strip() + "\n")
    keygen(tmp / "vm_host_key")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    (tmp / "sshd_config").write_text(f"""ListenAddress 10.10.2.2
HostKey {tmp}/vm_host_key
AuthorizedKeysFile {tmp}/authorized_keys
PidFile {tmp}/sshd.pid
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
""")
    sshd = lab.popen("dc1", ["/usr/sbin/sshd", "-D", "-e", "-f", str(tmp / "sshd_config")],
                     stdout=subprocess.DEVNULL, stderr=open(tmp / "sshd.log", "w"))
    try:
        with log_disk:
            try:
                daemon.start()
                yield type("AdminLab", (), {"tmp": tmp, "lab": lab, "daemon": daemon, "policy": policy,
                                            "log_disk": log_disk})
            finally:
                daemon.cleanup()
    finally:
        sshd.terminate()
        sshd.wait(10)


def operator_ssh(admin_lab, who: str, login: str, command: str) -> subprocess.CompletedProcess:
    return admin_lab.lab.exec("internet", [
        "ssh", "-i", str(admin_lab.tmp / who), "-p", str(PROXY_PORT), "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", *ssh_wait_options(),
        f"{login}@{UPLINK}", command], capture_output=True, text=True, timeout=60)


def forward_to_vm_sshd(admin_lab) -> subprocess.CompletedProcess:
    """alice's `ssh -W` through the proxy to dc1's own sshd: its stdout starts with the VM's banner
    when the forward reached the VM."""
    return admin_lab.lab.exec("internet", [
        "ssh", "-i", str(admin_lab.tmp / "alice"), "-p", str(PROXY_PORT), "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
        "-W", "10.10.2.2:22", f"alice+dc1@{UPLINK}"], input="", capture_output=True, text=True, timeout=60)


def load_with_sftp(admin_lab, name: str) -> None:
    """Load the module's policy with SFTP allowed (as `name` in the module's directory)."""
    with_sftp = admin_lab.tmp / name
    with_sftp.write_text(admin_lab.policy.read_text().replace("    port_forwarding: true\n",
                                                              "    port_forwarding: true\n    sftp: true\n"))
    admin_lab.daemon.cli("policy", "load", str(with_sftp), check=True)


def test_operator_runs_a_command_on_an_allowed_vm(admin_lab):
    out = operator_ssh(admin_lab, "alice", "alice+dc1", "echo through-skyguard; exit 3")
    assert out.stdout.strip() == "through-skyguard", out.stderr
    assert out.returncode == 3  # the VM's exit status comes back


def test_operator_refused_on_a_zone_they_may_not_access(admin_lab):
    out = operator_ssh(admin_lab, "bob", "bob+dc1", "echo should-not-run")
    assert out.returncode != 0 and "should-not-run" not in out.stdout
    assert "bob may not access dc1" in out.stderr


def test_direct_ssh_from_another_vm_is_dropped_by_the_datapath(admin_lab):
    probe = ("import socket; s = socket.socket(); s.settimeout(2)\n"
             "try:\n    s.connect(('10.10.2.2', 22)); print('open')\nexcept OSError as e:\n    print('blocked')")
    out = admin_lab.lab.exec("radius1", [sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip() == "blocked"


def test_sessions_are_in_the_signed_log(admin_lab):
    operator_ssh(admin_lab, "alice", "alice+dc1", "true")
    ends = admin_lab.daemon.log_entries("admin_session_end")
    assert ends and all(e["transcript_sha256"] for e in ends)
    assert admin_lab.daemon.cli("log", "verify").returncode == 0


def test_policy_load_without_an_operator_ends_their_session_and_refuses_them(admin_lab):
    args = ["ssh", "-i", str(admin_lab.tmp / "alice"), "-p", str(PROXY_PORT), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", *ssh_wait_options(),
            f"alice+dc1@{UPLINK}", "echo session-up; sleep 60"]
    client = admin_lab.lab.popen("internet", args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "session-up", client.stderr.read()
        loaded = admin_lab.daemon.cli("policy", "load", str(admin_lab.tmp / "without-alice.yaml"))
        assert loaded.returncode == 0, loaded.stderr
        _, stderr = client.communicate(timeout=30)
        assert client.returncode == 255 and "access revoked by a policy change" in stderr, stderr
        again = operator_ssh(admin_lab, "alice", "alice+dc1", "echo should-not-run")
        assert again.returncode == 255 and "Permission denied" in again.stderr, again.stderr
    finally:
        client.kill()
        client.wait()
        restored = admin_lab.daemon.cli("policy", "load", str(admin_lab.policy))
    assert restored.returncode == 0, restored.stderr
    assert operator_ssh(admin_lab, "alice", "alice+dc1", "echo back").stdout.strip() == "back"
    assert any(e.get("operator") == "alice" for e in admin_lab.daemon.log_entries("admin_access_revoked"))


def test_file_transfer_by_another_name_is_refused_and_in_the_signed_log(admin_lab):
    command = 'sh -c "scp -f /etc/hostname"'
    out = operator_ssh(admin_lab, "alice", "alice+dc1", command)
    assert out.returncode == 1 and "file transfer (SFTP/scp/rsync) is disabled by policy" in out.stderr
    assert "C0644" not in out.stdout
    [entry] = [e for e in admin_lab.daemon.log_entries("admin_session_refused") if e.get("command") == command]
    assert entry["reason"] == "file_transfer_refused" and entry["transfer_programs"] == ["scp"]


def test_a_session_whose_start_the_log_refuses_is_refused_and_running_ones_go_on(admin_lab):
    """The signed log's filesystem below its reserve: a new session was refused only as "the
    session cannot be recorded", its record left 'active' and its transcript's writer running; the
    running session's end entry raised out of closing its record (a traceback; the record stayed
    'active'); a port forward opened without its entry. Now the operator is told the log refuses
    entries, a refused session keeps no record, a forward does not open, and the running session
    goes on and is closed, its end entry best effort, said in the host's log."""
    daemon = admin_lab.daemon
    args = ["ssh", "-i", str(admin_lab.tmp / "alice"), "-p", str(PROXY_PORT), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
            f"alice+dc1@{UPLINK}", "echo running-up; read line; echo running-bye"]
    client = admin_lab.lab.popen("internet", args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    log_dir = daemon.state_dir / "log"
    filler = log_dir / "filler"
    try:
        assert client.stdout.readline() == "running-up\n", client.stderr.read()
        space = os.statvfs(log_dir)
        with open(filler, "wb") as f:  # another file leaves half the log's reserve free
            os.posix_fallocate(f.fileno(), 0, space.f_bavail * space.f_frsize - daemon.status()["log"]["reserve_bytes"] // 2)
        refused = operator_ssh(admin_lab, "alice", "alice+dc1", "echo should-not-run")
        assert daemon.status()["log"]["refusing"], daemon.log_tail()
        if "signed log" not in refused.stderr:  # the first entry may have found the space still there
            refused = operator_ssh(admin_lab, "alice", "alice+dc1", "echo should-not-run")
        assert refused.returncode != 0 and "should-not-run" not in refused.stdout
        assert "the signed log refuses entries" in refused.stderr, refused.stderr
        # A port forward is refused too (-W: the VM would open a TCP connection to its own sshd).
        forward = forward_to_vm_sshd(admin_lab)
        assert not forward.stdout.startswith("SSH-2.0"), forward.stdout
        assert "the signed log refuses entries" in forward.stderr, forward.stderr
        # The session that was running goes on; its end entry is best effort, said in the host's log.
        client.stdin.write("go on\n")
        client.stdin.close()
        client.stdin = None
        assert client.stdout.readline() == "running-bye\n"
        assert client.wait(30) == 0
        archive = SessionArchive(daemon.state_dir / "admin" / "sessions")
        # Every record closed (the running one once its end is through), none kept for the refused ones.
        wait_for(lambda: not [m for m in archive.list() if m["result"] == "active"], 30, "every record closed")
        said = daemon.log_tail(1 << 20)
        assert "admin_session_end of session" in said and "was not written to the signed log" in said, said[-4000:]
        assert "Traceback" not in said, said[-4000:]
    finally:
        client.kill()
        client.wait()
        filler.unlink(missing_ok=True)
    wait_for(lambda: daemon.status()["log"]["refusing"] is None, 60, "the log accepting entries")
    assert operator_ssh(admin_lab, "alice", "alice+dc1", "echo back").stdout.strip() == "back"
    forward = forward_to_vm_sshd(admin_lab)
    assert forward.stdout.startswith("SSH-2.0"), forward.stderr
    assert daemon.cli("log", "verify").returncode == 0


def test_a_session_opens_only_once_its_start_is_durable(admin_lab):
    """The signed log's disk stalled (fsfreeze): for the first 5 s, before the writer refuses new
    entries, a session's start entry was queued and the session opened at once, so an operator
    worked on a VM with no record of it written anywhere (a crash then, and none at all). Now the
    session waits until its start is durable: refused with the log's reason, no record kept; a port
    forward reaches the VM only once its entry is durable."""
    daemon = admin_lab.daemon
    archive = SessionArchive(daemon.state_dir / "admin" / "sessions")
    records = len(archive.list())
    size = daemon.status()["log"]["size"]
    admin_lab.log_disk.freeze()
    try:  # each at once: the log refuses new entries only after 5 s
        # A port forward does not reach the VM (-W: the VM's sshd would answer with its banner).
        forward = forward_to_vm_sshd(admin_lab)
        assert not forward.stdout.startswith("SSH-2.0"), forward.stdout
        admin_lab.log_disk.thaw()
        wait_for(lambda: daemon.status()["log"]["refusing"] is None, 60, "the log accepting entries")
        admin_lab.log_disk.freeze()
        refused = operator_ssh(admin_lab, "alice", "alice+dc1", "echo should-not-run")
        assert refused.returncode != 0 and "should-not-run" not in refused.stdout
        assert "signed log" in refused.stderr, refused.stderr
        assert len(archive.list()) == records  # no record kept of a session that never opened
    finally:
        admin_lab.log_disk.thaw()
    wait_for(lambda: daemon.status()["log"]["refusing"] is None, 60, "the log accepting entries")
    assert operator_ssh(admin_lab, "alice", "alice+dc1", "echo back").stdout.strip() == "back"
    # Their entries, queued before the refusal, are written once the disk answers: each is followed
    # by a withdrawal, so the log does not claim a session or a forward that never opened.
    def withdrawn() -> list[str]:
        rows = [json.loads(line) for line in daemon.cli("log", "show", "--json", check=True).stdout.splitlines()]
        entries = {row["index"]: row["entry"] for row in rows}
        return sorted(entries[e["index"]]["type"] for e in entries.values()
                      if e["type"] == "decision_withdrawn" and e["index"] >= size)
    wait_for(lambda: withdrawn() == ["admin_port_forward", "admin_session_start"], 30, "both withdrawn")
    assert daemon.cli("log", "verify").returncode == 0


class SftpBatch:
    """OpenSSH's sftp through the proxy (sftp-server by exec: the lab VM's sshd has no subsystem),
    reading its batch from a pipe, a step at a time: step() sends commands (a leading '-' goes on
    past a failure) and returns what they printed, up to a `pwd` sent after them."""

    def __init__(self, admin_lab):
        self.client = admin_lab.lab.popen("internet", [
            "sftp", "-i", str(admin_lab.tmp / "alice"), "-P", str(PROXY_PORT), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", *ssh_wait_options(),
            "-s", "/usr/lib/openssh/sftp-server", "-b", "-", f"alice+dc1@{UPLINK}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)

    def step(self, *commands: str) -> str:
        self.client.stdin.write("".join(c + "\n" for c in (*commands, "pwd")))
        self.client.stdin.flush()
        out = []
        while not (line := self.client.stdout.readline()).startswith("Remote working directory"):
            assert line, "".join(out) + self.client.stderr.read()
            out.append(line)
        return "".join(out)

    def close(self) -> str:
        """Its stderr, once it ended."""
        _, stderr = self.client.communicate("bye\n", timeout=60)
        return stderr


def test_an_sftp_transfer_the_log_refuses_is_not_carried_out(admin_lab):
    """With the signed log refusing entries (its disk below the reserve, or stalled), an SFTP
    session already open went on transferring files: each request's admin_file_transfer entry was
    dropped (a line in the host's log), the file moved. Now a request that names a file reaches the
    VM only once its entry is durable; one the log refuses is answered PERMISSION_DENIED and the
    operator told why, and the session goes on once the log takes entries again."""
    daemon, tmp = admin_lab.daemon, admin_lab.tmp
    on_vm = tmp / "vm-file.txt"
    on_vm.write_text("on the vm\n")
    uploaded, fetched = tmp / "uploaded.txt", tmp / "fetched.txt"
    (tmp / "local.txt").write_text("from the operator\n")
    load_with_sftp(admin_lab, "with-sftp.yaml")
    filler = daemon.state_dir / "log" / "filler"
    sftp = SftpBatch(admin_lab)
    try:
        sftp.step()  # the session is open (its start on record)
        space = os.statvfs(filler.parent)
        with open(filler, "wb") as f:  # another file leaves half the log's reserve free
            os.posix_fallocate(f.fileno(), 0, space.f_bavail * space.f_frsize - daemon.status()["log"]["reserve_bytes"] // 2)
        operator_ssh(admin_lab, "alice", "alice+dc1", "true")  # an entry that finds the space gone
        wait_for(lambda: daemon.status()["log"]["refusing"], 30, "the log refusing entries")
        sftp.step(f"-get {on_vm} {fetched}", f"-put {tmp / 'local.txt'} {uploaded}")
        assert not fetched.exists() and not uploaded.exists()  # neither carried out
        filler.unlink()
        wait_for(lambda: daemon.status()["log"]["refusing"] is None, 60, "the log accepting entries")
        sftp.step(f"get {on_vm} {fetched}")  # the same session goes on
        assert fetched.read_text() == "on the vm\n"
        # A stalled disk: the request waits for its entry, then is refused (the log is not refusing yet).
        admin_lab.log_disk.freeze()
        try:
            sftp.step(f"-put {tmp / 'local.txt'} {uploaded}")
            assert not uploaded.exists()
        finally:
            admin_lab.log_disk.thaw()
        wait_for(lambda: daemon.status()["log"]["refusing"] is None, 60, "the log accepting entries")
        stderr = sftp.close()
        assert sftp.client.returncode == 0, stderr
        assert stderr.count("the signed log refuses entries now") >= 2, stderr
        assert str(on_vm) in stderr and str(uploaded) in stderr, stderr
    finally:
        sftp.client.kill()
        sftp.client.wait()
        filler.unlink(missing_ok=True)
        admin_lab.log_disk.thaw()
        wait_for(lambda: daemon.status()["log"]["refusing"] is None, 60, "the log accepting entries")
        daemon.cli("policy", "load", str(admin_lab.policy), check=True)
    assert ("open-read", str(on_vm)) in [(e["op"], e["path"]) for e in daemon.log_entries("admin_file_transfer")]
    [record] = wait_for(lambda: [m for m in SessionArchive(daemon.state_dir / "admin" / "sessions").list()
                                 if m["result"] != "active" and any(f["path"] == str(on_vm) for f in m.get("files", []))],
                        30, "the SFTP session's record closed")
    refused = {f["path"] for f in record["files"] if f.get("refused") == "log_refused"}
    assert {str(on_vm), str(uploaded)} <= refused, record["files"]
    said = daemon.log_tail(1 << 20)
    assert f" of '{on_vm}' by alice on dc1" in said and "Traceback" not in said, said[-4000:]
    assert daemon.cli("log", "verify").returncode == 0


def test_sftp_renames_links_and_changes_are_on_record_and_wait_for_the_log(admin_lab):
    """OpenSSH's sftp renames with posix-rename@openssh.com and links with hardlink@openssh.com
    (SFTP extended requests), `chmod -h` is lsetstat@openssh.com and `cp` is copy-data: the log
    gate passed every extended request as naming no file, so these reached the VM with no entry,
    and while the log refused entries a file was renamed or linked anyway; SSH_FXP_RENAME and
    SYMLINK had only their first path logged, SETSTAT not what it sets. Now each is an
    admin_file_transfer entry with both paths (path: the file there; new_path: the name made) and
    the attributes set, and goes to the VM only once that entry is durable."""
    daemon, tmp = admin_lab.daemon, admin_lab.tmp
    work = tmp / "sftp-ops"
    work.mkdir()
    a, b, c, d, e, f, g = (str(work / n) for n in "abcdefg")
    (work / "a").write_text("audit config\n")
    local = tmp / "local-script"
    local.write_text("#!/bin/sh\n")
    local.chmod(0o750)
    os.utime(local, (1_700_000_000, 1_700_000_000))
    load_with_sftp(admin_lab, "with-sftp-ops.yaml")
    filler = daemon.state_dir / "log" / "filler"
    sftp = SftpBatch(admin_lab)
    try:
        sftp.step(f"rename {a} {b}", f"rename -l {b} {c}", f"ln {c} {d}", f"symlink {c} {e}", f"chmod 640 {d}",
                  f"-chmod -h 600 {e}", f"mkdir {g}", f"rmdir {g}", f"cp {c} {f}", f"rm {d}", f"put -p {local} {work / 'p'}")
        assert sorted(p.name for p in work.iterdir()) == ["c", "e", "f", "p"] and os.readlink(e) == c
        space = os.statvfs(filler.parent)
        with open(filler, "wb") as out:  # another file leaves half the log's reserve free
            os.posix_fallocate(out.fileno(), 0, space.f_bavail * space.f_frsize - daemon.status()["log"]["reserve_bytes"] // 2)
        operator_ssh(admin_lab, "alice", "alice+dc1", "true")  # an entry that finds the space gone
        wait_for(lambda: daemon.status()["log"]["refusing"], 30, "the log refusing entries")
        sftp.step(f"-rename {c} {a}", f"-rename -l {c} {b}", f"-ln {c} {d}", f"-symlink {c} {g}",
                  f"-chmod 600 {c}", f"-mkdir {work / 'h'}", f"-rm {f}")
        assert sorted(p.name for p in work.iterdir()) == ["c", "e", "f", "p"]  # none carried out
        assert (work / "c").stat().st_mode & 0o777 == 0o640
        filler.unlink()
        wait_for(lambda: daemon.status()["log"]["refusing"] is None, 60, "the log accepting entries")
        stderr = sftp.close()
        assert sftp.client.returncode == 0, stderr
        assert "the signed log refuses entries now (its disk is full or stalled); try again later (posix-rename of " \
            f"'{c}' to '{a}')" in stderr, stderr
    finally:
        sftp.client.kill()
        sftp.client.wait()
        filler.unlink(missing_ok=True)
        wait_for(lambda: daemon.status()["log"]["refusing"] is None, 60, "the log accepting entries")
        daemon.cli("policy", "load", str(admin_lab.policy), check=True)
    logged = [(e["op"], e["path"], e.get("new_path"), e.get("attrs")) for e in daemon.log_entries("admin_file_transfer")
              if e["path"].startswith(str(work))]
    reads = ("stat", "lstat", "opendir", "readlink", "statvfs", "open-read", "open-write")
    assert [row for row in logged if row[0] not in reads] == [
        ("posix-rename", a, b, None), ("rename", b, c, None), ("hardlink", c, d, None), ("symlink", c, e, None),
        ("setstat", d, None, {"mode": "0640"}), ("lsetstat", e, None, {"mode": "0600"}), ("mkdir", g, None, {"mode": "0777"}),
        ("rmdir", g, None, None), ("copy-data", c, f, None), ("remove", d, None, None),
        ("fsetstat", str(work / "p"), None, {"mode": "0750", "atime": 1_700_000_000, "mtime": 1_700_000_000})], logged
    [record] = wait_for(lambda: [m for m in SessionArchive(daemon.state_dir / "admin" / "sessions").list()
                                 if m["result"] != "active" and any(x["path"] == a for x in m.get("files", []))],
                        30, "the SFTP session's record closed")
    refused = {(x["op"], x["path"], x.get("new_path")) for x in record["files"] if x.get("refused") == "log_refused"}
    assert {("posix-rename", c, a), ("rename", c, b), ("hardlink", c, d), ("symlink", c, g), ("setstat", c, None),
            ("mkdir", str(work / "h"), None)} <= refused, record["files"]
    assert daemon.cli("log", "verify").returncode == 0


def test_down_returns_while_a_session_record_waits_on_a_stalled_disk(admin_lab):
    """The disk under the session records stalls (fsfreeze) as a session ends: its last output and
    its record's end wait on that disk. `skyguard down` waited for that record without a bound, so
    the programs stayed attached and `down` failed; now the proxy's stop() gives up after
    recording_close_wait, says which record it left open, and the rest of the shutdown (programs
    detached) goes on: `down` returns while the disk is still frozen. The daemon's process lingers
    until the disk answers (the kernel holds the thread in its write); the next start closes the
    record, hashed as the file ended up, and it verifies against the signed log. (The disk is
    unmounted under the running daemon: the records before this test are back in view.)"""
    daemon = admin_lab.daemon
    sessions = daemon.state_dir / "admin" / "sessions"
    sessions.mkdir(parents=True, exist_ok=True, mode=0o700)
    args = ["ssh", "-i", str(admin_lab.tmp / "alice"), "-p", str(PROXY_PORT), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", *ssh_wait_options(),
            f"alice+dc1@{UPLINK}", "echo record-up; read line; echo record-bye"]
    with FrozenDisk(sessions) as disk:
        client = admin_lab.lab.popen("internet", args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        try:
            assert client.stdout.readline() == "record-up\n", client.stderr.read()
            [meta] = [m for m in SessionArchive(sessions).list() if m["result"] == "active"]
            disk.freeze()
            client.stdin.close()  # the VM prints its last line and exits: both wait on the disk
            client.stdin = None
            while not blocked_in_the_kernel(daemon.proc.pid):
                assert daemon.proc.poll() is None, daemon.log_tail()
                time.sleep(0.01)
            down = daemon.cli("down", timeout=90)
            assert down.returncode == 0 and "programs detached" in down.stdout, down.stderr + daemon.log_tail()
            assert disk.frozen
            assert f"left open: {meta['id']}" in daemon.log_tail(), daemon.log_tail()
            assert not daemon.pin_dir.exists()  # the programs detached, their pins removed
            disk.thaw()
            daemon.proc.wait(30)  # the process ends once its write returns
        finally:
            client.kill()
            client.wait()
            disk.thaw()
        daemon.start()  # its recovery closes the record left open (and the module's other tests go on)
        meta = SessionArchive(sessions).load(meta["id"])
        assert meta["result"] == "interrupted"
        replayed = daemon.cli("admin", "replay", meta["id"], "--text")  # hashed as the file ended up
        assert replayed.returncode == 0 and "matches the session record" in replayed.stderr, replayed.stderr
        assert "record-up" in replayed.stdout
