"""The fleet store on etcd, through etcd's v3 JSON gateway (HTTP/1.1 + JSON, served by every etcd
member on its client URL), spoken with h11 over asyncio streams.

Why the gateway and not a gRPC client: it needs nothing beyond what skyguard already depends on
(h11), and etcd serves it on the same port. Every call is one short request; a member that does
not answer in time (killed, partitioned, or without quorum: etcd then times the request out) is
skipped for the next, and the member that answered last is asked first. A watch is the gateway's
WebSocket (/v3/watch, through `websockets`, a dependency already): JSON requests one way (create,
then a progress request whenever it has been silent a while), JSON responses the other.

Not here: what the fleet stores, and how a lost watch is recovered (agent.py re-lists).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncGenerator
from urllib.parse import urlsplit

import h11
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from skyguard.errors import BadInput
from skyguard.fleet.store import Change, Compacted, FleetError, Item, StoreUnavailable
from skyguard.timeouts import within

log = logging.getLogger("skyguard.fleet.etcd")

CALL_TIMEOUT_S = 3.0       # one member's answer; etcd itself times out a quorum-less write at ~7 s
MAX_RESPONSE = 64 << 20    # a range of the fleet's keys is small; refuse to buffer more
WATCH_IDLE_S = 2.0         # a watch silent this long is asked for progress (a frozen member answers nothing)


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def _prefix_end(prefix: str) -> str:
    """etcd's range_end for "every key starting with prefix": the prefix with its last byte + 1."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


def parse_endpoints(urls: str | list[str]) -> list[tuple[str, int]]:
    """'http://127.0.0.1:2379,http://127.0.0.1:22379' -> [(host, port), ...]; BadInput if not."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out = []
    for url in (u.strip() for u in items):
        if not url:
            continue
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
            raise BadInput(f"etcd endpoint {url!r}: give http://HOST:PORT (comma-separated for "
                           f"several members); TLS endpoints are not supported yet")
        try:
            port = parts.port or 2379
        except ValueError:
            raise BadInput(f"etcd endpoint {url!r}: the port is not a number") from None
        out.append((parts.hostname, port))
    if not out:
        raise BadInput("no etcd endpoint given: --etcd http://HOST:2379[,http://HOST2:2379...]")
    return out


def _key(kv: dict) -> str:
    """A key as text. etcd keys are bytes and anyone who can write etcd chooses them: one that is
    not UTF-8 gets U+FFFD in place of its bad bytes (so it matches no key the fleet uses) rather
    than raising, which would end every reader's list or watch."""
    return base64.b64decode(kv["key"]).decode("utf-8", "replace")


def _item(kv: dict) -> Item:
    return Item(_key(kv), base64.b64decode(kv.get("value", "")),
                int(kv.get("mod_revision", 0)), int(kv.get("lease", 0)))


