"""The eBPF datapath as seen from Python: ABI mirrors, the bcc loader, attach/detach, typed maps,
events. Nothing here parses YAML; it consumes skyguard.policy.model.Policy.

Contract other parts code against (implemented in skyguard/datapath/datapath.py):

    dp = Datapath(pin_dir=config.PIN_DIR)   # compiles bpf/, creates or re-opens pinned maps
    dp.apply_policy(policy)                  # atomic swap: no moment with no policy or a mix
    dp.attach(ifname) / dp.detach(ifname)    # XDP (VM -> host) + TC egress (host -> VM)
    dp.attached() -> dict[ifname, info]      # program ids and tags per interface
    dp.learn(zone, rule_name, ips, ttl)      # DNS learning: open ips for that zone+rule's ports
                                             # (for the longest ttl any call gave them)
    dp.counters() -> dict                    # per zone/direction/verdict/reason, summed per-CPU
    dp.close()                               # drops Python handles; pinned state stays

Details and additions (bpf/README.md explains the design):

    Datapath(pin_dir=None, from_vm_hook="tc", defines=None)
        from_vm_hook: "tc" (TC ingress, default, chosen by measurement), "xdp" (generic), "xdp-native";
        env SKYGUARD_FROM_VM_HOOK overrides the default. Root needed (PrivilegeError).
    apply_policy(policy, ifindexes=None) -> gen   # interfaces resolved in the calling thread's netns;
        raises BadInput (nothing loaded) for a policy the datapath cannot hold
    attach(ifname) -> (ifindex, info)        # BadInput if the interface is no workload's
    sync() -> {"attached": [...], "missing": [...]}  # attach every present workload interface not
                                             # carrying our programs (start, netlink events, periodic)
    verify() -> {ifname: problem}            # watchdog: missing or foreign programs ({} = all ours)
    program_ids() -> {"sg_from_vm": id, "sg_from_vm_tc": id, "sg_to_vm": id}
    detach_all() -> [ifname]                 # `skyguard down`; then Datapath.remove_pins()
    hold(zone, rule_name, ips, ttl)          # learn(), but exactly ttl: shortens (an answer taken back)
    forget(zone, rule_name, ips) -> removed  # close ips for that zone+rule now (others' holds stay)
    expire_learned() -> removed              # call periodically (the datapath already ignores expired)
    learned() -> {ip: {"zone/rule": expiry_monotonic_ns}}
    counters() -> {"traffic": [{zone, direction, verdict, packets, bytes}],
                   "drops": [{zone, direction, reason, packets, bytes}], "events_lost": n}
    flows() -> [{ifindex, proto, src, dst, sport, dport, zone, direction, state, rule, packets, bytes}]
    occupancy() -> {map name: entries}
    set_events(True) + events(): the ring of abi.Event records (flowlog/ring.py reads its memory map)
    reasons.DROP_REASONS / reason_name(code): the drop-reason table, parsed from bpf/abi.h
"""



def __getattr__(name: str):
    # `from skyguard.datapath import Datapath` imports the loader and pyroute2 (~0.7 s) only when
    # asked: readers of the ABI mirrors (abi, reasons) do not pay for it.
    if name == "Datapath":
        from skyguard.datapath.datapath import Datapath

        return Datapath
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
