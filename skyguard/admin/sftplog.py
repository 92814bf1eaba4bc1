"""The files an operator's SFTP session names, on record before the VM acts on them.

Every request of the operator's SFTP stream that names a file (open for reading or writing,
remove, rename, link, mkdir, stat, set attributes, copy between two open files, ...) is an
`admin_file_transfer` entry in the signed log (`op`, `path`; for a request with two paths,
`new_path`: the name it makes, renamed or linked to, or copied into; `attrs`: what a SETSTAT or
MKDIR sets), and goes on to the VM only once that entry is durable (fail closed). One the log
refuses (its disk full or stalled, skyguard/tlog/intake.py), or has not made durable within
parts.ENTRY_WAIT_S, never reaches the VM: skyguard answers it with an SFTP PERMISSION_DENIED
status saying why, and tells the operator on the session's stderr (OpenSSH's sftp shows that, not
a status's words). Requests that name no file (READ, WRITE and CLOSE on a handle, ...) pass in
order behind the ones that do: a handle exists only for an OPEN that went through.

Extended requests (OpenSSH's PROTOCOL, section 4) are read like the others: posix-rename and
hardlink name two paths, lsetstat a path and attributes, statvfs a path (a read, like STAT),
copy-data two handles (named by the files their OPENs named: the gate follows the VM's HANDLE
answers). Passed unlogged, as REALPATH is: limits, expand-path and home-directory (sftp asks them
at start and for every `~` path; they read no file, only canonicalise a name or tell limits),
users-groups-by-id (names of ids), and fstatvfs and fsync on a handle (a read, and a flush of what
was written through a logged OPEN). Any other extended request, or a request type of no SFTP
version 3 (what OpenSSH speaks), is answered OP_UNSUPPORTED and never reaches the VM (fail
closed: skyguard passes only what it can put on record), the first of a session logged
(`admin_sftp_refused`). A FSETSTAT or copy-data on a handle the gate cannot name (its OPEN not
answered yet, or its request id reused while in flight) is refused likewise (FAILURE).

SftpRequests reads requests (sans-io); SftpLogGate drives one session's stream from its
(synchronous) SSH callbacks. Packets as sftpwire.py reads them; SSH_FXP_SYMLINK's paths in
OpenSSH's order (target, then the link: PROTOCOL 4.1). Not here: content rules on uploads
(sftp.py), which see only what this gate let through.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import asyncssh

from skyguard.admin.sftpwire import (
    MAX_NAME_SHOWN,
    SSH_FX_FAILURE,
    SSH_FX_OP_UNSUPPORTED,
    SSH_FX_PERMISSION_DENIED,
    SSH_FXF_WRITE,
    SSH_FXP_CLOSE,
    SSH_FXP_EXTENDED,
    SSH_FXP_HANDLE,
    SSH_FXP_INIT,
    SSH_FXP_OPEN,
    SSH_FXP_OPENDIR,
    SSH_FXP_STATUS,
    Fields,
    PacketFramer,
    SftpProtocolError,
    status_packet,
)
from skyguard.errors import LogError
from skyguard.parts import DecisionLog, entries_durable

log = logging.getLogger("skyguard.admin")

# Request types whose fields after the request id are: one path ("path"), a path then ATTRS
# ("attrs"), two paths ("two"), a handle then ATTRS ("handle-attrs"), or one path then pflags
# (OPEN). Types 1-20 and 200 are all of SFTP version 3; those not here name no file (READ, WRITE,
# FSTAT, READDIR, REALPATH on a handle or a name only canonicalised).
NAMED = {3: ("open", "open"), 7: ("lstat", "path"), 9: ("setstat", "attrs"), 10: ("fsetstat", "handle-attrs"),
         11: ("opendir", "path"), 13: ("remove", "path"), 14: ("mkdir", "attrs"), 15: ("rmdir", "path"),
         17: ("stat", "path"), 18: ("rename", "two"), 19: ("readlink", "path"), 20: ("symlink", "two")}
VERSION_3_TYPES = frozenset({1, *range(3, 21), 200})
EXTENDED_NAMED = {b"posix-rename@openssh.com": ("posix-rename", "two"), b"hardlink@openssh.com": ("hardlink", "two"),
                  b"lsetstat@openssh.com": ("lsetstat", "attrs"), b"statvfs@openssh.com": ("statvfs", "path"),
                  b"copy-data": ("copy-data", "copy")}
# Read-only, or on a handle whose OPEN was logged: passed unlogged (see the module note).
EXTENDED_PASSED = frozenset({b"limits@openssh.com", b"expand-path@openssh.com", b"home-directory",
                             b"users-groups-by-id@openssh.com", b"fstatvfs@openssh.com", b"fsync@openssh.com"})
MAX_NAMED_HANDLES = 4096  # handles (and OPENs in flight) named per session; past it the oldest is forgotten
HEAD_BYTES = 4 + 1 + 4 + 4 + 256  # of the VM's packets: a HANDLE's id and handle (at most 256 bytes)
# What the operator is told of a request the signed log would not take (the log's own reason,
# with host paths, goes to the host's log).
LOG_REFUSED_WORDS = "skyguard: not done: the signed log refuses entries now (its disk is full or stalled); try again later"
UNSUPPORTED_WORDS = "skyguard: this SFTP request is not passed (skyguard cannot put it on record)"
UNKNOWN_HANDLE_WORDS = "skyguard: not done: the file of this handle is not known here (open it again)"


@dataclass(frozen=True)
class FileRequest:
    """One request that names a file: what goes on record before the VM gets it."""

    op: str
    path: str
    new_path: str | None = None  # rename, link, copy: the name made; symlink: the link (path: its target)
    attrs: dict | None = None  # SETSTAT, MKDIR, ...: what it sets

    def fields(self) -> dict:
        return {"op": self.op, "path": self.path} | ({"new_path": self.new_path} if self.new_path is not None else {}) \
            | ({"attrs": self.attrs} if self.attrs is not None else {})

    def __str__(self) -> str:  # quoted: a path may hold a line break, and this goes into the host's log
        return f"{self.op} of {self.path!r}" + (f" to {self.new_path!r}" if self.new_path is not None else "")


@dataclass(frozen=True)
class Refused:
    """A request answered by skyguard, never passed: its status code, words, and the reason counted."""

    code: int
    words: str
    reason: str  # "unsupported" or "unknown_handle"
    what: str  # the request, for the host's log (an extension's name, bounded)


class SftpRequests:
    """Reads one session's requests (see the module note). `request(packet)` for each packet of
    the operator, in order: a FileRequest to put on record, a Refused to answer, or None to pass.
    `forwarded(packet)` once it goes to the VM, `from_vm_packet(head)` for the start of each packet
    the operator gets: the handles of OPENs are named from their answers."""

    def __init__(self):
        self._opening: dict[int, str | None] = {}  # request id of an OPEN/OPENDIR in flight -> its path (None: ambiguous)
        self._handles: dict[bytes, str] = {}  # handle -> the path its OPEN named

    def request(self, packet: bytes) -> FileRequest | Refused | None:
        kind = packet[0]
        if kind == SSH_FXP_INIT:
            return None
        if len(packet) < 5:
            raise SftpProtocolError("truncated SFTP packet")
        if kind not in VERSION_3_TYPES:
            return Refused(SSH_FX_OP_UNSUPPORTED, UNSUPPORTED_WORDS, "unsupported", f"request type {kind}")
        fields = Fields(packet)
        if kind == SSH_FXP_EXTENDED:
            name = fields.string()
            if name in EXTENDED_PASSED:
                return None
            if name not in EXTENDED_NAMED:
                shown = name[:MAX_NAME_SHOWN].decode("ascii", "replace")
                return Refused(SSH_FX_OP_UNSUPPORTED, UNSUPPORTED_WORDS, "unsupported",
                               f"extended request {''.join(c if c.isprintable() else '?' for c in shown)!r}")
            op, layout = EXTENDED_NAMED[name]
        elif kind == SSH_FXP_CLOSE:
            self._handles.pop(fields.string(), None)  # the VM may give its handle to the next OPEN
            return None
        elif kind in NAMED:
            op, layout = NAMED[kind]
        else:
            return None
        if layout == "path":
            return FileRequest(op, fields.path())
        if layout == "open":
            path = fields.path()
            return FileRequest("open-write" if fields.uint32() & SSH_FXF_WRITE else "open-read", path)
        if layout == "attrs":
            path = fields.path()
            return FileRequest(op, path, attrs=fields.attrs())
        if layout == "two":
            path = fields.path()
            return FileRequest(op, path, fields.path())
        if layout == "handle-attrs":
            path = self._handles.get(fields.string())
            return _unknown_handle(op) if path is None else FileRequest(op, path, attrs=fields.attrs())
        source = self._handles.get(fields.string())  # copy-data: from a handle to a handle
        fields.uint64(), fields.uint64()
        target = self._handles.get(fields.string())
        fields.uint64()
        return _unknown_handle(op) if source is None or target is None else FileRequest(op, source, target)

    def forwarded(self, packet: bytes, request: FileRequest | None) -> None:
        if request is not None and packet[0] in (SSH_FXP_OPEN, SSH_FXP_OPENDIR):
            (request_id,) = struct.unpack_from(">I", packet, 1)
            # An id reused while in flight: which answer is whose is not known, so neither is named.
            self._opening[request_id] = None if request_id in self._opening else request.path
            _bound(self._opening)

    def from_vm_packet(self, head: bytes) -> None:
        if len(head) < 5 or head[0] not in (SSH_FXP_STATUS, SSH_FXP_HANDLE):
            return
        (request_id,) = struct.unpack_from(">I", head, 1)
        if request_id not in self._opening:
            return
        path = self._opening.pop(request_id)
        if head[0] == SSH_FXP_HANDLE and path is not None and len(head) >= 9:
            (length,) = struct.unpack_from(">I", head, 5)
            if 9 + length <= len(head):
                self._handles[head[9:9 + length]] = path
                _bound(self._handles)


def _unknown_handle(op: str) -> Refused:
    return Refused(SSH_FX_FAILURE, UNKNOWN_HANDLE_WORDS, "unknown_handle", f"{op} on an unknown handle")


def _bound(names: dict) -> None:
    while len(names) > MAX_NAMED_HANDLES:  # the oldest is forgotten: a request on it is refused, never misnamed
        del names[next(iter(names))]


def file_request(packet: bytes) -> FileRequest | Refused | None:
    """What one whole SFTP packet (without its length) is, read without a session's handles."""
    return SftpRequests().request(packet)


