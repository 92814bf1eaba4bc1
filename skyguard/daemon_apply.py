"""The daemon's hot swap of a policy (`skyguard policy load`, the fleet agent): the datapath's
atomic generation flip, then every part on the loop.

What holds whatever the parts do: once the datapath enforces a policy, the daemon says so
(status, `policy show`, attestation, a policy_load entry in the signed log), even when a part
takes longer than config.PARTS_WAIT_S to take it, or fails to. The parts then go on taking it on the
loop; the reply names the one still busy ("pending"), and no other swap starts until they are
done: two reconciles interleaving on the loop could leave the parts on the older policy under
the newer datapath.

Not here: what each part does with a policy (Daemon._reconcile_parts).
"""

from __future__ import annotations

import asyncio
import logging

from skyguard import config
from skyguard.datapath import guard
from skyguard.errors import DaemonError

log = logging.getLogger("skyguard.daemon")


def apply_policy(daemon, policy, text: str, host_addresses: list[str]) -> dict:
    """Swap `daemon` (skyguard.daemon.Daemon) to `policy`. Returns the parts with a problem
    ({name: {"state", "problem"}}, state "pending" for a part still taking it). Raises
    DaemonError, changing nothing, while the parts still take an earlier policy."""
    with daemon._lock:
        busy = daemon.parts_applying
        if busy is not None and not busy.done():
            raise DaemonError(f"the parts are still taking policy {daemon.policy.name} "
                              f"({daemon.policy.sha256[:16]}...), which the datapath already enforces "
                              f"({daemon.parts_busy or 'a part'} has not finished); nothing changed: load it "
                              "again once `skyguard status` shows no part pending")
        refusal = daemon.tlog.refusal() if daemon.tlog is not None else None
        if refusal is not None:  # a load is on record or not made (fail closed)
            raise DaemonError(f"policy {policy.name} was not loaded (nothing changed): the signed log "
                              f"cannot take its policy_load entry: {refusal}")
        # Raises only before its generation flip (nothing changed); never after it (Datapath.apply_policy).
        daemon.datapath.apply_policy(policy, host_addresses=host_addresses)
        # From here on the datapath enforces `policy`: the daemon says so, whatever follows.
        daemon.policy, daemon.policy_text = policy, text
        try:
            guard.install([w.interface for w in policy.workloads()])
            daemon.tpm.measure_policy(policy.name, policy.sha256)
        finally:  # logged, and the parts follow the datapath, even when one of these failed (raised)
            try:
                daemon.record("policy_load", name=policy.name, sha256=policy.sha256, source=str(policy.source))
            finally:
                busy = daemon.parts_applying = asyncio.run_coroutine_threadsafe(daemon._reconcile_parts(policy),
                                                                                 daemon.loop)
        # Under the lock, as at start: new interfaces are attached only once the parts (the DNS
        # proxy's steering) have the policy, or have had their config.PARTS_WAIT_S.
        try:
            problems = busy.result(config.PARTS_WAIT_S)
        except TimeoutError:
            part = daemon.parts_busy or "a part"
            log.error("%s has not taken policy %s within %.0f s; the datapath enforces it, the part goes on",
                      part, policy.sha256[:12], config.PARTS_WAIT_S)
            return {part: {"state": "pending", "problem": f"still taking the policy after {config.PARTS_WAIT_S:.0f} s "
                                                          "(it goes on; `skyguard status` shows when it is done)"}}
        daemon._reconcile()
        return problems


def part_states(daemon) -> dict[str, str]:
    """Each slot's state for status: "pending" for the one still taking a policy."""
    busy = daemon.parts_applying
    pending = daemon.parts_busy if busy is not None and not busy.done() else None
    return {slot.name: "pending" if slot.name == pending else slot.state for slot in daemon.slots}
