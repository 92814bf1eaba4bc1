"""Reads the file names out of an SFTP client's request stream, for the session log.

Sans-io: feed() takes the bytes the operator's client sends on an SFTP channel, in whatever
pieces they arrive, and returns (operation, path) for each request that names a file. It never
changes or blocks the stream and does not implement SFTP; a malformed stream just stops yielding
names (the VM's sftp-server is the one that rejects it). Packet layout from
draft-ietf-secsh-filexfer-02 (the version OpenSSH speaks): uint32 length, byte type, then fields.
"""

from __future__ import annotations

import struct

# Request types that carry a path as their first field after the request id.
_PATH_REQUESTS = {3: "open", 11: "opendir", 13: "remove", 14: "mkdir", 15: "rmdir",
                  17: "stat", 18: "rename", 20: "symlink", 7: "lstat", 9: "setstat", 19: "readlink"}
_INIT = 1
MAX_PACKET = 256 * 1024  # OpenSSH's limit; beyond it the parser stops (it is only watching)
MAX_PATH_SHOWN = 1024


class SftpRequestWatcher:
    def __init__(self):
        self._buffer = bytearray()
        self._broken = False

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        if self._broken:
            return []
        self._buffer += data
        found = []
        while len(self._buffer) >= 5:
            (length,) = struct.unpack_from(">I", self._buffer)
            if length < 1 or length > MAX_PACKET:
                self._broken = True
                self._buffer.clear()
                break
            if len(self._buffer) < 4 + length:
                break
            packet = bytes(self._buffer[4:4 + length])
            del self._buffer[:4 + length]
            op = _PATH_REQUESTS.get(packet[0])
            if op is None or len(packet) < 9:
                continue
            (path_len,) = struct.unpack_from(">I", packet, 5)
            path = packet[9:9 + min(path_len, MAX_PATH_SHOWN)].decode("utf-8", "replace")
            if op == "open" and len(packet) >= 9 + path_len + 4:
                (pflags,) = struct.unpack_from(">I", packet, 9 + path_len)
                op = "open-write" if pflags & 0x02 else "open-read"  # SSH_FXF_WRITE
            found.append((op, path))
        return found
