"""The lab's fixed address plan and the deterministic name -> address mapping of its DNS server.

Pure functions and constants, no I/O: the DNS server, the tests and anyone predicting what a
`.test` name resolves to use the same code. This is not where VM addresses come from (those are
the policy's); it only says what the sealed internet owns and how names map into it.
"""

from __future__ import annotations

import hashlib
import ipaddress

# What the `internet` namespace owns (documentation ranges, RFC 5737 and RFC 3849). It answers for
# every address in them and routes nothing else anywhere.
INTERNET_RANGES = (
    ipaddress.ip_network("192.0.2.0/24"),
    ipaddress.ip_network("198.51.100.0/24"),
    ipaddress.ip_network("203.0.113.0/24"),
    ipaddress.ip_network("2001:db8::/32"),
)
# Where `.test` names land: a sub-range of the above, so every answer is served by the echo servers.
NAME_RANGE_V4 = ipaddress.ip_network("203.0.113.0/24")
NAME_RANGE_V6 = ipaddress.ip_network("2001:db8:203::/64")

DNS_SERVER_V4 = ipaddress.ip_address("192.0.2.53")
DNS_SERVER_V6 = ipaddress.ip_address("2001:db8::53")
SYSLOG_COLLECTOR_V4 = ipaddress.ip_address("192.0.2.10")
SYSLOG_COLLECTOR_V6 = ipaddress.ip_address("2001:db8::10")

# Every VM's gateway: the same link-local addresses on every host-side veth (routed, not bridged).
GATEWAY_V4 = ipaddress.ip_address("169.254.1.1")
GATEWAY_V6 = ipaddress.ip_address("fe80::1")

# The one link between the lab host and the internet. Shared address space (RFC 6598) and a ULA
# that no policy in the repo uses, so host-originated traffic (skyguard's DNS and credential
# proxies) has routable source addresses of its own.
UPLINK_HOST = "lab-uplink"  # in the host namespace
UPLINK_INTERNET = "lab-downlink"  # in the internet namespace
UPLINK_V4_HOST = ipaddress.ip_interface("100.64.0.1/30")
UPLINK_V4_INTERNET = ipaddress.ip_interface("100.64.0.2/30")
UPLINK_V6_HOST = ipaddress.ip_interface("fd64::1/64")
UPLINK_V6_INTERNET = ipaddress.ip_interface("fd64::2/64")

# Name of the VM side of every VM veth (inside the VM namespace, like a guest's first NIC).
VM_INTERFACE = "eth0"

# Addresses a VM may not have: the lab's own plumbing and what cannot be a unicast host address.
RESERVED_FOR_LAB = INTERNET_RANGES + (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("100.64.0.0/30"),
    ipaddress.ip_network("fd64::/64"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
    ipaddress.ip_network("0.0.0.0/32"),
    ipaddress.ip_network("::/128"),
    ipaddress.ip_network("224.0.0.0/3"),
    ipaddress.ip_network("ff00::/8"),
)

TEST_DOMAIN = "test"


def normalize_name(name: str) -> str:
    """DNS names compare case-insensitively and with or without the trailing dot."""
    return name.strip().rstrip(".").lower()


def is_test_name(name: str) -> bool:
    """True for names strictly under `.test` (the apex itself has no addresses)."""
    n = normalize_name(name)
    return n.endswith("." + TEST_DOMAIN) and len(n) > len(TEST_DOMAIN) + 1


def addresses_for_name(name: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    """The A and AAAA the lab DNS server gives `name` (same answer for every case and trailing dot).

    SHA-256 of the normalized name picks a host in 203.0.113.1-254 (never the network or broadcast
    address) and a non-zero interface id in 2001:db8:203::/64. With 254 v4 slots, distinct names
    can share an IPv4 address; their IPv6 addresses practically never collide.
    """
    digest = hashlib.sha256(normalize_name(name).encode("utf-8")).digest()
    v4_host = 1 + int.from_bytes(digest[0:4], "big") % 254
    v6_host = int.from_bytes(digest[8:16], "big") or 1
    return (ipaddress.IPv4Address(int(NAME_RANGE_V4.network_address) + v4_host),
            ipaddress.IPv6Address(int(NAME_RANGE_V6.network_address) + v6_host))


def owned_by_internet(address) -> bool:
    addr = ipaddress.ip_address(address)
    return any(addr in net for net in INTERNET_RANGES if net.version == addr.version)
