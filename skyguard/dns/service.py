"""The DNS proxy as one part the daemon starts and stops: resolver + server + steering + learned
state, wired in one place.

Start order: load learned state and re-learn unexpired addresses into the datapath (so a restart
loses nothing), close port 53 of the VMs (steering without redirects), bind the listeners, then
install the steering (so VM queries are redirected only once something answers them, and a proxy
that cannot bind leaves them dropped, never routed to the resolver they named). If the process
dies later, the steering stays and the queries go unanswered: that is the intended fail-closed
state. stop() saves state and closes listeners; it removes the steering only when asked
(`skyguard down`), because a crashed or restarting daemon must leave VM queries unanswered
rather than let them reach another resolver.

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
from skyguard.policy.model import Policy


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
        # None: this namespace's addresses, read again at every hot swap (as the datapath's
        # `host` identity is), so an address the host gained since is never learned.
        self._own_addresses = host_addresses is None
        self.resolver = DnsPolicyResolver(
            policy, directory or PolicyDirectory(policy), learner, log=log, metrics=self.metrics,
            store=self.store,
            host_addresses=local_addresses() if host_addresses is None else host_addresses)
        self.server = DnsServer(self.resolver, [Upstream.parse(u) for u in policy.dns.upstreams],
                                listen=[("0.0.0.0", port), ("::", port)])
        # What a refusal of the log takes back leaves the saved state at once, not at the next flush.
        self.resolver.learning.save = self.server.state_writer.save
        self.log = log
        self.relearned = 0
        self.dropped: dict[str, int] = {}  # learned entries the policy no longer backs, per reason
        self.frozen_objects = 0  # set by start(): objects moved out of GC reach (latency.py)

    async def start(self) -> None:
        await asyncio.to_thread(self.store.load)
        result = self.store.relearn(self.resolver.learner, time.time(), self.policy)
        self.resolver.learning.forget_released()  # what the saved state held but the policy no longer backs
        self.relearned = result.relearned
        self._count_dropped(result.dropped)
        if self.steer:
            # Port 53 closed before the listeners bind: if they cannot (another program holds
            # the port), the VMs' queries to any resolver are dropped. Without any steering the
            # datapath passes them to the host, which would route them to that resolver.
            await self._install_steering(self.policy, closed=True)
        await self.server.start()
        if self.steer:
            await self._install_steering(self.policy)
        # Last: the heap built so far (policy, state, metrics, the daemon's modules) leaves the
        # garbage collector's reach, so its pauses stay short while queries are in flight.
        self.frozen_objects = settle_for_latency()

    async def set_policy(self, policy: Policy) -> dict[str, int]:
        """Hot swap: new rules apply to the next query; steering follows the new interfaces;
        learned entries of rules, zones or workloads the new policy lacks are dropped (and
        logged). Returns those drops per reason. Call it on the proxy's event loop."""
        upstreams = [Upstream.parse(u) for u in policy.dns.upstreams]  # may raise: nothing changed
        if self._own_addresses:  # pyroute2's netlink blocks and cannot run inside the loop
            addresses = await asyncio.get_running_loop().run_in_executor(None, local_addresses)
            self.resolver.set_host_addresses(addresses)
        self.policy = policy
        self.resolver.set_policy(policy)
        dropped = self.store.forget_stale(policy)
        self.resolver.learning.forget_released()  # the datapath closes them now, not at their TTL
        self._count_dropped(dropped)
        if isinstance(self.resolver.directory, PolicyDirectory):
            self.resolver.directory = PolicyDirectory(policy)
        self.server.upstreams = upstreams
        if self.steer:
            await self._install_steering(policy)
        return dropped

    def _count_dropped(self, dropped: dict[str, int]) -> None:
        if dropped:
            self.log.record("dns_learned_dropped", dropped=dict(dropped))
        for reason, count in dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + count
            self.metrics.learned_dropped.labels(reason).inc(count)

    async def _install_steering(self, policy: Policy, closed: bool = False) -> None:
        """nft runs in a worker thread: it may take its time (a busy host, another program
        holding the ruleset), and the loop answers every VM's queries (and serves the other
        parts) meanwhile; the table in place until then keeps steering them."""
        interfaces = [w.interface for w in policy.workloads()]
        if interfaces:
            await asyncio.to_thread(steering.install, interfaces, None if closed else self.port, self.netns)
        else:  # zones without workloads are valid: nothing to steer, and no stale redirect
            await asyncio.to_thread(steering.remove, self.netns)

    def status(self) -> dict:
        """For `skyguard status`: answers whose log entry was refused after they left (learning.py)."""
        return self.resolver.learning.status()

    async def stop(self, remove_steering: bool = False) -> None:
        await self.server.close()
        if remove_steering and self.steer:
            await asyncio.to_thread(steering.remove, self.netns)
