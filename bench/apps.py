"""Signed-in requests through the identity-aware proxy against the app reached directly (SPEC.md
§8), keep-alive, both measured in this run: requests per second (headline, target >= 0.5) and
the added median and p99 latency.

The app is a small keep-alive HTTP server in its own process on loopback (it answers every GET
with a fixed page). The proxy (skyguard/apps, as deployed: TLS, the session cookie opened and
checked, the access decision, the client's identity header stripped and a fresh ES256 assertion
signed, reused for 15 s per user and app) runs in this process's event loop thread, with a session made in its
table as a sign-in would (the sign-in itself is not what is measured; its issuer is never asked
during the run: session_check is longer than the run). wrk drives both with the same connections
and threads.

Two anchors, both measured in the run: the same app reached directly over HTTPS (the transport the
proxy's users get; this is the headline ratio, so TLS is on both sides) and over plain HTTP (the
ratio then also counts what TLS costs). A do-nothing TLS relay to the app (bench/_relay.py: TLS
in, plain HTTP out, no HTTP work) is measured too: the floor of any proxy on this runtime (issue 20).
Besides requests/s, the CPU time per request of the proxy
(this process), of the app (its process) and of wrk are reported: this machine is shared, so rates
move with its load, while CPU per request says what each side costs (cpu_ratio: the CPU of a
direct exchange, wrk + app, over that of a proxied one, wrk + proxy + app).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import resource
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
from skyguard.parts import (
    NullLog,  # the decision log is not in this measure
    new_event_loop,
)
from skyguard.policy.apps import App, Identity
from skyguard.policy.model import Policy, Workload, Zone

DURATION = 8  # seconds per run
CONNECTIONS, THREADS = 16, 1
APP_PORT, APP_TLS_PORT, PROXY_PORT, RELAY_PORT = 25180, 25181, 25443, 25444
HOST = "bench.apps.test"

APP = r"""
import asyncio, ssl, sys
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
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(sys.argv[3], sys.argv[4])
    await loop.create_server(App, "127.0.0.1", int(sys.argv[1]), backlog=1024)  # plain HTTP
    await loop.create_server(App, "127.0.0.1", int(sys.argv[2]), backlog=1024, ssl=context)  # HTTPS
    print("ready", flush=True)
    await asyncio.Event().wait()
try:
    import uvloop; uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process so far (this one when pid is None)."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's waited-for children (wrk)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wrk(url: str, *headers: str, app_pid: int) -> tuple[float, float, float, float, float, float]:
    """(requests/s, median ms, p99 ms, this process's, the app's and wrk's CPU ms per request)
    of one wrk run."""
    mine, app, client = cpu_seconds(), cpu_seconds(app_pid), children_cpu_seconds()
    argv = ["wrk", "-t", str(THREADS), "-c", str(CONNECTIONS), "-d", f"{DURATION}s", "--latency"]
    for header in headers:
        argv += ["-H", header]
    out = subprocess.run(argv + [url], capture_output=True, text=True, check=True).stdout
    mine, app, client = cpu_seconds() - mine, cpu_seconds(app_pid) - app, children_cpu_seconds() - client
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    count = int(re.search(r"(\d+) requests in", out).group(1))
    if re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        raise SystemExit(f"wrk saw error responses from {url}:\n{out}")

    def ms(label: str) -> float:
        value, unit = re.search(rf"\s{label}\s+([\d.]+)(us|ms|s)\b", out).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    per_request = 1000 / max(count, 1)
    return rate, ms("50%"), ms("99%"), mine * per_request, app * per_request, client * per_request


