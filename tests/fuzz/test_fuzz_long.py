"""The long fuzz tier (not run by default: `pytest -m fuzz tests/fuzz`, or scripts/test -m fuzz
tests/fuzz). Sizes come from the issue; SKYGUARD_FUZZ_SCALE (default 1.0) scales them down for a
quick look. What each costs on a 2-core machine: differential ~0.3 ms per packet (1M: ~6 min
idle); crash cycles ~6-22 s each (a fresh bcc compile per restart); atheris inputs (one core
each, idle): DNS ~9k/s, HTTP ~1-4k/s (inputs grow to 4 KB and are also fed byte by byte),
policy YAML ~225/s (1M ~75 min), signed-log files ~200/s (1M ~85 min; each input rewrites one
file of a two-segment log and verifies it), upstream responses ~200/s.
Last full runs, all clean: differential 1M packets 2,356 s and 100 SIGKILLs 2,207 s (2026-12-07,
under load); DNS 1M 107 s, HTTP 1M 1,319 s after one oracle fix (corpus/http/
transfer-coding-mixed-case.txt), policy 1M 8,956 s (beside the suite and the long lifecycle run),
tlog 1M in three workers on one corpus (2026-12-07); upstream 1M 4,863 s (session 4).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import harnesses
import pytest
from test_differential import describe, run_differential

from skyguard.attack import crash_under_load

SCALE = float(os.environ.get("SKYGUARD_FUZZ_SCALE", "1.0"))
FUZZ_INPUTS = int(1_000_000 * SCALE)
DIFF_POLICIES, DIFF_PACKETS = max(1, int(2500 * SCALE)), 400  # 1M packets at scale 1
CRASHES = max(1, int(100 * SCALE))


def test_differential_a_million_packets(bpf_runner):
    stats = run_differential(bpf_runner, seed=int(os.environ.get("SKYGUARD_FUZZ_SEED", "1")),
                             policies=DIFF_POLICIES, packets=DIFF_PACKETS)
    assert stats["packets"] == DIFF_POLICIES * DIFF_PACKETS
    assert not stats["disagreements"] and not stats["reason_mismatches"], describe(stats)


@pytest.mark.parametrize("target", sorted(harnesses.TARGETS))
def test_atheris_a_million_inputs(target, tmp_path):
    work = tmp_path / "corpus"
    shutil.copytree(harnesses.CORPUS / target, work)  # atheris adds to the corpus it is given
    done = subprocess.run([sys.executable, str(Path(harnesses.__file__)), target, f"-runs={FUZZ_INPUTS}",
                           f"-artifact_prefix={tmp_path}/", str(work)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(harnesses.REPO)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Done {FUZZ_INPUTS} runs" in done.stderr, done.stderr[-1000:]


def test_sigkill_a_hundred_times_under_load(attack_lab):
    result = crash_under_load(attack_lab, CRASHES)
    assert result["log_verify_failures"] == [], result["log_verify_failures"]
    assert result["delivered"] == 0, result
    assert result["legit"]["failed"] == 0, result["legit"]
