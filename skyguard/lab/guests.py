"""The lab's QEMU guests as lab members (`skyguard lab up --vms qemu`): which workloads boot as
guests, booting them, and what `lab exec`, `lab status` and `lab down` do for them. How one guest
is started and talked to is in qemu.py; the namespaces, uplink and internet are lab.py's, the same
for both kinds of VM.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from skyguard.errors import BadInput, LabError
from skyguard.lab import procs, qemu
from skyguard.policy.model import Workload

KINDS = ("netns", "qemu")
STATUS_PROBE_TIMEOUT = 5.0


def parse_vms(vms: str | None, workloads: list[Workload]) -> set[str]:
    """Names of the workloads that boot as QEMU guests: `netns` (none), `qemu` (all) or
    `qemu=NAME,NAME` (those; the others stay namespaces)."""
    vms = (vms or "netns").strip()
    kind, _, names = vms.partition("=")
    if kind not in KINDS or (kind == "netns" and names):
        raise BadInput(f"--vms {vms!r}: use `netns`, `qemu` or `qemu=NAME,NAME`")
    if kind == "netns":
        return set()
    known = {w.name for w in workloads}
    if not names:
        return known
    chosen = {n.strip() for n in names.split(",") if n.strip()}
    unknown = sorted(chosen - known)
    if unknown or not chosen:
        raise BadInput(f"--vms {vms!r}: no workload named {', '.join(unknown) or '(none given)'}; "
                       f"choose from {', '.join(sorted(known))}")
    return chosen


def spec_for(lab_dir: Path, w: Workload) -> qemu.GuestSpec:
    return qemu.GuestSpec(name=w.name, interface=w.interface, mac=w.mac,
                          addresses=[str(a) for a in w.addresses], dir=lab_dir / "guests" / w.name)


def boot(lab, workloads: list[Workload]) -> list[dict]:
    """Start one QEMU per workload (all at once), wait until every agent answers, and return their
    state entries. A guest that does not boot raises LabError with its console log (the caller
    tears the lab down, guests included)."""
    image = qemu.find_image()
    accel, why = qemu.choose_accel(image)
    lab.progress(f"booting {len(workloads)} QEMU guests: {why}")
    started = []
    for w in workloads:
        spec = spec_for(lab.lab_dir, w)
        started.append((w, spec, qemu.start(spec, image, accel, lab.netns_path("host")), time.monotonic()))
    entries = []
    for w, spec, pid, began in started:
        qemu.wait_booted(spec, pid)
        seconds = time.monotonic() - began  # since its QEMU started (they boot side by side)
        lab.progress(f"guest {w.name} booted in {seconds:.1f}s (pid {pid}, tap {w.interface})")
        entries.append({"name": w.name, "zone": w.zone, "kind": "qemu", "interface": w.interface,
                        "mac": w.mac, "addresses": [str(a) for a in w.addresses], "pid": pid,
                        "accel": accel, "accel_why": why, "image": image.key,
                        "boot_seconds": round(seconds, 2), "console_log": str(spec.console_log),
                        "agent_socket": str(spec.agent_socket)})
    return entries


def is_guest(vm: dict) -> bool:
    return vm.get("kind") == "qemu"


def running(lab_dir: Path, vm: dict) -> bool:
    return procs.alive(vm["pid"]) and qemu.is_lab_qemu(vm["pid"], lab_dir)


def describe(lab_dir: Path, vm: dict, probe: bool) -> dict:
    """The state entry plus `state`: running, or stopped (QEMU is gone); with probe, `answering`
    (did the agent run a command)."""
    out = dict(vm, state="running" if running(lab_dir, vm) else "stopped")
    if probe:
        out["answering"] = False
        if out["state"] == "running":
            try:
                reply = qemu.Agent(Path(vm["agent_socket"])).run("echo ok", timeout=STATUS_PROBE_TIMEOUT)
                out["answering"] = reply.stdout == b"ok\n"
            except (subprocess.TimeoutExpired, OSError, LabError):
                pass
    return out


def stop(lab_dir: Path, state: dict | None) -> list[int]:
    """Stop every guest of the lab by pid: those in the state file and any QEMU whose command line
    names the lab folder (left by a killed run). Returns the pids stopped."""
    pids = {vm["pid"] for vm in (state or {}).get("vms", [])
            if is_guest(vm) and qemu.is_lab_qemu(vm["pid"], lab_dir) and procs.alive(vm["pid"])}
    pids.update(qemu.lab_qemus(lab_dir))
    procs.stop(sorted(pids))
    return sorted(pids)


def run(vm: dict, argv: list[str], input=None, capture_output: bool = False, text: bool = False,
        timeout: float | None = qemu.AGENT_TIMEOUT, check: bool = False,
        stdout=None, stderr=None, **_ignored) -> subprocess.CompletedProcess:
    """subprocess.run's contract for a command in a guest: exit status, and stdout/stderr
    captured (capture_output or PIPE) or written to ours."""
    if not argv:
        raise BadInput("no command given; write it after `--`, e.g. `lab exec radius1 -- ip addr`")
    done = qemu.Agent(Path(vm["agent_socket"])).run(list(argv), input=input, timeout=timeout)
    capture_out = capture_output or stdout == subprocess.PIPE
    capture_err = capture_output or stderr == subprocess.PIPE
    if not capture_out and stdout != subprocess.DEVNULL:
        sys.stdout.buffer.write(done.stdout)
        sys.stdout.flush()
    if not capture_err and stderr != subprocess.DEVNULL:
        sys.stderr.buffer.write(done.stderr)
        sys.stderr.flush()
    out = done.stdout if capture_out else None
    err = done.stderr if capture_err else None
    if text:
        out = out.decode(errors="replace") if out is not None else None
        err = err.decode(errors="replace") if err is not None else None
    result = subprocess.CompletedProcess(argv, done.returncode, out, err)
    if check:
        result.check_returncode()
    return result
