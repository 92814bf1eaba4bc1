"""Signed-in requests through the identity-aware proxy against the app reached directly (SPEC.md
§8), keep-alive, both measured in this run: requests per second (headline, target >= 0.5) and
the added median and p99 latency.

The app is a small keep-alive HTTP server in its own process on loopback (it answers every GET
with a fixed page). The proxy (skyguard/apps, as deployed: TLS, the session cookie opened and
checked, the access decision, the client's identity header stripped and a fresh ES256 assertion
signed for every request) runs in this process's event loop thread, with a session made in its
table as a sign-in would (the sign-in itself is not what is measured; its issuer is never asked
during the run: session_check is longer than the run). wrk drives both with the same connections
and threads; the anchor is plain HTTP to the app, so the ratio includes what TLS costs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import progress, result

from skyguard.apps.oidc import SignIn
from skyguard.apps.service import AppsService
from skyguard.custody.store import SecretStore
from skyguard.lab.ca import LabCA
from skyguard.parts import new_event_loop
from skyguard.policy.apps import App, Identity
from skyguard.policy.model import Policy, Workload, Zone

DURATION = 8  # seconds per run
CONNECTIONS, THREADS = 16, 1
APP_PORT, PROXY_PORT = 25180, 25443
HOST = "bench.apps.test"

APP = r"""
import asyncio, sys
BODY = b"<html><body>hello from the app</body></html>\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
class App(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""
    def data_received(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:  # GETs without bodies
            _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.transport.write(RESPONSE)
async def main():
    server = await asyncio.get_running_loop().create_server(App, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    print("ready", flush=True)
    await server.serve_forever()
try:
    import uvloop; uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""


def wrk(url: str, *headers: str) -> tuple[float, float, float]:
    """(requests/s, median ms, p99 ms) of one wrk run."""
    argv = ["wrk", "-t", str(THREADS), "-c", str(CONNECTIONS), "-d", f"{DURATION}s", "--latency"]
    for header in headers:
        argv += ["-H", header]
    out = subprocess.run(argv + [url], capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    if re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        raise SystemExit(f"wrk saw error responses from {url}:\n{out}")

    def ms(label: str) -> float:
        value, unit = re.search(rf"\s{label}\s+([\d.]+)(us|ms|s)\b", out).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return rate, ms("50%"), ms("99%")


def main() -> None:
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed (Debian: wrk)")
    work = Path(tempfile.mkdtemp(prefix="sg-bench-apps-"))
    app_process = subprocess.Popen([sys.executable, "-c", APP, str(APP_PORT)], stdout=subprocess.PIPE, text=True)
    loop = new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    service = None
    try:
        assert app_process.stdout.readline().strip() == "ready"
        chain, key = LabCA(work / "ca").leaf_files(HOST)
        store = SecretStore(work / "state" / "secrets")
        store.set("bench-tls", chain.read_bytes() + key.read_bytes())
        store.set("idp-secret", b"never-used-in-this-run")
        workload = Workload("vm", "lab", "sg-vm", "02:00:00:00:00:01", (ipaddress.ip_address("127.0.0.1"),))
        app = App("bench", "vm", APP_PORT, HOST, f"127.0.0.1:{PROXY_PORT}", "bench-tls", users=("bench",))
        policy = Policy(name="bench", zones={"lab": Zone("lab", (workload,))}, networks={}, rules=(),
                        identity=Identity("https://idp.test:9443", "skyguard", "idp-secret", session_check=3600),
                        apps=(app,))

        class Discard:
            def record(self, kind, /, **fields):
                pass

        service = AppsService(policy, store, decision_log=Discard())
        asyncio.run_coroutine_threadsafe(service.start(), loop).result(10)
        session = service.sessions.create(app, SignIn("bench", "bench", "Bench User", ("staff",), "unused"), 3600)
        cookie = service.sealer.seal(session.sid, HOST, session.expires)
        progress(f"direct: {CONNECTIONS} keep-alive connections to the app for {DURATION} s")
        direct = wrk(f"http://127.0.0.1:{APP_PORT}/")
        progress(f"through skyguard: signed in, the same for {DURATION} s")
        proxied = wrk(f"https://127.0.0.1:{PROXY_PORT}/", f"Host: {HOST}:{PROXY_PORT}",
                      f"Cookie: __Host-skyguard-session={cookie}", "X-Skyguard-Assertion: forged")
    finally:
        if service is not None:
            asyncio.run_coroutine_threadsafe(service.stop(), loop).result(10)
        app_process.terminate()
        app_process.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    result("apps", "signed-in requests/s", proxied[0], direct[0], target=0.5,
           connections=CONNECTIONS, threads=THREADS, seconds_per_run=DURATION, keep_alive=True,
           direct_median_ms=direct[1], proxied_median_ms=proxied[1], added_median_ms=proxied[1] - direct[1],
           direct_p99_ms=direct[2], proxied_p99_ms=proxied[2], added_p99_ms=proxied[2] - direct[2],
           anchor_is="the app over plain HTTP on loopback", measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


if __name__ == "__main__":
    sys.exit(main())
