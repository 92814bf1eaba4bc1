"""The proxy's side towards an app in its VM: one keep-alive connection per client connection
while it is open (_AppSide, an asyncio protocol), and idle ones kept per app between client
connections (IdleUpstreams), so a browser's short connections do not each cost a connection
to the app.

Callbacks, not coroutines: an answer from the app is parsed as it arrives (the credential
proxy's ResponseReader, skyguard/credproxy/http1.py) and handed to the client connection that
asked (proxy.AppConnection._app_answered / _app_failed), with no task or future per request.
The credential proxy's UpstreamConnection does the same exchange awaiting a future per request
and its pool adds a timer per exchange (asyncio.timeout); the apps proxy's per-connection
watchdog (proxy.py) already bounds the wait, so this is the callback form of the same exchange.
After a WebSocket upgrade the connection is spliced: bytes pass to the client as they come,
once the app's 101 head was read whole and written filtered (proxy.AppConnection._switched).
"""

from __future__ import annotations

import asyncio

from skyguard.credproxy.http1 import ResponseReader, UpstreamProtocolError, read_switching_head

MAX_IDLE_PER_APP = 64  # idle connections kept per app between client connections
IDLE_SECONDS = 30.0  # below common servers' keep-alive timeouts, so few stale retries


class AppSide(asyncio.Protocol):
    """One connection to an app. `owner` is the client connection it currently serves (None
    while idle in the pool); `response` the answer being read; `splice` the client transport
    once upgraded."""

    def __init__(self):
        self.owner = None
        self.key: tuple = ()  # (app, address, port) it was opened to: the pool files it under this
        self.transport: asyncio.Transport | None = None
        self.response: ResponseReader | None = None
        self.splice: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        # The app's answer to an upgrade request, until its status line is in: spliced only when
        # it is 101; any other answer is read as a response (the reader waiting here).
        self.switching: ResponseReader | None = None
        self._head = b""  # the answer to the upgrade request so far
        self._is_101 = False

    @property
    def ready(self) -> bool:
        """Free for the next request: open, and no answer still being read."""
        return self.response is None and not self.lost and self.transport is not None \
            and not self.transport.is_closing()

    def send(self, data: bytes, response: ResponseReader) -> None:
        self.response = response
        self.transport.write(data)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.switching is not None:
            self._switch(data)
            return
        if self.splice is not None:
            self.splice.write(data)
            return
        response = self.response
        if response is None:
            self.lost = True  # bytes nobody asked for: this connection is out of step
            self.transport.abort()
            return
        try:
            response.feed(data)
        except Exception as error:  # the app speaks no HTTP we forward: 502 to the client
            self.owner._app_failed(error)
            return
        if response.done:
            self.owner._app_answered()

    def _switch(self, data: bytes) -> None:
        """The first bytes of the app's answer to an upgrade request. A 101 is read whole (its
        head bounded like any answer's) and handed to the owner, which writes it filtered as
        every other answer (an app must not set skyguard's cookies through it); what follows
        is spliced on. Any other status is an answer like any other (the owner writes it and
        closes), so what the client sends next never reaches the app unchecked."""
        self._head += data
        reader = self.switching
        if not self._is_101:
            if b"\r\n" not in self._head and len(self._head) < 1024:
                return
            if not self._head.startswith((b"HTTP/1.1 101 ", b"HTTP/1.1 101\r\n")):
                data, self._head = self._head, b""
                self.splice, self.response, self.switching = None, reader, None
                self.data_received(data)
                return
            self._is_101 = True
        end = self._head.find(b"\r\n\r\n")
        if end < 0 and len(self._head) <= reader.max_header_bytes:
            return  # the rest of the 101's head
        head, rest = self._head[:end + 4], self._head[end + 4:]
        self._head, self.switching = b"", None
        try:
            if end < 0:
                raise UpstreamProtocolError("upstream 101 head larger than the proxy's limit")
            written = self.owner._switched(read_switching_head(head))
        except Exception as error:  # an unreadable 101, or one the proxy will not write: 502
            self.splice = None
            self.owner._app_failed(error)
            return
        self.splice.write(written + rest)

    def eof_received(self) -> bool:
        self._ended()
        return False

    def connection_lost(self, exc) -> None:
        self.lost = True
        self._ended()

    def _ended(self) -> None:
        self.lost = True
        if self.splice is not None:
            self.splice.close()  # the app ended the WebSocket: so does the client's side
            if self.owner is not None:
                self.owner._splice_ended()
            return
        response = self.response
        if response is None or self.owner is None:
            return
        try:
            response.finish()  # a body delimited by the close is whole now
        except Exception as error:  # StaleConnection when nothing came: retried once
            self.owner._app_failed(error)
            return
        self.owner._app_answered()

    # Flow control while spliced: a side that cannot take more stops the other from reading.
    def pause_writing(self) -> None:
        if self.splice is not None:
            self.splice.pause_reading()

    def resume_writing(self) -> None:
        if self.splice is not None and not self.splice.is_closing():
            self.splice.resume_reading()

    def close(self) -> None:
        self.lost, self.owner, self.response = True, None, None
        if self.transport is not None:
            self.transport.close()


class IdleUpstreams:
    """Idle connections to apps, per (app, address, port), bounded; use on the event loop."""

    def __init__(self):
        self._idle: dict[tuple, list[AppSide]] = {}

    def take(self, key: tuple) -> AppSide | None:
        idle = self._idle.get(key)
        now = asyncio.get_running_loop().time()
        while idle:
            side = idle.pop()
            if side.ready and now - side.idle_since < IDLE_SECONDS:
                return side
            side.close()
        return None

    def give(self, key: tuple, side: AppSide) -> None:
        side.owner = None
        idle = self._idle.setdefault(key, [])
        if not side.ready or len(idle) >= MAX_IDLE_PER_APP:
            side.close()
            return
        side.idle_since = asyncio.get_running_loop().time()
        idle.append(side)

    def close(self, app: str | None = None) -> None:
        """Close the idle connections of one app (its address or port may have changed), or
        of all (the part stops)."""
        for key in [k for k in self._idle if app is None or k[0] == app]:
            for side in self._idle.pop(key):
                side.close()
