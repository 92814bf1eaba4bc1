"""The C text bcc compiles: bpf/sg_datapath.c with bpf/'s own `#include "lib/..."` headers
inlined (bcc rewrites map method calls such as `map.lookup(&k)` only in its main text, so the
headers must be part of it). One definition for the two that need the very same text: the loader
(loader.py) compiles it and the TPM measurement (skyguard/tpm/measure.py) hashes it. It reads
files under config.BPF_DIR and nothing else, so it stands in the foundation layer (below the TPM,
tests/unit/test_import_graph.py) while the rest of datapath/ stands above.
"""

from __future__ import annotations

import re
from pathlib import Path

from skyguard import config

MAIN_SOURCE = "sg_datapath.c"
_LOCAL_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$', re.M)


def inline_local_includes(path: Path, seen: set[Path] | None = None) -> str:
    """The C text of `path` with its quoted includes (relative to bpf/) inlined, once each.
    #line directives keep compiler messages pointing at the real file and line."""
    seen = set() if seen is None else seen
    out = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = _LOCAL_INCLUDE.match(line)
        if not match:
            out.append(line)
            continue
        included = (config.BPF_DIR / match.group(1)).resolve()
        if included not in seen:
            seen.add(included)
            out.append(f'#line 1 "{included}"')
            out.append(inline_local_includes(included, seen))
        out.append(f'#line {number + 1} "{path}"')
    return "\n".join(out) + "\n"


def c_source() -> str:
    return inline_local_includes(config.BPF_DIR / MAIN_SOURCE)
