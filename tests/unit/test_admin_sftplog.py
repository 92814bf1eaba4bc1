"""The SFTP log gate (skyguard/admin/sftplog.py) without sockets: which requests name a file, that
they go on in order once their entry is durable, and that one the log refuses never goes on but is
answered between the VM's packets. The real OpenSSH client against a real daemon whose log refuses
is test_admin_daemon.py's."""

from __future__ import annotations

import asyncio
import struct
from concurrent.futures import Future

from skyguard.admin.sftplog import LOG_REFUSED_WORDS, SftpLogGate, file_request
from skyguard.tlog.errors import LogSpaceLow


def packet(kind: int, request_id: int, path: bytes = b"", tail: bytes = b"") -> bytes:
    body = bytes([kind]) + struct.pack(">I", request_id) + struct.pack(">I", len(path)) + path + tail
    return struct.pack(">I", len(body)) + body


INIT = struct.pack(">IBI", 5, 1, 3)
OPEN_READ = packet(3, 1, b"/etc/passwd", struct.pack(">I", 0x01) + bytes(4))
OPEN_WRITE = packet(3, 2, b"/tmp/upload", struct.pack(">I", 0x1A) + bytes(4))
REMOVE = packet(13, 3, b"/tmp/old")
READ = packet(5, 4, b"handle")  # names a handle, not a file


class Session:
    """What the gate talks to, recorded. `refuse`: the paths whose entry the log refuses."""

    def __init__(self, refuse=()):
        self.refuse = set(refuse)
        self.logged, self.notes, self.to_vm, self.answers, self.told, self.failed = [], [], b"", b"", [], []

    def log_request(self, op, path):
        if path in self.refuse:
            raise LogSpaceLow("the signed log at /x refuses new entries: its filesystem has 1 bytes free")
        self.logged.append((op, path))
        done: Future = Future()
        done.set_result(None)
        return done

    def gate(self) -> SftpLogGate:
        def forward(data):
            self.to_vm += data

        def answer(data):
            self.answers += data

        return SftpLogGate(self.log_request, lambda op, path, refused: self.notes.append((op, path, refused)),
                           forward, answer, self.told.append, lambda: None, lambda: None, self.failed.append,
                           lambda: None, "alice on dc1")


async def fed(gate: SftpLogGate, stream: bytes, piece: int) -> None:
    for at in range(0, len(stream), piece):
        gate.from_operator(stream[at:at + piece])
        await asyncio.sleep(0)
    while gate.draining:
        await asyncio.sleep(0)


def test_file_requests_are_read_from_whole_packets():
    assert [file_request(p[4:]) for p in (OPEN_READ, OPEN_WRITE, REMOVE, READ, INIT)] == [
        ("open-read", "/etc/passwd"), ("open-write", "/tmp/upload"), ("remove", "/tmp/old"), None, None]


def test_requests_split_anyhow_are_logged_and_go_on_in_order():
    session = Session()
    gate = session.gate()
    stream = INIT + OPEN_READ + OPEN_WRITE + REMOVE + READ
    asyncio.run(fed(gate, stream, 7))
    assert session.to_vm == stream
    assert session.logged == [("open-read", "/etc/passwd"), ("open-write", "/tmp/upload"), ("remove", "/tmp/old")]
    assert not session.answers and not session.failed


def test_a_request_the_log_refuses_never_reaches_the_vm_and_is_answered_between_the_vms_packets():
    session = Session(refuse={"/tmp/upload"})
    gate = session.gate()
    vm_packet = struct.pack(">IBI", 9, 101, 1) + struct.pack(">I", 0)  # a STATUS for request 1
    assert gate.from_vm(vm_packet[:6]) == vm_packet[:6]  # the VM is in the middle of a packet

    asyncio.run(fed(gate, INIT + OPEN_READ + OPEN_WRITE + READ, 1000))
    assert session.to_vm == INIT + OPEN_READ + READ  # the refused OPEN is not passed
    assert session.notes == [("open-read", "/etc/passwd", False), ("open-write", "/tmp/upload", True)]
    assert session.answers == b""  # not amid the VM's packet
    carried = gate.from_vm(vm_packet[6:])
    assert carried.startswith(vm_packet[6:])
    answer = carried[len(vm_packet) - 6:]
    (length, kind, request_id, code) = struct.unpack_from(">IBII", answer)
    assert (length + 4, kind, request_id, code) == (len(answer), 101, 2, 3)  # PERMISSION_DENIED to request 2
    assert LOG_REFUSED_WORDS.encode() in answer
    assert session.told and "/tmp/upload" in session.told[0] and "signed log refuses" in session.told[0]


def test_a_stream_that_cannot_be_framed_ends_the_session():
    session = Session()
    asyncio.run(fed(session.gate(), b"\xff\xff\xff\xff garbage", 100))
    assert session.failed and not session.to_vm
