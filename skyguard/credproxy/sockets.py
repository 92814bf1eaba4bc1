"""Socket helpers shared by the credential proxy and TLS termination: listening on several
hosts on one port, and reading back where a redirected connection was going.

Not here: anything HTTP or TLS (http1.py, tlsaccept.py). A candidate for a project-wide
skyguard/netutil.py once other parts need it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h


async def listen(protocol_factory, hosts: str | list[str], port: int, **kwargs):
    """Listen on every host on ONE port (asyncio would give each host its own ephemeral port
    when port is 0, and steering redirects to a single port). Returns (servers, port)."""
    loop = asyncio.get_running_loop()
    servers = []
    try:
        for host in [hosts] if isinstance(hosts, str) else hosts:
            server = await loop.create_server(protocol_factory, host, port, reuse_address=True, **kwargs)
            port = server.sockets[0].getsockname()[1]
            servers.append(server)
    except BaseException:
        for server in servers:
            server.close()
        raise
    return servers, port


async def start_servers(callback, hosts: str | list[str], port: int, **kwargs):
    """listen() for asyncio streams: `callback(reader, writer)` per connection."""
    loop = asyncio.get_running_loop()

    def factory():
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), callback, loop=loop)

    return await listen(factory, hosts, port, **kwargs)


def listening_sockets(hosts: str | list[str], port: int, backlog: int = 1024) -> tuple[list[socket.socket], int]:
    """Non-blocking listening sockets, one per host, all on ONE port (see listen()); IPv6
    sockets are IPv6-only, so "0.0.0.0" and "::" can share the port."""
    sockets: list[socket.socket] = []
    try:
        for host in [hosts] if isinstance(hosts, str) else hosts:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
            sock = socket.create_server((host, port), family=family, backlog=backlog)
            sock.setblocking(False)
            sockets.append(sock)
            port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets, port


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """Where the client meant to connect before the nftables redirect; None if not redirected."""
    try:
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!2xH4s", raw)
            address = str(ipaddress.IPv4Address(packed))
        else:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port, packed = struct.unpack_from("!2xH4x16s", raw)
            address = str(ipaddress.IPv6Address(packed))
    except OSError:
        return None
    local = sock.getsockname()
    if (address, port) == (local[0], local[1]):
        return None  # connected straight to the proxy port: no destination to forward to
    return address, port
