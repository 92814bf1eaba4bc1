"""Guests that do not boot (vm tier): QEMU that exits at once, a guest that hangs (its agent never
answers), a lab whose guest fails, and a `lab up` killed while its guest boots. Each is stopped,
reported with its console log (or QEMU's error), and leaves nothing behind: no QEMU, no tap, no
namespace. Real QEMU, real kernel; the broken images are made here (a file that is not a kernel,
an initramfs that is not an archive).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from skyguard import config
from skyguard.errors import LabError
from skyguard.lab import Lab, guests, procs, qemu
from skyguard.lab.topology import read_workloads

HANG_TIMEOUT = 6.0  # seconds before a guest that never answers is stopped
# A lab of one workload: the lab-level tests need one guest, not the default policy's seven VMs.
ONE_GUEST = """apiVersion: skyguard/v1
kind: Policy
metadata: {name: one-guest}
zones:
  sandbox:
    workloads:
      - {name: agent1, interface: sg-agent1, mac: "02:00:00:00:05:02", addresses: [10.10.5.2, "fd00:10:5::2"]}
"""


@pytest.fixture
def one_guest_policy(tmp_path):
    path = tmp_path / "one-guest.yaml"
    path.write_text(ONE_GUEST)
    return path


@pytest.fixture
def short_dir():
    """A lab folder with a short path: a guest's sockets live in it, and pytest's tmp_path (deeper
    under xdist) can pass the 107 bytes a unix socket path may have."""
    path = Path(tempfile.mkdtemp(prefix="sgv"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def host_ns(root):
    """A namespace of this test's own standing in for the lab's host."""
    name = f"vbad{os.getpid() % 1000000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield Path("/run/netns") / name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _spec(tmp_path: Path, **extra) -> qemu.GuestSpec:
    w = next(w for w in read_workloads(config.DEFAULT_POLICY) if w.name == "agent1")
    spec = guests.spec_for(tmp_path, w)
    spec.extra.update(extra)
    return spec


def _tap_exists(host_ns: Path, name: str) -> bool:
    return subprocess.run(["ip", "-n", host_ns.name, "link", "show", name], capture_output=True).returncode == 0


def test_qemu_that_exits_at_once_is_reported_with_its_error(host_ns, tmp_path):
    not_a_kernel = tmp_path / "vmlinuz"
    not_a_kernel.write_bytes(os.urandom(4096))
    spec = _spec(tmp_path, kernel=not_a_kernel)
    image = qemu.find_image()
    pid = qemu.start(spec, image, "tcg", host_ns)
    with pytest.raises(LabError) as failed:
        qemu.wait_booted(spec, pid, timeout=HANG_TIMEOUT)
    message = str(failed.value)
    assert "agent1 did not boot: QEMU exited" in message and "console log" in message
    assert not procs.alive(pid)
    assert not _tap_exists(host_ns, spec.interface)


def test_a_guest_that_hangs_is_stopped_and_its_console_log_reported(host_ns, tmp_path):
    # A shell as init: it waits on the console forever and the agent never starts. loglevel=7 so
    # the console log shows the boot.
    spec = _spec(tmp_path)
    spec.kernel_args = "loglevel=7 rdinit=/bin/sh"
    pid = qemu.start(spec, qemu.find_image(), "tcg", host_ns)
    with pytest.raises(LabError) as failed:
        qemu.wait_booted(spec, pid, timeout=HANG_TIMEOUT)
    message = str(failed.value)
    assert f"did not boot within {HANG_TIMEOUT:.0f}s and was stopped" in message
    assert "console log" in message and re.search(r"\[\s*\d+\.\d{6}\] ", message), message  # kernel lines
    assert not procs.alive(pid)
    assert not _tap_exists(host_ns, spec.interface)


def test_a_lab_whose_guest_fails_is_removed_whole(root, tmp_path, short_dir, monkeypatch, one_guest_policy):
    prefix = f"v{os.getpid() % 1000000}f-"
    lab = Lab(policy_path=one_guest_policy, prefix=prefix, lab_dir=short_dir / prefix,
              progress=lambda message: None)
    good = qemu.find_image()
    broken = tmp_path / "initrd.img"
    broken.write_bytes(b"not a cpio archive" * 100)
    # A broken image (as a bad build would leave): the real kernel with an initramfs it cannot use.
    monkeypatch.setattr(qemu, "find_image", lambda: qemu.GuestImage(good.kernel, broken, "broken"))
    monkeypatch.setattr(qemu, "wait_booted", _with_timeout(qemu.wait_booted, HANG_TIMEOUT))
    try:
        with pytest.raises(LabError) as failed:
            lab.up(vms="qemu")
        assert "agent1" in str(failed.value) and "console log" in str(failed.value)
        assert not qemu.lab_qemus(lab.lab_dir)
        assert not [n for n in os.listdir("/run/netns") if n.startswith(prefix)]
        assert lab.status()["up"] is False
    finally:
        lab.down()


def _with_timeout(wait, timeout):
    return lambda spec, pid, timeout_=timeout: wait(spec, pid, timeout_)


def test_a_killed_lab_up_leaves_guests_that_down_stops(root, short_dir, one_guest_policy):
    prefix = f"v{os.getpid() % 1000000}k-"
    lab_dir = short_dir / prefix
    env = dict(os.environ, SKYGUARD_LAB_PREFIX=prefix, SKYGUARD_LAB_DIR=str(short_dir),
               PYTHONPATH=str(config.REPO_ROOT))
    cli = [sys.executable, "-m", "skyguard.cli.main", "lab"]
    up = subprocess.Popen(cli + ["up", "--policy", str(one_guest_policy), "--vms", "qemu"], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not qemu.lab_qemus(lab_dir) and time.monotonic() < deadline and up.poll() is None:
            time.sleep(0.1)
        assert qemu.lab_qemus(lab_dir), "lab up never started the guest"
    finally:
        up.kill()
        up.wait()
    left = qemu.lab_qemus(lab_dir)
    assert left  # QEMU has its own session: it outlives a killed `lab up`
    down = subprocess.run(cli + ["down"], env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert f"stopped QEMU guests (pid {left[0]})" in down.stderr
    assert not qemu.lab_qemus(lab_dir)
    assert not [n for n in os.listdir("/run/netns") if n.startswith(prefix)]
