"""The credential proxy's upstream side: TLS settings toward upstreams (whom to trust, which
client certificate to present) and a pool of keep-alive upstream connections, one exchange at a
time on each. Not here: what to send (swap.py decides), framing (http1.py), the VM side
(proxy.py).

Trust: upstream certificates are verified against the system trust store AND every extra CA
bundle given (the lab's CA, a private CA); an extra bundle never replaces the system store.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING

from skyguard.credproxy.http1 import ProxyLimits, ResponseReader, StaleConnection, serialise_request
from skyguard.credproxy.interfaces import SecretSource
from skyguard.credproxy.swap import ConnectionFacts, HttpRequest
from skyguard.custody.pemload import load_cert_chain_from_memory, split_pem
from skyguard.errors import CredentialError
from skyguard.keys.tlskey import KEY_REFERENCE, install_key

if TYPE_CHECKING:
    from skyguard.policy.keys import KeysConfig


class UpstreamTls:
    """Client-side TLS contexts toward upstreams, one per client certificate (None: none).

    Building one loads the trust store, so they are cached; forget() drops them when the policy
    or the store changed (client certificates are read from the store when first needed).
    `keys` is the policy's `keys:` section (where token-held client keys are): the proxy sets it
    with each policy, before forget()."""

    def __init__(self, secrets: SecretSource, extra_cas: Sequence[str] = ()):
        self.secrets = secrets
        self.keys: KeysConfig | None = None
        self.extra_cas = tuple(str(path) for path in extra_cas if path)
        self._contexts: dict[str | None, ssl.SSLContext] = {}
        self.context(None)  # a missing or unreadable bundle is an error now, not at the first request

    def __repr__(self) -> str:
        return f"UpstreamTls(extra_cas={list(self.extra_cas)})"

    def context(self, certificate: str | None) -> ssl.SSLContext:
        """The context presenting `certificate` (a store name; None: none), built here when not
        cached. Blocks while a token-held key loads: on the loop, use context_for()."""
        context = self._contexts.get(certificate)
        if context is None:
            context = self._contexts[certificate] = self._build(certificate, self.keys)
        return context

    async def context_for(self, certificate: str | None) -> ssl.SSLContext:
        """context() for the event loop: a token-held key (KEY_REFERENCE) is loaded in a worker
        thread (token login, the engine, the sealed store), so one VM's first mTLS request
        does not stall every other VM. The cache is only touched here on the loop, and a
        context built across a forget() goes into the dropped cache, never the new one."""
        context = self._contexts.get(certificate)
        if context is not None or certificate is None or not certificate.startswith(KEY_REFERENCE):
            return context or self.context(certificate)
        cache = self._contexts
        context = await asyncio.to_thread(self._build, certificate, self.keys)
        cache[certificate] = context
        return context

    def _build(self, certificate: str | None, keys) -> ssl.SSLContext:
        context = ssl.create_default_context()  # the system store, verified names, TLS 1.2+
        for path in self.extra_cas:
            try:
                context.load_verify_locations(cafile=path)
            except (OSError, ssl.SSLError) as error:
                raise CredentialError(
                    f"cannot load the upstream CA bundle {path} ({type(error).__name__}: "
                    f"{getattr(error, 'strerror', None) or error}); give a readable PEM file") from None
        context.set_alpn_protocols(["http/1.1"])
        if certificate is not None:
            # Outbound mutual TLS: the client certificate lives in the store, never in the VM.
            if certificate.startswith(KEY_REFERENCE):  # its key is in the key backend (a token)
                install_key(context, self.secrets, certificate[len(KEY_REFERENCE):], keys)
            else:
                chain, private_key = split_pem(bytes(self.secrets.get(certificate)))
                load_cert_chain_from_memory(context, chain, private_key)
        return context

    def forget(self) -> None:
        self._contexts = {None: self._contexts[None]} if None in self._contexts else {}


class UpstreamConnection(asyncio.Protocol):
    """One upstream connection, one exchange at a time."""

    def __init__(self, max_header_bytes: int):
        self.max_header_bytes = max_header_bytes
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self._response: ResponseReader | None = None
        self._waiter: asyncio.Future | None = None
        self._reusable = False
        # The exchange's deadline: one lazily re-armed timer (it re-checks when it fires), so a
        # request costs an assignment, not a timer or an asyncio.timeout() (issue 24).
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def reusable(self) -> bool:
        return self._reusable and not self.lost and not self.transport.is_closing()

    async def exchange(self, request: HttpRequest, limit: int, deadline: float):
        """((status, reason), headers, body) of the upstream's answer to `request`; TimeoutError
        when it is not whole by `deadline` (the loop's clock)."""
        if self.lost or self.transport.is_closing():
            raise StaleConnection("upstream closed while the connection was pooled")
        data = serialise_request(request)
        response = self._response = ResponseReader(request.method == b"HEAD", limit, self.max_header_bytes)
        self._reusable = False
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._deadline = deadline
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._deadline_passed)
        self.transport.write(data)
        try:
            await self._waiter
        finally:
            self._waiter = None
            self._response = None
        self._reusable = response.reusable
        return (response.status, response.reason), tuple(response.headers), bytes(response.body)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None:
            self.lost = True  # bytes nobody asked for: this connection is out of step
            self.transport.abort()
            return
        try:
            response.feed(data)
        except Exception as error:  # reported to the exchange waiting for it
            self._settle(error)
            return
        if response.done:
            self._settle(None)

    def eof_received(self) -> bool:
        self._at_eof()
        return False

    def connection_lost(self, exc) -> None:
        self.lost = True
        self._at_eof()

    def _at_eof(self) -> None:
        if self._response is None:
            return
        try:
            self._response.finish()
        except Exception as error:
            self._settle(error)
            return
        self._settle(None)

    def _deadline_passed(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # no exchange waits: the next one arms the timer again
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._deadline_passed)
            return
        waiter.set_exception(TimeoutError())

    def _settle(self, error: BaseException | None) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)

    def close(self) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Idle keep-alive upstream connections, shared by client connections.

    A connection is only reused for the same (address, port, TLS, verified name, client
    certificate): the name is what the certificate was checked against, so a connection is
    never lent to a request for another name. Reusing them spares an upstream TLS handshake per
    client connection (what makes short client connections cheap).

    Bounded per key and in total (ProxyLimits.max_idle_upstream): a VM naming ever new hosts
    makes ever new keys, and idle connections hold descriptors every part of the daemon
    shares; past the total, the connection idle the longest is closed."""

    MAX_IDLE_PER_KEY = 64
    IDLE_SECONDS = 30.0  # below common server keep-alive timeouts, so few stale retries

    def __init__(self, tls: UpstreamTls, limits: ProxyLimits):
        self.tls = tls
        self.limits = limits
        self._idle: dict[tuple, list[UpstreamConnection]] = {}
        self._age: collections.OrderedDict[UpstreamConnection, tuple] = collections.OrderedDict()  # oldest first

    async def exchange(self, facts: ConnectionFacts, request: HttpRequest, host: str, certificate: str | None):
        """`host` is the request's normalised Host (the verdict's): the name TLS is verified for;
        `certificate` the store name of the client certificate to present (None: none)."""
        certificate = certificate if facts.tls else None
        key = (facts.address, facts.port, facts.tls, host if facts.tls else None, certificate)
        limits = self.limits
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            # upstream_timeout bounds connect, TLS handshake and the whole response together.
            deadline = loop.time() + limits.upstream_timeout
            connection = self._checkout(key) if attempt == 0 else None
            reused = connection is not None
            if connection is None:
                async with asyncio.timeout_at(deadline):
                    context = await self.tls.context_for(certificate) if facts.tls else None
                    _, connection = await loop.create_connection(
                        lambda: UpstreamConnection(limits.max_header_bytes), facts.address, facts.port,
                        ssl=context, server_hostname=host if context else None)
            try:
                result = await connection.exchange(request, limits.max_response_body, deadline)
            except StaleConnection:
                connection.close()
                if reused:
                    continue
                raise
            except BaseException:
                connection.close()
                raise
            if connection.reusable:
                self._checkin(key, connection)
            else:
                connection.close()
            return result
        raise StaleConnection("upstream closed before answering")  # not reached: attempt 1 raises

    def _checkout(self, key) -> UpstreamConnection | None:
        idle = self._idle.get(key)
        now = asyncio.get_running_loop().time()
        while idle:
            connection = idle.pop()
            del self._age[connection]
            if not idle:
                del self._idle[key]
            if connection.reusable and now - connection.idle_since < self.IDLE_SECONDS:
                return connection
            connection.close()
        return None

    def _checkin(self, key, connection: UpstreamConnection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.MAX_IDLE_PER_KEY:
            connection.close()
            return
        connection.idle_since = asyncio.get_running_loop().time()
        idle.append(connection)
        self._age[connection] = key
        while len(self._age) > self.limits.max_idle_upstream:
            oldest, oldest_key = self._age.popitem(last=False)
            others = self._idle[oldest_key]
            others.remove(oldest)
            if not others:
                del self._idle[oldest_key]
            oldest.close()

    @property
    def idle(self) -> int:
        """Idle connections held now."""
        return len(self._age)

    def close(self) -> None:
        """Close every idle connection (on stop, and when the policy changes: a pooled
        connection was set up under the old policy's certificates)."""
        for connection in self._age:
            connection.close()
        self._idle.clear()
        self._age.clear()
