"""skyguard: a host-level zero-trust data path for virtual machines.

eBPF programs (bpf/) enforce policy on every VM interface; this package is the userspace:
policy, datapath loader, DNS, credential proxy, key custody, admin access, signed log, lab.
"""

__version__ = "0.1.0"
