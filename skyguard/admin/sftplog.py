"""The files an operator's SFTP session names, on record before the VM acts on them.

Every request of the operator's SFTP stream that names a file (open for reading or writing,
remove, rename, mkdir, stat, ...) is an `admin_file_transfer` entry in the signed log, and goes on
to the VM only once that entry is durable (fail closed). One the log refuses (its disk full or
stalled, skyguard/tlog/intake.py), or has not made durable within parts.ENTRY_WAIT_S, never reaches
the VM: skyguard answers it with an SFTP PERMISSION_DENIED status saying why, and tells the
operator on the session's stderr (OpenSSH's sftp shows that, not a status's words). Requests that
name no file (READ, WRITE and CLOSE on a handle, ...) pass in order behind the ones that do: a
handle exists only for an OPEN that went through.

file_request() is sans-io; SftpLogGate drives one session's stream from
its (synchronous) SSH callbacks. Packet layout from draft-ietf-secsh-filexfer-02 (the version
OpenSSH speaks): uint32 length, byte type, uint32 request id, then fields. Not here: content
rules on uploads (sftp.py), which see only what this gate let through.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import asyncssh

from skyguard.admin.sftp import MAX_PATH_SHOWN, SSH_FX_PERMISSION_DENIED, PacketFramer, SftpProtocolError, status_packet
from skyguard.errors import LogError
from skyguard.parts import DecisionLog, entries_durable

log = logging.getLogger("skyguard.admin")

# Request types that carry a path as their first field after the request id.
PATH_REQUESTS = {3: "open", 11: "opendir", 13: "remove", 14: "mkdir", 15: "rmdir",
                 17: "stat", 18: "rename", 20: "symlink", 7: "lstat", 9: "setstat", 19: "readlink"}
SSH_FXF_WRITE = 0x02
# What the operator is told of a request the signed log would not take (the log's own reason,
# with host paths, goes to the host's log).
LOG_REFUSED_WORDS = "skyguard: not done: the signed log refuses entries now (its disk is full or stalled); try again later"


def file_request(packet: bytes) -> tuple[str, str] | None:
    """(operation, path) of one whole SFTP packet (without its length) that names a file, else None."""
    op = PATH_REQUESTS.get(packet[0]) if packet else None
    if op is None or len(packet) < 9:
        return None
    (path_len,) = struct.unpack_from(">I", packet, 5)
    path = packet[9:9 + min(path_len, MAX_PATH_SHOWN)].decode("utf-8", "replace")
    if op == "open" and len(packet) >= 9 + path_len + 4:
        (pflags,) = struct.unpack_from(">I", packet, 9 + path_len)
        op = "open-write" if pflags & SSH_FXF_WRITE else "open-read"
    return op, path


class PacketEdge:
    """Whether a byte stream of SFTP packets is between two packets: where skyguard's own answers
    may go into the stream the VM's sftp-server writes to the operator."""

    def __init__(self):
        self._left = 0  # bytes of the current packet's body still to come
        self._head = b""  # bytes of the current packet's length seen so far

    def feed(self, data: bytes) -> None:
        at = 0
        while at < len(data):
            if self._left:
                taken = min(self._left, len(data) - at)
                self._left -= taken
                at += taken
                continue
            taken = data[at:at + 4 - len(self._head)]
            self._head += taken
            at += len(taken)
            if len(self._head) == 4:
                (self._left,) = struct.unpack(">I", self._head)
                self._head = b""

    @property
    def between(self) -> bool:
        return not self._left and not self._head


class SftpLogGate:
    """One SFTP session's operator -> VM stream, each file request held until its entry is durable
    (see the module note). `log_request(op, path)` writes the entry (DecisionLog.record: its Future,
    or None; raises LogError or OSError when the log refuses it); `note(op, path, refused)` tells
    the session's record. Bytes go on through `forward`, then `eof` after the operator's EOF;
    skyguard's answers through `answer`, between the VM's packets (from_vm() carries them), and
    `tell(words)` reaches the operator's stderr. While the queue drains the operator's channel is
    paused (`pause`, `resume`); a stream that cannot be framed ends the session (`fail`)."""

    def __init__(self, log_request: Callable[[str, str], Future | None], note: Callable[[str, str, bool], None],
                 forward: Callable[[bytes], None], answer: Callable[[bytes], None], tell: Callable[[str], None],
                 pause: Callable[[], None], resume: Callable[[], None], fail: Callable[[str], None],
                 eof: Callable[[], None], who: str, decisions: DecisionLog | None = None):
        self.log_request, self.note, self.who, self.decisions = log_request, note, who, decisions
        self.forward, self.answer, self.tell = forward, answer, tell
        self.pause, self.resume, self.fail, self.write_eof = pause, resume, fail, eof
        self._framer = PacketFramer()
        self._to_operator = PacketEdge()
        self._answers: list[bytes] = []  # waiting for the VM's stream to reach a packet's end
        self._queue: deque[bytes] = deque()
        self._task: Any = None
        self._eof = self._closed = self._told = False
        self.refused = 0  # file requests refused for the log

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
        """The VM's bytes for the operator, with skyguard's answers that waited for a packet's end."""
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
                    named = file_request(packet)
                    if named is not None:
                        if ready:  # what came before does not wait for this one's entry
                            self.forward(bytes(ready))
                            ready.clear()
                        if not await self._on_record(packet, *named) or self._closed:
                            continue
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

    async def _on_record(self, packet: bytes, op: str, path: str) -> bool:
        """Whether the request may go on: its entry is durable. Else it is answered here."""
        try:
            await entries_durable([self.log_request(op, path)], self.decisions)
        except (LogError, OSError) as error:  # the signed log refuses (or the fallback log cannot write)
            log.error("SFTP %s of %r by %s is refused: its admin_file_transfer entry cannot be logged: %s",
                      op, path, self.who, error)
            self.refused += 1
            self.note(op, path, True)
            self._reply(status_packet(struct.unpack_from(">I", packet, 1)[0], SSH_FX_PERMISSION_DENIED,
                                      LOG_REFUSED_WORDS))
            if not self._told:  # once while the log refuses: a client may ask many at once
                self._told = True
                self.tell(f"{LOG_REFUSED_WORDS} ({op} {path})\r\n")
            return False
        self._told = False
        self.note(op, path, False)
        return True

    def _reply(self, packet: bytes) -> None:
        if self._to_operator.between:
            self.answer(packet)
        else:
            self._answers.append(packet)


def log_gate(session) -> SftpLogGate:
    """The gate of an SFTP session of the access proxy (admin/session.py's ProxySession), whose
    recording is open: to its upload filter (sftp.py) when it has one, else to the VM."""
    owner, recording = session.owner, session.recording

    def log_request(op: str, path: str) -> Future | None:
        return session.proxy.decision_log.record("admin_file_transfer", session=recording.id,
                                                 operator=owner.operator_name, workload=owner.workload_name,
                                                 op=op, path=path)

    def note(op: str, path: str, refused: bool) -> None:
        recording.note("files", {"op": op, "path": path} | ({"refused": "log_refused"} if refused else {}))

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

    return SftpLogGate(log_request, note, forward, lambda data: session.chan.write(data), tell,
                       lambda: session.operator_reading.hold("sftp_log"),
                       lambda: session.operator_reading.release("sftp_log"),
                       lambda message: session.end_with_message(message + "\r\n", 255, "sftp_refused"), eof,
                       f"{owner.operator_name} on {owner.workload_name} (session {recording.id})",
                       session.proxy.decision_log)
