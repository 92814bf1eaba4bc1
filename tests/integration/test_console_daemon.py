"""VNC consoles under the real daemon: `skyguard up` in the lab's host namespace with an
admin.console policy hosts the console proxy beside the datapath. A real TigerVNC server (Xvnc,
root window the marker colour) runs in the dc1 lab VM with a password that only skyguard's sealed
store holds; a real VNC client (vncdotool) in the lab's internet namespace logs in to skyguard's
console listener with a one-time ticket from `skyguard admin console-ticket` and gets the VM's
desktop; the session's end, with its recording's SHA-256, is in the signed log. The datapath
keeps the target's port for the host: the proxy's own connection to dc1:5901 passes, while a VM
connecting straight to dc1:5901 is dropped, even with a rule that allows it (deny beats allow).

The proxy's own behaviour (clipboard, tickets, malformed messages, revocation) is
test_console_vnc.py's, without the daemon; this module checks what only the daemon adds.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_support import RunningDaemon, drop_count, wait_for
from PIL import Image

from skyguard import config
from skyguard.admin.recording import SessionArchive
from skyguard.custody.store import SecretStore
from support.client_waits import ANSWER_WAIT_S, SILENCE_WAIT_S, dig_argv
from support.console_support import start_xvnc
from support.frozen_disk import FrozenDisk

PORT = 24267
UPLINK = "100.64.0.1"  # the lab host's address toward the internet namespace
VM = "10.10.2.2"  # dc1
MARKER = (0x33, 0x66, 0xCC)
VM_PASSWORD = "Vd-" + secrets.token_hex(3)  # 8 characters: all VNC authentication uses
PY = sys.executable
LOG_FS_BYTES = 32 << 20  # the signed log's own small filesystem: its reserve is 1/50 of it
READY = 180.0  # seconds for `skyguard up` to answer on a loaded machine (bcc compiles); a bound, not a timing

# auth may reach the directory on tcp/5901 by an ordinary rule: the console target's port is
# still the console proxy's alone.
VNC_RULE = """  - name: auth-to-dc-vnc
    from: auth
    to: {zones: [directory]}
    ports: [tcp/5901]
"""

CONSOLE = f"""
admin:
  console:
    listen: "0.0.0.0:{PORT}"
    targets:
      - {{name: dc1-desktop, workload: dc1, protocol: vnc, port: 5901, credential: dc1-vnc, clipboard: to_vm}}
    operators:
      - {{name: alice, may_access: [directory]}}
