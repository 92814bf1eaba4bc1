"""Process settings that keep the DNS proxy's tail latency low: what the garbage collector and
the daemon's other Python threads do to a query that is in flight. Called once by the DNS
service when it has started (so the daemon runs it), and by bench/dns.py, which measures the
proxy as the daemon runs it. Both settings are process-wide: they apply to the whole daemon.

gc.freeze(): everything allocated until then (modules, the policy, bcc, the metrics registry)
moves to the permanent generation, so the collections that interrupt queries no longer walk it.
Before, a full (generation 2) collection in the benchmark's proxy process paused its loop for
~6 ms, and the daemon's heap is several times bigger. Objects allocated later are collected as
usual. It is process-wide: the daemon's other parts (credential and SSH proxies on the same
loop) share the benefit, and the caveat: a reference cycle made only of frozen objects is never
freed. Startup objects are not dropped in cycles (a policy swap replaces plain references).

sys.setswitchinterval(GIL_SWITCH_SECONDS): the event loop shares the process with the daemon's
other threads (flow log, signed-log writer, metrics exporter, watchdog). When one of them runs
Python code, the loop waits for the GIL until that thread yields it, by default up to 5 ms per
handover. 0.5 ms bounds that wait. Measured (bench/dns.py's proxy plus a thread doing pure-Python
bursts of 20 ms every 70 ms, 1k queries/s, two runs): p90 6.4-6.8 ms and p99 15.8-16.8 ms with
the default, p90 1.7-1.8 ms and p99 5.1-5.9 ms with 0.5 ms (the same machine, busy: unbound alone
had a 3 ms p99 then). Threads that never contend pay nothing; a contended handover costs a few us.

Measured and not applied (bench/dns.py rounds on a shared 2-core VM): a shorter EEVDF slice for
the loop thread (sched_setattr, 0.2 or 3 ms) and nice -5 / -10 did not lower the proxy's p99;
the short slice raised it. The tail there is other processes holding the CPUs, not the proxy's
priority. Not here: the event loop choice (service.new_event_loop), per-query code paths.
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
