"""The benchmark convention, tested through the real bench/run on a tiny fake benchmark: the last
stdout line is one JSON object with the contract's keys, the result file and plot are written,
progress stays on stderr, and bad names or failed benchmarks give a non-zero exit. This tests the
convention, never a figure."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
CONTRACT_KEYS = {"name", "metric", "skyguard", "anchor", "ratio", "target", "meets_target"}

FAKE_BENCHMARK = '''
"""A fake benchmark for the convention test: fixed figures, one plot."""
from _common import plot, progress, result
progress("measuring the anchor")
print("stray stdout chatter before the result")
progress("measuring skyguard")
plot("fake-probe", {"skyguard": [(10, 30.0), (1000, 33.0)], "anchor": [(10, 30.0), (1000, 30.0)]},
     xlabel="rules", ylabel="ns per packet", logx=True)
result("fake-probe", "ns/packet", 33.0, 30.0, target=1.2, higher_is_better=False, rules=[10, 1000])
'''

FAILING_BENCHMARK = '''
from _common import progress
progress("the anchor tool is missing")
raise SystemExit(3)
'''


@pytest.fixture
def bench_copy(tmp_path):
    """A copy of the real bench/run and bench/_common.py beside fake benchmarks."""
    bench = tmp_path / "bench"
    bench.mkdir()
    for name in ("run", "_common.py"):
        shutil.copy2(BENCH / name, bench / name)
    (bench / "fake_probe.py").write_text(FAKE_BENCHMARK)
    return bench


def run(bench: Path, *args: str, tmp_path: Path):
    env = {"PATH": "/usr/bin:/bin", "SKYGUARD_PYTHON": sys.executable,
           "SKYGUARD_BENCH_RESULTS": str(tmp_path / "results")}
    return subprocess.run([str(bench / "run"), *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_fake_benchmark_through_bench_run_ends_with_the_json_result(bench_copy, tmp_path):
    out = run(bench_copy, "fake-probe", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert CONTRACT_KEYS <= last.keys()
    assert last["name"] == "fake-probe" and last["metric"] == "ns/packet"
    assert last["ratio"] == pytest.approx(1.1)
    assert last["meets_target"] is True          # 1.1 <= 1.2 with lower-is-better
    assert last["rules"] == [10, 1000]
    assert "measuring skyguard" in out.stderr and "measuring" not in out.stdout
    written = json.loads((tmp_path / "results" / "fake-probe.json").read_text())
    assert written == last
    assert (tmp_path / "results" / "fake-probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_all_runs_every_benchmark_and_fails_when_one_fails(bench_copy, tmp_path):
    assert run(bench_copy, "all", tmp_path=tmp_path).returncode == 0
    (bench_copy / "broken_one.py").write_text(FAILING_BENCHMARK)
    out = run(bench_copy, "all", tmp_path=tmp_path)
    assert out.returncode == 1
    assert "failed: broken-one" in out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["name"] == "fake-probe"
    assert run(bench_copy, "--list", tmp_path=tmp_path).stdout.split() == ["broken-one", "fake-probe"]


def test_unknown_benchmark_is_bad_input_naming_the_available_ones(bench_copy, tmp_path):
    out = run(bench_copy, "no-such", tmp_path=tmp_path)
    assert out.returncode == 2
    assert "no benchmark named 'no-such'" in out.stderr and "fake-probe" in out.stderr


def _result_in_subprocess(tmp_path, call: str):
    code = f"import sys; sys.path.insert(0, {str(BENCH)!r}); from _common import result; {call}"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"SKYGUARD_BENCH_RESULTS": str(tmp_path)}, timeout=60)


@pytest.mark.parametrize("call, meets", [
    ("result('t', 'Gbit/s', 9.0, 10.0, target=0.95)", False),            # 0.9x < 0.95x
    ("result('t', 'Gbit/s', 9.6, 10.0, target=0.95)", True),
    ("result('t', 'ns', 80.0, 30.0, target=70, higher_is_better=False, "
     "target_applies_to='skyguard')", False),                             # absolute: 80 ns > 70 ns
    ("result('t', 'ns', 60.0, 30.0, target=70, higher_is_better=False, "
     "target_applies_to='skyguard')", True),
])
def test_meets_target_follows_direction_and_what_the_target_applies_to(tmp_path, call, meets):
    out = _result_in_subprocess(tmp_path, call)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["meets_target"] is meets


@pytest.mark.parametrize("call, message", [
    ("result('t', 'x', 1.0, 0.0, target=1)", "anchor measured 0"),
    ("result('t', 'x', float('nan'), 1.0, target=1)", "skyguard must be a finite number"),
    ("result('t', 'x', 1.0, 1.0, target=1, ratio=5)", "may not override"),
])
def test_result_refuses_figures_it_cannot_honestly_report(tmp_path, call, message):
    out = _result_in_subprocess(tmp_path, call)
    assert out.returncode != 0 and message in out.stderr
    assert not (tmp_path / "t.json").exists()
