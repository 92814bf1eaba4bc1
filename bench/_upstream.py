"""A fast HTTPS echo upstream for the proxy benchmarks (`python bench/_upstream.py PORT CERT KEY`):
each request is answered with JSON of its method, path and headers, keep-alive, on uvloop when
installed.

Not the lab's h11 echo (skyguard.lab.serve echo), which the tests use: h11's parsing costs about
three times the CPU per request of this one, and on a 2-core machine an upstream that slow is the
bottleneck of the "direct" run, which would make every proxy look closer to direct than it is (a
weaker anchor). This one does only what the benchmark reads back: the headers the proxy sent.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""

    def data_received(self, data):
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:  # the benchmarks send GETs without bodies
            head, self.buffer = self.buffer[:end].decode("latin-1").split("\r\n"), self.buffer[end + 4:]
            method, path = (head[0].split(" ") + ["", ""])[:2]
            headers = [[part.strip() for part in line.split(":", 1)] for line in head[1:] if ":" in line]
            body = json.dumps({"method": method, "path": path, "headers": headers}).encode()
            close = any(k.lower() == "connection" and v.lower() == "close" for k, v in headers)
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
                                 % (len(body), b"connection: close\r\n" if close else b"", body))
            if close:
                self.transport.close()
                return


async def serve(port: int, cert: str, key: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", port, ssl=context, backlog=1024)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    try:
        import uvloop

        uvloop.run(serve(port, cert, key))
    except ImportError:
        asyncio.run(serve(port, cert, key))
