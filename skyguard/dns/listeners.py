"""The DNS proxy's listeners for VM queries over UDP: each datagram goes to
DnsServer.on_udp_query with what to answer through. Not here: TCP (server.py reads it as
streams), upstreams, decisions.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from skyguard.dns.server import DnsServer


class ClientUdp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer):
        self.server = server
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.server.on_udp_query(self.transport, data, addr)

    def error_received(self, exc):
        pass


class ClientUdp6:
    """IPv6 client queries, each answered from the address it was sent to (IPV6_PKTINFO). A VM's
    host-side interface often has only link-local addresses: nftables' redirect then delivers the
    query to one of them, and a reply from the address the kernel would pick for the VM (a global
    one of another interface) matches no conntrack entry, is never un-NATed, and is dropped on its
    way into the VM. asyncio's datagram transports carry no ancillary data, hence a reader here."""

    BATCH = 64  # datagrams read per wake-up: the loop stays fair to the other parts

    def __init__(self, server: DnsServer, sock: socket.socket, loop: asyncio.AbstractEventLoop):
        self.server, self.sock, self.loop = server, sock, loop
        self._closing = False
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(self.BATCH):
            try:  # the ancillary buffer holds exactly one struct in6_pktinfo (16 + 4 bytes)
                data, ancdata, _flags, addr = self.sock.recvmsg(65535, socket.CMSG_SPACE(20))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error queued on the socket: nothing to answer
                continue
            pktinfo = next((d for level, kind, d in ancdata
                            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO), None)
            self.server.on_udp_query(ReplyFrom(self, pktinfo), data, addr)

    def send(self, data: bytes, addr, pktinfo: bytes | None) -> None:
        ancillary = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo)] if pktinfo else []
        try:
            self.sock.sendmsg([data], ancillary, 0, addr)
        except OSError:  # a full socket buffer or a vanished route: the client asks again
            self.server.metrics.dropped.labels("reply-send-failed").inc()

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


class ReplyFrom:
    """What on_udp_query answers through: sendto() from the address the query came to."""

    __slots__ = ("listener", "pktinfo")

    def __init__(self, listener: ClientUdp6, pktinfo: bytes | None):
        self.listener, self.pktinfo = listener, pktinfo

    def sendto(self, data: bytes, addr) -> None:
        self.listener.send(data, addr, self.pktinfo)

    def is_closing(self) -> bool:
        return self.listener.is_closing()