class _Http:
    """One HTTP/1.1 exchange with one member."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.conn = h11.Connection(h11.CLIENT)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, path: str, body: dict) -> h11.Response:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        request = h11.Request(method="POST", target=path, headers=[
            ("Host", f"{self.host}:{self.port}"), ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))), ("Connection", "close")])
        self.writer.write(self.conn.send(request) + self.conn.send(h11.Data(data=data))
                          + self.conn.send(h11.EndOfMessage()))
        await self.writer.drain()
        event = await self.next_event()
        if not isinstance(event, h11.Response):
            raise StoreUnavailable(f"etcd {self.host}:{self.port} sent no HTTP response")
        return event

    async def next_event(self):
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                chunk = await self.reader.read(65536)
                self.conn.receive_data(chunk)
                continue
            return event

    async def body(self) -> bytes:
        parts, total = [], 0
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                parts.append(bytes(event.data))
                total += len(event.data)
                if total > MAX_RESPONSE:
                    raise FleetError(f"etcd {self.host}:{self.port}: response over {MAX_RESPONSE} bytes")
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return b"".join(parts)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class EtcdStore:
    """The Store of store.py on an etcd cluster (any member's client URL; all are tried)."""

    def __init__(self, endpoints: str | list[str], timeout: float = CALL_TIMEOUT_S, watch_idle: float = WATCH_IDLE_S):
        self.endpoints = parse_endpoints(endpoints)
        self.timeout, self.watch_idle = timeout, watch_idle
        self._preferred = 0

    def __repr__(self):
        return f"EtcdStore({','.join(f'{h}:{p}' for h, p in self.endpoints)})"

    def _order(self) -> list[int]:
        n = len(self.endpoints)
        return [(self._preferred + i) % n for i in range(n)]

    async def _call(self, path: str, body: dict) -> dict:
        problems = []
        for index in self._order():
            host, port = self.endpoints[index]
            http = _Http(host, port)
            try:
                response = await within(http.send(path, body), self.timeout)
                data = await within(http.body(), self.timeout)
            except (TimeoutError, OSError, h11.ProtocolError, StoreUnavailable) as e:
                problems.append(f"{host}:{port}: {type(e).__name__} {e}".strip())
                continue
            finally:
                http.close()
            try:
                answer = json.loads(data or b"{}")
            except ValueError:
                problems.append(f"{host}:{port}: answer is not JSON")
                continue
            if response.status_code != 200:
                # etcd's own errors (no leader, request timed out) mean this member cannot serve
                # now; another member may. Anything else is the request's fault.
                message = str(answer.get("error") or answer.get("message") or response.status_code)
                if response.status_code >= 500 or "leader" in message or "timed out" in message:
                    problems.append(f"{host}:{port}: {message}")
                    continue
                if "compacted" in message:   # a read at a revision the store no longer keeps
                    raise Compacted(int(body.get("revision") or 0))
                raise FleetError(f"etcd refused {path}: {message}")
            self._preferred = index
            return answer
        raise StoreUnavailable("no etcd member answered (" + "; ".join(problems) + "): the host "
                               "keeps what it has and retries")

    async def get_prefix(self, prefix: str) -> tuple[list[Item], int]:
        answer = await self._call("/v3/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return [_item(kv) for kv in answer.get("kvs", [])], int(answer["header"]["revision"])

    async def get(self, key: str, revision: int = 0) -> tuple[Item | None, int]:
        body = {"key": _b64(key)}
        if revision:
            body["revision"] = str(revision)
        answer = await self._call("/v3/kv/range", body)
        kvs = answer.get("kvs", [])
        return (_item(kvs[0]) if kvs else None), int(answer["header"]["revision"])

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        body = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        answer = await self._call("/v3/kv/put", body)
        return int(answer["header"]["revision"])

    async def put_if(self, key: str, value: bytes, mod_revision: int) -> bool:
        compare = {"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": str(mod_revision)}
        answer = await self._call("/v3/kv/txn", {
            "compare": [compare], "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}]})
        return bool(answer.get("succeeded"))

    async def delete(self, key: str) -> None:
        await self._call("/v3/kv/deleterange", {"key": _b64(key)})

    async def grant_lease(self, ttl: int) -> int:
        return int((await self._call("/v3/lease/grant", {"TTL": ttl}))["ID"])

    async def keep_alive(self, lease: int) -> bool:
        # The gateway's keepalive is a stream; its first message is the answer to one renewal.
        answer = await self._call_first_line("/v3/lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0)) > 0

    async def revoke(self, lease: int) -> None:
        await self._call("/v3/lease/revoke", {"ID": str(lease)})

    async def compact(self, revision: int) -> None:
        """Forget history before revision (tests and operators; etcd also does it on a timer)."""
        await self._call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    async def _call_first_line(self, path: str, body: dict) -> dict:
        problems = []
        for index in self._order():
            host, port = self.endpoints[index]
            http = _Http(host, port)
            try:
                await within(http.send(path, body), self.timeout)
                return await within(_first_message(http), self.timeout)
            except (TimeoutError, OSError, h11.ProtocolError, StoreUnavailable, ValueError) as e:
                problems.append(f"{host}:{port}: {type(e).__name__}")
            finally:
                http.close()
        raise StoreUnavailable("no etcd member answered (" + "; ".join(problems) + ")")

    async def watch_prefix(self, prefix: str, after: int) -> AsyncGenerator[list[Change], None]:
        """Changes after revision `after`. Connects to the first member that answers; when its
        stream ends (member gone) or goes silent (member frozen or cut off: the connection stays
        open and says nothing), raises StoreUnavailable: the caller re-lists and watches again.

        Silence is found by asking: after `watch_idle` seconds without a message the watch sends
        a progress request, which a live member answers at once (a header, no events); no answer
        within the call timeout, and the member is left, the next one put first. The gateway's
        watch is a WebSocket for that (its plain HTTP stream takes one request body, so no
        question can follow the first); progress_notify also lets a member configured with
        --experimental-watch-progress-notify-interval speak unasked."""
        request = {"create_request": {"key": _b64(prefix), "range_end": _prefix_end(prefix),
                                      "start_revision": str(after + 1), "progress_notify": True}}
        ws, index, first = None, 0, None
        for index in self._order():
            host, port = self.endpoints[index]
            try:
                ws = await connect(f"ws://{host}:{port}/v3/watch", open_timeout=self.timeout, proxy=None,
                                   ping_interval=None, compression=None, max_size=MAX_RESPONSE,
                                   user_agent_header=None)
                await within(ws.send(json.dumps(request)), self.timeout)
                first = await within(ws.recv(), self.timeout)   # "created", or why not
                break
            except (TimeoutError, OSError, WebSocketException) as e:
                log.debug("etcd %s:%s: no watch (%s)", host, port, type(e).__name__)
                if ws is not None:
                    ws.transport.abort()
                ws = None
        if ws is None:
            raise StoreUnavailable("no etcd member accepted a watch")
        host, port = self.endpoints[index]
        try:
            message = first
            while True:
                changes = _watch_changes(message)
                if changes:
                    yield changes
                try:
                    message = await within(ws.recv(), self.watch_idle)
                except TimeoutError:
                    await within(ws.send('{"progress_request": {}}'), self.timeout)
                    message = await within(ws.recv(), self.timeout)
        except TimeoutError:
            if self._preferred == index:   # the next call and watch ask another member first
                self._preferred = (index + 1) % len(self.endpoints)
            raise StoreUnavailable(f"etcd {host}:{port}: the watch went silent (no answer to a "
                                   f"progress request in {self.timeout:.0f}s)") from None
        except (OSError, WebSocketException) as e:
            raise StoreUnavailable(f"etcd {host}:{port} closed the watch stream ({type(e).__name__})") from None
        finally:
            ws.transport.abort()   # a watch needs no closing handshake (the member may be frozen)

    async def close(self) -> None:
        pass


def _watch_changes(message: str | bytes) -> list[Change]:
    """The changes one watch message carries ([] for a progress or "created" message); Compacted
    or StoreUnavailable when etcd ended the watch."""
    try:
        result = json.loads(message).get("result", {})
    except (ValueError, AttributeError):
        raise StoreUnavailable("etcd sent a watch message that is not a JSON object") from None
    if int(result.get("compact_revision", 0) or 0):
        raise Compacted(int(result["compact_revision"]))
    if result.get("canceled"):
        raise StoreUnavailable(f"etcd canceled the watch: {result.get('cancel_reason', '')}")
    changes = []
    for ev in result.get("events", []):
        kv = ev["kv"]
        deleted = ev.get("type") == "DELETE"
        changes.append(Change(_key(kv), None if deleted else base64.b64decode(kv.get("value", "")),
                              int(kv.get("mod_revision", 0))))
    return changes


async def _first_message(http: _Http) -> dict:
    buffer = b""
    while b"\n" not in buffer:
        event = await http.next_event()
        if not isinstance(event, h11.Data):
            if buffer.strip():
                break
            raise StoreUnavailable("etcd ended the stream without a message")
        buffer += bytes(event.data)
    return json.loads(buffer.split(b"\n", 1)[0])
