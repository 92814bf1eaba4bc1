"""A small asyncio client for clamd's INSTREAM command over its Unix socket.

Protocol (clamd(8)): send `zINSTREAM\\0`, then the content as chunks, each prefixed by its length
as a 4-byte big-endian integer, then a zero-length chunk; clamd answers one NUL-terminated line:
`stream: OK`, `stream: <signature> FOUND`, or `<what went wrong> ERROR` (for example
`INSTREAM size limit exceeded. ERROR` past its StreamMaxLength, after which it closes).

ClamdStream streams while the content arrives (the scan itself runs when the terminator is sent),
so nothing is buffered here. Every step runs under one deadline for the whole scan.

Fail closed: anything other than a clean `stream: OK` (clamd down, slow past the deadline, an
ERROR line, a garbled answer, a connection closed early) is a ClamdUnavailable, and callers block
the upload with its message. Not here: which uploads need a scan (inspector.py).
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

from skyguard.content.errors import ContentError

# Largest chunk put in one INSTREAM frame. clamd accepts up to StreamMaxLength per stream; big
# frames only cost clamd memory, small ones per-frame overhead: 64 KiB is what clamdscan uses.
MAX_FRAME = 64 * 1024
MAX_REPLY = 4096  # a reply line is one signature name; anything longer is not clamd
DEBIAN_SOCKET = "/run/clamav/clamd.ctl"  # LocalSocket in Debian's clamav-daemon package


class ClamdUnavailable(ContentError):
    """clamd could not give a verdict: the content counts as unscanned (block it)."""


@dataclass(frozen=True)
class ClamdResult:
    infected: bool
    signature: str | None  # the signature name when infected


def parse_reply(reply: bytes) -> ClamdResult:
    """clamd's answer to one INSTREAM, or ClamdUnavailable for anything but a verdict."""
    line = reply.rstrip(b"\0\n").decode("utf-8", "replace")
    if line == "stream: OK":
        return ClamdResult(False, None)
    if line.startswith("stream: ") and line.endswith(" FOUND"):
        signature = line[len("stream: "):-len(" FOUND")].strip()
        if signature:
            return ClamdResult(True, signature[:200])
    if line.endswith("ERROR"):
        raise ClamdUnavailable(f"clamd refused the scan: {line[:200]}")
    raise ClamdUnavailable(f"clamd gave an answer that is not a verdict: {line[:80]!r}")


class ClamdStream:
    """One INSTREAM scan: `await open()`, `await send(data)` any number of times, then
    `await finish()` for the verdict; `close()` abandons it. The deadline (seconds) covers all
    of it, from open() on."""

    def __init__(self, socket_path: str, deadline: float):
        self.socket_path = socket_path
        self.deadline = deadline
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ends_at = 0.0
        self._closed_early = False  # clamd hung up while we streamed: its reply says why

    def _remaining(self) -> float:
        left = self._ends_at - asyncio.get_running_loop().time()
        if left <= 0:
            raise ClamdUnavailable(f"clamd did not answer within {self.deadline:g}s")
        return left

    async def _timed(self, awaitable):
        try:
            return await asyncio.wait_for(awaitable, self._remaining())
        except TimeoutError:
            raise ClamdUnavailable(f"clamd did not answer within {self.deadline:g}s") from None

    async def open(self) -> None:
        self._ends_at = asyncio.get_running_loop().time() + self.deadline
        try:
            self._reader, self._writer = await self._timed(asyncio.open_unix_connection(self.socket_path))
            self._writer.write(b"zINSTREAM\0")
            await self._timed(self._writer.drain())
        except OSError as error:
            self.close()
            raise ClamdUnavailable(f"cannot reach clamd at {self.socket_path}: {error.strerror or error}") from None

    async def send(self, data: bytes) -> None:
        if self._writer is None:
            raise ClamdUnavailable("clamd stream is not open")
        if self._closed_early:
            return
        view = memoryview(data)
        try:
            for start in range(0, len(view), MAX_FRAME):
                frame = view[start:start + MAX_FRAME]
                self._writer.write(struct.pack(">I", len(frame)))
                self._writer.write(frame)
                await self._timed(self._writer.drain())
        except (ConnectionResetError, BrokenPipeError):
            self._closed_early = True  # e.g. past StreamMaxLength: finish() reads the reason

    async def finish(self) -> ClamdResult:
        if self._writer is None:
            raise ClamdUnavailable("clamd stream is not open")
        try:
            if not self._closed_early:
                try:
                    self._writer.write(b"\0\0\0\0")
                    await self._timed(self._writer.drain())
                except (ConnectionResetError, BrokenPipeError):
                    pass  # read whatever clamd said before it hung up
            try:
                reply = await self._timed(self._reader.readuntil(b"\0"))
            except asyncio.IncompleteReadError as partial:
                reply = partial.partial
            except asyncio.LimitOverrunError:
                raise ClamdUnavailable("clamd's answer is too long to be a verdict") from None
            if not reply:
                raise ClamdUnavailable("clamd closed the connection without a verdict")
            return parse_reply(reply[:MAX_REPLY])
        except OSError as error:
            raise ClamdUnavailable(f"clamd connection failed: {error.strerror or error}") from None
        finally:
            self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


async def scan_bytes(socket_path: str, data: bytes, deadline: float) -> ClamdResult:
    """One whole buffer through INSTREAM (tests, the CLI)."""
    stream = ClamdStream(socket_path, deadline)
    await stream.open()
    try:
        await stream.send(data)
    except BaseException:
        stream.close()
        raise
    return await stream.finish()
