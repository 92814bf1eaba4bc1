"""Process settings that keep the DNS proxy's tail latency low: what the garbage collector does
to a query that is in flight. Called once by the DNS service when it has started (so the daemon
runs it), and by bench/dns.py, which measures the proxy as the daemon runs it.

gc.freeze(): everything allocated until then (modules, the policy, bcc, the metrics registry)
moves to the permanent generation, so the collections that interrupt queries no longer walk it.
Before, a full (generation 2) collection in the benchmark's proxy process paused its loop for
~6 ms, and the daemon's heap is several times bigger. Objects allocated later are collected as
usual. It is process-wide: the daemon's other parts (credential and SSH proxies on the same
loop) share the benefit, and the caveat: a reference cycle made only of frozen objects is never
freed. Startup objects are not dropped in cycles (a policy swap replaces plain references).

Measured and not applied (bench/dns.py rounds on a shared 2-core VM): a shorter EEVDF slice for
the loop thread (sched_setattr, 0.2 or 3 ms) and nice -5 / -10 did not lower the proxy's p99;
the short slice raised it. The tail there is other processes holding the CPUs, not the proxy's
priority. Not here: the event loop choice (service.new_event_loop), per-query code paths.
"""

from __future__ import annotations

import gc


def settle_for_latency() -> int:
    """Collect startup garbage once, then freeze what is left out of future collections.
    Idempotent. Returns how many objects are frozen (for the caller's log)."""
    gc.collect()  # garbage from startup goes now, not in a pause while queries wait
    gc.freeze()
    return gc.get_freeze_count()
