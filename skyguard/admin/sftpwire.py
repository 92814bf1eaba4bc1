"""SFTP packets as the access proxy reads and makes them (draft-ietf-secsh-filexfer-02, version 3,
what OpenSSH speaks): uint32 length, byte type, uint32 request id (but INIT and VERSION), then
fields; OpenSSH's extensions as its PROTOCOL file says. Sans-io: the packet framer, the field
reader, the status answers skyguard sends itself. Not here: what the packets mean to skyguard (the
log gate, sftplog.py; the upload filter, sftp.py).
"""

from __future__ import annotations

import struct
from typing import Any

MAX_PACKET = 256 * 1024  # OpenSSH's limit on an SFTP message
MAX_PATH_SHOWN = 1024  # characters of a path in a log entry
MAX_NAME_SHOWN = 64  # characters of an extension's (or an extended attribute's) name in a log entry

SSH_FXP_INIT, SSH_FXP_VERSION, SSH_FXP_OPEN, SSH_FXP_CLOSE, SSH_FXP_WRITE = 1, 2, 3, 4, 6
SSH_FXP_LSTAT, SSH_FXP_SETSTAT, SSH_FXP_FSETSTAT, SSH_FXP_OPENDIR, SSH_FXP_REMOVE = 7, 9, 10, 11, 13
SSH_FXP_MKDIR, SSH_FXP_RMDIR, SSH_FXP_STAT, SSH_FXP_RENAME, SSH_FXP_READLINK, SSH_FXP_SYMLINK = 14, 15, 17, 18, 19, 20
SSH_FXP_STATUS, SSH_FXP_HANDLE, SSH_FXP_EXTENDED = 101, 102, 200
SSH_FX_OK, SSH_FX_FAILURE, SSH_FX_PERMISSION_DENIED, SSH_FX_OP_UNSUPPORTED = 0, 4, 3, 8
SSH_FILEXFER_ATTR_SIZE = 0x01
SSH_FXF_WRITE, SSH_FXF_APPEND, SSH_FXF_CREAT, SSH_FXF_TRUNC, SSH_FXF_EXCL = 0x02, 0x04, 0x08, 0x10, 0x20


class SftpProtocolError(Exception):
    """The operator's SFTP stream cannot be followed: the channel must end (fail closed)."""


def read_string(packet: bytes, at: int) -> tuple[bytes, int]:
    if at + 4 > len(packet):
        raise SftpProtocolError("truncated SFTP packet")
    (length,) = struct.unpack_from(">I", packet, at)
    end = at + 4 + length
    if end > len(packet):
        raise SftpProtocolError("truncated SFTP packet")
    return packet[at + 4:end], end


def request_id_of(packet: bytes) -> int:
    return struct.unpack_from(">I", packet, 1)[0]


def make_packet(kind: int, request_id: int, *fields: bytes) -> bytes:
    body = bytes([kind]) + struct.pack(">I", request_id) + b"".join(fields)
    return struct.pack(">I", len(body)) + body


def sftp_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def status_packet(request_id: int, code: int, message: str) -> bytes:
    return make_packet(SSH_FXP_STATUS, request_id, struct.pack(">I", code), sftp_string(message.encode()),
                   sftp_string(b"en"))


class PacketFramer:
    """Whole SFTP packets out of a byte stream."""

    def __init__(self):
        self.buffer = bytearray()

    def packets(self, data: bytes) -> list[bytes]:
        self.buffer += data
        out = []
        while len(self.buffer) >= 4:
            (length,) = struct.unpack_from(">I", self.buffer)
            if length < 1 or length > MAX_PACKET + 1024:
                raise SftpProtocolError(f"SFTP packet of {length} bytes")
            if len(self.buffer) < 4 + length:
                break
            out.append(bytes(self.buffer[4:4 + length]))
            del self.buffer[:4 + length]
        return out


class Fields:
    """The fields of one request packet after its request id; a field cut short is SftpProtocolError."""

    def __init__(self, packet: bytes, at: int = 5):
        self.packet, self.at = packet, at

    def string(self) -> bytes:
        value, self.at = read_string(self.packet, self.at)
        return value

    def path(self) -> str:
        """A path as logged: UTF-8 (else replaced), at most MAX_PATH_SHOWN characters."""
        return self.string()[:MAX_PATH_SHOWN * 4].decode("utf-8", "replace")[:MAX_PATH_SHOWN]

    def uint32(self) -> int:
        return self._take(">I", 4)[0]

    def uint64(self) -> int:
        return self._take(">Q", 8)[0]

    def attrs(self) -> dict:
        """ATTRS (filexfer-02 5): what is set, mode as octal digits."""
        flags, out = self.uint32(), dict[str, Any]()
        if flags & 0x01:
            out["size"] = self.uint64()
        if flags & 0x02:
            out["uid"], out["gid"] = self.uint32(), self.uint32()
        if flags & 0x04:
            out["mode"] = f"{self.uint32() & 0o7777:04o}"
        if flags & 0x08:
            out["atime"], out["mtime"] = self.uint32(), self.uint32()
        if flags & 0x80000000:
            names = []
            for _ in range(self.uint32()):  # a count past the packet's end is cut short below
                name, _value = self.string(), self.string()
                names.append(name[:MAX_NAME_SHOWN].decode("ascii", "replace"))
            out["extended"] = names[:16]
        return out

    def _take(self, layout: str, size: int) -> tuple:
        if self.at + size > len(self.packet):
            raise SftpProtocolError("truncated SFTP packet")
        self.at += size
        return struct.unpack_from(layout, self.packet, self.at - size)
