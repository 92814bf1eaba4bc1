"""Content rules on SFTP uploads through the access proxy (SftpUploadFilter). Packets as
sftpwire.py reads and makes them.

The filter changes the stream: files an operator writes under a content rule
(skyguard/policy/content.py) are held back and judged before the VM gets a byte. Not here: which
files a session names and their log entries (sftplog.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from skyguard.admin.sftpwire import (
    MAX_PATH_SHOWN,
    SSH_FILEXFER_ATTR_SIZE,
    SSH_FX_FAILURE,
    SSH_FX_OK,
    SSH_FX_OP_UNSUPPORTED,
    SSH_FX_PERMISSION_DENIED,
    SSH_FXF_APPEND,
    SSH_FXF_CREAT,
    SSH_FXF_EXCL,
    SSH_FXF_TRUNC,
    SSH_FXF_WRITE,
    SSH_FXP_CLOSE,
    SSH_FXP_EXTENDED,
    SSH_FXP_FSETSTAT,
    SSH_FXP_HANDLE,
    SSH_FXP_INIT,
    SSH_FXP_MKDIR,
    SSH_FXP_OPEN,
    SSH_FXP_REMOVE,
    SSH_FXP_RENAME,
    SSH_FXP_SETSTAT,
    SSH_FXP_STATUS,
    SSH_FXP_SYMLINK,
    SSH_FXP_VERSION,
    SSH_FXP_WRITE,
    Fields,
    PacketFramer,
    SftpProtocolError,
    make_packet,
    read_string,
    request_id_of,
    sftp_string,
    status_packet,
)

if TYPE_CHECKING:
    from skyguard.parts import DecisionLog

log = logging.getLogger("skyguard.admin")


# ---- content rules on uploads --------------------------------------------------------------------
#
# Holding, not streaming: a file opened for writing under a content rule gets its WRITEs answered
# here (status OK) and kept, bounded by content.max_inspect_bytes; at its CLOSE the whole file is
# judged (skyguard/content). Allowed: the file is truncated through its handle (so it holds the
# judged image only, whatever another handle to it wrote meanwhile) and the WRITEs are replayed to
# the VM (their answers swallowed,
# a failure among them turns the CLOSE's answer into a failure), then the CLOSE goes on. Blocked:
# the VM's handle is closed and the file (created empty by the OPEN) removed, by requests of our
# own, and once the removal is answered the operator's CLOSE is answered PERMISSION_DENIED. So a blocked file
# never has a byte on the VM, and the client's transfer ends in an error, never in success.
#
# Known limits: a file under a rule can be read back through its own handle only after CLOSE (the
# VM holds nothing before), and an upload larger than the inspection buffer is refused (its WRITE
# fails) rather than streamed unscanned. A file is opened for writing only to be written whole
# (truncated, or created new): an OPEN that appends or keeps the file's bytes (`reput`, sshfs
# writing into a file) is refused, as the judged bytes would not be the file's; so are extended
# requests that may write (copy-data@openssh.com: PASSED_EXTENSIONS lists those passed), and a
# SETSTAT, FSETSTAT or lsetstat that sets a size (cut to a prefix, or grown with zeros, a judged
# file is one no rule saw: a file known by its hash, uploaded with a byte more). Names are bytes the
# VM keeps too (a symlink's target up to 4 KiB: readlink gives it back), so the names a request
# writes (an OPEN for writing, MKDIR, a rename's or link's new name, both paths of a SYMLINK) are
# held to the rules' patterns, as an HTTP request's target is; such a block is logged without them.
#
# One VM, several channels (sessions of one operator or of several, each with its own sftp-server
# on the VM): a replay (truncate, then the writes) and an OPEN for writing (which truncates) must
# not run between another channel's truncation and its writes, or the file keeps both channels'
# halves, each judged alone. So they take turns per VM (ReplayTurn, shared by the VM's channels):
# a channel holds the turn from sending such requests until the VM has answered them. One channel
# cannot keep the others waiting for good: while another waits it queues behind it for its next
# request, and one that has held the turn for TURN_HOLD_S while another waits (a VM that never
# answers its OPEN: a FIFO, a hung disk) has its SFTP stream ended, the turn passed on after
# TURN_GRACE_S as for any channel that ends while holding it.

_NEW_FILE = SSH_FXF_CREAT | SSH_FXF_EXCL  # created by this OPEN, so empty
_OWN_IDS = 0xF0000000  # request ids skyguard sends on the operator's behalf (clients count up from 0)
# Extended requests (OpenSSH's) passed to the VM under content rules: none writes a file's bytes.
# Any other is refused, copy-data@openssh.com first: it copies bytes between two handles on the
# VM, so a file opened for writing would get bytes no content rule saw (two harmless uploads
# copied into one), and they stay there if the channel ends without the CLOSE that judges it.
PASSED_EXTENSIONS = frozenset({b"posix-rename@openssh.com", b"statvfs@openssh.com", b"fstatvfs@openssh.com",
                               b"hardlink@openssh.com", b"fsync@openssh.com", b"lsetstat@openssh.com",
                               b"limits@openssh.com", b"expand-path@openssh.com", b"home-directory",
                               b"users-groups-by-id@openssh.com"})
MAX_HELD_FILES = 64  # files held open for judging at once, per channel
MAX_IN_FLIGHT = 1 << 16  # operator requests the VM has not answered yet, per channel
TURN_WAIT_S = 120.0  # how long a channel waits for another's replay to the VM before its stream fails
TURN_HOLD_S = 60.0  # the turn held this long while another waits: the stream ends (< TURN_WAIT_S - TURN_GRACE_S)
# A channel that ended with a replay unanswered keeps the turn this long: the VM's sftp-server
# may still be writing what reached it (at most an SSH window, 2 MiB in OpenSSH, after the end).
TURN_GRACE_S = 10.0


class ReplayTurn:
    """Whose turn it is to send one VM what truncates or rewrites a file under content rules (a
    replay, an OPEN for writing): shared by the upload filters of the VM's channels, on their
    event loop. The channel holding it may take it again while no other waits (its requests run in
    order on its own sftp-server); the others wait, first come first served, until the VM has
    answered all it sent. A holder past TURN_HOLD_S while another waits is ended: its `overrun`
    (a callable taking the reason, if it has one) is called, then it leaves."""

    def __init__(self):
        self.holder: object | None = None
        self._unanswered = 0  # the holder's requests that needed the turn, not answered yet
        self._queue: deque[tuple[object, asyncio.Future]] = deque()
        self._grace: asyncio.TimerHandle | None = None
        self._watch: asyncio.TimerHandle | None = None  # the TURN_HOLD_S check while someone waits

    @property
    def waiting(self) -> int:
        """Channels waiting for the turn."""
        return sum(1 for _, future in self._queue if not future.done())

    async def take(self, channel: object, timeout: float | None = None) -> None:
        """The turn for one more request of `channel`; SftpProtocolError after `timeout` seconds
        (TURN_WAIT_S by default)."""
        timeout = TURN_WAIT_S if timeout is None else timeout
        loop = asyncio.get_running_loop()
        if not self.waiting and self.holder in (None, channel):
            self.holder = channel
            self._unanswered += 1
            return
        future = loop.create_future()
        self._queue.append((channel, future))
        if self._watch is None and self.holder is not None:  # the holder's clock runs from now
            self._watch = loop.call_later(TURN_HOLD_S, self._check_hold)
        try:
            await asyncio.wait({future}, timeout=timeout)
        except BaseException:  # cancelled: the channel ended while it waited
            if future.done() and not future.cancelled():
                self.answered(channel)  # handed over meanwhile: passed on
            future.cancel()
            raise
        if not future.done() or future.cancelled():
            future.cancel()
            raise SftpProtocolError(f"another upload to this VM was still being written after {timeout:g} s")

    def answered(self, channel: object) -> None:
        """The VM answered one of `channel`'s requests that needed the turn."""
        if self.holder is channel:
            self._unanswered -= 1
            if self._unanswered <= 0:
                self._pass_on()

    def leave(self, channel: object) -> None:
        """`channel` ended: its waits end; a turn it holds is passed on after TURN_GRACE_S (the
        VM may still be writing what it was sent)."""
        for waiter, future in self._queue:
            if waiter is channel:
                future.cancel()
        if self.holder is channel and self._grace is None:
            self._grace = asyncio.get_running_loop().call_later(TURN_GRACE_S, self._expire, channel)

    def _expire(self, channel: object) -> None:
        self._grace = None
        if self.holder is channel:
            self._pass_on()

    def _check_hold(self) -> None:
        """The holder held the turn TURN_HOLD_S while another waited: it is ended."""
        self._watch = None
        holder = self.holder
        if holder is None or not self.waiting or self._grace is not None:
            return
        reason = f"this channel held the VM's upload turn for over {TURN_HOLD_S:g} s while another upload waited"
        log.warning("SFTP: %s; ending it", reason)
        overrun = getattr(holder, "overrun", None)
        if overrun is not None:
            overrun(reason)
        self.leave(holder)

    def _pass_on(self) -> None:
        self.holder, self._unanswered = None, 0
        for timer in (self._grace, self._watch):
            if timer is not None:
                timer.cancel()
        self._grace = self._watch = None
        while self._queue:
            channel, future = self._queue.popleft()
            if not future.done():
                self.holder, self._unanswered = channel, 1
                future.set_result(None)
                if self.waiting:
                    self._watch = asyncio.get_running_loop().call_later(TURN_HOLD_S, self._check_hold)
                return


