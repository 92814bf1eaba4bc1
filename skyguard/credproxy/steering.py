"""nftables steering for the credential proxy and TLS termination: `table inet skyguard_cred`.

- HTTP (tcp/80) and HTTPS (tcp/443) that VMs of the credentials' zones send to the credentials'
  destination addresses is redirected to the proxy's listeners (prerouting, dstnat), so a VM
  needs no proxy setting and cannot reach those destinations directly on those ports.
- Connections to a workload's terminated port (tls_termination) are redirected to the
  terminator's listener, from anywhere, including the host itself (output chain).

The proxy reads the original destination back with SO_ORIGINAL_DST. Destination addresses come
from DNS learning and change at run time: they live in two sets updated without touching the
rules. Install and remove are idempotent and atomic (one nft transaction each). Not here:
filtering (the eBPF datapath decides what may flow at all).
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from skyguard.errors import CredentialError

TABLE = "skyguard_cred"
FAMILY = "inet"


@dataclass(frozen=True)
class TerminationSteer:
    """Redirect tcp/`port` toward `addresses` to local port `listen_port`."""

    addresses: tuple[str, ...]
    port: int
    listen_port: int


@dataclass
class CredentialSteering:
    """The table for one running proxy. `nft` is the command to run (tests prefix a netns)."""

    interfaces: Sequence[str]
    http_port: int
    https_port: int
    terminations: Sequence[TerminationSteer] = ()
    nft: Sequence[str] = ("nft",)
    # True: every tcp/80 and tcp/443 connection of those interfaces goes to the proxy, so a
    # placeholder sent to ANY host is seen and blocked (VMs then trust the skyguard CA for all
    # HTTPS). False: only the destination addresses in the sets are steered.
    all_destinations: bool = False
    # Interfaces whose every tcp/80 and tcp/443 connection goes to the proxy whatever
    # all_destinations says: zones under HTTP content rules (skyguard/policy/content.py).
    content_interfaces: Sequence[str] = ()
    installed: bool = field(default=False, init=False)

    def ruleset(self, addresses: Iterable[str] = ()) -> str:
        v4, v6 = _split(addresses)
        lines = [
            f"table {FAMILY} {TABLE} {{}}",
            f"delete table {FAMILY} {TABLE}",
            f"table {FAMILY} {TABLE} {{",
            "  set cred_v4 { type ipv4_addr; }",
            "  set cred_v6 { type ipv6_addr; }",
            "  chain prerouting {",
            "    type nat hook prerouting priority dstnat; policy accept;",
        ]
        if self.interfaces and self.all_destinations:
            ifaces = ", ".join(_quote(name) for name in self.interfaces)
            lines.append(f"    iifname {{ {ifaces} }} meta nfproto {{ ipv4, ipv6 }} tcp dport 80 redirect to :{self.http_port}")
            lines.append(f"    iifname {{ {ifaces} }} meta nfproto {{ ipv4, ipv6 }} tcp dport 443 redirect to :{self.https_port}")
        elif self.interfaces:
            ifaces = ", ".join(_quote(name) for name in self.interfaces)
            for family, set_name in (("ip", "cred_v4"), ("ip6", "cred_v6")):
                match = f"    iifname {{ {ifaces} }} {family} daddr @{set_name}"
                lines.append(f"{match} tcp dport 80 redirect to :{self.http_port}")
                lines.append(f"{match} tcp dport 443 redirect to :{self.https_port}")
        if self.content_interfaces:
            ifaces = ", ".join(_quote(name) for name in self.content_interfaces)
            lines.append(f"    iifname {{ {ifaces} }} meta nfproto {{ ipv4, ipv6 }} tcp dport 80 redirect to :{self.http_port}")
            lines.append(f"    iifname {{ {ifaces} }} meta nfproto {{ ipv4, ipv6 }} tcp dport 443 redirect to :{self.https_port}")
        termination_rules = []
        for steer in self.terminations:
            t4, t6 = _split(steer.addresses)
            for family, group in (("ip", t4), ("ip6", t6)):
                if group:
                    termination_rules.append(
                        f"{family} daddr {{ {', '.join(group)} }} tcp dport {steer.port} redirect to :{steer.listen_port}")
        lines += ["    " + rule for rule in termination_rules]
        lines += ["  }", "  chain output {", "    type nat hook output priority -100; policy accept;"]
        lines += ["    " + rule for rule in termination_rules]
        lines += ["  }", "}"]
        for set_name, group in (("cred_v4", v4), ("cred_v6", v6)):
            if group:
                lines.append(f"add element {FAMILY} {TABLE} {set_name} {{ {', '.join(group)} }}")
        return "\n".join(lines) + "\n"

    def install(self, addresses: Iterable[str] = ()) -> None:
        """Create (or replace) the table with these destination addresses, atomically."""
        self._run(self.ruleset(addresses))
        self.installed = True

    def set_addresses(self, addresses: Iterable[str]) -> None:
        """Replace the steered destination addresses (both families) in one transaction."""
        v4, v6 = _split(addresses)
        script = [f"flush set {FAMILY} {TABLE} cred_v4", f"flush set {FAMILY} {TABLE} cred_v6"]
        for set_name, group in (("cred_v4", v4), ("cred_v6", v6)):
            if group:
                script.append(f"add element {FAMILY} {TABLE} {set_name} {{ {', '.join(group)} }}")
        self._run("\n".join(script) + "\n")

    def add_address(self, address: str) -> None:
        """Steer one more address (DNS learned it for a credential destination)."""
        v4, v6 = _split([address])
        set_name = "cred_v4" if v4 else "cred_v6"
        self._run(f"add element {FAMILY} {TABLE} {set_name} {{ {(v4 or v6)[0]} }}\n")

    def remove(self) -> None:
        """Delete the table; fine if it is already gone."""
        self._run(f"table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\n")
        self.installed = False

    def _run(self, script: str) -> None:
        try:
            result = subprocess.run([*self.nft, "-f", "-"], input=script.encode(), capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise CredentialError(f"cannot run nft ({error}); install nftables (scripts/setup does)") from None
        if result.returncode != 0:
            raise CredentialError(
                f"nft refused the credential steering rules: {result.stderr.decode(errors='replace').strip()} "
                "(needs root and nf_tables with nat support)"
            )


def _split(addresses: Iterable[str]) -> tuple[list[str], list[str]]:
    v4: list[str] = []
    v6: list[str] = []
    for text in addresses:
        try:
            address = ipaddress.ip_address(str(text))
        except ValueError:
            raise CredentialError(f"not an IP address for credential steering: {text!r}") from None
        (v4 if address.version == 4 else v6).append(address.compressed)
    return sorted(set(v4)), sorted(set(v6))


def _quote(interface: str) -> str:
    if not interface.replace("-", "").replace("_", "").replace(".", "").isalnum() or len(interface) > 15:
        raise CredentialError(f"not a valid interface name for credential steering: {interface!r}")
    return f'"{interface}"'
