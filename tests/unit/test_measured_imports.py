"""After the measured launch, a module of the package is imported only as the launch read it
(skyguard/tpm/imports.py), through Python's real import system on a package written here."""

import importlib
import py_compile
import sys
import uuid

import pytest

from skyguard.tpm import imports


@pytest.fixture
def package(tmp_path):
    name = "measuredpkg_" + uuid.uuid4().hex[:8]
    root = tmp_path / name
    (root / "sub").mkdir(parents=True)
    for rel, text in {"__init__.py": "", "a.py": "VALUE = 'a'\n", "b.py": "VALUE = 'b'\n",
                      "e.py": "VALUE = 'measured'\n", "sub/__init__.py": "", "sub/c.py": "VALUE = 'c'\n"}.items():
        (root / rel).write_text(text)
    sys.path.insert(0, str(tmp_path))
    finder = imports.guard(name, root)
    yield name, root
    sys.meta_path.remove(finder)
    sys.path.remove(str(tmp_path))
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def test_modules_as_measured_are_imported(package):
    name, _ = package
    assert importlib.import_module(f"{name}.a").VALUE == "a"
    assert importlib.import_module(f"{name}.sub.c").VALUE == "c"


def test_a_module_changed_or_added_after_the_launch_is_refused(package):
    name, root = package
    (root / "b.py").write_text("VALUE = 'changed'\n")
    with pytest.raises(imports.UnmeasuredModule, match="changed since the measured launch"):
        importlib.import_module(f"{name}.b")
    (root / "new.py").write_text("VALUE = 'new'\n")
    with pytest.raises(imports.UnmeasuredModule, match="appeared since the measured launch"):
        importlib.import_module(f"{name}.new")
    (root / "sub" / "d.py").write_text("VALUE = 'd'\n")
    with pytest.raises(imports.UnmeasuredModule):
        importlib.import_module(f"{name}.sub.d")


def test_a_bytecode_cache_dropped_beside_a_module_is_not_run(package, tmp_path):
    """An unchecked-hash .pyc is run by Python without looking at the source: the guard compiles
    the measured source instead."""
    name, root = package
    other = tmp_path / "other.py"
    other.write_text("VALUE = 'foreign'\n")
    cache = importlib.util.cache_from_source(str(root / "e.py"))
    py_compile.compile(str(other), cfile=cache, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    assert importlib.import_module(f"{name}.e").VALUE == "measured"