class _HeldFile:
    def __init__(self, path: str):
        self.path = path
        self.writes: list[tuple[int, bytes]] = []  # (offset, data) as the client sent them
        self.size = 0  # bytes held
        self.end = 0  # highest offset + length: the file's size once written
        self.refusal: str | None = None  # set when a WRITE was refused: the CLOSE fails too
        self.replay_failed = False


class SftpUploadFilter:
    """One SFTP channel from an operator to a VM, with the content rules of the VM's zone.

    from_operator(data) is async (judging a file talks to clamd) and returns (to_vm, to_operator);
    from_vm(data) returns the bytes for the operator. Call them in the order the bytes arrive, one
    at a time per direction. Each block is reported as every part reports a decision,
    `decision_log.record("content_blocked", **fields)`, with `log_fields` added to the fields."""

    def __init__(self, engine, zone: str | None, decision_log: DecisionLog, *, workload: str | None = None,
                 metrics=None, turn: ReplayTurn | None = None, **log_fields):
        """`turn`: the VM's, shared by all its channels (a filter of its own otherwise)."""
        self.engine = engine
        self.turn = turn if turn is not None else ReplayTurn()
        self.overrun: Callable[[str], None] | None = None  # told when it held the turn too long (ReplayTurn)
        self.refused: Callable[[], None] = lambda: None  # told of each request its rules refuse (a metric)
        self._turn_ids: set[int] = set()  # operator's requests sent under the turn, not answered yet
        self.zone = zone
        self.decision_log = decision_log
        self.metrics = metrics
        self.workload = workload
        self.log_fields = log_fields
        self._from_operator = PacketFramer()
        self._from_vm = PacketFramer()
        self._opening: dict[int, str] = {}  # request id -> path, for OPENs with the WRITE flag
        self._held: dict[bytes, _HeldFile] = {}  # handle -> file being held
        self._own: dict[int, bytes | None] = {}  # our request ids -> the handle of a replayed WRITE
        self._closing: dict[int, _HeldFile] = {}  # operator's CLOSE ids forwarded after a replay
        self._denials: dict[int, tuple[int, bytes]] = {}  # our REMOVE's id -> (CLOSE id, the refusal to send)
        # Ids of the operator's requests not answered yet. An id reused while in flight is refused:
        # answers are told apart only by id, so another request's answer could take a write OPEN's
        # place and its handle would never be held (its WRITEs unjudged).
        self._in_flight: set[int] = set()
        self._next_id = _OWN_IDS
        self._held_bytes = 0
        self.active = engine is not None and engine.inspector(zone, "upload", "sftp") is not None

    def _own_id(self, handle: bytes | None = None) -> int:
        request_id = self._next_id
        self._next_id = _OWN_IDS + (self._next_id + 1 - _OWN_IDS) % 0x0FFFFFFF
        self._own[request_id] = handle
        return request_id

    async def from_operator(self, data: bytes) -> tuple[bytes, bytes]:
        if not self.active:
            return data, b""
        to_vm, to_operator = bytearray(), bytearray()
        for packet in self._from_operator.packets(data):
            kind = packet[0]
            if kind != SSH_FXP_INIT:
                if len(packet) < 5:
                    raise SftpProtocolError("truncated SFTP packet")
                (request_id,) = struct.unpack_from(">I", packet, 1)
                if request_id >= _OWN_IDS:
                    raise SftpProtocolError("request id in skyguard's own range")
                if request_id in self._in_flight:
                    raise SftpProtocolError(f"request id {request_id} reused while in flight")
                if len(self._in_flight) >= MAX_IN_FLIGHT:
                    raise SftpProtocolError(f"more than {MAX_IN_FLIGHT} requests unanswered")
            if kind == SSH_FXP_EXTENDED and read_string(packet, 5)[0] not in PASSED_EXTENSIONS:
                to_operator += self._refuse(request_id, SSH_FX_OP_UNSUPPORTED, "this extended request is not passed")
                continue
            if _sets_size(kind, packet):
                to_operator += self._refuse(request_id, SSH_FX_PERMISSION_DENIED,
                                            "a file's size is set only by writing it whole")
                continue
            written = names_written(kind, packet)
            rule = self.engine.pattern_hit(self.zone, "upload", "sftp", written[1]) if written else None
            if written and rule is not None:
                to_operator += self._name_blocked(request_id, rule, *written)
                continue
            if kind in (SSH_FXP_OPEN, SSH_FXP_WRITE, SSH_FXP_CLOSE):
                if kind == SSH_FXP_OPEN:
                    path, at = read_string(packet, 5)
                    if at + 4 > len(packet):
                        raise SftpProtocolError("truncated SFTP OPEN")
                    (pflags,) = struct.unpack_from(">I", packet, at)
                    if pflags & SSH_FXF_WRITE:
                        if pflags & SSH_FXF_APPEND or not (pflags & SSH_FXF_TRUNC or
                                                           pflags & _NEW_FILE == _NEW_FILE):
                            # What the file already holds, or the order appends land in, would not
                            # be judged with the bytes written: a file put together from pieces
                            # judged apart (`put` half, `reput` the rest).
                            to_operator += self._refuse(request_id, SSH_FX_PERMISSION_DENIED,
                                                        "a file is written whole (no append, resume or "
                                                        "writing into an existing file)")
                            continue
                        self._opening[request_id] = path.decode("utf-8", "replace")[:MAX_PATH_SHOWN]
                        await self._take_turn(request_id)  # it truncates: never amid another channel's replay
                elif kind == SSH_FXP_WRITE:
                    handle, at = read_string(packet, 5)
                    held = self._held.get(handle)
                    if held is not None:
                        if at + 8 > len(packet):
                            raise SftpProtocolError("truncated SFTP WRITE")
                        (offset,) = struct.unpack_from(">Q", packet, at)
                        chunk, _ = read_string(packet, at + 8)
                        to_operator += self._hold(held, request_id, offset, chunk)
                    else:
                        # Every file opened for writing is held from its HANDLE on, so this is a
                        # handle the VM has not answered yet (OpenSSH's are numbered: a client can
                        # guess the next one and write before it is held), one whose OPEN went
                        # unseen, or a read-only one (the VM would refuse the WRITE): never passed.
                        self.refused()
                        to_operator += status_packet(request_id, SSH_FX_FAILURE,
                                                     "skyguard: upload blocked: not a file opened for writing")
                    continue
                else:  # CLOSE
                    handle, _ = read_string(packet, 5)
                    held = self._held.pop(handle, None)
                    if held is not None:
                        vm, operator = await self._judge(held, handle, request_id, packet)
                        to_vm += vm
                        to_operator += operator
                        self._in_flight.add(request_id)  # answered by the VM, or by the refusal
                        continue
            if kind != SSH_FXP_INIT:
                self._in_flight.add(request_id)
            to_vm += struct.pack(">I", len(packet)) + packet
        return bytes(to_vm), bytes(to_operator)

    def _refuse(self, request_id: int, code: int, why: str) -> bytes:
        self.refused()
        return status_packet(request_id, code, f"skyguard: uploads here are judged by content rules: {why}")

    def _name_blocked(self, request_id: int, rule: str, op: str, names: list[bytes]) -> bytes:
        from skyguard.content.inspector import PATTERN, ContentVerdict
        from skyguard.content.record import record_block

        joined = b"\0".join(names)
        verdict = ContentVerdict(True, rule, PATTERN, f"a name it writes matches a blocked pattern (rule {rule})",
                                 len(joined), hashlib.sha256(joined).hexdigest())
        if self.metrics is not None:
            self.metrics.count(self.zone, "sftp", verdict)
        record_block(self.decision_log, verdict, zone=self.zone, workload=self.workload, protocol="sftp",
                     direction="upload", destination=self.workload, request=op, **self.log_fields)
        self.refused()
        return status_packet(request_id, SSH_FX_PERMISSION_DENIED, f"skyguard: upload blocked: {verdict.reason}")

    def _hold(self, held: _HeldFile, request_id: int, offset: int, chunk: bytes) -> bytes:
        limit = self.engine.content.max_inspect_bytes
        if held.refusal is None and (offset + len(chunk) > limit or self._held_bytes + len(chunk) > 2 * limit):
            held.refusal = f"larger than the inspection buffer ({limit} bytes): refused unscanned"
            self._held_bytes -= held.size
            held.writes, held.size = [], 0
        if held.refusal is not None:
            return status_packet(request_id, SSH_FX_FAILURE, f"skyguard: upload blocked: {held.refusal}")
        held.writes.append((offset, chunk))
        held.size += len(chunk)
        held.end = max(held.end, offset + len(chunk))
        self._held_bytes += len(chunk)
        return status_packet(request_id, SSH_FX_OK, "")

    async def _judge(self, held: _HeldFile, handle: bytes, close_id: int, close_packet: bytes) -> tuple[bytes, bytes]:
        from skyguard.content.inspector import UNINSPECTABLE, ContentVerdict, inspect_bytes
        from skyguard.content.record import record_block

        self._held_bytes -= held.size
        if held.refusal is not None:
            rule = self.engine.content.rules_for(self.zone, "upload", "sftp")[0].name
            verdict = ContentVerdict(True, rule, UNINSPECTABLE, held.refusal, held.end, "")
        else:
            image = bytearray(held.end)  # holes read as zeros, as on the VM's disk
            for offset, chunk in held.writes:
                image[offset:offset + len(chunk)] = chunk
            verdict = await inspect_bytes(self.engine, self.zone, "upload", "sftp", bytes(image))
        if self.metrics is not None and verdict is not None:
            self.metrics.count(self.zone, "sftp", verdict)
        if verdict is None or not verdict.blocked:
            # The file is cut to nothing through this handle first: another handle to it (of this
            # channel or another) may have written bytes since this OPEN truncated it, and the
            # file the VM keeps must be the image judged, not it merged with other halves. No
            # other channel truncates or replays until the VM has answered the CLOSE (ReplayTurn).
            await self._take_turn(close_id)
            to_vm = bytearray(make_packet(SSH_FXP_FSETSTAT, self._own_id(handle), sftp_string(handle),
                                      struct.pack(">IQ", SSH_FILEXFER_ATTR_SIZE, 0)))
            for offset, chunk in held.writes:
                to_vm += make_packet(SSH_FXP_WRITE, self._own_id(handle), sftp_string(handle), struct.pack(">Q", offset),
                                 sftp_string(chunk))
            to_vm += struct.pack(">I", len(close_packet)) + close_packet
            self._closing[close_id] = held
            self._held[handle] = held  # marks replay failures until the CLOSE's answer
            return bytes(to_vm), b""
        record_block(self.decision_log, verdict, zone=self.zone, workload=self.workload, protocol="sftp",
                     direction="upload", destination=self.workload, path=held.path, **self.log_fields)
        remove_id = self._own_id()
        cleanup = make_packet(SSH_FXP_CLOSE, self._own_id(), sftp_string(handle)) + \
            make_packet(SSH_FXP_REMOVE, remove_id, sftp_string(held.path.encode()))
        # The operator hears of the refusal once the VM has removed the file: a client that quits
        # on the error (sftp -b) cannot end the channel before the removal ran.
        self._denials[remove_id] = (close_id, status_packet(close_id, SSH_FX_PERMISSION_DENIED,
                                                            f"skyguard: upload blocked: {verdict.reason}"))
        return cleanup, b""

    async def _take_turn(self, request_id: int) -> None:
        await self.turn.take(self)
        self._turn_ids.add(request_id)

    def close(self) -> None:
        """The channel ended: see ReplayTurn.leave."""
        self.turn.leave(self)

    def from_vm(self, data: bytes) -> bytes:
        if not self.active:
            return data
        out = bytearray()
        for packet in self._from_vm.packets(data):
            if packet[0] != SSH_FXP_VERSION and len(packet) >= 5 and request_id_of(packet) not in self._own:
                self._in_flight.discard(request_id_of(packet))  # every answer: STATUS, HANDLE, DATA, NAME, ...
                if request_id_of(packet) in self._turn_ids:  # its OPEN or replay has run on the VM
                    self._turn_ids.discard(request_id_of(packet))
                    self.turn.answered(self)
            if packet[0] in (SSH_FXP_STATUS, SSH_FXP_HANDLE) and len(packet) >= 5:
                request_id = request_id_of(packet)
                if request_id in self._own:  # an answer to skyguard's own request: not the operator's
                    handle = self._own.pop(request_id)
                    close_id, denial = self._denials.pop(request_id, (None, b""))
                    self._in_flight.discard(close_id)
                    out += denial
                    code = struct.unpack_from(">I", packet, 5)[0] if len(packet) >= 9 else SSH_FX_FAILURE
                    if handle is not None and packet[0] == SSH_FXP_STATUS and code != SSH_FX_OK \
                            and handle in self._held:
                        self._held[handle].replay_failed = True
                    continue
                if packet[0] == SSH_FXP_HANDLE and request_id in self._opening:
                    path = self._opening.pop(request_id)
                    handle, _ = read_string(packet, 5)
                    if len(self._held) >= MAX_HELD_FILES:
                        raise SftpProtocolError(f"more than {MAX_HELD_FILES} files open for writing")
                    self._held[handle] = _HeldFile(path)
                elif packet[0] == SSH_FXP_STATUS:
                    self._opening.pop(request_id, None)
                    held = self._closing.pop(request_id, None)
                    if held is not None:
                        self._held = {h: f for h, f in self._held.items() if f is not held}
                        if held.replay_failed:
                            out += status_packet(request_id, SSH_FX_FAILURE, "skyguard: writing the file on the VM failed")
                            continue
            out += struct.pack(">I", len(packet)) + packet
        return bytes(out)