class PacketEdge:
    """Whether a byte stream of SFTP packets is between two packets: where skyguard's own answers
    may go into the stream the VM's sftp-server writes to the operator. `on_packet(head)` gets the
    first HEAD_BYTES of each packet (without its length) once the packet has passed."""

    def __init__(self, on_packet: Callable[[bytes], None] = lambda head: None):
        self.on_packet = on_packet
        self._left = 0  # bytes of the current packet's body still to come
        self._length = b""  # bytes of the current packet's length seen so far
        self._head = bytearray()  # the current packet's first bytes

    def feed(self, data: bytes) -> None:
        at = 0
        while at < len(data):
            if self._left:
                taken = min(self._left, len(data) - at)
                if len(self._head) < HEAD_BYTES:
                    self._head += data[at:at + min(taken, HEAD_BYTES - len(self._head))]
                self._left -= taken
                at += taken
                if not self._left:
                    head, self._head = bytes(self._head), bytearray()
                    self.on_packet(head)
                continue
            piece = data[at:at + 4 - len(self._length)]
            self._length += piece
            at += len(piece)
            if len(self._length) == 4:
                (self._left,) = struct.unpack(">I", self._length)
                self._length = b""

    @property
    def between(self) -> bool:
        return not self._left and not self._length


class SftpLogGate:
    """One SFTP session's operator -> VM stream, each file request held until its entry is durable
    (see the module note). `log_request(request)` writes the entry (DecisionLog.record: its Future,
    or None; raises LogError or OSError when the log refuses it); `note(request, refused)` tells
    the session's record; `count(reason)` counts a request answered here (log_refused,
    unsupported, unknown_handle); `unsupported(what)` is called for the session's first request
    refused as unsupported. Bytes go on through `forward`, then `eof` after the operator's EOF;
    skyguard's answers through `answer`, between the VM's packets (from_vm() carries them, and
    must see every packet the operator gets), and `tell(words)` reaches the operator's stderr.
    While the queue drains the operator's channel is paused (`pause`, `resume`); a stream that
    cannot be framed or read ends the session (`fail`)."""

    def __init__(self, log_request: Callable[[FileRequest], Future | None],
                 note: Callable[[FileRequest, bool], None],
                 forward: Callable[[bytes], None], answer: Callable[[bytes], None], tell: Callable[[str], None],
                 pause: Callable[[], None], resume: Callable[[], None], fail: Callable[[str], None],
                 eof: Callable[[], None], who: str, decisions: DecisionLog | None = None,
                 count: Callable[[str], None] = lambda reason: None,
                 unsupported: Callable[[str], None] = lambda what: None):
        self.log_request, self.note, self.who, self.decisions = log_request, note, who, decisions
        self.forward, self.answer, self.tell, self.count, self.unsupported = forward, answer, tell, count, unsupported
        self.pause, self.resume, self.fail, self.write_eof = pause, resume, fail, eof
        self._framer = PacketFramer()
        self._requests = SftpRequests()
        self._to_operator = PacketEdge(self._requests.from_vm_packet)
        self._answers: list[bytes] = []  # waiting for the VM's stream to reach a packet's end
        self._queue: deque[bytes] = deque()
        self._task: Any = None
        self._eof = self._closed = self._told = self._said_unsupported = False
        self.refused = 0  # requests answered here, never passed

    def from_operator(self, data: bytes) -> None:
        self._queue.append(data)
        if self._task is None:
            self.pause()
            self._task = asyncio.get_running_loop().create_task(self._drain())

    @property
    def draining(self) -> bool:
        """Bytes of the operator are queued or held for their entries."""
        return self._task is not None

    def eof(self) -> None:
        """The operator's EOF, after the bytes queued before it."""
        if self._task is None:
            self.write_eof()
        else:
            self._eof = True

    def from_vm(self, data: bytes) -> bytes:
        """The bytes for the operator (the VM's, or the upload filter's own answers: whole
        packets), with skyguard's answers that waited for a packet's end."""
        self._to_operator.feed(data)
        if self._answers and self._to_operator.between:
            data, self._answers = data + b"".join(self._answers), []
        return data

    def close(self) -> None:
        """The session ended: what is queued is dropped, a wait for the log ends."""
        self._closed = True
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()

    async def _drain(self) -> None:
        try:
            while self._queue:
                ready = bytearray()
                for packet in self._framer.packets(self._queue.popleft()):
                    request = self._requests.request(packet)
                    if isinstance(request, Refused):
                        self._refuse(packet, request)
                        continue
                    if request is not None:
                        if ready:  # what came before does not wait for this one's entry
                            self.forward(bytes(ready))
                            ready.clear()
                        if not await self._on_record(packet, request) or self._closed:
                            continue
                    self._requests.forwarded(packet, request)
                    ready += struct.pack(">I", len(packet)) + packet
                if ready and not self._closed:
                    self.forward(bytes(ready))
        except SftpProtocolError as error:
            self._queue.clear()
            self.fail(f"skyguard: SFTP stream refused: {error}")
        finally:
            self._task = None
            if not self._closed:
                self.resume()
                if self._eof:
                    self.write_eof()

    async def _on_record(self, packet: bytes, request: FileRequest) -> bool:
        """Whether the request may go on: its entry is durable. Else it is answered here."""
        try:
            await entries_durable([self.log_request(request)], self.decisions)
        except (LogError, OSError) as error:  # the signed log refuses (or the fallback log cannot write)
            log.error("SFTP %s by %s is refused: its admin_file_transfer entry cannot be logged: %s",
                      request, self.who, error)
            self.note(request, True)
            self._refuse(packet, Refused(SSH_FX_PERMISSION_DENIED, LOG_REFUSED_WORDS, "log_refused", str(request)))
            if not self._told:  # once while the log refuses: a client may ask many at once
                self._told = True
                self.tell(f"{LOG_REFUSED_WORDS} ({request})\r\n")
            return False
        self._told = False
        self.note(request, False)
        return True

    def _refuse(self, packet: bytes, refused: Refused) -> None:
        self.refused += 1
        self.count(refused.reason)
        if refused.reason == "unsupported" and not self._said_unsupported:  # once a session: a client may loop
            self._said_unsupported = True
            log.warning("SFTP %s by %s is refused: not passed (unsupported)", refused.what, self.who)
            self.unsupported(refused.what)
        reply = status_packet(struct.unpack_from(">I", packet, 1)[0], refused.code, refused.words)
        if self._to_operator.between:
            self.answer(reply)
        else:
            self._answers.append(reply)


