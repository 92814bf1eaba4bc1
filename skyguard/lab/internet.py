"""The sealed internet's servers, run as ONE background process inside the `internet` namespace:
authoritative DNS for `.test` (UDP and TCP 53 at 192.0.2.53 and 2001:db8::53), HTTP (80) and
HTTPS (443) echo, and TCP and UDP echo on 7, 514, 6514 and 5001, on every address the namespace
owns (wildcard listeners; `ip route add local ... dev lo` makes the whole ranges local).

Started and stopped by skyguard.lab.lab.Lab (`python -m skyguard.lab.serve --lab-dir DIR`); it
writes DIR/internet.ready once every socket is bound. Each HTTP(S) request is appended as one JSON
line to DIR/requests.jsonl. This is test infrastructure: it trusts nothing it receives, but it is
not hardened for the real network (it never sees it).

The same HTTP(S) echo also runs alone, outside a lab, as the upstream of the credential and content
proxies' tests and benchmarks: `EchoServer` (in a process, on threads) or
`python -m skyguard.lab.serve echo --port P [--host H]... [--cert F --key F [--client-ca F]] [--log F]`.
A request may ask for an encoded answer (`X-Echo-Encoding: gzip`, or any other value, which is
only announced) or for the connection to be dropped just after the answer (`X-Echo-Drop-Idle`),
as an idle upstream would; each record names the client certificate's common name, if verified.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import itertools
import json
import os
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import h11

from skyguard.lab.addressing import DNS_SERVER_V4, DNS_SERVER_V6
from skyguard.lab.ca import LabCA
from skyguard.lab.dns import LabResolver

HTTP_PORT = 80
HTTPS_PORT = 443
ECHO_PORTS = (7, 514, 6514, 5001)
DNS_PORT = 53
READY_FILE = "internet.ready"
REQUESTS_LOG = "requests.jsonl"
MAX_BODY = 1 << 20  # bytes of a request body kept and echoed; the rest is read and dropped
IDLE_TIMEOUT = 30.0  # seconds a client connection may stay silent

# Linux socket options Python does not name.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = 78


def _plain(address: str) -> str:
    """'::ffff:203.0.113.9' -> '203.0.113.9': dual-stack sockets report IPv4 peers as mapped."""
    return address[7:] if address.startswith("::ffff:") and "." in address else address


def _text_or_b64(data: bytes) -> dict:
    try:
        return {"body": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"body_base64": base64.b64encode(data).decode("ascii")}


def request_body(record: dict) -> bytes:
    """The body of a logged or echoed request, as the bytes the server received."""
    if "body_base64" in record:
        return base64.b64decode(record["body_base64"])
    return record["body"].encode("utf-8")


class RequestLog:
    """Appends one JSON object per line; one lock so lines from many threads never interleave."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()