# Requests that write names on the VM: the operation, how many paths it has, which it writes.
NAMING = {SSH_FXP_MKDIR: ("mkdir", 1, (0,)), SSH_FXP_RENAME: ("rename", 2, (1,)), SSH_FXP_SYMLINK: ("symlink", 2, (0, 1)),
          b"posix-rename@openssh.com": ("posix-rename", 2, (1,)), b"hardlink@openssh.com": ("hardlink", 2, (1,))}


def names_written(kind: int, packet: bytes) -> tuple[str, list[bytes]] | None:
    """(operation, the names it writes on the VM) of a request that writes names, else None."""
    fields = Fields(packet)
    if kind == SSH_FXP_OPEN:
        path = fields.string()
        return ("open-write", [path]) if fields.uint32() & SSH_FXF_WRITE else None
    key: int | bytes = fields.string() if kind == SSH_FXP_EXTENDED else kind
    if key not in NAMING:
        return None
    op, count, written = NAMING[key]
    paths = [fields.string() for _ in range(count)]
    return op, [paths[i] for i in written]


def _sets_size(kind: int, packet: bytes) -> bool:
    """A SETSTAT, FSETSTAT or lsetstat@openssh.com whose attributes set a size."""
    if kind == SSH_FXP_EXTENDED:
        name, at = read_string(packet, 5)
        if name != b"lsetstat@openssh.com":
            return False
        _, at = read_string(packet, at)
    elif kind in (SSH_FXP_SETSTAT, SSH_FXP_FSETSTAT):
        _, at = read_string(packet, 5)
    else:
        return False
    if at + 4 > len(packet):
        raise SftpProtocolError("truncated SFTP SETSTAT")
    return bool(struct.unpack_from(">I", packet, at)[0] & SSH_FILEXFER_ATTR_SIZE)


