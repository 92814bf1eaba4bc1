"""The DNS proxy as one part the daemon starts and stops: resolver + server + steering + learned
state, wired in one place.

Start order: load learned state and re-learn unexpired addresses into the datapath (so a restart
loses nothing), bind the listeners, then install the steering (so VM queries are redirected only
once something answers them). If the process dies later, the steering stays and the queries go
unanswered: that is the intended fail-closed state. stop() saves state and closes listeners; it removes the steering
only when asked (`skyguard down`), because a crashed or restarting daemon must leave VM queries
unanswered rather than let them reach another resolver.

Not here: policy parsing, the datapath, the signed log (they are passed in).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from skyguard import config
from skyguard.dns import steering
from skyguard.dns.interfaces import DecisionLog, Learner, PolicyDirectory, WorkloadDirectory
from skyguard.dns.latency import settle_for_latency
from skyguard.dns.learned import FILE_NAME, LearnedStore
from skyguard.dns.metrics import DnsMetrics
from skyguard.dns.resolver import DnsPolicyResolver
from skyguard.dns.server import DEFAULT_PORT, DnsServer, Upstream, local_addresses
from skyguard.errors import DnsError
from skyguard.policy.model import Policy


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed: it nearly triples the proxy's queries/s (bench/dns.py)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class DnsProxy:
    def __init__(self, policy: Policy, learner: Learner, log: DecisionLog,
                 registry=None, state_dir: Path | None = None, port: int = DEFAULT_PORT,
                 netns: str | None = None, directory: WorkloadDirectory | None = None,
                 host_addresses: list[str] | None = None, steer: bool = True):
        self.policy = policy
        self.port = port
        self.netns = netns  # None: steering goes into the namespace this process runs in
        self.steer = steer
        self.store = LearnedStore(Path(state_dir or config.STATE_DIR) / FILE_NAME)
        self.metrics = DnsMetrics(registry)
        self.resolver = DnsPolicyResolver(
            policy, directory or PolicyDirectory(policy), learner, log=log, metrics=self.metrics,
            store=self.store,
            host_addresses=local_addresses() if host_addresses is None else host_addresses)
        self.server = DnsServer(self.resolver, [Upstream.parse(u) for u in policy.dns.upstreams],
                                listen=[("0.0.0.0", port), ("::", port)])
        self.relearned = 0
        self.frozen_objects = 0  # set by start(): objects moved out of GC reach (latency.py)

    async def start(self) -> None:
        self.store.load()
        self.relearned = self.store.relearn(self.resolver.learner, time.time())
        await self.server.start()
        if self.steer:
            steering.install([w.interface for w in self.policy.workloads()], self.port,
                             self.netns)
        # Last: the heap built so far (policy, state, metrics, the daemon's modules) leaves the
        # garbage collector's reach, so its pauses stay short while queries are in flight.
        self.frozen_objects = settle_for_latency()

    def set_policy(self, policy: Policy) -> None:
        """Hot swap: new rules apply to the next query; steering follows the new interfaces."""
        upstreams = [Upstream.parse(u) for u in policy.dns.upstreams]  # may raise: nothing changed
        if not upstreams:
            raise DnsError("the new policy has no dns.upstreams; keeping the running policy")
        self.policy = policy
        self.resolver.set_policy(policy)
        if isinstance(self.resolver.directory, PolicyDirectory):
            self.resolver.directory = PolicyDirectory(policy)
        self.server.upstreams = upstreams
        if self.steer:
            steering.install([w.interface for w in policy.workloads()], self.port, self.netns)

    async def stop(self, remove_steering: bool = False) -> None:
        await self.server.close()
        if remove_steering and self.steer:
            steering.remove(self.netns)
