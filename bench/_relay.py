"""A do-nothing TLS relay, the floor of any proxy on skyguard's runtime (`python bench/_relay.py
PORT CERT KEY UPSTREAM_PORT UPSTREAM_CA`): it terminates the client's TLS, opens one connection to
the upstream per client connection (TLS verified against UPSTREAM_CA; plain TCP when it is `-`,
as the identity proxy reaches VM apps) and moves the bytes both ways, on uvloop as the daemon's
proxies run. No HTTP at all: no parsing, no decision, no rewriting.

The proxy benchmarks run it beside the proxy they measure: the proxy's CPU per request above the
relay's is what its HTTP work and checks cost; the relay's ratio to direct is the most a Python
proxy with two TLS legs on this machine could reach (issue 24).
"""

from __future__ import annotations

import asyncio
import ssl
import sys


class Leg(asyncio.Protocol):
    """One side of a relayed connection; what it reads is written to its peer."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.peer: Leg | None = None
        self.pending: list[bytes] = []  # client bytes that arrived before the upstream connected

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def serve(port: int, cert: str, key: str, upstream_port: int, upstream_ca: str) -> None:
    loop = asyncio.get_running_loop()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=upstream_ca) if upstream_ca != "-" else None

    def accepted() -> Leg:
        client = Leg()

        async def connect():
            try:
                _, upstream = await loop.create_connection(Leg, "127.0.0.1", upstream_port, ssl=client_context,
                                                           server_hostname="localhost" if client_context else None)
            except OSError:
                if client.transport is not None:
                    client.transport.close()
                return
            upstream.peer, client.peer = client, upstream
            for data in client.pending:
                upstream.transport.write(data)
            client.pending.clear()

        loop.create_task(connect())
        return client

    await loop.create_server(accepted, "127.0.0.1", port, ssl=server_context, backlog=1024)
    await asyncio.Event().wait()


if __name__ == "__main__":
    port, cert, key, upstream_port, upstream_ca = sys.argv[1:6]
    try:
        import uvloop

        uvloop.run(serve(int(port), cert, key, int(upstream_port), upstream_ca))
    except ImportError:
        asyncio.run(serve(int(port), cert, key, int(upstream_port), upstream_ca))
