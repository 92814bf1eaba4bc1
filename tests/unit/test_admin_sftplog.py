"""The SFTP log gate (skyguard/admin/sftplog.py) without sockets: which requests name a file, that
they go on in order once their entry is durable, and that one the log refuses never goes on but is
answered between the VM's packets. The real OpenSSH client against a real daemon whose log refuses
is test_admin_daemon.py's."""

from __future__ import annotations

import asyncio
import struct
from concurrent.futures import Future

import pytest

from skyguard.admin.sftplog import LOG_REFUSED_WORDS, FileRequest, Refused, SftpLogGate, file_request
from skyguard.admin.sftpwire import SftpProtocolError
from skyguard.tlog.errors import LogSpaceLow


def string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def packet(kind: int, request_id: int, path: bytes = b"", tail: bytes = b"") -> bytes:
    body = bytes([kind]) + struct.pack(">I", request_id) + string(path) + tail
    return struct.pack(">I", len(body)) + body


def extended(request_id: int, name: bytes, *fields: bytes) -> bytes:
    return packet(200, request_id, name, b"".join(fields))


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
        self.counted, self.unsupported = [], []

    def log_request(self, request):
        if request.path in self.refuse:
            raise LogSpaceLow("the signed log at /x refuses new entries: its filesystem has 1 bytes free")
        self.logged.append(request)
        done: Future = Future()
        done.set_result(None)
        return done

    def gate(self) -> SftpLogGate:
        def forward(data):
            self.to_vm += data

        def answer(data):
            self.answers += data

        return SftpLogGate(self.log_request, lambda request, refused: self.notes.append((str(request), refused)),
                           forward, answer, self.told.append, lambda: None, lambda: None, self.failed.append,
                           lambda: None, "alice on dc1", count=self.counted.append, unsupported=self.unsupported.append)


async def fed(gate: SftpLogGate, stream: bytes, piece: int) -> None:
    for at in range(0, len(stream), piece):
        gate.from_operator(stream[at:at + piece])
        await asyncio.sleep(0)
    while gate.draining:
        await asyncio.sleep(0)


def test_file_requests_are_read_from_whole_packets():
    assert [file_request(p[4:]) for p in (OPEN_READ, OPEN_WRITE, REMOVE, READ, INIT)] == [
        FileRequest("open-read", "/etc/passwd"), FileRequest("open-write", "/tmp/upload"), FileRequest("remove", "/tmp/old"),
        None, None]


MODE_644 = struct.pack(">II", 0x04, 0o100644)
UNSUPPORTED = Refused(8, "skyguard: this SFTP request is not passed (skyguard cannot put it on record)", "unsupported",
                      "extended request 'evil@example.com'")
# (description, packet, what the gate makes of it), the wire formats of OpenSSH's PROTOCOL
REQUESTS = [
    ("rename", packet(18, 1, b"/a", string(b"/b")), FileRequest("rename", "/a", "/b")),
    ("symlink: target, then the link", packet(20, 1, b"/etc/shadow", string(b"/tmp/s")),
     FileRequest("symlink", "/etc/shadow", "/tmp/s")),
    ("posix-rename", extended(1, b"posix-rename@openssh.com", string(b"/a"), string(b"/b")),
     FileRequest("posix-rename", "/a", "/b")),
    ("hardlink", extended(1, b"hardlink@openssh.com", string(b"/etc/shadow"), string(b"/tmp/h")),
     FileRequest("hardlink", "/etc/shadow", "/tmp/h")),
    ("setstat", packet(9, 1, b"/a", struct.pack(">IQIIIIII", 0x0F, 0, 0, 0, 0o4755, 1, 2, 0)),
     FileRequest("setstat", "/a", attrs={"size": 0, "uid": 0, "gid": 0, "mode": "4755", "atime": 1, "mtime": 2})),
    ("lsetstat", extended(1, b"lsetstat@openssh.com", string(b"/l"), MODE_644),
     FileRequest("lsetstat", "/l", attrs={"mode": "0644"})),
    ("mkdir", packet(14, 1, b"/d", MODE_644), FileRequest("mkdir", "/d", attrs={"mode": "0644"})),
    ("statvfs", extended(1, b"statvfs@openssh.com", string(b"/")), FileRequest("statvfs", "/")),
    ("limits", extended(1, b"limits@openssh.com"), None),
    ("expand-path", extended(1, b"expand-path@openssh.com", string(b"~/x")), None),
    ("fsync", extended(1, b"fsync@openssh.com", string(b"\0\0\0\1")), None),
    ("realpath", packet(16, 1, b"."), None),
    ("an unknown extension", extended(1, b"evil@example.com", string(b"/a")), UNSUPPORTED),
    ("a type of no version 3", packet(21, 1, b"/a", string(b"/b")),
     Refused(8, UNSUPPORTED.words, "unsupported", "request type 21")),
    ("copy-data, handles not known", extended(1, b"copy-data", string(b"h1"), bytes(16), string(b"h2"), bytes(8)),
     Refused(4, "skyguard: not done: the file of this handle is not known here (open it again)", "unknown_handle",
             "copy-data on an unknown handle")),
]


