"""What every skyguard benchmark shares: progress on stderr, the one JSON result line, the plot.

A benchmark (bench/<name>.py) measures skyguard and its anchor side by side in the same run,
calls progress() as it goes, and ends with result(), which computes the ratio and whether the
target is met, prints the JSON object as the last stdout line and writes
bench/results/<name>.json. plot() draws a PNG next to it where a picture says more.

This module measures nothing and knows no benchmark; it is the output contract only.
Results go to $SKYGUARD_BENCH_RESULTS when set (tests), else bench/results/ (gitignored).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(os.environ.get("SKYGUARD_BENCH_RESULTS",
                                  Path(__file__).resolve().parent / "results"))
_started = time.monotonic()


def progress(message: str) -> None:
    """One progress line on stderr (stdout is reserved for the result), with seconds elapsed."""
    print(f"[{time.monotonic() - _started:7.1f}s] {message}", file=sys.stderr, flush=True)


def _finite_number(label: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{label} must be a finite number, got {value!r}")
    return float(value)


def result(name: str, metric: str, skyguard: float, anchor: float, target: float,
           higher_is_better: bool = True, target_applies_to: str = "ratio", **extra) -> dict:
    """Print the benchmark's JSON result as the last stdout line and write results/<name>.json.

    ratio = skyguard / anchor. The target is compared with the ratio (default: "0.95x of no
    filter") or, with target_applies_to="skyguard", with skyguard's own figure (for absolute
    targets such as "<= 70 ns per packet"). higher_is_better says which side of the target wins.
    extra keys (units, parameters, the raw series) are recorded alongside.
    """
    skyguard = _finite_number("skyguard", skyguard)
    anchor = _finite_number("anchor", anchor)
    target = _finite_number("target", target)
    if target_applies_to not in ("ratio", "skyguard"):
        raise ValueError("target_applies_to must be 'ratio' or 'skyguard'")
    if anchor == 0:
        raise ValueError(f"{name}: the anchor measured 0, so no ratio exists; the anchor run failed")
    reserved = {"name", "metric", "skyguard", "anchor", "ratio", "target", "meets_target"}
    if reserved & extra.keys():
        raise ValueError(f"extra keys may not override {sorted(reserved & extra.keys())}")
    ratio = skyguard / anchor
    judged = ratio if target_applies_to == "ratio" else skyguard
    meets = judged >= target if higher_is_better else judged <= target
    record = {"name": name, "metric": metric, "skyguard": skyguard, "anchor": anchor,
              "ratio": ratio, "target": target, "meets_target": meets,
              "higher_is_better": higher_is_better, "target_applies_to": target_applies_to,
              "host": {"kernel": platform.release(), "cpus": os.cpu_count()},
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
    line = json.dumps(record, sort_keys=True, default=str)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(record, indent=2, sort_keys=True,
                                                         default=str) + "\n")
    progress(f"{name}: skyguard {skyguard:g} vs anchor {anchor:g} {metric} -> ratio {ratio:.3f}, "
             f"target {target:g} ({target_applies_to}) {'met' if meets else 'NOT met'}")
    sys.stdout.flush()
    print(line, flush=True)
    return record


def plot(name: str, series: dict, *, xlabel: str, ylabel: str, title: str | None = None,
         kind: str = "line", logx: bool = False) -> Path:
    """Write results/<name>.png and return its path.

    kind="line": series maps a label to [(x, y), ...] (e.g. cost per packet against rule count).
    kind="bar": series maps a label to one value (e.g. skyguard, no filter, nftables).
    """
    import matplotlib
    matplotlib.use("Agg")  # no display on benchmark hosts
    import matplotlib.pyplot as plt

    if kind not in ("line", "bar"):
        raise ValueError("kind must be 'line' or 'bar'")
    if not series:
        raise ValueError("nothing to plot: series is empty")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    try:
        if kind == "line":
            for label, points in series.items():
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=label)
            ax.legend()
            if logx:
                ax.set_xscale("log")
        else:
            labels = list(series)
            bars = ax.bar(labels, [series[label] for label in labels])
            ax.bar_label(bars, fmt="%.3g")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title or name)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{name}.png"
        fig.savefig(path)
    finally:
        plt.close(fig)
    progress(f"{name}: plot written to {path}")
    return path
