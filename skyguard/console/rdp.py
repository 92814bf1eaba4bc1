"""RDP consoles the way Guacamole does them: FreeRDP's own client draws the VM's RDP desktop into a
private X server that skyguard then serves as a VNC console.

For each RDP session skyguard starts, on this host:
  - a private Xvnc: a free display number (-displayfd), RFB only on a Unix socket in a 0700
    directory (no TCP port), a random VNC password known only to skyguard, and X clients admitted
    only with a random MIT cookie (no other local process can read the screen or inject keys);
  - in it `xfreerdp` (FreeRDP 2), full screen, connecting to the VM's RDP port with the stored
    credential. The password goes to xfreerdp on its stdin (/from-stdin:force), never on its
    command line, where any local user's `ps` would see it.
The VNC session (session.py) then logs into that Xvnc like into any VM's VNC server, so recording,
clipboard rules, keystroke counting, replay and the web console are the VNC ones. When the
session ends, both processes are killed and the directory removed.

The stored credential of an RDP target is `username:password` (split at the first colon: a user
name has none; DOMAIN\\user is passed on as is).

Server certificates: FreeRDP is told /cert:ignore. The policy has no field for an RDP server's
certificate fingerprint yet, and lab servers (xrdp) have self-signed ones; the skyguard -> VM leg
runs over the datapath's own network, not the internet. A `fingerprint` target field passed as
/cert:fingerprint:sha256:<hex> is the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
from pathlib import Path

from skyguard.errors import AdminError
from skyguard.timeouts import within

log = logging.getLogger("skyguard.console")

TOOLS = ("Xvnc", "xfreerdp", "vncpasswd", "xauth")
GEOMETRY = "1024x768"
START_TIMEOUT = 10.0  # seconds for the private Xvnc to come up
SETTLE = 1.5  # seconds xfreerdp must survive before the operator is let in (an early exit is a failure)


def missing_tools() -> list[str]:
    """The programs an RDP console needs that this host lacks (the proxy reports them as Degraded)."""
    return [t for t in TOOLS if shutil.which(t) is None]


def split_credential(secret: bytes) -> tuple[str, bytes]:
    """(username, password) of an RDP target's stored `username:password`."""
    user, sep, password = bytes(secret).partition(b":")
    if not sep or not user or not password or b"\n" in secret:
        # Never quote the value: the message names the format only.
        raise AdminError("the stored credential of an RDP console target must be 'username:password'")
    return user.decode(errors="strict"), password


