"""Small parsers of one scalar policy value each (ports, MACs, addresses, CIDRs, host:port, SSH
keys) and the name patterns the checker uses. Public, so the CLI, tests and other parts reuse
them. Each returns the normal form or raises ValueError with a message that completes
"'<value>' ...". Pure: no YAML, no I/O.
"""

from __future__ import annotations

import ipaddress
import re
import string
from typing import Any

from skyguard.policy.model import PortRange

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")  # zones, workloads, networks, rules
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}$")
PORT_RE = re.compile(r"^(tcp|udp)/(\d{1,5})(?:-(\d{1,5}))?$")
SECRET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Placeholders are matched inside HTTP headers and bodies: visible ASCII that no encoding mangles.
PLACEHOLDER_RE = re.compile(r"^[A-Za-z0-9._~+/=-]+$")
HEADER_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token

def parse_port(text: Any) -> PortRange:
    """`tcp/N`, `udp/N`, `tcp/LO-HI`, `udp/LO-HI`, `icmp` or `icmpv6` (case-insensitive)."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError("is not a port; write tcp/N, udp/N, tcp/LO-HI, icmp or icmpv6")
    if isinstance(text, int):
        raise ValueError(f"has no protocol; write tcp/{text} or udp/{text}")
    lowered = text.strip().lower()
    if lowered in ("icmp", "icmpv6"):
        return PortRange(lowered)  # type: ignore[arg-type]
    if lowered.startswith(("icmp/", "icmpv6/")):
        raise ValueError("names an ICMP type; ICMP is allowed as a whole: write icmp or icmpv6")
    if lowered.isdigit():
        raise ValueError(f"has no protocol; write tcp/{lowered} or udp/{lowered}")
    match = PORT_RE.match(lowered)
    if not match:
        raise ValueError("is not a port; write tcp/N, udp/N, tcp/LO-HI, icmp or icmpv6")
    protocol, lo_text, hi_text = match.groups()
    lo = int(lo_text)
    hi = int(hi_text) if hi_text is not None else lo
    for value in (lo, hi):
        if not 1 <= value <= 65535:
            raise ValueError("is not a port (1-65535)")
    if lo > hi:
        raise ValueError(f"is an empty range; write {protocol}/{hi}-{lo}")
    return PortRange(protocol, lo, hi)  # type: ignore[arg-type]


def parse_mac(text: Any) -> str:
    """A unicast MAC address, returned as lower-case colon-separated hex."""
    if not isinstance(text, str):
        raise ValueError("is not a MAC address; quote it: \"02:00:00:00:00:01\"")
    if not MAC_RE.match(text):
        raise ValueError("is not a MAC address; write six hex bytes such as \"02:00:00:00:00:01\"")
    mac = text.lower().replace("-", ":")
    first = int(mac[:2], 16)
    if first & 1:
        raise ValueError("is a multicast or broadcast MAC; a VM's MAC is unicast (first byte even)")
    if mac == "00:00:00:00:00:00":
        raise ValueError("is the all-zero MAC; give the VM's real MAC")
    return mac


def parse_host_address(text: Any):
    """One IPv4 or IPv6 host address a workload may use as its source."""
    if not isinstance(text, str):
        raise ValueError("is not an IP address; write it as a string such as 10.0.0.2")
    if "/" in text:
        raise ValueError(f"is a network; a workload's addresses are hosts: write {text.split('/')[0]}")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError("is not an IPv4 or IPv6 address") from None
    if address.is_unspecified or address.is_multicast or address.is_loopback:
        raise ValueError("is not a usable host address (unspecified, multicast or loopback)")
    if isinstance(address, ipaddress.IPv6Address) and address.is_link_local:
        raise ValueError("is link-local; list global or unique-local addresses (link-local "
                         "addresses are derived from the MAC)")
    if isinstance(address, ipaddress.IPv4Address) and address == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError("is the broadcast address")
    return address


def parse_cidr(text: Any):
    """A network in CIDR form; a bare address means that one host (/32 or /128)."""
    if not isinstance(text, str):
        raise ValueError("is not a CIDR; write it as a string such as 10.0.0.0/8")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError("is not a CIDR such as 10.0.0.0/8 or fd00::/8") from None
    raise ValueError(f"has host bits set; did you mean {loose}?")


def parse_hostport(text: Any, *, default_port: int | None = None) -> tuple[str, int | None]:
    """`ADDR`, `ADDR:PORT` or `[V6ADDR]:PORT` with ADDR an IP address. Returns (address, port)."""
    if not isinstance(text, str):
        raise ValueError("is not an address; write it as a string such as \"192.0.2.53\" or "
                         "\"127.0.0.1:2222\"")
    host, port_text = text, None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError("is not [IPv6]:PORT")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("is not an IP address with an optional port, such as 192.0.2.53:53 or "
                         "[2001:db8::53]:53") from None
    port = default_port
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError("has an invalid port (1-65535)")
        port = int(port_text)
    return str(address), port


def format_hostport(address: str, port: int | None) -> str:
    if port is None:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def parse_ssh_public_key(text: Any) -> str:
    """An OpenSSH public key line; returns "TYPE BASE64" (the comment dropped)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    if not isinstance(text, str):
        raise ValueError("must be an OpenSSH public key line such as 'ssh-ed25519 AAAA... alice@host'")
    parts = text.strip().split()
    if len(parts) < 2:
        raise ValueError("is not an OpenSSH public key line ('ssh-ed25519 AAAA... comment')")
    try:
        key = load_ssh_public_key(f"{parts[0]} {parts[1]}".encode("ascii"))
    except (ValueError, UnicodeEncodeError, NotImplementedError) as e:
        # NotImplementedError: cryptography's answer to a compressed EC point (found by the fuzz tier)
        raise ValueError(f"is not a valid OpenSSH public key ({e}); paste the whole line of the "
                         f"operator's .pub file") from None
    except UnsupportedAlgorithm as e:
        raise ValueError(f"is not a supported OpenSSH public key ({e}); use ed25519, ecdsa or rsa") from None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise ValueError(f"is an RSA key of {key.key_size} bits; use at least 2048 (or ed25519)")
    return f"{parts[0]} {parts[1]}"


def format_fields(fmt: str) -> set[str] | None:
    try:
        return {field for _, field, _, _ in string.Formatter().parse(fmt) if field is not None}
    except ValueError:
        return None
