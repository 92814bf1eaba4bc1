"""The result of one `skyguard doctor` check: a small value with no skyguard imports, so that a
part's own check (skyguard/keys/doctor.py) returns it without importing the doctor, which runs
those checks and so imports the parts. The checks themselves are in skyguard/doctor.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Check:
    """One prerequisite: ok, or what is wrong (detail) and the exact command that fixes it (fix)."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def as_dict(self) -> dict:
        return asdict(self)