class RdpDesktop:
    """One session's Xvnc + xfreerdp pair."""

    def __init__(self, work: Path, address: str, port: int, credential: bytes, clipboard: bool):
        self.work = work
        self.address, self.port = address, port
        self.user, self._password = split_credential(credential)
        self.clipboard = clipboard
        self.socket = work / "vnc.sock"
        self.vnc_password = secrets.token_urlsafe(6)[:8]  # all VNC authentication uses is 8 characters
        self.display: int | None = None
        self._procs: list[asyncio.subprocess.Process] = []
        self._watcher: asyncio.Task | None = None

    async def start(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Start Xvnc and xfreerdp; the RFB stream of the Xvnc (not yet logged into)."""
        try:
            return await self._start()
        except BaseException:
            self.stop()
            raise

    async def _start(self):
        self.work.mkdir(parents=True, mode=0o700)
        os.chmod(self.work, 0o700)
        passwd = self.work / "passwd"
        out = await _run(["vncpasswd", "-f"], self.vnc_password.encode())
        passwd.write_bytes(out)
        os.chmod(passwd, 0o600)
        xauth = self.work / "Xauthority"
        cookie = secrets.token_hex(16)
        # The server accepts every cookie in its -auth file whatever display it names.
        await _run(["xauth", "-f", str(xauth), "add", ":0", ".", cookie])
        read_fd, write_fd = os.pipe()
        xvnc_log = open(self.work / "xvnc.log", "wb")  # noqa: SIM115 - handed to the child, closed below
        try:
            xvnc = await asyncio.create_subprocess_exec(
                "Xvnc", "-displayfd", str(write_fd), "-auth", str(xauth), "-nolisten", "tcp",
                "-rfbunixpath", str(self.socket), "-rfbunixmode", "0600", "-rfbport", "-1",
                "-geometry", GEOMETRY, "-depth", "24", "-SecurityTypes", "VncAuth", "-PasswordFile", str(passwd),
                "-AlwaysShared", "-AcceptSetDesktopSize=0",
                pass_fds=(write_fd,), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=xvnc_log, start_new_session=True)
        finally:
            os.close(write_fd)
            xvnc_log.close()
        self._procs.append(xvnc)
        self.display = await within(_read_display(read_fd), START_TIMEOUT)
        await _run(["xauth", "-f", str(xauth), "add", f":{self.display}", ".", cookie])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.work),
               "DISPLAY": f":{self.display}", "XAUTHORITY": str(xauth)}
        rdp_log = open(self.work / "xfreerdp.log", "wb")  # noqa: SIM115 - handed to the child, closed below
        try:
            xfreerdp = await asyncio.create_subprocess_exec(
                "xfreerdp", f"/v:{self.address}:{self.port}", f"/u:{self.user}", "/from-stdin:force",
                "/cert:ignore", "/f", "/bpp:24", "/log-level:WARN",
                "+clipboard" if self.clipboard else "-clipboard",
                env=env, cwd=str(self.work), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                stderr=rdp_log, start_new_session=True)
        finally:
            rdp_log.close()
        self._procs.append(xfreerdp)
        xfreerdp.stdin.write(self._password + b"\n")
        await xfreerdp.stdin.drain()
        xfreerdp.stdin.close()
        self._password = b""
        with contextlib.suppress(TimeoutError):
            await within(xfreerdp.wait(), SETTLE)
        if xfreerdp.returncode is not None:
            raise AdminError(f"the RDP client could not connect to {self.address}:{self.port}: {self._why()}")
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        # The session ends when FreeRDP does (the VM logged the user off, the network broke):
        # killing the Xvnc closes the VNC leg, which ends the session as for any VNC server.
        self._watcher = asyncio.get_running_loop().create_task(self._watch(xfreerdp))
        log.info("RDP console of %s:%s drawn into private display :%s", self.address, self.port, self.display)
        return reader, writer

    async def _watch(self, xfreerdp) -> None:
        await xfreerdp.wait()
        if self._procs:
            log.info("RDP client for %s:%s exited (%s)", self.address, self.port, xfreerdp.returncode)
            self.stop()

    def _why(self) -> str:
        """The last error FreeRDP logged (its log holds no password: that went to its stdin)."""
        try:
            lines = (self.work / "xfreerdp.log").read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [line.split(" - ", 1)[-1] for line in lines if "ERROR" in line]
        return (errors[-1] if errors else (lines[-1] if lines else "exited"))[:200]

    def stop(self) -> None:
        """Kill the session's processes (their whole process groups) and remove its directory."""
        procs, self._procs = self._procs, []
        for proc in reversed(procs):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(self.work, ignore_errors=True)


async def _run(argv: list[str], stdin: bytes | None = None) -> bytes:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate(stdin)
    if proc.returncode != 0:
        raise AdminError(f"{argv[0]} failed: {err.decode(errors='replace').strip()[:200]}")
    return out


async def _read_display(fd: int) -> int:
    """The display number Xvnc writes to its -displayfd once it accepts connections."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while not data.endswith(b"\n"):
            try:
                chunk = os.read(fd, 16)
            except BlockingIOError:
                await asyncio.sleep(0.05)
                continue
            if not chunk:
                raise AdminError("the private Xvnc for an RDP console did not start")
            data += chunk
    finally:
        os.close(fd)
    return int(data)
