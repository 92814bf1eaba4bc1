"""The eBPF datapath as seen from Python: ABI mirrors, the bcc loader, attach/detach, typed maps,
events. Nothing here parses YAML; it consumes skyguard.policy.model.Policy.

Contract other parts code against (implemented in skyguard/datapath/datapath.py):

    dp = Datapath(pin_dir=config.PIN_DIR)   # compiles bpf/, creates or re-opens pinned maps
    dp.apply_policy(policy)                  # atomic swap: no moment with no policy or a mix
    dp.attach(ifname) / dp.detach(ifname)    # XDP (VM -> host) + TC egress (host -> VM)
    dp.attached() -> dict[ifname, info]      # program ids and tags per interface
    dp.learn(zone, rule_name, ips, ttl)      # DNS learning: open ips for that zone+rule's ports
    dp.counters() -> dict                    # per zone/direction/verdict/reason, summed per-CPU
    dp.close()                               # drops Python handles; pinned state stays
"""

from skyguard.datapath.datapath import Datapath  # noqa: E402,F401
