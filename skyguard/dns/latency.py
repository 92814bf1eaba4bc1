"""Process settings that keep the DNS proxy's tail latency low: what the garbage collector and
the daemon's other Python threads do to a query that is in flight. Called once by the DNS
service when it has started (so the daemon runs it), and by bench/dns.py, which measures the
proxy as the daemon runs it. Both settings are process-wide: they apply to the whole daemon.

gc.freeze(): everything allocated until then (modules, the policy, bcc, the metrics registry)
moves to the permanent generation, so the collections that interrupt queries no longer walk it.
Measured: a full (generation 2) collection paused the benchmark's proxy loop for 6.2 ms, and
takes ~5 ms over the daemon's modules and policy (45k tracked objects); after the freeze, ~0.
Objects allocated later are collected as usual. The daemon's other parts (credential and SSH
proxies on the same loop) share the benefit, and the caveat: a reference cycle made only of
frozen objects is never freed (a policy swap replaces plain references, so the old policy still
goes by reference counting).

sys.setswitchinterval(GIL_SWITCH_SECONDS): the event loop shares the process with the daemon's
other threads (flow log, signed-log writer, metrics exporter, watchdog). When one of them runs
Python code, the loop waits for the GIL until that thread yields it, by default up to 5 ms per
handover. 0.5 ms bounds that wait. Measured (bench/dns.py's proxy plus a thread doing pure-Python
bursts of 20 ms every 70 ms, 1k queries/s, two runs): p90 6.4-6.8 ms and p99 15.8-16.8 ms with
the default, p90 1.7-1.8 ms and p99 5.1-5.9 ms with 0.5 ms (the same machine, busy: unbound alone
had a 3 ms p99 then). Threads that never contend pay nothing; a contended handover costs a few us.

Measured and not applied (A/B runs of several proxies side by side against one unbound, rounds
in rotating order, on a shared 2-core VM): a shorter EEVDF slice for the loop thread
(sched_setattr; 0.2 ms: p99 1.74 ms vs 1.42 ms untuned, 3 ms: 1.72 ms) and nice -5 / -10 (p99
0.50 / 0.68 ms vs 0.55 ms). Priority does not shorten this tail. Not here: the event loop choice
(parts.new_event_loop), per-query code paths.
"""

from __future__ import annotations

import gc
import sys

GIL_SWITCH_SECONDS = 0.0005  # longest a Python thread keeps the GIL while the loop waits for it


def settle_for_latency() -> int:
    """Collect startup garbage once, then freeze what is left out of future collections, and
    shorten the GIL handover interval. Idempotent. Returns how many objects are frozen (for the
    caller's log)."""
    gc.collect()  # garbage from startup goes now, not in a pause while queries wait
    gc.freeze()
    if sys.getswitchinterval() > GIL_SWITCH_SECONDS:  # never lengthen a shorter one set elsewhere
        sys.setswitchinterval(GIL_SWITCH_SECONDS)
    return gc.get_freeze_count()
