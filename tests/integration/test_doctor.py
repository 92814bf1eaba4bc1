"""`skyguard doctor` run for real as a user would: it passes on this machine, and it fails with the
missing prerequisite and its fix when one is taken away (bpffs unmounted in a private mount
namespace, or privileges dropped). Also require_privileges as other commands use it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NETNS_PREFIX = "dcx-sgdoctor-"
EXPECTED_CHECKS = ["privileges", "bpf syscall", "bpffs", "bcc", "kernel headers", "libbpf",
                   "network namespaces", "XDP generic", "XDP native", "TC clsact+bpf", "nftables", "TPM",
                   "PKCS#11 keys"]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "PYTHONPATH": str(REPO), "SKYGUARD_DOCTOR_NETNS_PREFIX": NETNS_PREFIX,
            "SKYGUARD_PIN_DIR": str(tmp_path / "pin"), "SKYGUARD_STATE_DIR": str(tmp_path / "state"),
            "SKYGUARD_RUN_DIR": str(tmp_path / "run")}


def doctor_namespaces() -> list[str]:
    netns = Path("/run/netns")
    return sorted(p.name for p in netns.iterdir() if p.name.startswith(NETNS_PREFIX)) \
        if netns.is_dir() else []


def run(argv, env):
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)


def doctor_argv(*extra):
    return [sys.executable, "-m", "skyguard.cli.main", "doctor", *extra]


def test_doctor_passes_here_and_leaves_nothing_behind(root, env):
    result = run(doctor_argv("--json"), env)
    report = json.loads(result.stdout)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert failed == [] and result.returncode == 0, result.stdout + result.stderr
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == EXPECTED_CHECKS
    assert doctor_namespaces() == []


def test_doctor_without_bpffs_fails_naming_bpffs_and_the_mount_fix(root, env):
    # A private mount namespace: bpffs disappears for the doctor only, never for the machine.
    script = "umount /sys/fs/bpf && exec " + " ".join(doctor_argv())
    result = run(["unshare", "-m", "sh", "-c", script], env)
    assert result.returncode == 1, result.stdout + result.stderr
    bpffs_line = next(line for line in result.stdout.splitlines() if "bpffs" in line)
    assert bpffs_line.startswith("FAIL") and "not mounted at /sys/fs/bpf" in bpffs_line
    assert "fix: mount -t bpf bpf /sys/fs/bpf" in result.stdout
    assert f"1 of {len(EXPECTED_CHECKS)} checks failed: bpffs" in result.stdout
    assert "Traceback" not in result.stderr
    assert doctor_namespaces() == []


def test_doctor_without_privileges_fails_with_the_fix_and_no_traceback(root, env):
    result = run(NOBODY + doctor_argv("--json"), env)
    assert result.returncode == 1, result.stdout + result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["privileges"]["ok"] is False
    assert "CAP_BPF" in checks["privileges"]["detail"]
    assert "root" in checks["privileges"]["fix"]
    assert checks["bpf syscall"]["ok"] is False
    assert "Traceback" not in result.stderr
    assert doctor_namespaces() == []


def test_require_privileges_raises_privilege_error_with_the_fix(root, env):
    snippet = ("from skyguard.doctor import require_privileges\n"
               "from skyguard.errors import PrivilegeError\n"
               "try:\n    require_privileges('loading the datapath')\n"
               "except PrivilegeError as e:\n    print(e)\nelse:\n    print('NOT RAISED')\n")
    unprivileged = run(NOBODY + [sys.executable, "-c", snippet], env)
    assert "loading the datapath needs root" in unprivileged.stdout, unprivileged.stderr
    assert "CAP_BPF" in unprivileged.stdout and "sudo" in unprivileged.stdout
    privileged = run([sys.executable, "-c", snippet], env)
    assert privileged.stdout.strip() == "NOT RAISED"


def test_doctor_removes_a_leftover_namespace_of_a_killed_doctor(root, env):
    finished = subprocess.Popen(["true"])
    finished.wait()  # reaped: a pid no process holds
    dead_pid = finished.pid
    leftover = f"{NETNS_PREFIX}{dead_pid}"
    subprocess.run(["ip", "netns", "add", leftover], check=True)
    try:
        result = run(doctor_argv(), env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert leftover not in doctor_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", leftover], capture_output=True)


def test_doctor_without_kernel_headers_explains_the_fallback_and_keeps_json_clean(root, env):
    # An empty /lib/modules in a private mount namespace: bcc finds no headers, for doctor only.
    script = "mount -t tmpfs tmpfs /lib/modules && exec " + " ".join(doctor_argv("--json"))
    result = run(["unshare", "-m", "sh", "-c", script], env)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)  # bcc's own complaints must not leak into the JSON
    checks = {c["name"]: c for c in report["checks"]}
    headers = checks["kernel headers"]
    assert headers["ok"] is False
    assert "no headers at /lib/modules/" in headers["detail"]
    assert "6.1" in headers["detail"] and "scripts/setup" in headers["fix"]
    assert "ln -sfn" in headers["fix"] and "linux-headers-amd64" in headers["fix"]
    for dependent in ("XDP generic", "XDP native", "TC clsact+bpf"):
        assert checks[dependent]["ok"] is False
        assert "kernel headers check failed" in checks[dependent]["detail"]
    assert checks["bpffs"]["ok"] and checks["nftables"]["ok"]
    assert doctor_namespaces() == []
