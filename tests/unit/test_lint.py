"""The linters are part of the test command: ruff over the code, tests and benchmarks, mypy over
the package, both with the settings stated in pyproject.toml. A finding fails the test with the
linter's own output (file:line: rule, message), so it reads like any other failure."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: ruff and mypy are test extras


def _run(*command: str) -> subprocess.CompletedProcess:
    tool = BIN / command[0]
    if not tool.exists():
        pytest.fail(f"{tool} is missing: install the test extras (scripts/setup, or pip install -e '.[test]')")
    return subprocess.run([str(tool), *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing():
    out = _run("ruff", "check", "--no-cache", "--output-format", "concise", "skyguard", "tests", "bench")
    assert out.returncode == 0, f"ruff check skyguard tests bench:\n{out.stdout}{out.stderr}"


def test_mypy_finds_nothing():
    # Incremental, with its cache outside the checkout: a full check costs ~10 s on an idle
    # 2-core machine (a minute under a loaded one), a re-check of a few changed files ~2 s.
    cache = Path(tempfile.gettempdir()) / f"skyguard-mypy-cache-{os.getuid()}"
    out = _run("mypy", "--cache-dir", str(cache), "skyguard")
    assert out.returncode == 0, f"mypy skyguard:\n{out.stdout}{out.stderr}"