def main() -> None:
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed (Debian: wrk)")
    work = Path(tempfile.mkdtemp(prefix="sg-bench-apps-"))
    chain, key = LabCA(work / "ca").leaf_files(HOST)
    app_process = subprocess.Popen([sys.executable, "-c", APP, str(APP_PORT), str(APP_TLS_PORT), str(chain), str(key)],
                                   stdout=subprocess.PIPE, text=True)
    relay_process = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent / "_relay.py"), str(RELAY_PORT),
                                      str(chain), str(key), str(APP_PORT), "-"])
    loop = new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    service = None
    try:
        assert app_process.stdout.readline().strip() == "ready"
        store = SecretStore(work / "state" / "secrets")
        store.set("bench-tls", chain.read_bytes() + key.read_bytes())
        store.set("idp-secret", b"never-used-in-this-run")
        workload = Workload("vm", "lab", "sg-vm", "02:00:00:00:00:01", (ipaddress.ip_address("127.0.0.1"),))
        app = App("bench", "vm", APP_PORT, HOST, f"127.0.0.1:{PROXY_PORT}", "bench-tls", users=("bench",))
        policy = Policy(name="bench", zones={"lab": Zone("lab", (workload,))}, networks={}, rules=(),
                        identity=Identity("https://idp.test:9443", "skyguard", "idp-secret", session_check=3600),
                        apps=(app,))
        service = AppsService(policy, store, decision_log=NullLog())
        asyncio.run_coroutine_threadsafe(service.start(), loop).result(10)
        session = service.sessions.create(app, SignIn("bench", "bench", "Bench User", ("staff",), "unused"), 3600)
        cookie = service.sealer.seal(session.sid, HOST, session.expires)
        pid = app_process.pid
        progress(f"direct over HTTPS (the proxy's transport): {CONNECTIONS} keep-alive connections for {DURATION} s")
        direct = wrk(f"https://127.0.0.1:{APP_TLS_PORT}/", f"Host: {HOST}:{APP_TLS_PORT}", app_pid=pid)
        progress(f"direct over plain HTTP (no TLS, unlike the proxy's users): the same for {DURATION} s")
        plain = wrk(f"http://127.0.0.1:{APP_PORT}/", app_pid=pid)
        progress(f"through skyguard (HTTPS): signed in, the same for {DURATION} s")
        proxied = wrk(f"https://127.0.0.1:{PROXY_PORT}/", f"Host: {HOST}:{PROXY_PORT}",
                      f"Cookie: __Host-skyguard-session={cookie}", "X-Skyguard-Assertion: forged", app_pid=pid)
        progress(f"through a do-nothing TLS relay to the app (the floor of a proxy on this runtime), {DURATION} s")
        relay_cpu = cpu_seconds(relay_process.pid)
        relay = wrk(f"https://127.0.0.1:{RELAY_PORT}/", f"Host: {HOST}:{RELAY_PORT}", app_pid=pid)
        relay_cpu_ms = (cpu_seconds(relay_process.pid) - relay_cpu) * 1000 / max(relay[0] * DURATION, 1)
        progress(f"relay floor: {relay[0]:.0f} requests/s (ratio {relay[0] / direct[0]:.2f}), relay CPU {relay_cpu_ms:.3f} ms "
                 f"per request")
        progress(f"requests/s: proxied {proxied[0]:.0f}, direct HTTPS {direct[0]:.0f} (ratio {proxied[0] / direct[0]:.2f}), "
                 f"direct plain HTTP {plain[0]:.0f} (ratio {proxied[0] / plain[0]:.2f}); CPU ms per request: proxy "
                 f"{proxied[3]:.3f} (+ app {proxied[4]:.3f}), app alone over HTTPS {direct[4]:.3f}, over HTTP {plain[4]:.3f}; "
                 f"wrk {proxied[5]:.3f} through the proxy, {direct[5]:.3f} direct over HTTPS")
    finally:
        if service is not None:
            asyncio.run_coroutine_threadsafe(service.stop(), loop).result(10)
        for process in (app_process, relay_process):
            process.terminate()
            process.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    result("apps", "signed-in requests/s", proxied[0], direct[0], target=0.5,
           connections=CONNECTIONS, threads=THREADS, seconds_per_run=DURATION, keep_alive=True,
           direct_median_ms=direct[1], proxied_median_ms=proxied[1], added_median_ms=proxied[1] - direct[1],
           direct_p99_ms=direct[2], proxied_p99_ms=proxied[2], added_p99_ms=proxied[2] - direct[2],
           anchor_is="the app reached directly over HTTPS on loopback (the proxy's users' transport)",
           plain_http_anchor=plain[0], ratio_to_plain_http=proxied[0] / plain[0],
           plain_http_median_ms=plain[1], plain_http_p99_ms=plain[2],
           relay_floor={"rps": relay[0], "ratio": relay[0] / direct[0], "relay_cpu_ms_per_request": relay_cpu_ms,
                        "is": "a do-nothing TLS relay to the app on the same runtime (bench/_relay.py)"},
           proxy_cpu_ms_per_request=proxied[3], app_cpu_ms_per_request_proxied=proxied[4],
           app_cpu_ms_per_request_direct_https=direct[4], app_cpu_ms_per_request_plain_http=plain[4],
           wrk_cpu_ms_per_request_proxied=proxied[5], wrk_cpu_ms_per_request_direct_https=direct[5],
           # What the whole exchange costs in CPU (wrk + proxy + app) against direct HTTPS (wrk + app): on
           # a machine with cores to spare this bounds the ratio; on a shared one, waits add to it.
           cpu_ratio=(direct[5] + direct[4]) / (proxied[5] + proxied[3] + proxied[4]),
           measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


if __name__ == "__main__":
    sys.exit(main())
