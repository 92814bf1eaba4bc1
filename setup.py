"""Ships bpf/ and policies/ inside the wheel (as skyguard/data/bpf and skyguard/data/policies), so an
installed skyguard compiles its programs and finds its default policy outside the checkout
(skyguard/config.py picks the packaged copy when there is one). The project's metadata is in
pyproject.toml; this file only adds that copy to the build."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DATA = ("bpf", "policies")  # folders of the repository, copied whole


class BuildPyWithData(build_py):
    def run(self):
        super().run()
        root = Path(__file__).resolve().parent
        for name in DATA:
            for src in sorted((root / name).rglob("*")):
                if src.is_file() and "__pycache__" not in src.parts:
                    dest = Path(self.build_lib, "skyguard", "data", src.relative_to(root))
                    self.mkpath(str(dest.parent))
                    self.copy_file(str(src), str(dest))


setup(cmdclass={"build_py": BuildPyWithData})
