"""Accepting intercepted TLS with the certificate chosen BEFORE the handshake starts.

The interception certificate depends on the name the VM asks for (SNI). Choosing it inside
OpenSSL's SNI callback would mean minting it there, synchronously, on the event loop: a VM
cycling through random names would stall every other VM. So the listener here accepts plain
TCP, waits until the whole ClientHello sits in the socket's receive queue, reads the SNI with
MSG_PEEK (nothing is consumed: OpenSSL reads the very same bytes afterwards), and hands the
socket and the name to the owner, which may mint in a worker thread and then start TLS with
loop.connect_accepted_socket.

client_hello_sni() is sans-io and strict: a handshake record that is not a ClientHello, or one
that does not parse, is refused rather than guessed at. Not here: certificates (ca.py), rate
limits and connection caps (proxy.py with fairness.py), HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from skyguard.credproxy.sockets import listening_sockets

log = logging.getLogger(__name__)

_HANDSHAKE = 0x16
_CLIENT_HELLO = 1
_SERVER_NAME = 0  # extension type (RFC 6066)
_HOST_NAME = 0  # server name type
MAX_RECORD = 16384 + 256  # a TLSPlaintext fragment is at most 2^14 (some slack for old peers)
MAX_HELLO = 64 * 1024  # peeked at most; a ClientHello larger than this is refused
# While a ClientHello is incomplete the socket is polled, not watched (a watched socket with
# unread bytes would wake the loop continuously): first after POLL_FIRST, doubling to POLL_MAX.
POLL_FIRST = 0.005
POLL_MAX = 0.1
ACCEPT_BATCH = 64  # connections accepted per wake-up, so one flood cannot monopolise the loop
ACCEPT_RETRY = 1.0  # seconds without accepting after the process ran out of descriptors
ALERT_UNRECOGNIZED_NAME = b"\x15\x03\x03\x00\x02\x02\x70"  # fatal alert 112, as a raw record


class NotClientHello(ValueError):
    """The first bytes are not a TLS ClientHello the proxy can read."""


def client_hello_sni(data: bytes) -> tuple[bool, str | None]:
    """(complete, server_name) from the first bytes of a TLS connection. complete is False
    while more bytes are needed; server_name is None when the hello names no host.
    Raises NotClientHello for anything else."""
    handshake = bytearray()
    offset = 0
    while True:
        if len(data) < offset + 5:
            return False, None
        content_type, major, length = data[offset], data[offset + 1], int.from_bytes(data[offset + 3:offset + 5], "big")
        if content_type != _HANDSHAKE or major != 3 or not 0 < length <= MAX_RECORD:
            raise NotClientHello("not a TLS handshake record")
        if len(data) < offset + 5 + length:
            return False, None
        handshake += data[offset + 5:offset + 5 + length]
        offset += 5 + length
        if len(handshake) >= 4:
            if handshake[0] != _CLIENT_HELLO:
                raise NotClientHello("first handshake message is not a ClientHello")
            end = 4 + int.from_bytes(handshake[1:4], "big")
            if end > MAX_HELLO:
                raise NotClientHello("ClientHello larger than the proxy's limit")
            if len(handshake) >= end:
                return True, _server_name(bytes(handshake[4:end]))


def _u16(data: bytes, at: int, end: int) -> int:
    if at + 2 > end:
        raise NotClientHello("truncated ClientHello")
    return (data[at] << 8) | data[at + 1]


def _server_name(body: bytes) -> str | None:
    """The host name in a ClientHello body (RFC 8446 4.1.2, RFC 6066 3). Offsets, not
    objects: this runs for every intercepted connection."""
    end = len(body)
    at = 2 + 32  # legacy_version, random
    if at >= end:
        raise NotClientHello("truncated ClientHello")
    at += 1 + body[at]  # legacy_session_id
    at += 2 + _u16(body, at, end)  # cipher_suites
    if at >= end:
        raise NotClientHello("truncated ClientHello")
    at += 1 + body[at]  # legacy_compression_methods
    if at == end:
        return None  # no extensions at all
    extensions_end = at + 2 + _u16(body, at, end)
    if extensions_end != end:
        raise NotClientHello("ClientHello extensions do not fill the message")
    at += 2
    seen: set[int] = set()
    name = None
    while at < end:
        kind, length = _u16(body, at, end), _u16(body, at + 2, end)
        at += 4
        data_end = at + length
        if data_end > end:
            raise NotClientHello("truncated ClientHello extension")
        if kind in seen:
            raise NotClientHello("repeated ClientHello extension")  # OpenSSL refuses them too
        seen.add(kind)
        if kind == _SERVER_NAME:
            if at + 2 + _u16(body, at, data_end) != data_end:
                raise NotClientHello("malformed server_name extension")
            entry = at + 2
            while entry < data_end:
                if entry + 3 > data_end:
                    raise NotClientHello("malformed server_name extension")
                name_type, size = body[entry], _u16(body, entry + 1, data_end)
                value = body[entry + 3:entry + 3 + size]
                if len(value) != size:
                    raise NotClientHello("malformed server_name extension")
                entry += 3 + size
                if name_type == _HOST_NAME:
                    if name is not None:
                        raise NotClientHello("two host names in server_name")
                    try:
                        name = value.decode("ascii")
                    except UnicodeDecodeError:
                        raise NotClientHello("server name is not ASCII") from None
        at = data_end
    return name


HelloHandler = Callable[[socket.socket, object, str | None], Awaitable[None]]


class PeekingTlsListener:
    """Listens on one port on every host. For each connection: `admit(peer_address)` returns a
    token (None: refuse at once), then once the whole ClientHello is queued,
    `on_hello(sock, token, server_name)` owns the socket and the token. If the connection ends
    before that (garbage, silence past `hello_timeout`, close), `release(token)` is called."""

    def __init__(self, *, admit: Callable[[str], object], release: Callable[[object], None],
                 on_hello: HelloHandler, hello_timeout: float):
        self.admit = admit
        self.release = release
        self.on_hello = on_hello
        self.hello_timeout = hello_timeout
        self.port = 0
        self._listeners: list[socket.socket] = []
        self._pending: dict[int, tuple[socket.socket, object, float, float]] = {}  # fd -> (sock, token, deadline, delay)
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, hosts: str | list[str], port: int) -> int:
        self._loop = asyncio.get_running_loop()
        self._listeners, self.port = listening_sockets(hosts, port)
        for sock in self._listeners:
            self._loop.add_reader(sock.fileno(), self._accept, sock)
        return self.port

    async def stop(self) -> None:
        for sock in self._listeners:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners = []
        for fd in list(self._pending):
            self._drop(fd)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                # Out of file descriptors or memory: the pending connection stays queued and
                # would wake the loop at once, endlessly. Pause accepting, as asyncio does.
                log.warning("credential proxy cannot accept (%s); retrying in %ss", error.strerror, ACCEPT_RETRY)
                self._loop.remove_reader(listener.fileno())
                self._loop.call_later(ACCEPT_RETRY, self._resume_accepting, listener)
                return
            sock.setblocking(False)
            # asyncio sets this itself only on sockets whose proto says TCP, which accepted
            # sockets of socket.create_server do not: without it, a response and the TLS
            # close_notify after it wait on the client's delayed ACK (Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            token = self.admit(peer[0])
            if token is None:
                sock.close()
                continue
            deadline = self._loop.time() + self.hello_timeout
            self._pending[sock.fileno()] = (sock, token, deadline, POLL_FIRST)
            self._loop.call_at(deadline, self._expire, sock.fileno(), sock)  # a client that never speaks
            self._peek(sock.fileno(), watched=False)  # the ClientHello has often arrived already

    def _resume_accepting(self, listener: socket.socket) -> None:
        if listener in self._listeners:
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    def _peek(self, fd: int, watched: bool = True) -> None:
        entry = self._pending.get(fd)
        if entry is None:
            return
        sock, token, deadline, delay = entry
        if watched:
            self._loop.remove_reader(fd)
        try:
            data = sock.recv(MAX_HELLO, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            self._loop.add_reader(fd, self._peek, fd)  # nothing yet: wake when something comes
            return
        except OSError:
            self._drop(fd)
            return
        try:
            if not data:
                raise NotClientHello("closed before the ClientHello")
            complete, name = client_hello_sni(data)
        except NotClientHello:
            self._drop(fd)
            return
        if complete:
            del self._pending[fd]
            task = self._loop.create_task(self._hand_over(sock, token, name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        if self._loop.time() >= deadline or len(data) >= MAX_HELLO:
            self._drop(fd)
            return
        self._pending[fd] = (sock, token, deadline, min(delay * 2, POLL_MAX))
        self._loop.call_later(delay, self._watch_again, fd, sock)

    def _watch_again(self, fd: int, sock: socket.socket) -> None:
        entry = self._pending.get(fd)
        if entry is not None and entry[0] is sock:
            self._loop.add_reader(fd, self._peek, fd)

    def _expire(self, fd: int, sock: socket.socket) -> None:
        entry = self._pending.get(fd)
        if entry is not None and entry[0] is sock:
            self._drop(fd)

    def _drop(self, fd: int) -> None:
        sock, token, _, _ = self._pending.pop(fd)
        self._loop.remove_reader(fd)
        sock.close()
        self.release(token)

    async def _hand_over(self, sock: socket.socket, token, name: str | None) -> None:
        try:
            await self.on_hello(sock, token, name)
        except Exception:  # the handler owns the socket and the token and cleans up itself
            log.exception("TLS accept handler failed")
