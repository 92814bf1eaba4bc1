"""Transparent DNS steering: every query a VM sends to any address on udp/tcp 53 reaches the
proxy, the answer leaves from the address the VM asked, and nothing else of port 53 passes.

One nftables table (`inet skyguard_dns`) in the network namespace where skyguard runs:
- prerouting, dstnat: port 53 arriving on the VMs' host-side interfaces is redirected to the
  proxy's port, at most DNS_CONNECTIONS_PER_VM tracked connections per interface at a time (each
  redirect is an entry in the kernel's connection table, which every namespace of the host
  shares: a VM sending queries from random ports would otherwise fill it and stop every new
  connection of every VM and of the host). conntrack's NAT reverses the rewrite on replies, so the VM sees the answer come
  from 198.51.100.99 if that is where it sent the query.
- prerouting, mangle (after conntrack made the entry, before it is confirmed): a steered UDP
  query's entry lives DNS_QUERY_TIMEOUT_S (a ct timeout policy) instead of the kernel's 30 s, so
  the cap below is ~250 queries/s from distinct ports per VM instead of ~68 (a resolver without a
  cache, glibc's, sends every query from a new port). A kernel without conntrack timeout
  policies (CONFIG_NF_CONNTRACK_TIMEOUT) gets the table without it, and a warning.
- prerouting, just after dstnat: port 53 from those interfaces that was NOT redirected is dropped.
  NAT only rewrites what the connection tracker accepts: TCP without flags, SYN+FIN, bad checksums
  or a packet of a connection older than the steering are left alone and would be routed to the
  real destination (a tunnel). Whatever still has destination port 53 after NAT is such a packet.
- postrouting: the proxy's replies (the reply direction of a connection redirected from port 53)
  get the SG_MARK_DNS_REPLY bit of skb->mark, which is the only thing that lets DNS into a VM
  (bpf/sg_datapath.c keeps no conntrack state for steered DNS).
install() replaces the whole table in one nft transaction (idempotent; never a moment without
steering when updating); remove() deletes it and is a no-op when it is absent.

Not here: blocking DoT (853) and DoH. Those are ordinary flows to addresses no rule allows, and
the datapath drops them. The datapath must pass udp/tcp 53 from VMs up to this stack.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess

from skyguard.datapath.abi import MARK_DNS_REPLY
from skyguard.errors import DnsError

log = logging.getLogger(__name__)

TABLE = "skyguard_dns"
# Steered DNS connections one VM interface may have tracked at once: with each query's entry
# kept DNS_QUERY_TIMEOUT_S, ~250 queries/s from distinct ports sustained (without the timeout
# policy, 30 s each: ~68/s); more are dropped unanswered.
DNS_CONNECTIONS_PER_VM = 2048
DNS_QUERY_TIMEOUT_S = 8  # from the query, and again from its answer (conntrack refreshes an
# entry on the reply): longer than the proxy takes to try three upstreams (2 s each), and than
# the 5 s a stub resolver waits before it asks again
_IFNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")


def ruleset(interfaces: list[str], port: int | None, short_timeouts: bool = True) -> str:
    """The nft script that replaces the steering table (pure; tested without nft). Port None:
    the table without its redirects, so port 53 from the interfaces is dropped, not routed
    (what the proxy installs before it binds: if it cannot, VM DNS stays unanswered).
    short_timeouts: steered UDP queries' conntrack entries expire after DNS_QUERY_TIMEOUT_S."""
    if not interfaces:
        raise DnsError("no VM interfaces to steer DNS from; the policy has no workloads")
    for name in interfaces:
        if not _IFNAME.match(name):
            raise DnsError(f"interface name {name!r} is not a valid Linux interface name")
    if port is not None and (not 0 < port < 65536 or port == 53):
        raise DnsError(f"DNS proxy port {port} is out of range 1-65535 or 53 (the steering drops what "
                       "still goes to port 53 after the redirect; use another port, e.g. 5353)")
    names = ", ".join(f'"{name}"' for name in sorted(set(interfaces)))
    return "\n".join([
        f"table inet {TABLE} {{}}",  # make the delete below valid on first install
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        "  set dns_conns { type ifname; size 65535; flags dynamic; }",
        *([f"  ct timeout dns_udp {{ protocol udp; l3proto inet; policy = {{ unreplied: "
           f"{DNS_QUERY_TIMEOUT_S}, replied: {DNS_QUERY_TIMEOUT_S} }}; }}",
           "  chain timeouts {",  # after conntrack's lookup (-200): the entry must exist
           "    type filter hook prerouting priority mangle; policy accept;",
           f'    iifname {{ {names} }} udp dport 53 ct timeout set "dns_udp"',
           "  }"] if short_timeouts else []),
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        f"    iifname {{ {names} }} meta l4proto {{ tcp, udp }} th dport 53 "
        f"add @dns_conns {{ iifname ct count over {DNS_CONNECTIONS_PER_VM} }} counter drop",
        *(f"    iifname {{ {names} }} {proto} dport 53 counter redirect to :{port}"
          for proto in (("udp", "tcp") if port is not None else ())),
        "  }",
        "  chain unsteered {",
        "    type filter hook prerouting priority dstnat + 10; policy accept;",
        f"    iifname {{ {names} }} meta l4proto {{ tcp, udp }} th dport 53 counter drop",
        "  }",
        "  chain replies {",
        "    type filter hook postrouting priority filter; policy accept;",
        *(f"    oifname {{ {names} }} ct direction reply ct status dnat meta l4proto {proto} "
          f"ct original proto-dst 53 meta mark set meta mark | {MARK_DNS_REPLY:#010x}" for proto in ("udp", "tcp")),
        "  }",
        "}",
        "",
    ])


def _nft(script: str, netns: str | None) -> None:
    nft = shutil.which("nft")
    if nft is None:
        raise DnsError("nft is not installed; install nftables (scripts/setup does)")
    command = [nft, "-f", "-"]
    if netns:
        command = ["nsenter", f"--net=/run/netns/{netns}", "--"] + command
    result = subprocess.run(command, input=script, capture_output=True, text=True)
    if result.returncode != 0:
        raise DnsError(f"nftables refused the DNS steering rules: {result.stderr.strip()} "
                       "(needs root and nf_tables; `skyguard doctor` checks both)")


def install(interfaces: list[str], port: int | None, netns: str | None = None) -> None:
    """Steer port 53 from interfaces to the proxy's port; with port None, drop it all."""
    try:
        _nft(ruleset(interfaces, port), netns)
    except DnsError as e:
        try:
            _nft(ruleset(interfaces, port, short_timeouts=False), netns)
        except DnsError:
            raise e from None
        log.warning("DNS steering installed without its conntrack timeout policy (%s): each VM "
                    "gets ~68 queries/s from distinct ports, not ~250", e)


def remove(netns: str | None = None) -> None:
    _nft(f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n", netns)


def installed(netns: str | None = None) -> str:
    """The current table as nft prints it, or "" if absent."""
    command = ["nft", "list", "table", "inet", TABLE]
    if netns:
        command = ["nsenter", f"--net=/run/netns/{netns}", "--"] + command
    result = subprocess.run(command, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else ""
