"""Lab lifecycle edges with labs of their own: nothing up, killed runs, bad policies, teardown."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from skyguard import config
from skyguard.lab import Lab
from support.client_waits import ping_argv


def lab_prefix(tag):
    """Same scheme as conftest's session lab ('t<pid>-'), with a tag so these labs are distinct."""
    return f"t{os.getpid() % 1000000}{tag}-"


def namespaces_with(prefix):
    return [n for n in os.listdir("/run/netns") if n.startswith(prefix)] if os.path.isdir("/run/netns") else []


def server_pids(lab_dir):
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"skyguard.lab.serve" in cmd and str(lab_dir).encode() in cmd:
                pids.append(int(entry.name))
    return pids


def cli_env(prefix, labs_dir):
    return dict(os.environ, SKYGUARD_LAB_PREFIX=prefix, SKYGUARD_LAB_DIR=str(labs_dir),
                PYTHONPATH=str(config.REPO_ROOT))


def test_down_with_nothing_up_is_not_an_error(root, labs_dir):
    prefix = lab_prefix("n")
    out = subprocess.run([sys.executable, "-m", "skyguard.cli.main", "lab", "down"],
                         capture_output=True, text=True, env=cli_env(prefix, labs_dir), timeout=60)
    assert out.returncode == 0, out.stderr
    assert "nothing to remove" in out.stderr


def test_bad_policy_exits_2_names_file_line_key_and_creates_nothing(root, labs_dir, tmp_path):
    prefix = lab_prefix("b")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: skyguard/v1\nkind: Policy\nzones:\n  auth:\n    workloads:\n"
        "      - name: r1\n        interface: sg-r1\n        mac: \"02:00:00:00:01:zz\"\n"
        "        addresses: [10.10.1.2]\n")
    out = subprocess.run([sys.executable, "-m", "skyguard.cli.main", "lab", "up", "--policy", str(bad)],
                         capture_output=True, text=True, env=cli_env(prefix, labs_dir), timeout=60)
    assert out.returncode == 2
    assert f"{bad}:8: zones.auth.workloads[0].mac" in out.stderr
    assert "Traceback" not in out.stderr
    assert namespaces_with(prefix) == []
    assert not (labs_dir / prefix).exists()


def test_killed_up_leaves_leftovers_that_the_next_up_cleans(root, labs_dir):
    prefix = lab_prefix("k")
    lab_dir = labs_dir / prefix
    proc = subprocess.Popen([sys.executable, "-m", "skyguard.cli.main", "lab", "up"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=cli_env(prefix, labs_dir))
    # Kill it hard once it is mid-build: namespaces exist, veths are being made.
    for line in proc.stderr:
        if "routed veth pairs" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert namespaces_with(prefix)  # the killed run did leave something behind

    messages = []
    lab = Lab(prefix=prefix, lab_dir=lab_dir, progress=messages.append)
    try:
        status = lab.up()
        assert status["up"] and all(status["namespaces"].values())
        assert any("cleaning" in m for m in messages)
        out = lab.exec("radius1", ping_argv("-c1", "10.10.2.2"), capture_output=True, text=True)
        assert out.returncode == 0, out.stdout
    finally:
        lab.down()
    assert namespaces_with(prefix) == []
    assert server_pids(lab_dir) == []
    assert not lab_dir.exists()


def test_stray_namespaces_and_a_dead_server_are_repaired(root, labs_dir):
    prefix = lab_prefix("s")
    lab_dir = labs_dir / prefix
    lab = Lab(prefix=prefix, lab_dir=lab_dir, progress=lambda m: None)
    try:
        first = lab.up()
        os.kill(first["internet"]["servers"]["pid"], signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", prefix + "dc2"], check=True)
        assert not lab.status()["up"]
        out = subprocess.run([sys.executable, "-m", "skyguard.cli.main", "lab", "status"],
                             capture_output=True, text=True, env=cli_env(prefix, labs_dir), timeout=60)
        assert out.returncode == 1 and "NOT running" in out.stdout
        again = lab.up()
        assert again["up"] and again["internet"]["servers"]["pid"] != first["internet"]["servers"]["pid"]
        out = lab.exec("dc1", ping_argv("-c1", "10.10.2.3"), capture_output=True, text=True)
        assert out.returncode == 0, out.stdout
    finally:
        lab.down()
    assert namespaces_with(prefix) == [] and server_pids(lab_dir) == []


def test_without_root_up_and_down_say_so_and_exit_1(root, labs_dir):
    prefix = lab_prefix("u")
    for command in ("up", "down"):
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              sys.executable, "-m", "skyguard.cli.main", "lab", command],
                             capture_output=True, text=True, env=cli_env(prefix, labs_dir), timeout=60)
        assert out.returncode == 1, out.stderr
        assert "needs root" in out.stderr and "Traceback" not in out.stderr
    assert namespaces_with(prefix) == []