"""


@pytest.fixture(scope="module")
def console_daemon(lab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console-daemon")
    os.chmod(tmp, 0o700)
    policy = tmp / "policy.yaml"
    base = config.DEFAULT_POLICY.read_text()
    assert "\nrules:\n" in base
    policy.write_text(base.replace("\nrules:\n", "\nrules:\n" + VNC_RULE, 1) + CONSOLE)
    daemon = RunningDaemon(lab, tmp / "daemon", policy_path=policy, ready_timeout=READY, wait_attached=True)
    SecretStore(daemon.state_dir / "secrets").set("dc1-vnc", VM_PASSWORD.encode())
    xvnc, display = start_xvnc(lab, "dc1", tmp, VM_PASSWORD, 5901, VM, display_base=500)
    try:
        with FrozenDisk(daemon.state_dir / "log", size=f"{LOG_FS_BYTES}") as log_disk:  # filled, frozen by tests
            try:
                daemon.start()  # every workload attached
                status = wait_for(lambda: (s := daemon.status())["parts"].get("console") == "running" and s, READY,
                                  "the console part running", interval=0.5)
                yield type("ConsoleDaemon", (), {"tmp": tmp, "lab": lab, "daemon": daemon, "status": status,
                                                 "log_disk": log_disk, "display": display})
            finally:
                daemon.cleanup()
    finally:
        xvnc.terminate()
        xvnc.wait(10)


def vncdo(console_daemon, password: str, *commands: str) -> subprocess.CompletedProcess:
    return console_daemon.lab.exec("internet", [PY, "-W", "ignore", "-m", "vncdotool.command", "-v", "-t", "30",
                                                "-s", f"{UPLINK}::{PORT}", "-p", password, *commands],
                                   capture_output=True, text=True, timeout=90)


def fill_log(console_daemon) -> Path:
    """Another file leaves half the log's reserve free; returns it once the log refuses entries
    (a DNS decision's entry finds the space gone). Unlink it to give the space back."""
    daemon = console_daemon.daemon
    filler = daemon.state_dir / "log" / "filler"
    space = os.statvfs(filler.parent)
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, space.f_bavail * space.f_frsize - daemon.status()["log"]["reserve_bytes"] // 2)
    console_daemon.lab.exec("agent1", dig_argv("pypi.sandbox.test", answer=False), capture_output=True, timeout=60)
    wait_for(lambda: daemon.status()["log"]["refusing"], 30, "the log refusing entries")
    return filler


def test_an_operator_sees_the_vm_desktop_through_the_daemon_and_the_session_is_signed(console_daemon):
    daemon = console_daemon.daemon
    issued = daemon.cli("admin", "console-ticket", "alice", "dc1-desktop", check=True)
    shot = console_daemon.tmp / "shot.png"
    out = vncdo(console_daemon, issued.stdout.strip(), "type", "hi", "capture", str(shot))
    assert out.returncode == 0, out.stderr + daemon.log_tail()
    assert Image.open(shot).convert("RGB").getpixel((160, 120)) == MARKER
    ends = wait_for(lambda: [e for e in daemon.log_entries("admin_session_end") if e.get("operator") == "alice"],
                    60, "the console session's end in the signed log", interval=0.5)
    assert ends[-1]["transcript_sha256"] and ends[-1]["workload"] == "dc1"
    listed = daemon.cli("admin", "sessions", check=True)
    assert ends[-1]["session"] in listed.stdout and "dc1/dc1-desktop" in listed.stdout
    verified = daemon.cli("log", "verify")
    assert verified.returncode == 0, verified.stderr
    assert VM_PASSWORD not in (daemon.work_dir / "daemon.log").read_text(errors="replace")


def test_a_console_session_whose_start_the_log_refuses_is_refused_and_keeps_no_record(console_daemon):
    """With the signed log's filesystem below its reserve, the session's start entry raised out of
    its recording: the record was left 'active', its writer running. Now the session is refused
    before the operator sees the screen, the host's log says why, and nothing of it is kept."""
    daemon = console_daemon.daemon
    ticket = daemon.cli("admin", "console-ticket", "alice", "dc1-desktop", check=True).stdout.strip()
    log_dir = daemon.state_dir / "log"
    filler = log_dir / "filler"
    space = os.statvfs(log_dir)
    try:
        with open(filler, "wb") as f:  # another file leaves half the log's reserve free
            os.posix_fallocate(f.fileno(), 0, space.f_bavail * space.f_frsize - daemon.status()["log"]["reserve_bytes"] // 2)
        out = vncdo(console_daemon, ticket, "capture", str(console_daemon.tmp / "refused.png"))
        assert out.returncode != 0 and not (console_daemon.tmp / "refused.png").exists()
        said = daemon.log_tail(1 << 20)
        assert "a console session of alice on dc1-desktop is refused: its start cannot be logged" in said, said[-4000:]
        records = SessionArchive(daemon.state_dir / "admin" / "sessions").list()
        assert not [m for m in records if m["result"] == "active"], records
    finally:
        filler.unlink()
    wait_for(lambda: daemon.status()["log"]["refusing"] is None, 60, "the log accepting entries")
    ticket = daemon.cli("admin", "console-ticket", "alice", "dc1-desktop", check=True).stdout.strip()
    assert vncdo(console_daemon, ticket, "capture", str(console_daemon.tmp / "again.png")).returncode == 0


def test_a_console_login_while_the_log_refuses_is_refused_with_its_reason_and_keeps_the_ticket(console_daemon):
    """With the signed log known to refuse entries (its disk below the reserve), a login with a
    good ticket used the ticket up, logged into the VM with its stored password and answered the
    client "OK", then closed on it when the session's start entry was refused: the operator saw
    a dropped connection and needed a new ticket, and a refused login's entry was dropped too.
    Now the login is refused before anything is judged, with the reason, and the ticket still
    works once the log takes entries again."""
    daemon = console_daemon.daemon
    ticket = daemon.cli("admin", "console-ticket", "alice", "dc1-desktop", check=True).stdout.strip()
    shot = console_daemon.tmp / "log-refused.png"
    filler = fill_log(console_daemon)
    try:
        out = vncdo(console_daemon, ticket, "capture", str(shot))
        assert out.returncode != 0 and not shot.exists()
        assert "the signed log refuses entries now" in out.stderr, out.stderr
        said = daemon.log_tail(1 << 20)
        assert "a console login from" in said and "is refused: the signed log" in said, said[-4000:]
    finally:
        filler.unlink()
    wait_for(lambda: daemon.status()["log"]["refusing"] is None, 60, "the log accepting entries")
    out = vncdo(console_daemon, ticket, "capture", str(shot))  # the same ticket
    assert out.returncode == 0, out.stderr


def test_a_console_session_opens_only_once_its_start_is_durable(console_daemon):
    """The signed log's disk stalled (fsfreeze): for its first 5 s the session's start entry was
    queued and the operator saw the VM's screen at once, with the session on record nowhere. Now
    the session waits until its start is durable: refused, nothing of it kept."""
    daemon = console_daemon.daemon
    ticket = daemon.cli("admin", "console-ticket", "alice", "dc1-desktop", check=True).stdout.strip()
    shot = console_daemon.tmp / "stalled.png"
    console_daemon.log_disk.freeze()
    try:
        out = vncdo(console_daemon, ticket, "capture", str(shot))  # at once: the log is not refusing yet
        assert out.returncode != 0 and not shot.exists(), out.stderr
        records = SessionArchive(daemon.state_dir / "admin" / "sessions").list()
        assert not [m for m in records if m["result"] == "active"], records
    finally:
        console_daemon.log_disk.thaw()
    wait_for(lambda: daemon.status()["log"]["refusing"] is None, 60, "the log accepting entries")
    ticket = daemon.cli("admin", "console-ticket", "alice", "dc1-desktop", check=True).stdout.strip()
    assert vncdo(console_daemon, ticket, "capture", str(shot)).returncode == 0


# A VNC client that stays in its session and pastes each line it reads, then asks for the screen:
# once that comes, skyguard has relayed or dropped the paste (one connection, in order).
PASTER = """import sys
from vncdotool import api
client = api.connect(sys.argv[1], password=sys.argv[2])
client.refreshScreen()
print("open", flush=True)
for line in sys.stdin:
    client.paste(line.rstrip("\\n"))
    client.refreshScreen()
    print("pasted", flush=True)
client.disconnect()
api.shutdown()
"""


def test_a_clipboard_transfer_the_log_refuses_is_not_relayed(console_daemon):
    """With the signed log refusing entries (its disk below the reserve, or stalled), a paste into
    the VM went through with nothing in the log (an allowed transfer had no entry at all; a
    dropped one's went through record_or_report). Now each allowed transfer is a console_clipboard
    entry and is relayed only once it is durable; one the log refuses is dropped, counted and said
    in the host's log, and the session goes on."""
    daemon, lab = console_daemon.daemon, console_daemon.lab
    ticket = daemon.cli("admin", "console-ticket", "alice", "dc1-desktop", check=True).stdout.strip()
    client = lab.popen("internet", [PY, "-W", "ignore", "-c", PASTER, f"{UPLINK}::{PORT}", ticket],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)

    def paste(text: str) -> None:
        client.stdin.write(text + "\n")
        client.stdin.flush()
        assert client.stdout.readline() == "pasted\n", client.stderr.read()

    def vm_clipboard() -> str:
        return lab.exec("dc1", ["xclip", "-display", f":{console_daemon.display}", "-selection", "clipboard", "-o"],
                        capture_output=True, text=True, timeout=10).stdout

    filler = None
    try:
        assert client.stdout.readline() == "open\n", client.stderr.read()
        paste("pasted-while-logged")
        wait_for(lambda: vm_clipboard() == "pasted-while-logged", ANSWER_WAIT_S, "the paste on the VM")
        filler = fill_log(console_daemon)
        paste("pasted-while-refused")
        assert vm_clipboard() == "pasted-while-logged"  # not relayed
        filler.unlink()
        wait_for(lambda: daemon.status()["log"]["refusing"] is None, 60, "the log accepting entries")
        console_daemon.log_disk.freeze()  # stalled: the paste waits for its entry, then is dropped
        try:
            paste("pasted-while-stalled")
            assert vm_clipboard() == "pasted-while-logged"
        finally:
            console_daemon.log_disk.thaw()
        wait_for(lambda: daemon.status()["log"]["refusing"] is None, 60, "the log accepting entries")
        paste("pasted-again")  # the same session goes on
        wait_for(lambda: vm_clipboard() == "pasted-again", ANSWER_WAIT_S, "the paste on the VM")
    finally:
        client.stdin.close()
        client.wait(30)
        if filler is not None:
            filler.unlink(missing_ok=True)
        console_daemon.log_disk.thaw()
    logged = [e["bytes"] for e in daemon.log_entries("console_clipboard") if e["direction"] == "to_vm"]
    assert len("pasted-while-logged") in logged and len("pasted-again") in logged, logged
    said = daemon.log_tail(1 << 20)
    assert said.count("a clipboard transfer (to_vm, 20 bytes) of console session") == 2, said[-4000:]
    assert "Traceback" not in said


def test_status_counts_the_console_credential_as_used(console_daemon):
    secrets = console_daemon.daemon.status()["secrets"]
    assert "dc1-vnc" not in secrets["unused"] and "dc1-vnc" not in secrets["missing"]


def test_a_vm_connecting_straight_to_the_console_port_is_dropped(console_daemon):
    """radius1 (zone auth) may reach dc1 on tcp/5901 by the policy's rules, yet the connection is
    dropped: only skyguard's console proxy may use the target's port, so no VM bypasses the
    stored password. The same probe to dc1's LDAP port (auth-to-directory) passes, so it is the
    console rule that drops."""
    daemon, lab = console_daemon.daemon, console_daemon.lab
    def denied():  # counted on the sending or the receiving side's zone
        status = daemon.status()
        return sum(drop_count(status, zone, "policy_deny") for zone in ("auth", "directory"))

    before = denied()
    # 5901: dropped (listened for SILENCE_WAIT_S); 389: dc1's RST must come (ANSWER_WAIT_S)
    probe = ("import socket, sys\n"
             f"for port, wait in ((5901, {SILENCE_WAIT_S}), (389, {ANSWER_WAIT_S})):\n"
             "    s = socket.socket(); s.settimeout(wait)\n"
             "    try:\n        s.connect(('10.10.2.2', port)); print('open')\n"
             "    except ConnectionRefusedError:\n        print('refused')\n"
             "    except OSError:\n        print('blocked')\n")
    out = lab.exec("radius1", [PY, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # 389: nothing listens there, so dc1's kernel answers (RST): the datapath let it through.
    assert out.stdout.split() == ["blocked", "refused"]
    assert denied() > before
