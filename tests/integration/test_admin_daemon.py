"""SSH into VMs only through skyguard, end to end in the lab: the daemon runs the access proxy
for the policy's admin.ssh section, operators use the real OpenSSH client from outside (the lab's
internet namespace), a real sshd runs in the dc1 lab VM, and the datapath lets only this host's
proxy reach tcp/22 of a VM."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from skyguard import config

PROXY_PORT = 24299
UPLINK = "100.64.0.1"  # the lab host's address toward the internet namespace


def sh(*args, **kw):
    return subprocess.run(args, capture_output=True, text=True, **kw)


def keygen(path: Path) -> str:
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path), check=True)
    return Path(str(path) + ".pub").read_text().strip()


@pytest.fixture(scope="module")
def admin_lab(lab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("admin")
    env = dict(os.environ, PYTHONPATH=str(config.REPO_ROOT), SKYGUARD_STATE_DIR=str(tmp / "state"),
               SKYGUARD_RUN_DIR=str(tmp / "run"), SKYGUARD_PIN_DIR=str(config.PIN_DIR.parent / f"sg-admin-{os.getpid()}"))
    alice, bob = keygen(tmp / "alice"), keygen(tmp / "bob")
    policy = tmp / "policy.yaml"
    policy.write_text(config.DEFAULT_POLICY.read_text() + f"""
admin:
  ssh:
    listen: "0.0.0.0:{PROXY_PORT}"
    operators:
      - {{name: alice, public_key: "{alice}", may_access: [directory]}}
      - {{name: bob, public_key: "{bob}", may_access: [sandbox]}}
""")
    skyguard = [sys.executable, "-m", "skyguard.cli.main"]
    vm_key = sh(*skyguard, "admin", "vm-key", env=env, check=True).stdout.strip()
    (tmp / "authorized_keys").write_text(vm_key + "\n")
    keygen(tmp / "vm_host_key")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    (tmp / "sshd_config").write_text(f"""ListenAddress 10.10.2.2
HostKey {tmp}/vm_host_key
AuthorizedKeysFile {tmp}/authorized_keys
PidFile {tmp}/sshd.pid
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
""")
    sshd = lab.popen("dc1", ["/usr/sbin/sshd", "-D", "-e", "-f", str(tmp / "sshd_config")],
                     stdout=subprocess.DEVNULL, stderr=open(tmp / "sshd.log", "w"))
    daemon = lab.popen("host", [*skyguard, "up", "--policy", str(policy), "--metrics", "off"], env=env,
                       stdout=open(tmp / "daemon.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while sh(*skyguard, "status", env=env).returncode != 0:
            assert daemon.poll() is None, (tmp / "daemon.log").read_text()
            assert time.monotonic() < deadline, "the daemon did not answer"
            time.sleep(0.5)
        yield type("AdminLab", (), {"tmp": tmp, "env": env, "lab": lab, "skyguard": skyguard})
    finally:
        lab.exec("host", [*skyguard, "down"], env=env, capture_output=True)
        daemon.wait(30)
        sshd.terminate()
        sshd.wait(10)


def operator_ssh(admin_lab, who: str, login: str, command: str) -> subprocess.CompletedProcess:
    return admin_lab.lab.exec("internet", [
        "ssh", "-i", str(admin_lab.tmp / who), "-p", str(PROXY_PORT), "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
        f"{login}@{UPLINK}", command], capture_output=True, text=True, timeout=60)


def test_operator_runs_a_command_on_an_allowed_vm(admin_lab):
    out = operator_ssh(admin_lab, "alice", "alice+dc1", "echo through-skyguard; exit 3")
    assert out.stdout.strip() == "through-skyguard", out.stderr
    assert out.returncode == 3  # the VM's exit status comes back


def test_operator_refused_on_a_zone_they_may_not_access(admin_lab):
    out = operator_ssh(admin_lab, "bob", "bob+dc1", "echo should-not-run")
    assert out.returncode != 0 and "should-not-run" not in out.stdout
    assert "bob may not access dc1" in out.stderr


def test_direct_ssh_from_another_vm_is_dropped_by_the_datapath(admin_lab):
    probe = ("import socket; s = socket.socket(); s.settimeout(2)\n"
             "try:\n    s.connect(('10.10.2.2', 22)); print('open')\nexcept OSError as e:\n    print('blocked')")
    out = admin_lab.lab.exec("radius1", [sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip() == "blocked"


def test_sessions_are_in_the_signed_log(admin_lab):
    operator_ssh(admin_lab, "alice", "alice+dc1", "true")
    shown = sh(*admin_lab.skyguard, "log", "show", "--json", env=admin_lab.env, check=True).stdout
    assert "admin_session_end" in shown and "transcript_sha256" in shown
    assert sh(*admin_lab.skyguard, "log", "verify", env=admin_lab.env).returncode == 0
