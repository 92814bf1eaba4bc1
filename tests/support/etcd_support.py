"""A real etcd cluster on loopback (Debian's etcd-server), for the fleet's tests and benchmark and
for trying a fleet on one machine. Each member is a child process with its own data dir and two
free loopback ports; `stop(i)` ends one by its pid (SIGTERM, then SIGKILL: a member that lost
quorum may not exit on SIGTERM), `start(i)` brings it back with its data; `freeze(i)` stops one
by SIGSTOP (a hung host, a partition: its connections stay open and silent), `thaw(i)` resumes it.

Not for production: no TLS, no auth, data under a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from skyguard.fleet.store import FleetError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalEtcdCluster:
    def __init__(self, directory: Path, members: int = 3, token: str | None = None):
        self.etcd = shutil.which("etcd")
        if not self.etcd:
            raise FleetError("etcd is not installed: apt-get install etcd-server")
        self.directory = Path(directory)
        self.names = [f"m{i}" for i in range(members)]
        self.client_ports = [_free_port() for _ in self.names]
        self.peer_ports = [_free_port() for _ in self.names]
        self.token = token or f"skyguard-{os.getpid()}-{time.monotonic_ns()}"
        self.procs: list[subprocess.Popen | None] = [None] * members
        self._started = [False] * members

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.client_ports]

    @property
    def endpoints(self) -> str:
        return ",".join(self.urls)

    def _command(self, i: int) -> list[str]:
        peers = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports))
        return [self.etcd, "--name", self.names[i], "--data-dir", str(self.directory / self.names[i]),
                "--listen-client-urls", self.urls[i], "--advertise-client-urls", self.urls[i],
                "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
                "--initial-cluster", peers, "--initial-cluster-token", self.token,
                "--initial-cluster-state", "new", "--log-level", "warn"]

    def start(self, i: int | None = None) -> LocalEtcdCluster:
        self.directory.mkdir(parents=True, exist_ok=True)
        for j in ([i] if i is not None else range(len(self.names))):
            if self.procs[j] is not None and self.procs[j].poll() is None:
                continue
            logfile = open(self.directory / f"{self.names[j]}.log", "ab")
            self.procs[j] = subprocess.Popen(self._command(j), stdout=logfile, stderr=logfile,
                                             stdin=subprocess.DEVNULL)
            logfile.close()
        return self

    def stop(self, i: int, timeout: float = 5.0) -> None:
        proc = self.procs[i]
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)   # a frozen member takes its SIGTERM once resumed
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()   # a member without quorum can hang in its shutdown
                proc.wait(10)
        self.procs[i] = None

    def freeze(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGSTOP)

    def thaw(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)

    def watches_started(self, i: int) -> int:
        """How many watch streams member i has served since it started (its /metrics)."""
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # loopback, never a proxy
        with opener.open(f"{self.urls[i]}/metrics", timeout=5) as answer:
            for line in answer.read().decode().splitlines():
                if line.startswith("grpc_server_started_total{") and 'grpc_service="etcdserverpb.Watch"' in line:
                    return int(float(line.rsplit(" ", 1)[1]))
        return 0

    def stop_all(self) -> None:
        for i in range(len(self.names)):
            self.stop(i)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until a write through the cluster succeeds (a leader and quorum)."""
        import asyncio

        from skyguard.fleet.etcd import EtcdStore

        store = EtcdStore(self.urls, timeout=1.0)
        deadline = time.monotonic() + timeout
        while True:
            try:
                asyncio.run(store.put("/skyguard/ready", b"1"))
                return
            except FleetError:
                if time.monotonic() > deadline:
                    raise FleetError(f"the local etcd cluster did not become ready in {timeout:.0f} s "
                                     f"(logs in {self.directory})") from None
                time.sleep(0.2)

    def __enter__(self):
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop_all()
            raise
        return self

    def __exit__(self, *exc):
        self.stop_all()