def log_gate(session) -> SftpLogGate:
    """The gate of an SFTP session of the access proxy (admin/session.py's ProxySession), whose
    recording is open: to its upload filter (sftp.py) when it has one, else to the VM."""
    owner, recording, proxy = session.owner, session.recording, session.proxy

    def log_request(request: FileRequest) -> Future | None:
        return proxy.decision_log.record("admin_file_transfer", session=recording.id, operator=owner.operator_name,
                                         workload=owner.workload_name, **request.fields())

    def note(request: FileRequest, refused: bool) -> None:
        recording.note("files", request.fields() | ({"refused": "log_refused"} if refused else {}))

    def forward(data: bytes) -> None:
        if session.sftp_filter is not None:
            session.sftp_filter.from_operator(data)
        else:
            session.vm_chan.write(data)

    def eof() -> None:
        if session.sftp_filter is not None:
            session.sftp_filter.eof()
        else:
            session.vm_chan.write_eof()

    def tell(words: str) -> None:
        try:
            session.chan.write_stderr(words.encode())
        except (asyncssh.Error, OSError):
            pass  # the operator is already gone

    def unsupported(what: str) -> None:  # best effort: the request is refused whatever the log does
        proxy.record("admin_sftp_refused", session=recording.id, operator=owner.operator_name,
                     workload=owner.workload_name, request=what, reason="unsupported")

    return SftpLogGate(log_request, note, forward, lambda data: session.chan.write(data), tell,
                       lambda: session.operator_reading.hold("sftp_log"),
                       lambda: session.operator_reading.release("sftp_log"),
                       lambda message: session.end_with_message(message + "\r\n", 255, "sftp_refused"), eof,
                       f"{owner.operator_name} on {owner.workload_name} (session {recording.id})",
                       proxy.decision_log, count=lambda reason: proxy.metrics.sftp_refused.labels(reason).inc(),
                       unsupported=unsupported)
