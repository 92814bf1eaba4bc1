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

ClamdCheck vouches for a clamd before its verdicts count: past MaxFileSize, MaxScanSize or
MaxRecursion clamd stops looking and answers `stream: OK` unless AlertExceedsMax is on (Debian
ships it off), so EICAR after 30 MiB of zeros in a 200-byte bzip2, xz or tar.bz2 file would pass
as clean. The check sends a probe no clamd may open within its limits (gzip nested deeper than
the largest MaxRecursion clamd accepts) and wants a Heuristics.Limits.Exceeded answer; without
it every scan is refused, with the clamd setting named.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import logging
import struct
from dataclasses import dataclass

from skyguard.content.errors import ContentError
from skyguard.timeouts import within

# Largest chunk put in one INSTREAM frame. clamd accepts up to StreamMaxLength per stream; big
# frames only cost clamd memory, small ones per-frame overhead: 64 KiB is what clamdscan uses.
MAX_FRAME = 64 * 1024
MAX_REPLY = 4096  # a reply line is one signature name; anything longer is not clamd
DEBIAN_SOCKET = "/run/clamav/clamd.ctl"  # LocalSocket in Debian's clamav-daemon package
LIMITS_SIGNATURE = "Heuristics.Limits.Exceeded"  # how clamd names a file past its limits (AlertExceedsMax)
# clamd refuses to start with MaxRecursion above 100 (CLI_MAX_MAXRECLEVEL in libclamav): a gzip
# nested one level deeper is past the limit of every clamd, whatever its clamd.conf; 2 KiB.
PROBE_DEPTH = 101
CHECK_VALID_S = 60.0  # a clamd that passed is checked again after this long (it may have been restarted)
RECHECK_FAILED_S = 1.0  # a failed check is repeated at most this often (not once per upload)

log = logging.getLogger(__name__)


class ClamdUnavailable(ContentError):
    """clamd could not give a verdict: the content counts as unscanned (block it)."""


class ClamdMisconfigured(ClamdUnavailable):
    """clamd answers, but its `stream: OK` cannot be trusted (AlertExceedsMax off): block."""


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
            return await within(awaitable, self._remaining())
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


@functools.cache
def limits_probe() -> bytes:
    """What ClamdCheck sends: a short text in PROBE_DEPTH layers of gzip."""
    data = b"skyguard clamd limits probe\n"
    for _ in range(PROBE_DEPTH):
        data = gzip.compress(data, mtime=0)
    return data


async def check_limits_alert(socket_path: str, deadline: float) -> None:
    """Raises ClamdMisconfigured unless clamd at `socket_path` flags a file past its limits,
    ClamdUnavailable when it cannot be asked."""
    result = await scan_bytes(socket_path, limits_probe(), deadline)
    if not (result.infected and (result.signature or "").startswith(LIMITS_SIGNATURE)):
        answer = f"found {result.signature}" if result.infected else "clean"
        raise ClamdMisconfigured(
            f"clamd at {socket_path} passes what it skips past its limits as clean (a gzip nested "
            f"{PROBE_DEPTH} deep came back {answer}, not {LIMITS_SIGNATURE}.*): set `AlertExceedsMax yes` "
            "(and `ScanArchive yes`) in clamd.conf and restart clamd; until then every file a clamav "
            "rule covers is refused")


class ClamdCheck:
    """Whether clamd at one socket may give verdicts (check_limits_alert), remembered: checked
    before the first scan, again CHECK_VALID_S later or after a scan that could not reach it, and
    while it fails at most every RECHECK_FAILED_S. Callers waiting at once share one probe. Lives
    on one event loop (each ContentEngine has its own); `problem` may be read from any thread."""

    def __init__(self, socket_path: str, deadline: float):
        self.socket_path = socket_path
        self.deadline = deadline
        self.problem: str | None = "clamd has not been checked yet"
        self._error: ClamdUnavailable | None = None
        self._checked_at: float | None = None
        self._probe: asyncio.Future | None = None

    def __repr__(self) -> str:
        return f"ClamdCheck({self.socket_path!r}, problem={self.problem!r})"

    async def ready(self) -> None:
        """Returns when clamd may be used; ClamdUnavailable (or ClamdMisconfigured) saying why not."""
        now = asyncio.get_running_loop().time()
        fresh = self._checked_at is not None and \
            now - self._checked_at < (RECHECK_FAILED_S if self._error else CHECK_VALID_S)
        if not fresh:
            if self._probe is None:
                self._probe = asyncio.ensure_future(self._run_probe())
            await asyncio.shield(self._probe)
        if self._error is not None:
            raise self._error

    def forget(self) -> None:
        """A scan could not reach clamd: it may come back another clamd, check it again."""
        self._checked_at = None

    async def _run_probe(self) -> None:
        try:
            await check_limits_alert(self.socket_path, self.deadline)
            error = None
        except ClamdUnavailable as failure:
            error = failure
        finally:
            self._probe = None
        if str(error or "") != str(self._error or ""):  # logged when it changes, not per upload
            if error is None:
                log.info("clamd at %s checked: it flags files past its limits", self.socket_path)
            else:
                log.error("clamd is not usable, files under clamav rules are refused: %s", error)
        self._error, self.problem = error, str(error) if error else None
        self._checked_at = asyncio.get_running_loop().time()
