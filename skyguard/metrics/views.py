"""Daemon-side reads for the live view (`skyguard top`): the "flows.active" control operation's
reply, the conntrack entries alive now, each named by the interface and workload it was seen on.

Why here and not in the CLI: interface indexes only mean something in the daemon's network
namespace, and the policy that maps interfaces to workloads lives in the daemon. The reply is
bounded (`limit` flows, largest first) so a flood of a million flows cannot make it huge.

Not here: printing (cli/top.py, cli/render.py), reading the maps (datapath.flows()), or the flow
records of `skyguard flows` (the "flows" operation, datapath/flowlog.py).
"""

from __future__ import annotations

import socket

from skyguard.errors import BadInput

DEFAULT_FLOW_LIMIT = 200
MAX_FLOW_LIMIT = 100_000


def workload_names(policy) -> dict[str, dict]:
    """{ifname: {"workload", "zone"}} for every workload of the policy."""
    if policy is None:
        return {}
    return {w.interface: {"workload": w.name, "zone": w.zone} for w in policy.workloads()}


def flows_reply(datapath, policy, args: dict | None = None) -> dict:
    """The "flows.active" control operation: args {"limit": int, "zone": name or None}.

    Returns {"flows": [...largest first, each with "interface" and "workload"], "total": int
    (before the limit), "by_zone": {zone: count}, "workloads": {ifname: {"workload", "zone"}}}.
    """
    args = args or {}
    limit = args.get("limit", DEFAULT_FLOW_LIMIT)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_FLOW_LIMIT:
        raise BadInput(f"flows.active: limit must be a whole number from 1 to {MAX_FLOW_LIMIT}")
    zone = args.get("zone")
    if zone is not None and not isinstance(zone, str):
        raise BadInput("flows.active: zone must be a zone name")
    workloads = workload_names(policy)
    ifnames = {index: name for index, name in socket.if_nameindex()}
    flows = datapath.flows() if datapath is not None else []
    by_zone: dict[str, int] = {z: 0 for z in (policy.zones if policy is not None else ())}
    selected = []
    for flow in flows:
        by_zone[flow.get("zone", "unknown")] = by_zone.get(flow.get("zone", "unknown"), 0) + 1
        if zone is not None and flow.get("zone") != zone:
            continue
        ifname = ifnames.get(flow.get("ifindex"), "")
        selected.append(dict(flow, interface=ifname, workload=workloads.get(ifname, {}).get("workload", "")))
    selected.sort(key=lambda f: (-int(f.get("bytes", 0)), -int(f.get("packets", 0))))
    return {"flows": selected[:limit], "total": len(selected), "by_zone": by_zone, "workloads": workloads}


def flows_handler(daemon):
    """The handler to register as the daemon's "flows.active" control operation:
    handlers["flows.active"] = flows_handler(self)."""
    return lambda args: flows_reply(getattr(daemon, "datapath", None), getattr(daemon, "policy", None), args)
