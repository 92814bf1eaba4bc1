"""Helpers for the vm tier: a lab whose workloads are real QEMU guests on taps (Debian's cloud
kernel, busybox, curl, OpenBSD netcat, dropbear; skyguard/lab/guest/), and traffic from inside
them. Commands reach a guest through its agent (Lab.exec), the way `skyguard lab exec` does.

The daemon is the integration tier's RunningDaemon (tests/integration/daemon_support.py): the
same `skyguard up` in the lab's host namespace, which sees each guest's tap as it sees a veth.
Nothing here asserts skyguard's behaviour; the tests do.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from daemon_support import PY, RunningDaemon, attached_programs, drop_count, start_listener, stop_process, wait_for  # noqa: E402

from skyguard import config  # noqa: E402
from skyguard.lab import Lab  # noqa: E402

__all__ = ["PY", "RunningDaemon", "attached_programs", "drop_count", "start_listener", "stop_process",
           "wait_for", "vm_lab", "gsh", "probe", "start_tcp_echo"]

PROBE_TIMEOUT = 2  # seconds a probe waits for its answer inside the guest


def vm_lab(tmp_path_factory, tag: str, vms: str):
    """A lab of policies/keysystems.yaml with the workloads in `vms` as QEMU guests, prefix unique
    to this process; the generator tears it down (guests stopped by pid)."""
    prefix = f"v{os.getpid() % 1000000}{tag}-"
    lab = Lab(policy_path=config.DEFAULT_POLICY, prefix=prefix,
              lab_dir=tmp_path_factory.mktemp("vmlabs") / prefix, progress=lambda message: None)
    try:
        lab.up(vms=vms)
        yield lab
    finally:
        lab.down()


def gsh(lab, vm: str, line: str, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess:
    """Run a shell line in guest (or namespace VM) `vm`; text output captured."""
    return lab.exec(vm, ["sh", "-c", line], capture_output=True, text=True, timeout=timeout, input=input,
                    lab_resolver=False)


def _probe_line(kind: str, host: str, port: int, source: str | None) -> str:
    src = f"-s {source} " if source else ""
    if kind == "tcp":  # a whole exchange with an echo server: both directions passed
        return f"printf probe | ncat -N -w {PROBE_TIMEOUT} {src}{host} {port} | grep -q probe"
    if kind == "udp":
        return f"printf probe | ncat -u -w {PROBE_TIMEOUT} {src}{host} {port} | grep -q probe"
    if kind == "icmp":
        return f"ping -c1 -W {PROBE_TIMEOUT} {'-I ' + source + ' ' if source else ''}{host} >/dev/null"
    if kind == "dns":  # `host` is a name, resolved through the guest's resolver (the lab's DNS)
        return f"nslookup {host} >/dev/null"
    raise ValueError(kind)


def probe(lab, vm: str, probes) -> list[bool]:
    """Run every probe ((kind, host, port[, source])) at once inside `vm`; True = answered."""
    lines = []
    for i, p in enumerate(probes):
        kind, host, port, source = (list(p) + [None] * 4)[:4]
        lines.append(f"( {_probe_line(kind, host, port, source)} ) >/dev/null 2>&1 && echo {i}=1 > /tmp/p{i} "
                     f"|| echo {i}=0 > /tmp/p{i} &")
    script = "\n".join(lines) + "\nwait\ncat " + " ".join(f"/tmp/p{i}" for i in range(len(probes)))
    out = gsh(lab, vm, script, timeout=60)
    assert out.returncode == 0, out.stderr
    got = dict(line.split("=") for line in out.stdout.split())
    return [got[str(i)] == "1" for i in range(len(probes))]


def start_tcp_echo(lab, vm: str, ports) -> None:
    """TCP echo servers (busybox nc, dual-stack) on `ports` in guest `vm`, left running."""
    line = " ".join(f"nc -ll -p {p} -e cat </dev/null >/dev/null 2>&1 &" for p in ports)
    assert gsh(lab, vm, line).returncode == 0
