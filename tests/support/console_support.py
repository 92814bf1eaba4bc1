"""A real VNC server for the console tests: TigerVNC's Xvnc started inside a lab VM with a VNC
password (the credential skyguard's store holds for it), its root window painted the marker
colour once it answers X clients (xsetroot).

    xvnc, display = start_xvnc(lab, "dc1", tmp, password, 5901, "10.10.2.2", display_base=100)
    ...
    xvnc.terminate(); xvnc.wait(10)        # the caller owns the process

Not the console proxy or its client: the tests start those.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

MARKER_COLOUR = "#3366cc"  # the tests' MARKER, (0x33, 0x66, 0xCC)
START_TIMEOUT = 30.0  # seconds for Xvnc to answer X clients; a bound against hangs, not a timing


def start_xvnc(lab, vm: str, tmp: Path, password: str, port: int, interface: str,
               display_base: int) -> tuple[subprocess.Popen, int]:
    """Xvnc (320x240, depth 24, VncAuth with `password`) in lab VM `vm`, listening on
    interface:port, on the first free X display from display_base + (pid % 300) (each test module
    its own base, so modules running at once rarely meet). Writes tmp/passwd (vncpasswd's file,
    mode 0600) and tmp/xvnc.log. Returns (process, display) once the root window is painted; fails
    with the log's tail, leaving nothing running, when it is not within START_TIMEOUT."""
    passwd = tmp / "passwd"
    passwd.write_bytes(subprocess.run(["vncpasswd", "-f"], input=password.encode(), capture_output=True,
                                      check=True).stdout)
    os.chmod(passwd, 0o600)
    display = next(n for n in range(display_base + os.getpid() % 300, 1000)
                   if not Path(f"/tmp/.X{n}-lock").exists())
    with open(tmp / "xvnc.log", "w") as log:
        proc = lab.popen(vm, ["Xvnc", f":{display}", "-rfbport", str(port), "-interface", interface,
                              "-geometry", "320x240", "-depth", "24", "-SecurityTypes", "VncAuth",
                              "-PasswordFile", str(passwd), "-nolisten", "tcp"],
                         stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + START_TIMEOUT
    while lab.exec(vm, ["xsetroot", "-display", f":{display}", "-solid", MARKER_COLOUR],
                   capture_output=True).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"Xvnc did not start in {vm}: " + (tmp / "xvnc.log").read_text()[-2000:])
        time.sleep(0.1)
    return proc, display
