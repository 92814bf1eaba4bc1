"""The VNC console through skyguard against a direct VNC client on the same server (SPEC.md §8):
full-screen frames per second and the latency of one frame, both measured in this run.

A real TigerVNC server (Xvnc, 1024x768, 24-bit, VNC authentication) on loopback; the console
proxy (skyguard/console, recording on, as deployed) in this process's event loop thread; one
client that asks for the whole screen (a non-incremental FramebufferUpdateRequest, Raw) and waits
for it, back to back for DURATION seconds: once straight to Xvnc (the anchor), once through the
proxy with a one-time ticket. The client frames messages with skyguard's RFB reader on both runs,
so the client side costs the same. Reported: frames/s through skyguard / direct (headline,
target >= 0.5), and the added median and p99 latency of a frame.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import progress, result

from skyguard.admin.decisionlog import JsonLinesDecisionLog
from skyguard.console import rfb
from skyguard.console.proxy import ConsoleProxy
from skyguard.custody.store import SecretStore
from skyguard.policy.console import AdminConsole, ConsoleGrant, ConsoleTarget
from skyguard.policy.model import Policy, Workload, Zone

DURATION = 8.0  # seconds per run
WIDTH, HEIGHT = 1024, 768
PASSWORD = b"bench-pw"
VNC_PORT, PROXY_PORT = 25901, 25902


async def frames(port: int, password: bytes, seconds: float) -> list[float]:
    """Seconds each full-screen frame took, requested back to back."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    rfb.parse_version(await r.readexactly(12))
    w.write(rfb.VERSION_3_8)
    await r.readexactly((await r.readexactly(1))[0])
    w.write(bytes([rfb.SECURITY_VNC]))
    w.write(rfb.vnc_auth_response(password, await r.readexactly(16)))
    if await r.readexactly(4) != bytes(4):
        raise SystemExit("the VNC login failed")
    w.write(b"\x01")
    init = await rfb.read_server_init(r)
    w.write(rfb.set_encodings((rfb.ENC_RAW,)))
    took = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.monotonic()
        w.write(struct.pack(">BBHHHH", rfb.FB_UPDATE_REQUEST, 0, 0, 0, init.width, init.height))
        while (await rfb.read_server_message(r, init.pixel_format, (init.width, init.height))).type != rfb.FB_UPDATE:
            pass
        took.append(time.monotonic() - start)
    w.close()
    return sorted(took)


def main() -> None:
    if not shutil.which("Xvnc") or not shutil.which("vncpasswd"):
        raise SystemExit("Xvnc and vncpasswd are needed (Debian: tigervnc-standalone-server tigervnc-tools)")
    work = Path(tempfile.mkdtemp(prefix="sg-bench-console-"))
    (work / "passwd").write_bytes(subprocess.run(["vncpasswd", "-f"], input=PASSWORD, capture_output=True,
                                                 check=True).stdout)
    display = next(n for n in range(600 + os.getpid() % 300, 1000) if not Path(f"/tmp/.X{n}-lock").exists())
    xvnc = subprocess.Popen(["Xvnc", f":{display}", "-rfbport", str(VNC_PORT), "-localhost", "-interface", "127.0.0.1",
                             "-geometry", f"{WIDTH}x{HEIGHT}", "-depth", "24", "-SecurityTypes", "VncAuth",
                             "-PasswordFile", str(work / "passwd"), "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    proxy = None
    try:
        time.sleep(1.5)
        if xvnc.poll() is not None:
            raise SystemExit("Xvnc did not start")
        workload = Workload("vm", "lab", "sg-vm", "02:00:00:00:00:01", (ipaddress.ip_address("127.0.0.1"),))
        policy = Policy(name="bench", zones={"lab": Zone("lab", (workload,))}, networks={}, rules=(),
                        admin_console=AdminConsole(listen=f"127.0.0.1:{PROXY_PORT}",
                                                   targets=(ConsoleTarget("desk", "vm", "vnc", VNC_PORT, "vm-vnc"),),
                                                   operators=(ConsoleGrant("bench", ("lab",)),)))
        store = SecretStore(work / "state" / "secrets")
        store.set("vm-vnc", PASSWORD)
        proxy = ConsoleProxy(policy, store, work / "state", JsonLinesDecisionLog(work / "log.jsonl"))
        asyncio.run_coroutine_threadsafe(proxy.start(), loop).result(10)
        progress(f"direct: full {WIDTH}x{HEIGHT} frames for {DURATION:.0f} s")
        direct = asyncio.run(frames(VNC_PORT, PASSWORD, DURATION))
        progress(f"through skyguard: the same for {DURATION:.0f} s")
        ticket = proxy.tickets.issue("bench", "desk").password.encode()
        proxied = asyncio.run(frames(PROXY_PORT, ticket, DURATION))
    finally:
        if proxy is not None:
            asyncio.run_coroutine_threadsafe(proxy.stop(), loop).result(10)
        xvnc.terminate()
        xvnc.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    def pct(values, q):
        return values[min(len(values) - 1, int(len(values) * q))] * 1000

    result("console", "full-screen frames/s", len(proxied) / DURATION, len(direct) / DURATION, target=0.5,
           screen=f"{WIDTH}x{HEIGHT}x32bpp Raw", seconds_per_run=DURATION,
           direct_median_ms=pct(direct, 0.5), proxied_median_ms=pct(proxied, 0.5),
           added_median_ms=pct(proxied, 0.5) - pct(direct, 0.5), added_p99_ms=pct(proxied, 0.99) - pct(direct, 0.99),
           recording=True)


if __name__ == "__main__":
    sys.exit(main())
