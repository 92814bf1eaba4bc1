"""The Vagrant suite: the whole suite in a clean Debian 12 VM, driven by vagrant/run-suite, on both
machines (Debian 12's kernel and the newest backports kernel). It needs Vagrant and a provider
that can boot a VM, and network access for the box; where Vagrant or a provider is missing it is
skipped with the reason (the one skip the suite allows). Excluded by default (marker `vagrant`;
the `vm` tier of the default run is QEMU guests in the lab): `pytest -m vagrant tests/vm`.
"""

import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.vagrant

VAGRANT_DIR = Path(__file__).resolve().parents[2] / "vagrant"
RUN_SUITE = VAGRANT_DIR / "run-suite"
TIERS = ("unit", "bpf", "integration")
SUITE_TIMEOUT_S = 3 * 3600  # a guard against a hung VM, not a performance expectation


@pytest.fixture(scope="session")
def vagrant_can_boot():
    preflight = subprocess.run([str(RUN_SUITE), "--preflight"], capture_output=True, text=True,
                               timeout=120)
    if preflight.returncode == 3:
        reason = preflight.stdout.strip()
        assert "Vagrant" in reason
        pytest.skip(reason)
    assert preflight.returncode == 0, preflight.stdout + preflight.stderr


def kernel_release(text: str) -> tuple[int, int]:
    major, minor = text.strip().split(".")[:2]
    return int(major), int(minor)


@pytest.mark.parametrize("machine", ["stable", "backports"])
def test_suite_passes_in_a_clean_vm(vagrant_can_boot, machine):
    result = subprocess.run([str(RUN_SUITE), "--machine", machine], text=True,
                            timeout=SUITE_TIMEOUT_S)
    results = VAGRANT_DIR / "results" / machine
    assert result.returncode == 0, f"run-suite failed on {machine}; see {results}"
    doctor = json.loads((results / "doctor.json").read_text())
    assert doctor["ok"] is True, [c for c in doctor["checks"] if not c["ok"]]
    for tier in TIERS:
        root = ET.parse(results / f"junit-{tier}.xml").getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        assert int(suite.get("tests")) > 0, f"{tier}: no tests ran"
        assert int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0, tier
    kernel = kernel_release((results / "kernel.txt").read_text())
    if machine == "stable":
        assert kernel == (6, 1)
    else:
        assert kernel > (6, 1), f"backports machine still runs {kernel}"
