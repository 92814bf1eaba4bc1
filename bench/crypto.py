"""Signatures per second through the crypto proxy's API vs the same SoftHSM key used directly by a
local process (SPEC.md section 8: "signatures through the crypto proxy | the same SoftHSM key used
locally | ratio and p99 reported").

Both sides sign SHA-256 digests with one ec-p256 key in a SoftHSM token made for the run. The
anchor is one local process calling the PKCS#11 backend in a loop. skyguard is the crypto proxy
(skyguard/keys/proxy.py) in its own process on loopback (127.0.0.1 stands for a VM on `lo`: the
proxy identifies it by address and route as it does a VM), asked by CLIENTS keep-alive HTTP clients
in this process: identification, the zone and rate checks, JSON, the key worker threads and a
key_use record per signature are all in the measured path; the datapath and the lab are not (the
lab test covers that path, tests/integration/test_crypto_proxy.py).

    bench/run crypto           (SKYGUARD_BENCH_SECONDS sets each side's duration, default 5)
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import progress, result  # noqa: E402

SECONDS = float(os.environ.get("SKYGUARD_BENCH_SECONDS", "5"))
CLIENTS = int(os.environ.get("SKYGUARD_BENCH_CLIENTS", "2"))
PIN = secrets.token_hex(8).encode()
TARGET = 0.5  # no target in SPEC.md (ratio and p99 reported); half the local rate is a useful bar


def serve(token_dir: str, module: str, state: str) -> None:
    """The proxy's process: print its port, serve until stdin closes."""
    import ipaddress

    from skyguard.keys.proxy import CryptoProxy
    from skyguard.parts import (
        LoopThread,
        NullLog,  # the signed log is not in this measure (bench/tlog.py is)
    )
    from skyguard.policy.keys import KeyGrant, KeysConfig
    from skyguard.policy.model import Policy, Workload, Zone

    vm = Workload("vm1", "auth", "lo", "02:00:00:00:00:01", (ipaddress.ip_address("127.0.0.1"),))
    keys = KeysConfig(backend="pkcs11", module=module, token="bench", pin_secret="hsm-pin", port=0,
                      grants=(KeyGrant("bench", ("auth",), ("sign",), 1e9, 10**9),))
    policy = Policy(name="bench", zones={"auth": Zone("auth", (vm,))}, networks={}, rules=(), keys=keys)
    loop = LoopThread()
    proxy = CryptoProxy(policy, Path(state), NullLog(), hosts=("127.0.0.1",))
    loop.call(proxy.start())
    print(proxy.port, flush=True)
    sys.stdin.read()
    loop.call(proxy.stop())
    loop.stop()


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98] if len(samples) >= 100 else max(samples)


def anchor_run(module: str) -> tuple[float, list[float]]:
    from skyguard.keys.pkcs11 import Pkcs11Backend

    backend = Pkcs11Backend(module, "bench", PIN)
    digest = hashlib.sha256(b"anchor").digest()
    latencies = []
    end = time.monotonic() + SECONDS
    while time.monotonic() < end:
        t0 = time.perf_counter()
        backend.sign("bench", digest)
        latencies.append(time.perf_counter() - t0)
    backend.close()
    return len(latencies) / SECONDS, latencies


def proxy_run(port: int) -> tuple[float, list[float], int]:
    body = json.dumps({"digest": hashlib.sha256(b"through the proxy").hexdigest()})
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    end = time.monotonic() + SECONDS

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine = []
        while time.monotonic() < end:
            t0 = time.perf_counter()
            conn.request("POST", "/v1/keys/bench/sign", body=body, headers={"content-type": "application/json"})
            response = conn.getresponse()
            response.read()
            mine.append(time.perf_counter() - t0)
            if response.status != 200:
                failures[0] += 1
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies) / SECONDS, latencies, failures[0]


def main() -> int:
    from skyguard.custody.store import SecretStore
    from skyguard.keys.softhsm import SoftHsmToken

    tmp = Path(tempfile.mkdtemp(prefix="sg-bench-crypto-"))
    token = SoftHsmToken.create(tmp / "hsm", "bench", PIN)
    os.environ.update(token.env)
    state = tmp / "state"
    SecretStore(state / "secrets").set("hsm-pin", PIN)
    progress("token made; creating an ec-p256 key in it")
    setup = subprocess.run([sys.executable, "-c", "import sys\nfrom skyguard.keys.pkcs11 import Pkcs11Backend\n"
                            "Pkcs11Backend(sys.argv[1], 'bench', sys.stdin.buffer.read()).create('bench', 'ec-p256')",
                            token.module], input=PIN, env=os.environ, capture_output=True, timeout=60)
    if setup.returncode != 0:
        progress(setup.stderr.decode()[-500:])
        return 1
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(tmp), token.module, str(state)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=os.environ, text=True)
    try:
        port = int(server.stdout.readline())
        progress(f"crypto proxy on 127.0.0.1:{port}; {CLIENTS} keep-alive clients for {SECONDS:g} s")
        proxy_rate, proxy_latencies, failures = proxy_run(port)
        progress(f"proxy: {proxy_rate:.0f} signatures/s, p99 {p99(proxy_latencies) * 1e3:.2f} ms, {failures} refused")
    finally:
        server.stdin.close()
        server.wait(30)
    progress(f"anchor: the same key from this process for {SECONDS:g} s")
    anchor_rate, anchor_latencies = anchor_run(token.module)
    progress(f"anchor: {anchor_rate:.0f} signatures/s, p99 {p99(anchor_latencies) * 1e3:.3f} ms")
    if failures:
        progress(f"{failures} requests were not answered 200: the run is not valid")
        return 1
    result("crypto", "signatures/s", proxy_rate, anchor_rate, target=TARGET,
           p99_ms={"skyguard": p99(proxy_latencies) * 1e3, "anchor": p99(anchor_latencies) * 1e3},
           median_ms={"skyguard": statistics.median(proxy_latencies) * 1e3,
                      "anchor": statistics.median(anchor_latencies) * 1e3},
           clients=CLIENTS, seconds=SECONDS, key="ec-p256 in SoftHSM 2.6",
           path="loopback HTTP/1.1 keep-alive to the crypto proxy process (no datapath)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve(*sys.argv[2:])
        sys.exit(0)
    sys.exit(main())
