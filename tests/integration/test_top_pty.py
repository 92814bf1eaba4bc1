"""`skyguard top` in a pseudo-terminal against a real daemon in the lab: it draws the lab's zones,
workloads and flows, redraws in place on the alternate screen, and quits on q and on Ctrl-C
leaving the terminal as it found it. Also `--once` without a terminal, and the readable
`skyguard status` printer fed the daemon's real status reply.
"""

import fcntl
import io
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time

import pytest
from daemon_support import RunningDaemon
from rich.console import Console

from skyguard.cli.render import print_status

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>]")
ALT_SCREEN_ON, ALT_SCREEN_OFF = "\x1b[?1049h", "\x1b[?1049l"


@pytest.fixture(scope="module")
def daemon(lab, tmp_path_factory):
    d = RunningDaemon(lab, tmp_path_factory.mktemp("mtx-top"), metrics="127.0.0.1:26002", wait_attached=True)
    try:
        d.start()
        # Traffic so there are flows to show: allowed (auth -> directory) and denied (sandbox).
        lab.exec("radius1", ["ping", "-n", "-q", "-c", "3", "-i", "0.2", "10.10.2.2"], check=True,
                 capture_output=True, timeout=30)
        lab.exec("agent1", ["ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "1", "10.10.2.2"],
                 capture_output=True, timeout=30)
        yield d
    finally:
        d.cleanup()


def _controlling_terminal():
    """In the child: the pty becomes its controlling terminal, and Ctrl-C interrupts it even when
    the suite runs as a background job (which starts with SIGINT ignored, inherited by top)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """`skyguard top` on the slave side of a pty of a given size; we read what it draws."""

    def __init__(self, daemon, argv, rows=50, cols=180):
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = dict(daemon.env, TERM="xterm-256color")
        env.pop("COLUMNS", None)
        env.pop("LINES", None)
        self.proc = subprocess.Popen(daemon.command("top", *argv), stdin=slave, stdout=slave, stderr=slave,
                                     env=env, start_new_session=True,
                                     preexec_fn=_controlling_terminal)
        os.close(slave)
        self.output = ""

    def read_for(self, seconds: float) -> str:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.output += os.read(self.master, 65536).decode("utf-8", "replace")
                except OSError:  # the slave side closed: the program exited
                    break
        return self.output

    def read_until(self, done, timeout: float = 30.0) -> str:
        """Read until done(output) holds (or the timeout passes: the assertions then say what is missing)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not done(self.output) and self.proc.poll() is None:
            self.read_for(0.25)
        return self.output

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float = 15) -> int:
        # Keep reading while it exits: a program whose last frame (or its TCSADRAIN on leaving
        # cbreak mode) waits on a full pty buffer never exits if nobody drains the master.
        deadline = time.monotonic() + timeout
        try:
            while self.proc.poll() is None and time.monotonic() < deadline:
                self.read_for(0.2)
            code = self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        finally:
            self.read_for(0.2)
            os.close(self.master)
        return code

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def screen_text(raw: str) -> str:
    return ANSI.sub("", raw)


def test_top_shows_the_labs_zones_and_flows_and_quits_on_q(daemon):
    term = Terminal(daemon, ["--interval", "0.5"])
    try:
        # At least three frames (it redraws) and rates (they need two readings).
        raw = term.read_until(lambda out: out.count("skyguard top") >= 3 and " pps" in out)
        assert term.proc.poll() is None, f"top exited early:\n{screen_text(raw)}"
        term.send(b"q")
        assert term.wait() == 0
    finally:
        term.close()
    raw = term.output
    text = screen_text(raw)
    for zone in ("auth", "directory", "sdn", "firewall", "sandbox"):
        assert zone in text, f"zone {zone} not on screen:\n{text[-4000:]}"
    for expected in ("radius1", "dc1", "agent1", "sg-radius1", "2/2", "10.10.1.2", "10.10.2.2",
                     "auth-to-directory", "policy_deny", "keysystems"):
        assert expected in text, f"{expected!r} not on screen:\n{text[-4000:]}"
    assert raw.count("skyguard top") >= 3, "top did not refresh"
    assert ALT_SCREEN_ON in raw and ALT_SCREEN_OFF in raw  # drew on the alternate screen and left it
    open(os.environ.get("MTX_TOP_DUMP", os.devnull), "w").write(raw)
    assert " pps" in text  # rates appear once two readings exist


def test_top_quits_on_ctrl_c_and_restores_the_terminal(daemon):
    term = Terminal(daemon, ["--interval", "0.5"])
    try:
        term.read_until(lambda out: "Zones" in out)
        term.send(b"\x03")  # the pty's line discipline turns it into SIGINT for the foreground group
        assert term.wait() == 0
    finally:
        term.close()
    assert ALT_SCREEN_OFF in term.output
    assert "Traceback" not in screen_text(term.output)


def test_top_once_without_a_terminal(daemon):
    out = subprocess.run(daemon.command("top", "--once", "--zone", "auth"), env=dict(daemon.env, COLUMNS="200"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "\x1b[" not in out.stdout  # not a terminal: plain text
    assert "radius1" in out.stdout and "auth-to-directory" in out.stdout
    assert "agent1" not in out.stdout  # --zone auth hides the sandbox


def test_status_printer_reads_the_real_status(daemon):
    status = daemon.request("status")
    status.pop("ok", None)
    console = Console(width=200, record=True, color_system=None, file=io.StringIO())
    print_status(status, console=console)
    text = console.export_text()
    for expected in ("sg-radius1", "sg-agent1", "sg_ct", "keysystems", "policy_deny", "Signed log", "allow"):
        assert expected in text, f"{expected!r} missing from status:\n{text}"
    interfaces = text.split("Interfaces and programs")[1].split("Traffic by zone")[0]  # that table only
    assert " none " not in interfaces and "tampered" not in interfaces  # every interface has both programs
