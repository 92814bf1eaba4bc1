"""Shared test setup. Tiers are markers (unit, bpf, integration, vm, adversarial, fuzz), given per
folder below; the Vagrant suite in tests/vm is marked `vagrant` instead of `vm`.

Privileged tiers never skip: on a machine (or CI) where they cannot run, they fail.
"""

import os
from pathlib import Path

import pytest

TIER_BY_FOLDER = {"unit": "unit", "bpf": "bpf", "integration": "integration", "vm": "vm",
                  "adversarial": "adversarial", "fuzz": "fuzz"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        tier = TIER_BY_FOLDER.get(folder)
        if tier == "vm" and item.get_closest_marker("vagrant"):
            continue  # the Vagrant suite is its own tier (`-m vagrant`), not part of `-m vm`
        if tier:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def root():
    """Privileged tests depend on this: it fails (never skips) when not root."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (BPF and network namespaces); run it as root")
