"""After the measured launch, skyguard's own modules are imported only as they were measured.

The launch measures every file of the package (measure.package_digest), but the daemon imports
some modules later, when a policy first needs them (the content filter, the apps proxy, ...).
Without this guard, a module changed on disk after the launch would run unmeasured while the PCR
still vouches for the package of the launch. guard() installs a finder, first on sys.meta_path,
that serves every not-yet-imported module of the package from the SHA-256 the launch read: a
source that differs, or a file that was not there, is refused with ImportError (the part that
wanted it fails closed), and the bytecode cache is never read (a .pyc is not what was measured)
nor written.

Not here: the measurement itself (measure.py).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
from pathlib import Path

log = logging.getLogger("skyguard.tpm")


class UnmeasuredModule(ImportError):
    pass


def source_manifest(root: Path) -> dict[str, str]:
    """{resolved path of each .py under root: its SHA-256 hex}."""
    return {str(path.resolve()): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in root.rglob("*.py") if path.is_file() and "__pycache__" not in path.parts}


class _MeasuredLoader(importlib.machinery.SourceFileLoader):
    def __init__(self, fullname: str, path: str, manifest: dict[str, str]):
        super().__init__(fullname, path)
        self.manifest = manifest

    def get_data(self, path: str) -> bytes:
        if path.endswith(".pyc"):
            raise OSError("the bytecode cache is not what was measured")  # SourceLoader compiles the source
        data = super().get_data(path)
        expected = self.manifest.get(str(Path(path).resolve()))
        if expected != hashlib.sha256(data).hexdigest():
            log.error("refused to import %s: %s %s since the measured launch", self.name, path,
                      "appeared" if expected is None else "changed")
            raise UnmeasuredModule(f"{self.name} ({path}) {'appeared' if expected is None else 'changed'} "
                                   "since the measured launch: not imported")
        return data

    def set_data(self, *args, **kwargs) -> None:
        return None  # no cache: the next import reads (and checks) the source again


class MeasuredFinder(importlib.abc.MetaPathFinder):
    """Finds `package`'s modules as the path finder does, and loads them with _MeasuredLoader."""

    def __init__(self, package: str, manifest: dict[str, str]):
        self.package, self.manifest = package, manifest

    def find_spec(self, fullname, path, target=None):
        if fullname != self.package and not fullname.startswith(self.package + "."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None:
            return spec
        if not spec.origin.endswith(".py"):  # an extension module or bare .pyc: nothing measured runs so
            raise UnmeasuredModule(f"{fullname} ({spec.origin}) is not a measured source file: not imported")
        loader = _MeasuredLoader(fullname, spec.origin, self.manifest)
        return importlib.util.spec_from_file_location(fullname, spec.origin, loader=loader,
                                                      submodule_search_locations=spec.submodule_search_locations)


def guard(package: str, root: Path, manifest: dict[str, str] | None = None) -> MeasuredFinder:
    """Install (once per package) the finder for `package` rooted at `root`; returns it."""
    for finder in sys.meta_path:
        if isinstance(finder, MeasuredFinder) and finder.package == package:
            finder.manifest = manifest if manifest is not None else source_manifest(root)
            return finder
    finder = MeasuredFinder(package, manifest if manifest is not None else source_manifest(root))
    sys.meta_path.insert(0, finder)
    return finder
