"""One VM connection to the credential proxy: asyncio protocol in, whole requests out, answers
written back in order. It keeps the per-connection limits (deadlines, pipelining, lingering
close after a refusal) and holds one of its VM's connection slots (fairness.py) while open.

Not here: deciding (swap.py via proxy.CredentialProxy.answer), framing (http1.py), the upstream
side (upstream.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from skyguard.credproxy.http1 import (
    BODY,
    CONTINUE,
    HEAD,
    IDLE,
    ProtocolRefusal,
    RequestReader,
    Upgraded,
    client_keeps_alive,
    refusal_response,
)
from skyguard.credproxy.swap import HttpRequest

if TYPE_CHECKING:
    from skyguard.credproxy.proxy import CredentialProxy

log = logging.getLogger(__name__)

# Whole requests parsed ahead of the one being answered (pipelining); reading pauses beyond.
MAX_PIPELINED = 2
# Lingering close after a refusal: the client may still be sending what was refused (a body over
# the limit), and closing with unread input resets the connection, which can destroy the answer
# before the client reads it. So input is read and discarded until it pauses LINGER_QUIET, for at
# most LINGER_MAX seconds (it costs no memory), then the connection closes.
LINGER_QUIET = 0.2
LINGER_MAX = 2.0
_REFUSED_WHILE_ARRIVING = frozenset({413, 431})  # too large: the rest is likely still coming
_NO_SLOT = object()  # a ClientConnection that holds no slot (yet)


class ClientConnection(asyncio.Protocol):
    """One VM connection. data_received parses what arrives into whole requests; one task
    (_serve) answers them in order. Every read deadline is one lazily re-armed timer."""

    def __init__(self, proxy: CredentialProxy, tls: bool, slot=_NO_SLOT):
        self.proxy = proxy
        self.tls = tls
        self.slot = slot  # the VM's connection slot this connection holds (TLS: taken at accept)
        self.limits = proxy.limits
        self.reader: RequestReader | None = None  # made in connection_made, under the VM's limits
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None
        self.refusal: ProtocolRefusal | None = None  # answered after the requests before it
        self.eof = False  # nothing more will be read
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future | None = None  # the task waiting for input
        self._reading_paused = False
        self._messages_seen = 0
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._linger_ends: float | None = None  # set while closing after a refusal
        self._last_heard = 0.0

    # ---- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        address = peer[0] if peer else ""
        if self.slot is _NO_SLOT:
            slot = self.proxy.admit(address)
            if slot is None:
                transport.abort()  # this VM is over its connection share: close at once, never queue
                return
            self.slot = slot
        # Content zones may send files up to the inspection buffer (the policy at connect time).
        self.limits = self.proxy.state.request_limits(address)
        self.reader = RequestReader(self.limits)
        self.proxy._connections.add(self)
        self._arm(self.limits.idle_timeout)
        self.task = self._loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        if self._linger_ends is not None:
            self._last_heard = self._loop.time()  # discarded: lingering keeps no input
            return
        if self.refusal is not None or self.eof:
            return  # nothing after a refusal or an upgrade is read
        reader = self.reader
        try:
            reader.feed(data)
        except ProtocolRefusal as refusal:
            self._stop_reading(refusal)
            return
        except Upgraded:
            self._stop_reading(None)
            return
        if reader.state is BODY:
            self._arm(self.limits.body_read_timeout)  # between two reads of a body
            if reader.expects_continue:
                reader.expects_continue = False
                self.transport.write(CONTINUE)
        elif reader.state is HEAD and reader.messages_begun != self._messages_seen:
            self._arm(self.limits.header_timeout)  # the whole head, from its first byte
        elif reader.state is IDLE:
            self._deadline = None  # whole requests only: the task answers them
        self._messages_seen = reader.messages_begun
        if len(reader.complete) >= MAX_PIPELINED and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        if self._linger_ends is not None:
            self._close_now()
        self._wake()
        # Plain TCP: keep the write side open, requests already read are still answered. (TLS
        # cannot half-close; asyncio warns when asked to.)
        return not self.tls

    def connection_lost(self, exc) -> None:
        self.eof = True
        self.proxy._connections.discard(self)
        if self.slot is not _NO_SLOT:
            self.proxy.release(self.slot)
            self.slot = _NO_SLOT
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._write_paused = False
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    # ---- the task -------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            origin = None if self.transport.is_closing() else self.proxy.origin(self.transport, self.tls)
            while origin is not None:
                try:
                    request = await self._next_request()
                except ProtocolRefusal as refusal:
                    self.proxy.account_protocol_block(origin, refusal.reason)
                    await self._refuse(refusal.status, refusal.reason)
                    return
                if request is None:
                    return
                keep_alive = client_keeps_alive(request)
                answer = await self.proxy.answer(request, origin, keep_alive)
                if isinstance(answer, ProtocolRefusal):
                    await self._refuse(answer.status, answer.reason)
                    return
                if not await self._send(answer) or not keep_alive:
                    return
                if self.reader.state is IDLE and not self.reader.complete:
                    self._arm(self.limits.idle_timeout)
        except Exception:  # the last line of defence: one connection never takes the proxy down
            log.exception("credential proxy connection failed")
        finally:
            self._close()

    async def _next_request(self) -> HttpRequest | None:
        """The next whole request; None when the client is gone or idle too long."""
        reader = self.reader
        while True:
            if reader.complete:
                if self._reading_paused and not self.eof and self.refusal is None:
                    self._reading_paused = False
                    self.transport.resume_reading()
                    if reader.state is not IDLE:  # its deadline must not run while we did not read
                        self._arm(self.limits.header_timeout if reader.state is HEAD else self.limits.body_read_timeout)
                return reader.complete.popleft()
            if self.refusal is not None:
                raise self.refusal
            if self.eof:
                if reader.state is not IDLE and not self.transport.is_closing():
                    raise ProtocolRefusal(400, "connection closed mid-request")
                return None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def _send(self, data: bytes) -> bool:
        """Write; wait only when the socket pushed back. False when the client is gone."""
        if self.transport.is_closing():
            return False
        self.transport.write(data)
        if not self._write_paused:
            return True
        try:
            async with asyncio.timeout(self.limits.body_read_timeout):
                while self._write_paused:
                    self._waiter = self._loop.create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
        except TimeoutError:
            return False
        return not self.transport.is_closing()

    async def _refuse(self, status: int, reason: str) -> None:
        await self._send(refusal_response(status, reason))

    # ---- helpers --------------------------------------------------------------------------

    def _stop_reading(self, refusal: ProtocolRefusal | None) -> None:
        self.refusal = refusal
        self.eof = refusal is None
        self._deadline = None
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _arm(self, seconds: float) -> None:
        """Set the read deadline; one timer serves every re-arm (it re-checks when it fires)."""
        self._deadline = self._loop.time() + seconds
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._timer = None
        if self._deadline is None or self.eof or self.refusal is not None:
            return
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._deadline_passed)
            return
        if self.reader.state is IDLE:
            self._stop_reading(None)  # idle keep-alive connection: close quietly
        else:
            self._stop_reading(ProtocolRefusal(408, "request not received in time"))

    def abort(self) -> None:
        """Close now (the proxy is stopping)."""
        if self.transport is not None:
            self.transport.abort()
        if self.task is not None:
            self.task.cancel()

    def _close(self) -> None:
        if self.transport.is_closing():
            return
        if self.refusal is not None and self.refusal.status in _REFUSED_WHILE_ARRIVING and not self.eof:
            self._linger()
        else:
            self._close_now()

    def _linger(self) -> None:
        """Close once the client's input goes quiet (see LINGER_QUIET), discarding it."""
        now = self._loop.time()
        self._linger_ends, self._last_heard = now + LINGER_MAX, now
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        self._loop.call_later(LINGER_QUIET, self._linger_check)

    def _linger_check(self) -> None:
        if self.transport.is_closing():
            return
        now = self._loop.time()
        quiet_at = self._last_heard + LINGER_QUIET
        if now >= quiet_at or now >= self._linger_ends:
            self._close_now()
        else:
            self._loop.call_at(min(quiet_at, self._linger_ends), self._linger_check)

    def _close_now(self) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        transport.close()  # flushes what is buffered first; a client that never reads is cut off
        if transport.get_write_buffer_size():
            self._loop.call_later(self.limits.body_read_timeout, transport.abort)
