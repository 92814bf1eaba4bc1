"""An installed wheel works outside the checkout: the wheel carries bpf/ and policies/ (setup.py
copies them to skyguard/data/), and skyguard installed from it into a fresh virtual environment,
run from another folder, finds them there: `skyguard doctor` passes, `skyguard policy validate`
accepts the packaged default policy, and the drop reasons are read from the packaged abi.h.

The fresh venv gets its dependencies from the project's venv through a .pth (the folder, not its
.pth files: the editable skyguard there stays out), and bcc the way scripts/setup exposes it."""

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "setup.py", "skyguard", "bpf", "policies")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of the fresh venv, a folder outside the checkout, environment) with the wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy, so the build writes no build/ or egg-info into the shared checkout
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip"]
    # the venv's own setuptools (a test extra): an isolated build would fetch one each run
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True)
    wheel = next((tmp / "dist").glob("skyguard-*.whl"))
    shipped = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(["git", "ls-files", "skyguard"], cwd=REPO, check=True, capture_output=True,
                             text=True).stdout.split()
    missing = [name for name in tracked if name not in shipped]
    assert not missing, f"files of the package missing from the wheel (pyproject.toml package-data): {missing}"
    venv = tmp / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    bcc_parent = Path(importlib.util.find_spec("bcc").origin).parent.parent
    (site / "deps.pth").write_text(f"{bcc_parent}\n{sysconfig.get_paths()['purelib']}\n")
    subprocess.run([*pip, "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(SKYGUARD_PIN_DIR=str(tmp / "pin"), SKYGUARD_STATE_DIR=str(tmp / "state"),
               SKYGUARD_RUN_DIR=str(tmp / "run"), SKYGUARD_DOCTOR_NETNS_PREFIX="whl-sgdoctor-")
    return python, elsewhere, env


def _run(installed, *args):
    python, elsewhere, env = installed
    return subprocess.run([str(python), *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)


def test_the_installed_package_reads_its_own_copy_of_bpf_and_policies(installed):
    python = installed[0]
    out = _run(installed, "-c", "import skyguard; from skyguard import config; from skyguard.datapath import reasons; "
                                "print(skyguard.__file__); print(config.BPF_DIR); print(config.DEFAULT_POLICY); "
                                "print(len(reasons.DROP_REASONS))")
    assert out.returncode == 0, out.stderr
    module, bpf_dir, policy, n_reasons = out.stdout.split()
    venv = python.parent.parent
    for path in (module, bpf_dir, policy):
        assert Path(path).is_relative_to(venv), f"{path} is not the installed copy"
    assert str(REPO) not in out.stdout
    assert int(n_reasons) > 20


def test_doctor_passes_from_another_folder(installed):
    out = _run(installed, "-m", "skyguard.cli.main", "doctor")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all checks passed" in out.stdout


def test_policy_validate_accepts_the_packaged_default(installed):
    python = installed[0]
    skyguard = python.parent / "skyguard"  # the console script the wheel installed
    default = _run(installed, "-c", "from skyguard import config; print(config.DEFAULT_POLICY)").stdout.strip()
    out = subprocess.run([str(skyguard), "policy", "validate", default], cwd=installed[1], env=installed[2],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("keysystems: ")