def _dual_stack_listener(port: int, kind: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(512)
    return sock


class InternetServers:
    max_body = MAX_BODY
    _closing = False  # set by EchoServer.close(): the accept loops end

    def __init__(self, lab_dir: Path):
        self.lab_dir = lab_dir
        self.ca = LabCA(lab_dir / "ca")
        self.log = RequestLog(lab_dir / REQUESTS_LOG)
        self.resolver = LabResolver()
        self._tls_contexts: dict[str, ssl.SSLContext] = {}
        self._tls_lock = threading.Lock()
        self.tcp_listeners: list[tuple[socket.socket, Callable]] = []
        self.udp_sockets: dict[socket.socket, Callable] = {}
        self._handshake = threading.local()
        self._connection_ids = itertools.count(1)
        self._sni_context = self._make_sni_context()

    # ---- setup -------------------------------------------------------------------------------
    def bind_all(self) -> None:
        self.tcp_listeners.append((_dual_stack_listener(HTTP_PORT, socket.SOCK_STREAM),
                                   lambda c, a: self._serve_http(c, a, tls=False)))
        self.tcp_listeners.append((_dual_stack_listener(HTTPS_PORT, socket.SOCK_STREAM),
                                   lambda c, a: self._serve_http(c, a, tls=True)))
        for port in ECHO_PORTS:
            self.tcp_listeners.append((_dual_stack_listener(port, socket.SOCK_STREAM), self._serve_echo))
            self._bind_udp_echo(port)
        for address, family in ((str(DNS_SERVER_V4), socket.AF_INET), (str(DNS_SERVER_V6), socket.AF_INET6)):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            tcp = socket.socket(family, socket.SOCK_STREAM)
            for s in (udp, tcp):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((address, DNS_PORT))
            tcp.listen(128)
            self.udp_sockets[udp] = self._answer_dns_udp
            self.tcp_listeners.append((tcp, self._serve_dns_tcp))

    def _bind_udp_echo(self, port: int) -> None:
        # One socket per family with packet info, so each reply leaves from the exact address the
        # datagram was sent to (a wildcard socket would otherwise pick a source by route).
        v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        v4.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)
        v4.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        v4.bind(("0.0.0.0", port))
        v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        v6.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        v6.bind(("::", port))
        self.udp_sockets[v4] = self._echo_udp_v4
        self.udp_sockets[v6] = self._echo_udp_v6

    # ---- loops -------------------------------------------------------------------------------
    def run(self) -> None:
        for listener, handler in self.tcp_listeners:
            threading.Thread(target=self._accept_loop, args=(listener, handler), daemon=True).start()
        threading.Thread(target=self._udp_loop, daemon=True).start()

    def _accept_loop(self, listener: socket.socket, handler) -> None:
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                if self._closing:
                    return
                continue
            threading.Thread(target=self._guarded, args=(handler, conn, peer), daemon=True).start()

    @staticmethod
    def _guarded(handler, conn: socket.socket, peer) -> None:
        # One bad client must never take the server down: errors end that connection only.
        try:
            conn.settimeout(IDLE_TIMEOUT)
            handler(conn, peer)
        except Exception as e:  # noqa: BLE001 - boundary of a connection thread
            print(f"connection from {peer[0]}: {e.__class__.__name__}: {e}", file=sys.stderr)
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _udp_loop(self) -> None:
        poller = select.epoll()
        by_fd = {s.fileno(): (s, h) for s, h in self.udp_sockets.items()}
        for fd in by_fd:
            poller.register(fd, select.EPOLLIN)
        while True:
            for fd, _ in poller.poll():
                sock, handler = by_fd[fd]
                try:
                    handler(sock)
                except OSError as e:
                    print(f"udp: {e}", file=sys.stderr)

    # ---- UDP ---------------------------------------------------------------------------------
    def _answer_dns_udp(self, sock: socket.socket) -> None:
        data, peer = sock.recvfrom(65535)
        answer = self.resolver.answer_bytes(data)
        if answer is not None:
            sock.sendto(answer, peer)

    def _echo_udp_v4(self, sock: socket.socket) -> None:
        data, ancdata, _, peer = sock.recvmsg(65535, socket.CMSG_SPACE(12))
        cmsgs = []
        for level, kind, value in ancdata:
            if level == socket.SOL_IP and kind == IP_PKTINFO:
                _, _, dst = struct.unpack("=I4s4s", value[:12])
                # in_pktinfo {ifindex=0, spec_dst=original destination, addr unused}
                cmsgs.append((socket.SOL_IP, IP_PKTINFO, struct.pack("=I4s4s", 0, dst, b"\0" * 4)))
        sock.sendmsg([data], cmsgs, 0, peer)

    def _echo_udp_v6(self, sock: socket.socket) -> None:
        data, ancdata, _, peer = sock.recvmsg(65535, socket.CMSG_SPACE(20))
        cmsgs = []
        for level, kind, value in ancdata:
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                dst = value[:16]
                cmsgs.append((socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, dst + struct.pack("=I", 0)))
        sock.sendmsg([data], cmsgs, 0, peer)

    # ---- TCP ---------------------------------------------------------------------------------
    @staticmethod
    def _serve_echo(conn: socket.socket, peer) -> None:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)

    def _serve_dns_tcp(self, conn: socket.socket, peer) -> None:
        reader = conn.makefile("rb")
        while True:
            header = reader.read(2)
            if len(header) < 2:
                return
            (length,) = struct.unpack("!H", header)
            query = reader.read(length)
            if len(query) < length:
                return
            answer = self.resolver.answer_bytes(query)
            if answer is None:
                return
            conn.sendall(struct.pack("!H", len(answer)) + answer)

    def _tls_context_for(self, name: str) -> ssl.SSLContext:
        with self._tls_lock:
            ctx = self._tls_contexts.get(name)
            if ctx is None:
                chain, key = self.ca.leaf_files(name)
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(chain, key)
                ctx.set_alpn_protocols(["http/1.1"])
                self._tls_contexts[name] = ctx
            return ctx

    def _make_sni_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        chain, key = self.ca.leaf_files(LabCA.servable_name(None))
        ctx.load_cert_chain(chain, key)
        ctx.set_alpn_protocols(["http/1.1"])

        def choose(sslobj, server_name, _ctx):
            self._handshake.sni = server_name
            sslobj.context = self._tls_context_for(LabCA.servable_name(server_name))

        ctx.sni_callback = choose
        return ctx

    def _serve_http(self, conn: socket.socket, peer, tls: bool) -> None:
        stream, sni = conn, None
        if tls:
            self._handshake.sni = None
            # The handshake (and so the SNI callback) runs in this thread: a thread-local carries
            # the client's SNI out of the callback.
            stream = self._sni_context.wrap_socket(conn, server_side=True)
            sni = self._handshake.sni
        # Verified only when the context asks for client certificates (EchoServer's client_ca).
        peer_cert = stream.getpeercert() if tls else None  # type: ignore[attr-defined]
        client_cn = dict(x[0] for x in peer_cert["subject"]).get("commonName") if peer_cert else None
        connection = next(self._connection_ids)  # which connection carried a request (pooling tests)
        local = stream.getsockname()
        http = h11.Connection(h11.SERVER)
        while True:
            request, body = self._read_request(stream, http, self.max_body)
            if request is None:
                return
            record = {
                "time": time.time(),
                "scheme": "https" if tls else "http",
                "client": _plain(peer[0]), "client_port": peer[1],
                "server": _plain(local[0]), "server_port": local[1],
                "sni": sni,
                "client_certificate": client_cn, "connection": connection,
                "method": request.method.decode("ascii", "replace"),
                "path": request.target.decode("utf-8", "replace"),
                "http_version": request.http_version.decode("ascii", "replace"),
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers.raw_items()],
                **_text_or_b64(body),
            }
            self.log.append(record)
            payload = (json.dumps(record, sort_keys=True, indent=1) + "\n").encode("utf-8")
            asked = dict(request.headers)  # lower-case names
            extra = []
            encoding = asked.get(b"x-echo-encoding", b"").decode("latin-1").strip().lower()
            if encoding:  # a test checks that a proxy decodes before it looks at the body
                payload = gzip.compress(payload) if encoding == "gzip" else payload
                extra.append(("Content-Encoding", encoding))
            response = h11.Response(status_code=200, reason=b"OK", headers=[
                ("Content-Type", "application/json"), ("Content-Length", str(len(payload))),
                ("Server", "skyguard-lab-echo"), *extra])
            wire = http.send(response)
            if request.method != b"HEAD":  # a HEAD response announces the body but carries none
                wire += http.send(h11.Data(data=payload))
            stream.sendall(wire + http.send(h11.EndOfMessage()))
            if http.our_state is h11.MUST_CLOSE or http.their_state is h11.MUST_CLOSE:
                return
            if b"x-echo-drop-idle" in asked:
                time.sleep(0.05)  # the client has the answer and keeps the connection: drop it
                return
            try:
                http.start_next_cycle()
            except h11.LocalProtocolError:
                return

    @staticmethod
    def _read_request(stream, http: h11.Connection, max_body: int = MAX_BODY):
        request, chunks, size = None, [], 0
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                if http.they_are_waiting_for_100_continue:
                    stream.sendall(http.send(h11.InformationalResponse(status_code=100, headers=[])))
                try:
                    data = stream.recv(65536)
                except (TimeoutError, ConnectionError, ssl.SSLError):
                    return None, b""
                http.receive_data(data)
                if not data and request is None:
                    return None, b""
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                if size < max_body:
                    chunks.append(event.data[: max_body - size])
                size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return request, b"".join(chunks)
            elif isinstance(event, (h11.ConnectionClosed, h11.PAUSED)):
                return None, b""


