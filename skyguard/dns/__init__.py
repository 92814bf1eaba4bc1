"""The transparent DNS proxy: decides by name per zone, programs the datapath, detects tunnels.

Modules: wire (bounded raw parsing), resolver (sans-io policy engine), rebinding (which answer
addresses a public name may not have), tunnel (detection),
learned (persisted learned addresses), server (asyncio transport), steering (nftables redirect),
names (the FQDN matching seam), interfaces (Learner, DecisionLog, WorkloadDirectory protocols),
metrics, service (DnsProxy: all of it wired for the daemon).

Not here: policy parsing, the datapath's maps, the signed log. They are consumed through the
protocols in interfaces.py.
"""
