"""RDP consoles through skyguard, end to end in the lab: a real RDP server (Debian's xrdp, no
sesman: its libvnc.so section shows an Xvnc in the same VM whose root window is the marker colour,
password=ask so the RDP login's password is that Xvnc's) in the dc1 lab VM; the console proxy in
the lab's host namespace, with the RDP credential only in its sealed store and a real signed log;
a real VNC client (vncdotool) in the lab's internet namespace logging in with a one-time ticket.

skyguard is the RDP client here: FreeRDP's xfreerdp draws the VM's desktop into a private Xvnc
(skyguard/console/rdp.py) that the VNC console path serves. xrdp has a self-signed certificate
(/etc/xrdp/cert.pem), which is why rdp.py passes /cert:ignore.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from skyguard import config
from skyguard.console.proxy import ConsoleProxy
from skyguard.custody.store import SecretStore
from skyguard.policy.parse import parse_policy
from skyguard.tlog import LogReader, LogWriter, entry, host_signer
from skyguard.tlog.verify import verify_log
from support.console_support import start_xvnc
from support.netns_support import NamespaceLoop

PORT = 24279
WEB_PORT = 24280
UPLINK = "100.64.0.1"  # the lab host's address toward the internet namespace
VM = "10.10.2.2"  # dc1
RDP_PORT = 3389
INNER_VNC = 5911  # the VM's own Xvnc, which xrdp shows (on the VM's loopback only)
MARKER = (0x33, 0x66, 0xCC)
RDP_PASSWORD = "Rd-" + secrets.token_hex(3)  # xrdp passes it on as the VNC password: 8 characters
PY = sys.executable

CONSOLE = f"""
admin:
  console:
    listen: "0.0.0.0:{PORT}"
    web: "0.0.0.0:{WEB_PORT}"
    targets:
      - {{name: dc1-rdp, workload: dc1, protocol: rdp, port: {RDP_PORT}, credential: dc1-rdp}}
      - {{name: dc1-rdp-closed, workload: dc1, protocol: rdp, port: 3390, credential: dc1-rdp}}
      - {{name: dc1-rdp-badcred, workload: dc1, protocol: rdp, port: 3391, credential: dc1-rdp-bad}}
    operators:
      - {{name: alice, may_access: [directory]}}
"""

XRDP_INI = f"""
[Globals]
ini_version=1
fork=false
port=tcp://{VM}:{RDP_PORT}
use_vsock=false
security_layer=tls
crypt_level=high
certificate=/etc/xrdp/cert.pem
key_file=/etc/xrdp/key.pem
ssl_protocols=TLSv1.2, TLSv1.3
autorun=marker
allow_channels=true
max_bpp=24

[Logging]
LogFile={{log}}
LogLevel=INFO
EnableSyslog=false

[Channels]
rdpdr=false
rdpsnd=false
drdynvc=false
cliprdr=true
rail=false
xrdpvr=false
tcutils=false