def tls_server_context(cert_file: str | Path, key_file: str | Path,
                       client_ca: str | Path | None = None) -> ssl.SSLContext:
    """A TLS server context from PEM files; with `client_ca`, client certificates it signed are
    asked for and verified (a client may still present none)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


class _NoLog:
    def append(self, record: dict) -> None:
        pass


class EchoServer(InternetServers):
    """The HTTP(S) echo alone, on `port` (0: any) of each of `hosts`, with the certificate the
    caller gives (the SNI is only recorded, any name is served): no CA, DNS or other service.
    Requests go to the JSON-lines file `log`, if given. `start()` serves on threads of this
    process; `close()` stops accepting (connections already open end on their own)."""

    max_body = 64 << 20  # the content tests send a few MiB and compare what arrived

    def __init__(self, hosts: Sequence[str] = ("127.0.0.1",), port: int = 0, *, cert: str | Path | None = None,
                 key: str | Path | None = None, client_ca: str | Path | None = None,
                 log: str | Path | None = None):
        # Not InternetServers.__init__: only what _serve_http reads is set up here.
        self.log = RequestLog(Path(log)) if log else _NoLog()  # type: ignore[assignment]
        self._handshake = threading.local()
        self._connection_ids = itertools.count(1)
        self.tls = cert is not None
        if cert is not None:
            context = tls_server_context(cert, key or cert, client_ca)

            def remember_sni(_sslobj, server_name, _ctx):
                self._handshake.sni = server_name  # echoed, so a test sees what the upstream got

            context.sni_callback = remember_sni
            self._sni_context = context
        self.listeners = []
        for host in hosts:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.listeners.append(socket.create_server((host, port), family=family, backlog=512))
            port = port or self.listeners[0].getsockname()[1]  # every host on the first one's port
        self.port = port

    def start(self) -> EchoServer:
        for listener in self.listeners:
            threading.Thread(target=self._accept_loop, daemon=True,
                             args=(listener, lambda c, a: self._serve_http(c, a, tls=self.tls))).start()
        return self

    def close(self) -> None:
        self._closing = True
        for listener in self.listeners:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            listener.close()


def echo_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m skyguard.lab.serve echo",
                                     description="the lab's HTTP(S) echo alone, outside a lab")
    parser.add_argument("--host", action="append", help="repeatable; default 0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", help="PEM certificate chain: serve HTTPS")
    parser.add_argument("--key")
    parser.add_argument("--client-ca", help="verify client certificates signed by this CA")
    parser.add_argument("--log", help="append each request, as JSON, to this file")
    args = parser.parse_args(argv)
    server = EchoServer(args.host or ["0.0.0.0"], args.port, cert=args.cert, key=args.key,
                        client_ca=args.client_ca, log=args.log).start()
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.close()
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["echo"]:
        return echo_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    ready = args.lab_dir / READY_FILE
    ready.unlink(missing_ok=True)
    servers = InternetServers(args.lab_dir)
    servers.bind_all()
    servers.run()
    ready.write_text(f"{os.getpid()}\n")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    ready.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
