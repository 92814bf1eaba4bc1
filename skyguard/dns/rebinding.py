"""Which answer addresses are DNS rebinding: a public name made to point inside.

Two classes. FORBIDDEN addresses (unspecified, loopback, link-local with the cloud metadata
address, multicast, reserved, IPv4-mapped and -compatible IPv6, Teredo) are stripped from every
answer unless a rule's `cidrs`/`networks` name them. PRIVATE addresses (RFC 1918, CGNAT
100.64/10, benchmarking 198.18/15, IETF 192.0.0/24, ULA fc00::/7, site-local fec0::/10, the
local-use NAT64 prefix) are stripped unless the rule also says `allow_private: true` (an
intranet name). Addresses that
wrap an IPv4 address (NAT64 64:ff9b::/96, 6to4 2002::/16) take the class of what they wrap, so
64:ff9b::10.0.0.1 is private and 2002:7f00:1::1 is forbidden. The host's own addresses are
forbidden too (passed in: they depend on where skyguard runs).

Deliberately not ipaddress's is_private: it counts the documentation ranges (where the lab's
internet lives) as private and misses CGNAT. Pure and allocation-light: called per answer record.
"""

from __future__ import annotations

import ipaddress

FORBIDDEN = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
             "::/96", "::1/128", "fe80::/10", "ff00::/8", "::ffff:0:0/96", "2001::/32")
PRIVATE = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "198.18.0.0/15",
           "192.0.0.0/24", "fc00::/7", "fec0::/10", "64:ff9b:1::/48")

NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address in the low 32 bits
SIX_TO_FOUR = ipaddress.ip_network("2002::/16")  # RFC 3056: the IPv4 address in bits 16-47

FORBIDDEN_CLASS, PRIVATE_CLASS = "forbidden", "private"


def _masks(networks) -> dict[int, list[tuple[int, int]]]:
    """(network int, mask int) per IP version: one AND per network per address."""
    out: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    for text in networks:
        net = ipaddress.ip_network(text)
        out[net.version].append((int(net.network_address), int(net.netmask)))
    return out


_FORBIDDEN = _masks(FORBIDDEN)
_PRIVATE = _masks(PRIVATE)
_NAT64 = (int(NAT64.network_address), int(NAT64.netmask))
_SIX_TO_FOUR = (int(SIX_TO_FOUR.network_address), int(SIX_TO_FOUR.netmask))


def _within(value: int, masks) -> bool:
    for network, mask in masks:
        if value & mask == network:
            return True
    return False


def host_keys(addresses) -> frozenset:
    """The host's own addresses as classify_value() wants them: (version, int) pairs."""
    return frozenset((a.version, int(a)) for a in addresses)


def classify(ip, host_addresses=frozenset()) -> str:
    """"" for an address a public name may have, else FORBIDDEN_CLASS or PRIVATE_CLASS."""
    return classify_value(int(ip), ip.version, host_keys(host_addresses))


def classify_value(value: int, version: int, hosts: frozenset) -> str:
    """classify() on an address as an integer (the resolver's hot path: no object, no hash of
    an ipaddress object). hosts: host_keys() of the host's own addresses."""
    if (version, value) in hosts:
        return FORBIDDEN_CLASS
    if version == 6:
        if value & _NAT64[1] == _NAT64[0]:
            value, version = value & 0xFFFFFFFF, 4
        elif value & _SIX_TO_FOUR[1] == _SIX_TO_FOUR[0]:
            value, version = (value >> 80) & 0xFFFFFFFF, 4
        if version == 4 and (4, value) in hosts:
            return FORBIDDEN_CLASS
    if _within(value, _FORBIDDEN[version]):
        return FORBIDDEN_CLASS
    if _within(value, _PRIVATE[version]):
        return PRIVATE_CLASS
    return ""
