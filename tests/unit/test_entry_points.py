"""Every `python -m skyguard...` the package's docstrings and the README tell people to run names a
module Python can run: a module, or a package with a __main__ (`python -m skyguard.lab.idp` was
documented while the package had none, so the command failed with "cannot be directly executed")."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMAND = re.compile(r"python3? -m (skyguard(?:\.[a-z_]+)+)(?![.\w])")  # not a template (vmtools.<tool>)


def documented_modules() -> set[str]:
    texts = [p.read_text() for p in (REPO / "skyguard").rglob("*.py")] + [(REPO / "README.md").read_text()]
    return {m for text in texts for m in COMMAND.findall(text)}


def runnable(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    if spec is None:
        return False
    if spec.submodule_search_locations is None:
        return True  # a plain module
    return importlib.util.find_spec(f"{name}.__main__") is not None


def test_every_documented_python_dash_m_is_runnable():
    modules = documented_modules()
    assert "skyguard.lab.idp" in modules and "skyguard.vmtools.probe" in modules  # the scan finds them
    assert [m for m in sorted(modules) if not runnable(m)] == []