class SftpFilterPump:
    """Drives one SftpUploadFilter from an SSH session's callbacks, which are synchronous: bytes
    from the operator queue up and are filtered in order by one task, with the operator's channel
    paused meanwhile (so the queue stays short); bytes from the VM are filtered at once. A stream
    the filter cannot follow ends the session (fail closed)."""

    def __init__(self, upload_filter: SftpUploadFilter, write_vm, write_operator, pause, resume, fail, write_vm_eof):
        self.filter = upload_filter
        self.write_vm, self.write_operator = write_vm, write_operator
        self.pause, self.resume, self.fail, self.write_vm_eof = pause, resume, fail, write_vm_eof
        self._eof = False  # the operator sent EOF: passed on once the queue is drained
        self._closed = False  # the session ended (close())
        self._queue: list[bytes] = []
        self._task: Any = None  # the asyncio task draining the queue, while there is one
        upload_filter.overrun = lambda reason: self.fail(f"skyguard: SFTP stream ended: {reason}")

    def from_operator(self, data: bytes) -> None:
        import asyncio

        self._queue.append(data)
        if self._task is None:
            self.pause()
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._queue:
                to_vm, to_operator = await self.filter.from_operator(self._queue.pop(0))
                if to_vm:
                    self.write_vm(to_vm)
                if to_operator:
                    self.write_operator(to_operator)
        except SftpProtocolError as error:
            self._queue.clear()
            self.fail(f"skyguard: SFTP stream refused: {error}")
        finally:
            self._task = None
            if not self._closed:
                self.resume()
                if self._eof:
                    self.write_vm_eof()

    def close(self) -> None:
        """The session ended: what is queued is dropped, a wait for the VM's turn ends."""
        self._closed = True
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()
        self.filter.close()

    def eof(self) -> None:
        """The operator's EOF, after the bytes queued before it."""
        if self._task is None:
            self.write_vm_eof()
        else:
            self._eof = True

    def from_vm(self, data: bytes) -> bytes:
        try:
            return self.filter.from_vm(data)
        except SftpProtocolError as error:
            self.fail(f"skyguard: SFTP stream refused: {error}")
            return b""


