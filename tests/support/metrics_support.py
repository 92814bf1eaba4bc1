"""Test harness for the metrics and live-view tests: a real Prometheus server in a lab's host
namespace beside the daemon (tests/integration/daemon_support.py starts that), and a raw frame
flood sent from inside a lab VM.

Not used by the daemon. Everything it starts it stops; namespaces are the lab's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from skyguard.errors import DaemonError
from support.client_waits import curl_argv


class PrometheusServer:
    """Debian's prometheus in the lab's host namespace, scraping `target` every second, with the
    repository's alert rules loaded. Queried over its HTTP API with curl from the same namespace."""

    __test__ = False

    def __init__(self, lab, work: Path, target: str, listen: str, rules: Path | None = None):
        self.lab = lab
        self.work = Path(work)
        self.target = target
        self.listen = listen
        self.rules = rules
        self.proc: subprocess.Popen | None = None

    def start(self) -> PrometheusServer:
        exe = shutil.which("prometheus")
        if not exe:
            raise DaemonError("prometheus is not installed: apt-get install prometheus (scripts/setup does)")
        self.work.mkdir(parents=True, exist_ok=True)
        config_file = self.work / "prometheus.yml"
        conf = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [{"job_name": "skyguard", "static_configs": [{"targets": [self.target]}]}]}
        if self.rules:
            shutil.copy(self.rules, self.work / "rules.yml")
            conf["rule_files"] = [str(self.work / "rules.yml")]
        config_file.write_text(json.dumps(conf))  # JSON is YAML
        log = open(self.work / "prometheus.log", "wb")
        self.proc = self.lab.popen("host", [exe, f"--config.file={config_file}",
                                            f"--storage.tsdb.path={self.work / 'tsdb'}",
                                            f"--web.listen-address={self.listen}", "--log.level=warn"],
                                   lab_resolver=False, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DaemonError(f"prometheus exited: {(self.work / 'prometheus.log').read_text()[-3000:]}")
            if self._get("/-/ready", check=False) is not None:
                return self
            time.sleep(0.3)
        raise DaemonError("prometheus did not become ready within 30s")

    def _get(self, path: str, params: dict | None = None, check: bool = True):
        argv = curl_argv("-f", "--get")
        for k, v in (params or {}).items():
            argv += ["--data-urlencode", f"{k}={v}"]
        argv.append(f"http://{self.listen}{path}")
        proc = self.lab.exec("host", argv, lab_resolver=False, capture_output=True, text=True)
        if proc.returncode != 0:
            if check:
                raise DaemonError(f"GET {path} {params} failed (curl exit {proc.returncode}): {proc.stderr}")
            return None
        return proc.stdout

    def api(self, path: str, **params):
        reply = json.loads(self._get(f"/api/v1/{path}", params))
        if reply.get("status") != "success":
            raise DaemonError(f"prometheus {path}: {reply}")
        return reply["data"]

    def query(self, promql: str) -> list[tuple[dict, float, float]]:
        """[(labels, sample time, value)] of an instant query."""
        data = self.api("query", query=promql)
        return [(r["metric"], float(r["value"][0]), float(r["value"][1])) for r in data["result"]]

    def value(self, promql: str) -> float:
        rows = self.query(f"sum({promql}) or vector(0)")
        return rows[0][2]

    def wait_scraped_after(self, moment: float, timeout: float = 30.0) -> None:
        """Block until Prometheus holds a successful scrape that started after `moment` (Unix time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.query('timestamp(skyguard_daemon_start_time_seconds{job="skyguard"})')
            if rows and rows[0][2] > moment:
                return
            time.sleep(0.3)
        raise DaemonError(f"prometheus scraped nothing after {moment} within {timeout:.0f}s; "
                          f"targets: {self.api('targets')}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


# Run inside a lab VM: send raw Ethernet frames (IPv4/UDP) out of eth0. argv: gateway MAC, own
# MAC, own IPv4, count, mode, then for "flows" a destination address and port. Modes: "spoof"
# (random source addresses: all dropped), "scan" (own source, random destinations: all dropped
# unless the policy allows them), "flows" (own source, one allowed destination, a new source
# port per frame: one new allowed flow each).
FLOOD = r"""
import random, socket, struct, sys
gw, me, my_ip, count, mode = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
mac = lambda s: bytes.fromhex(s.replace(":", ""))
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
rnd = random.Random(8)
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.bind(("eth0", 0))
eth = mac(gw) + mac(me) + b"\x08\x00"
payload = b"x" * 18
for i in range(count):
    if mode == "spoof":
        src = bytes([10, rnd.randrange(256), rnd.randrange(256), rnd.randrange(1, 255)])
        dst = socket.inet_aton("10.10.2.2")
    elif mode == "flows":
        src, dst = socket.inet_aton(my_ip), socket.inet_aton(sys.argv[6])
    else:
        src = socket.inet_aton(my_ip)
        dst = bytes([198, 51, 100, rnd.randrange(1, 255)]) if i % 2 else bytes([203, 0, 113, rnd.randrange(1, 255)])
    if mode == "flows":
        ports = (10000 + i, int(sys.argv[7]))
    else:
        ports = (rnd.randrange(1024, 65535), rnd.randrange(1, 65535))
    udp = struct.pack("!HHHH", *ports, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i & 0xFFFF, 0, 64, 17, 0, src, dst)
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    sock.send(eth + hdr + udp)
"""
