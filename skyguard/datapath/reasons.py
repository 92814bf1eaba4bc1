"""The drop-reason table, read from bpf/abi.h so C and Python share one definition.

Not a copy: the SG_DROP_REASONS X-macro in abi.h is parsed at import. Adding a reason there is
the whole change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from skyguard import config

_ENTRY = re.compile(r'X\((\d+),\s*([A-Z0-9_]+),\s*"([^"]*)"\)')


@dataclass(frozen=True)
class DropReason:
    code: int
    name: str  # e.g. "SPOOF_MAC" (SG_DROP_SPOOF_MAC in C); metric label value in lower case
    text: str  # what an operator reads


def _parse() -> dict[int, DropReason]:
    text = (config.BPF_DIR / "abi.h").read_text()
    block = text[text.index("#define SG_DROP_REASONS(X)") :]
    block = block[: block.index("\n\n")]
    table = {int(c): DropReason(int(c), n, t) for c, n, t in _ENTRY.findall(block)}
    if not table:
        raise RuntimeError("bpf/abi.h has no SG_DROP_REASONS entries")
    return table


DROP_REASONS: dict[int, DropReason] = _parse()
BY_NAME: dict[str, DropReason] = {r.name: r for r in DROP_REASONS.values()}


def reason_name(code: int) -> str:
    r = DROP_REASONS.get(code)
    return r.name.lower() if r else f"unknown_{code}"


def code(name: str) -> int:
    return BY_NAME[name.upper()].code