@pytest.mark.parametrize("data,expected", [(p, e) for _, p, e in REQUESTS], ids=[d for d, _, _ in REQUESTS])
def test_each_request_is_read_as_what_it_does_to_files(data, expected):
    assert file_request(data[4:]) == expected


@pytest.mark.parametrize("data", [packet(18, 1, b"/a"), extended(1, b"hardlink@openssh.com", string(b"/a")),
                                  packet(9, 1, b"/a", struct.pack(">I", 0x04))], ids=["rename", "hardlink", "setstat"])
def test_a_request_cut_short_cannot_be_read(data):
    with pytest.raises(SftpProtocolError):
        file_request(data[4:])


def handle_answer(request_id: int, handle: bytes) -> bytes:
    body = bytes([102]) + struct.pack(">I", request_id) + string(handle)
    return struct.pack(">I", len(body)) + body


def test_requests_on_handles_are_named_by_the_files_their_opens_named():
    """copy-data and FSETSTAT name handles: the gate names them from the OPENs the VM answered;
    one it cannot name (not answered, closed, or its OPEN's id reused in flight) is refused."""
    session = Session()
    gate = session.gate()
    copy = extended(9, b"copy-data", string(b"H1"), bytes(16), string(b"H2"), bytes(8))
    chmod = packet(10, 10, b"H2", MODE_644)
    asyncio.run(fed(gate, INIT + OPEN_READ + OPEN_WRITE + copy, 1000))  # not answered yet
    assert copy not in session.to_vm and session.counted == ["unknown_handle"]
    assert gate.from_vm(handle_answer(1, b"H1") + handle_answer(2, b"H2"))
    asyncio.run(fed(gate, copy + chmod, 1000))
    assert session.to_vm.endswith(copy + chmod)
    assert session.logged[-2:] == [FileRequest("copy-data", "/etc/passwd", "/tmp/upload"),
                                   FileRequest("fsetstat", "/tmp/upload", attrs={"mode": "0644"})]
    reused = packet(3, 20, b"/a", bytes(8)), packet(3, 20, b"/b", bytes(8))
    asyncio.run(fed(gate, packet(4, 11, b"H2") + b"".join(reused) + chmod, 1000))  # closed: H2 not known
    gate.from_vm(handle_answer(20, b"H2") + handle_answer(20, b"H3"))  # which is /a, which /b?
    asyncio.run(fed(gate, chmod, 1000))
    assert session.counted == ["unknown_handle"] * 3


def test_an_unsupported_request_never_reaches_the_vm_and_is_reported_once():
    session = Session()
    gate = session.gate()
    evil = extended(5, b"evil@example.com", string(b"/a"))
    asyncio.run(fed(gate, INIT + evil + evil + READ, 1000))
    assert session.to_vm == INIT + READ and session.counted == ["unsupported"] * 2
    assert session.unsupported == ["extended request 'evil@example.com'"]
    assert session.answers.count(struct.pack(">BII", 101, 5, 8)) == 2  # OP_UNSUPPORTED, twice


def test_requests_split_anyhow_are_logged_and_go_on_in_order():
    session = Session()
    gate = session.gate()
    stream = INIT + OPEN_READ + OPEN_WRITE + REMOVE + READ
    asyncio.run(fed(gate, stream, 7))
    assert session.to_vm == stream
    assert [str(r) for r in session.logged] == ["open-read of '/etc/passwd'", "open-write of '/tmp/upload'",
                                                "remove of '/tmp/old'"]
    assert not session.answers and not session.failed


def test_a_request_the_log_refuses_never_reaches_the_vm_and_is_answered_between_the_vms_packets():
    session = Session(refuse={"/tmp/upload"})
    gate = session.gate()
    vm_packet = struct.pack(">IBI", 9, 101, 1) + struct.pack(">I", 0)  # a STATUS for request 1
    assert gate.from_vm(vm_packet[:6]) == vm_packet[:6]  # the VM is in the middle of a packet

    asyncio.run(fed(gate, INIT + OPEN_READ + OPEN_WRITE + READ, 1000))
    assert session.to_vm == INIT + OPEN_READ + READ  # the refused OPEN is not passed
    assert session.notes == [("open-read of '/etc/passwd'", False), ("open-write of '/tmp/upload'", True)]
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