[marker]
name=marker
lib=libvnc.so
username=na
password=ask
ip=127.0.0.1
port={INNER_VNC}
"""


class SignedLog:
    """The daemon's signed log (skyguard/tlog) behind the proxy's decision-log interface."""

    def __init__(self, state: Path):
        self.directory = state / "log"
        self.writer = LogWriter(self.directory, host_signer(state))
        self.lock = threading.Lock()

    def record(self, kind: str, /, **fields) -> None:
        with self.lock:
            self.writer.append(entry(kind, **canonical(fields)))

    def entries(self) -> list[dict]:
        return [json.loads(raw) for _, raw in LogReader(self.directory).entries()]


def canonical(value):
    """As the daemon logs: no floats in entries (fixed-point strings)."""
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


@pytest.fixture(scope="module")
def console(lab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console-rdp")
    os.chmod(tmp, 0o700)
    state = tmp / "state"
    store = SecretStore(state / "secrets")
    store.set("dc1-rdp", f"operator:{RDP_PASSWORD}".encode())
    store.set("dc1-rdp-bad", RDP_PASSWORD.encode())  # no "username:": refused, never quoted
    (tmp / "xrdp.ini").write_text(XRDP_INI.replace("{log}", str(tmp / "xrdp.log")))
    xvnc, _ = start_xvnc(lab, "dc1", tmp, RDP_PASSWORD, INNER_VNC, "127.0.0.1", display_base=600)
    procs = [xvnc]
    thread = proxy = None
    try:
        procs.append(lab.popen("dc1", ["xrdp", "-n", "-c", str(tmp / "xrdp.ini")], stdout=subprocess.DEVNULL,
                               stderr=open(tmp / "xrdp.err", "w")))
        for _ in range(100):
            if f"{VM}:{RDP_PORT}" in lab.exec("dc1", ["ss", "-tln"], capture_output=True, text=True).stdout:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("xrdp did not start: " + (tmp / "xrdp.err").read_text()[-2000:])
        policy = parse_policy(config.DEFAULT_POLICY.read_text() + CONSOLE)
        log = SignedLog(state)
        thread = NamespaceLoop(lab.ns_name("host"), timeout=30)
        proxy = ConsoleProxy(policy, store, state, log)
        thread.run(proxy.start())  # no Degraded: FreeRDP and Xvnc are installed
        yield type("Console", (), {"tmp": tmp, "state": state, "lab": lab, "proxy": proxy, "log": log})
    finally:
        if proxy is not None:
            thread.run(proxy.stop())
        if thread is not None:
            thread.close()
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(10)


def process_list() -> str:
    return subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout


def rdp_clients() -> list[str]:
    return [line for line in process_list().splitlines() if "xfreerdp" in line and f"/v:{VM}:{RDP_PORT}" in line]


def leftovers(console) -> list[str]:
    """Processes of ended RDP sessions: xfreerdp, or a private Xvnc (its socket is in the state dir)."""
    private = str(console.state / "console" / "rdp")
    return rdp_clients() + [line for line in process_list().splitlines() if private in line]


def test_an_operator_sees_the_rdp_desktop_and_the_session_is_signed(console):
    shot = console.tmp / "shot.png"
    password = console.proxy.tickets.issue("alice", "dc1-rdp").password
    client = console.lab.popen("internet", [PY, "-W", "ignore", "-m", "vncdotool.command", "-v", "-t", "30",
                                            "-s", f"{UPLINK}::{PORT}", "-p", password,
                                            "pause", "2", "type", "hi", "capture", str(shot)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen_during = []
    try:
        for _ in range(200):  # while the session is open: its processes and what ps shows of them
            if rdp_clients():
                seen_during.append(process_list())
                listeners = console.lab.exec("host", ["ss", "-tlnp"], capture_output=True, text=True).stdout
                break
            time.sleep(0.05)
    finally:
        _, stderr = client.communicate(timeout=60)
    assert client.returncode == 0, stderr + (console.tmp / "xrdp.log").read_text(errors="replace")[-2000:]
    assert Image.open(shot).convert("RGB").getpixel((100, 100)) == MARKER
    # FreeRDP ran, with the credential on its stdin only.
    assert seen_during and "/from-stdin" in seen_during[0]
    assert RDP_PASSWORD not in seen_during[0]
    # The private Xvnc has no TCP port (the console listener shows the right namespace was looked at).
    assert f":{PORT}" in listeners and "Xvnc" not in listeners

    for _ in range(100):
        done = [s for s in console.proxy.archive.list() if s.get("result") not in (None, "active")]
        if done:
            break
        time.sleep(0.1)
    [session] = done
    assert session["console"]["target"] == "dc1-rdp" and session["console"]["keystrokes"] == 2
    entries = console.log.entries()
    ends = [e for e in entries if e["type"] == "admin_session_end" and e["session"] == session["id"]]
    assert ends and ends[0]["transcript_sha256"] == session["transcript_sha256"]
    assert verify_log(console.log.directory, console.log.writer.signer.verifier).ok

    # The session's processes and private files are gone with it.
    for _ in range(50):
        if not leftovers(console):
            break
        time.sleep(0.1)
    assert not leftovers(console)
    assert not any((console.state / "console" / "rdp").iterdir())

    # The password is in no record, log or process list.
    seen = [process_list(), json.dumps(entries), (console.tmp / "xrdp.log").read_text(errors="replace")]
    seen += [p.read_text(errors="replace") for p in (console.state / "admin" / "sessions").iterdir() if p.is_file()]
    assert not any(RDP_PASSWORD in blob for blob in seen)


@pytest.mark.parametrize("target, why", [
    ("dc1-rdp-closed", "the RDP client could not connect to 10.10.2.2:3390"),
    ("dc1-rdp-badcred", "must be 'username:password'"),
])
def test_an_rdp_login_that_fails_refuses_the_operator_and_says_why_in_the_log(console, target, why):
    password = console.proxy.tickets.issue("alice", target).password
    out = console.lab.exec("internet", [PY, "-W", "ignore", "-m", "vncdotool.command", "-v", "-t", "30",
                                        "-s", f"{UPLINK}::{PORT}", "-p", password, "capture",
                                        str(console.tmp / f"{target}.png")], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and f"could not open the console of {target} (VM side)" in out.stderr
    failed = [e for e in console.log.entries() if e["type"] == "console_vm_login_failed" and e["target"] == target]
    assert failed and why in failed[-1]["error"] and RDP_PASSWORD not in failed[-1]["error"]
    assert not leftovers(console) and not any((console.state / "console" / "rdp").iterdir())


def test_the_web_console_shows_the_rdp_desktop(console):
    """The web console's WebSocket (the door noVNC uses) opens the RDP target by a web ticket: an
    RFB client written out below reads the screen until the marker colour is at (100, 100)."""
    token = console.proxy.tickets.issue("alice", "dc1-rdp", web=True).password
    out = console.lab.exec("internet", [PY, "-c", WS_RFB_CLIENT, f"ws://{UPLINK}:{WEB_PORT}/console/ws?ticket={token}"],
                           capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["51,102,204"]


# RFB over the WebSocket, security None (the web ticket admitted it): full-screen Raw updates
# until the pixel at (100, 100) is the marker or 20 s pass; prints that pixel as r,g,b.
WS_RFB_CLIENT = r"""
import asyncio, struct, sys, time
from websockets.asyncio.client import connect
async def main(url):
    async with connect(url, max_size=None) as ws:
        buf = bytearray()
        async def read(n):
            while len(buf) < n:
                buf.extend(await asyncio.wait_for(ws.recv(), 20))
            data = bytes(buf[:n]); del buf[:n]; return data
        await read(12); await ws.send(b"RFB 003.008\n")
        assert 1 in await read((await read(1))[0]); await ws.send(b"\x01")
        assert await read(4) == bytes(4); await ws.send(b"\x01")
        w, h = struct.unpack(">HH", await read(4)); pf = await read(16); await read(struct.unpack(">I", await read(4))[0])
        bpp, big = pf[0] // 8, pf[2]
        rmax, gmax, bmax, rs, gs, bs = struct.unpack(">HHHBBB", pf[4:13])
        pixel, deadline = None, time.monotonic() + 20
        while pixel != (51, 102, 204) and time.monotonic() < deadline:
            await ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, w, h))
            while True:
                kind = (await read(1))[0]
                if kind == 0:
                    break
                if kind == 2:
                    continue
                await read(7); await read(struct.unpack(">I", await read(4))[0])  # cut text
            _, count = struct.unpack(">BH", await read(3))
            for _ in range(count):
                x, y, rw, rh, enc = struct.unpack(">HHHHi", await read(12))
                if enc != 0:
                    continue  # DesktopSize: no payload
                data = await read(rw * rh * bpp)
                if x <= 100 < x + rw and y <= 100 < y + rh:
                    at = ((100 - y) * rw + (100 - x)) * bpp
                    v = int.from_bytes(data[at:at + bpp], "big" if big else "little")
                    pixel = ((v >> rs & rmax) * 255 // rmax, (v >> gs & gmax) * 255 // gmax, (v >> bs & bmax) * 255 // bmax)
            await asyncio.sleep(0.2)
        print(",".join(map(str, pixel)))
asyncio.run(main(sys.argv[1]))
"""
