"""The adversarial report: runs the attacks of issue 10 against the real datapath and daemon and
writes the figures to tests/adversarial/REPORT.md (and prints them): attacks tried, packets and
inputs sent, what got through (goal: zero), what was lost (goal: zero).

    bench/run adversarial-report                     # CI-sized: the same sample as the tests
    SKYGUARD_REPORT_SCALE=10 bench/run adversarial-report   # 10x the packets, inputs and crashes

It measures by running, never by reading test results: the differential test through
BPF_PROG_RUN, the kill chain and the evasion corpus from agent1 in the lab with sniffers in every
other VM and the internet, SIGKILLs of the daemon under a denied flood with a live allowed
session, and the fuzz corpus plus mutations through every parser harness. Needs root.
Last stdout line (bench convention): skyguard = attack packets/frames delivered, anchor = attack
packets sent, target 0 delivered.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "adversarial"), str(REPO / "tests" / "fuzz"), str(REPO / "bench")]

from _common import progress, result  # noqa: E402

SCALE = float(os.environ.get("SKYGUARD_REPORT_SCALE", "1"))
# Sections below this line in REPORT.md are written by hand (each attack class with its test) and
# survive a regeneration; everything above it is this script's.
KEPT_MARKER = "<!-- Hand-written below: kept when bench/adversarial_report.py writes the figures above. -->"
REPORT = REPO / "tests" / "adversarial" / "REPORT.md"


def main() -> int:
    if os.geteuid() != 0:
        progress("the adversarial report needs root (BPF, network namespaces)")
        return 2
    import harnesses
    from adv_fixtures import arena_session, bpf_runner_session
    from test_differential import run_differential

    from skyguard.attack import NOT_YET_COVERED, crash_under_load, evasion_corpus, kill_chain

    figures: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "scale": SCALE}

    policies, per_policy = max(1, int(40 * SCALE)), 100
    progress(f"differential: {policies} random policies x {per_policy} packets through BPF_PROG_RUN")
    with bpf_runner_session("r") as runner:
        diff = run_differential(runner, seed=int(time.time()), policies=policies, packets=per_policy)
    figures["differential"] = {"packets": diff["packets"], "allowed": diff["allowed"],
                               "disagreements": len(diff["disagreements"]),
                               "reason_mismatches": len(diff["reason_mismatches"])}

    crashes = max(1, int(5 * SCALE))
    with tempfile.TemporaryDirectory(prefix="sg-report-") as tmp, arena_session(Path(tmp), progress) as arena:
        progress("sniffer self-check (an allowed datagram must be seen)")
        figures["sniffer_self_check"] = arena.sniffer_self_check()
        progress("kill chain from agent1")
        chain = arena.play(kill_chain(), on_step=lambda a: progress(f"  {a.step}: {a.title}: {a.sent} sent"))
        progress("evasion corpus through real veths")
        evasion = arena.play(evasion_corpus(), on_step=lambda a: progress(f"  evasion {a.title}: {a.sent} sent"))
        progress(f"{crashes} SIGKILLs of the daemon under a denied flood")
        crash = crash_under_load(arena, crashes, on_crash=lambda i, ok: progress(f"  crash {i + 1}: log verify "
                                                                                 f"{'ok' if ok else 'FAILED'}"))
        final_verify = arena.log_verify()

    fuzz = {}
    for target in sorted(harnesses.TARGETS):
        n = int({"policy": 300, "tlog": 300}.get(target, 3000) * SCALE)
        progress(f"fuzz corpus + {n} mutations: {target}")
        try:
            fuzz[target] = {"inputs": harnesses.replay(target, n)["inputs"], "failures": 0}
        except AssertionError as e:
            fuzz[target] = {"inputs": n, "failures": 1, "first": str(e)[:300]}

    text = render(figures, chain, evasion, crash, final_verify.returncode == 0, fuzz, NOT_YET_COVERED)
    REPORT.write_text(text.rstrip("\n") + "\n\n" + kept_sections())
    print(text)
    attack_packets = sum(a.sent for a in chain["attacks"] + evasion["attacks"])
    delivered = (sum(max(0, s["frames"]) for r in (chain, evasion) for s in r["sniffed"].values())
                 + sum(a.answered for a in chain["attacks"] + evasion["attacks"]) + crash["delivered"])
    result("adversarial-report", "attack packets delivered", delivered, attack_packets + crash["denied_dropped"],
           target=0, higher_is_better=False, target_applies_to="skyguard",
           differential=figures["differential"], legit_failed=chain["legit"]["failed"] + crash["legit"]["failed"],
           crashes=crashes, log_verify_failures=len(crash["log_verify_failures"]),
           fuzz_inputs=sum(f["inputs"] for f in fuzz.values()))
    return 0


def render(figures, chain, evasion, crash, final_ok, fuzz, not_covered) -> str:
    def reasons(a):
        why = ", ".join(f"{r} {n}" for r, n in sorted(a.counted.items()))
        if a.logged:
            why = (why + "; " if why else "") + f"{a.logged} log: " + (", ".join(sorted(set(a.log_verdicts))) or "none")
        return why or "-"

    lines = [
        "# Adversarial report",
        "",
        f"Generated by `bench/run adversarial-report` (bench/adversarial_report.py) at {figures['started']}, "
        f"scale {figures['scale']:g}. Every figure below was measured in that run against the real eBPF "
        "programs and the running daemon; nothing is copied from test results.",
        "",
        "## Kill chain from a compromised sandbox VM (agent1)",
        "",
        "Sniffers in every other VM and in the lab internet counted what of the attacker arrived; "
        "'answered' counts connections or replies the attacker got.",
        "",
        "| VM | step | attempt | sent | answered | drop reasons counted (sandbox egress) or decision logged | blocked |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in chain["attacks"]:
        lines.append(f"| {a.vm} | {a.step} | {a.title} | {a.sent} | {a.answered} | {reasons(a)} | "
                     f"{'yes' if a.blocked else '**NO**'} |")
    arrived = {k: v["frames"] for k, v in chain["sniffed"].items()}
    lines += ["", f"Frames of the attacker that arrived anywhere: {sum(arrived.values())} ({arrived}). "
              f"Sniffer self-check (an allowed syslog datagram): {figures['sniffer_self_check']} frames seen.",
              f"Legitimate radius1 -> dc1:389 session during the chain: {chain['legit']['ok']} round trips, "
              f"{chain['legit']['failed']} failed.", "",
              "## Evasion corpus through real veths (agent1 -> dc1, denied flows)", "",
              "| case | frames sent | drop reasons counted | blocked |", "|---|---|---|---|"]
    for a in evasion["attacks"]:
        lines.append(f"| {a.title} | {a.sent} | {reasons(a)} | {'yes' if a.blocked else '**NO**'} |")
    arrived = sum(max(0, v["frames"]) for v in evasion["sniffed"].values())
    d = figures["differential"]
    lines += ["", f"Frames that arrived anywhere: {arrived}. The same corpus and more runs through "
              "BPF_PROG_RUN in tests/adversarial/test_evasion_bpf.py (both from-VM hooks).", "",
              "## Differential test (reference model vs datapath, BPF_PROG_RUN)", "",
              f"{d['packets']} first packets of flows under random policies ({d['allowed']} allowed by the model): "
              f"**{d['disagreements']} verdict disagreements, {d['reason_mismatches']} policies with other drop "
              "reasons.** Found and fixed while building it: an IPv6 rule to `::/0` opened all of IPv4 "
              "(compile now always gives 0.0.0.0/0 its own ipcache entry), and IPv6 packets to or from "
              "IPv4-mapped addresses (::ffff:a.b.c.d) were matched against IPv4 rules (now malformed).", "",
              "## Crash and restart under load", "",
              f"{crash['crashes']} SIGKILLs of the daemon while agent1 flooded dc1:445 (denied): "
              f"{crash['denied_dropped']} denied packets dropped, **{crash['delivered']} delivered**; the "
              f"established radius1 -> dc1:389 session: {crash['legit']['ok']} round trips, "
              f"**{crash['legit']['failed']} failed**; `skyguard log verify` failed after "
              f"**{len(crash['log_verify_failures'])}** restarts; final verify {'ok' if final_ok else 'FAILED'}.", "",
              "## Fuzzing (regression corpus + deterministic mutations)", "",
              "| target | inputs | failures |", "|---|---|---|"]
    for target, f in fuzz.items():
        lines.append(f"| {target} | {f['inputs']} | {f['failures']} |")
    lines += ["", "The fuzz tier (`pytest -m fuzz tests/fuzz`) runs 1M atheris inputs per target, 1M "
              "differential packets and 100 SIGKILLs. Open findings of that tier, kept out of the CI "
              "corpus until fixed: tests/fuzz/findings/README.md "
              f"({len(list((REPO / 'tests' / 'fuzz' / 'findings').glob('*.bin')))} open).", "",
              "## Not yet covered", ""]
    for step, what in not_covered:
        lines.append(f"- {step}: {what}")
    lines.append("")
    return "\n".join(lines)


def kept_sections() -> str:
    """The hand-written part of the current REPORT.md (from KEPT_MARKER on), or just the marker."""
    current = REPORT.read_text() if REPORT.exists() else ""
    index = current.find(KEPT_MARKER)
    return current[index:] if index >= 0 else KEPT_MARKER + "\n"


if __name__ == "__main__":
    sys.exit(main())