def uploads_judged(engine, zone: str) -> bool:
    """Whether content rules cover SFTP uploads to `zone` (`engine`: the proxy's content_engine)."""
    return engine is not None and bool(engine.content.rules_for(zone, "upload", "sftp"))


def upload_pump(session, workload) -> SftpFilterPump | None:
    """The pump for an SFTP session of the access proxy (admin/session.py's ProxySession) on a VM
    of `workload`'s zone, or None when no content rule covers SFTP uploads there."""
    engine = session.proxy.content_engine  # the policy's rules, compiled once (AdminSshProxy)
    if not uploads_judged(engine, workload.zone):
        return None
    recording = session.recording
    # The proxy's record() is its DecisionLog (a failing log is reported, not raised); who and
    # which recorded session go into every block's fields.
    upload_filter = SftpUploadFilter(engine, workload.zone, session.proxy, workload=workload.name,
                                     metrics=session.proxy.metrics.content, turn=session.proxy.sftp_turn(workload.name),
                                     operator=session.owner.operator_name, session=recording.id if recording else None)
    # Its own answers reach the operator through the log gate's view too (which names handles from answers).
    upload_filter.refused = lambda: session.proxy.metrics.sftp_refused.labels("content_rules").inc()
    return SftpFilterPump(upload_filter, lambda data: session.vm_chan.write(data),
                          lambda data: session.chan.write(session.sftp_log.from_vm(data) if session.sftp_log else data),
                          lambda: session.operator_reading.hold("sftp"), lambda: session.operator_reading.release("sftp"),
                          lambda message: session.end_with_message(message + "\r\n", 255, "sftp_refused"),
                          lambda: session.vm_chan.write_eof())
