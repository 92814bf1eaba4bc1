"""The fail-closed guard for workload interfaces that have no skyguard programs yet.

Between the moment a VM interface appears (a VM starts, a tap is re-created) and the moment the
daemon has attached its programs, the kernel would forward the VM's packets unfiltered. This
nftables table closes that window: packets entering or leaving an interface named by the policy
are dropped unless that interface (by ifindex) is in the `attached` set, to which the daemon adds
an interface only after its programs are attached. A re-created interface gets a new ifindex, so
it is dropped until re-attached; a dead daemon leaves the set as it was (fail closed: attached
interfaces keep their programs, new ones stay dark). `skyguard down` removes the table.

The same table drops port 53 forwarded from a workload interface: the datapath passes a VM's DNS
up to the host for the DNS steering to redirect to the proxy (input, never forward), so what is
forwarded missed the steering (an interface the DNS part has not taken yet, when it is slow or
failed) and would be routed to whatever resolver the VM named.

Not here: the eBPF programs themselves (they make every decision; this only covers their absence).
"""

from __future__ import annotations

import json
import subprocess

from skyguard.errors import DatapathError

TABLE = "skyguard_guard"
PRIORITY = -200  # before any filter a site may have; after DNS steering's dstnat (a NAT hook)


def _nft(script: str) -> None:
    done = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
    if done.returncode != 0:
        raise DatapathError(f"nftables refused the interface guard: {done.stderr.strip()}")


def install(interfaces: list[str]) -> None:
    """Create or update the guard for these workload interface names, atomically, keeping the
    set of attached interfaces (a restarting daemon must not open or close anything)."""
    names = ", ".join(json.dumps(n) for n in sorted(set(interfaces))) or '"-none-"'
    lines = [f"add table inet {TABLE}",
             f"add set inet {TABLE} attached {{ type iface_index; }}"]
    for chain, hook in (("forward", "forward"), ("input", "input"), ("output", "output")):
        lines += [f"add chain inet {TABLE} {chain} {{ type filter hook {hook} priority {PRIORITY}; policy accept; }}",
                  f"flush chain inet {TABLE} {chain}"]
    lines += [f"add rule inet {TABLE} forward iifname {{ {names} }} iif != @attached counter drop",
              # Steered DNS goes to the proxy (input): port 53 forwarded from a VM missed the
              # steering (an interface the DNS part does not have yet, a DNS part that failed).
              f"add rule inet {TABLE} forward iifname {{ {names} }} meta l4proto {{ tcp, udp }} th dport 53 counter drop",
              f"add rule inet {TABLE} forward oifname {{ {names} }} oif != @attached counter drop",
              f"add rule inet {TABLE} input iifname {{ {names} }} iif != @attached counter drop",
              f"add rule inet {TABLE} output oifname {{ {names} }} oif != @attached counter drop"]
    _nft("\n".join(lines) + "\n")


def mark_attached(ifindex: int) -> None:
    """The programs are on the interface with this index: let the kernel route its packets (to
    the programs' verdicts). By index, the one attach() put them on: by name, an interface
    re-created in between would be marked with its new index, open without programs until the
    watchdog's next look."""
    _nft(f"add element inet {TABLE} attached {{ {int(ifindex)} }}\n")


def remove() -> None:
    subprocess.run(["nft", "delete", "table", "inet", TABLE], capture_output=True)


def dropped() -> int:
    """Packets the guard dropped (interfaces not yet, or no longer, carrying our programs; DNS
    that missed the steering)."""
    done = subprocess.run(["nft", "-j", "list", "table", "inet", TABLE], capture_output=True, text=True)
    if done.returncode != 0:
        return 0
    total = 0
    for item in json.loads(done.stdout).get("nftables", []):
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                total += expr["counter"].get("packets", 0)
    return total
