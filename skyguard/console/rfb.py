"""The RFB (VNC) protocol as the console proxy needs it: message framing in both directions, the
pixel format, and VNC authentication's DES response. Protocol only: the readers take any object
with `async readexactly(n)` (an asyncio.StreamReader; tests feed one by hand), and nothing here
opens a socket or decides policy (proxy.py and session.py do).

RFC 6143 is the reference. skyguard keeps the protocol small on purpose: it lets through only the
encodings its recorder decodes (Raw, CopyRect and the DesktopSize pseudo-encoding; Raw is always
allowed), so every client extension that needs a pseudo-encoding the server acknowledged (fences,
continuous updates, QEMU key events, ...) never starts, and any message type outside RFC 6143's
core is a protocol error that ends that one session.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from skyguard.errors import AdminError

VERSION_3_8 = b"RFB 003.008\n"
SECURITY_NONE, SECURITY_VNC = 1, 2

# Client -> server message types (RFC 6143 7.5).
SET_PIXEL_FORMAT, SET_ENCODINGS, FB_UPDATE_REQUEST, KEY_EVENT, POINTER_EVENT, CLIENT_CUT_TEXT = 0, 2, 3, 4, 5, 6
# Server -> client message types (RFC 6143 7.6).
FB_UPDATE, SET_COLOUR_MAP, BELL, SERVER_CUT_TEXT = 0, 1, 2, 3

ENC_RAW, ENC_COPYRECT, ENC_DESKTOP_SIZE = 0, 1, -223
ALLOWED_ENCODINGS = (ENC_RAW, ENC_COPYRECT, ENC_DESKTOP_SIZE)  # what recording.py can decode

MAX_CUT_TEXT = 1 << 20  # bytes of clipboard in one message: text, not files
MAX_ENCODINGS = 256  # a client lists a few dozen at most
MAX_SIZE = 16384  # framebuffer width/height limit: a 16k x 16k x 4 update is 1 GiB already
MAX_NAME = 4096


class RfbError(AdminError):
    """A peer broke the protocol (or used a part skyguard does not let through). Ends that session."""


@dataclass(frozen=True)
class PixelFormat:
    bits_per_pixel: int
    depth: int
    big_endian: bool
    true_colour: bool
    red_max: int
    green_max: int
    blue_max: int
    red_shift: int
    green_shift: int
    blue_shift: int

    _STRUCT = struct.Struct(">BBBBHHHBBB3x")

    @classmethod
    def unpack(cls, data: bytes) -> PixelFormat:
        bpp, depth, be, tc, rmax, gmax, bmax, rs, gs, bs = cls._STRUCT.unpack(data)
        return cls(bpp, depth, bool(be), bool(tc), rmax, gmax, bmax, rs, gs, bs)

    def pack(self) -> bytes:
        return self._STRUCT.pack(self.bits_per_pixel, self.depth, self.big_endian, self.true_colour,
                                 self.red_max, self.green_max, self.blue_max,
                                 self.red_shift, self.green_shift, self.blue_shift)

    @property
    def bytes_per_pixel(self) -> int:
        return self.bits_per_pixel // 8

    def check(self) -> PixelFormat:
        """Only true-colour formats of 8, 16 or 32 bits: colour maps would need the map's history
        to replay a recording, and no current client asks for one."""
        if self.bits_per_pixel not in (8, 16, 32) or not self.true_colour:
            raise RfbError(f"pixel format of {self.bits_per_pixel} bits, true colour {self.true_colour}: "
                           "skyguard relays only true-colour formats of 8, 16 or 32 bits")
        return self

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class ClientMessage:
    type: int
    raw: bytes  # the whole message, as it would be forwarded
    key_down: bool = False
    text_length: int = 0  # ClientCutText
    pixel_format: PixelFormat | None = None
    encodings: tuple[int, ...] = ()


@dataclass
class ServerMessage:
    type: int
    raw: bytes
    text_length: int = 0  # ServerCutText
    new_size: tuple[int, int] | None = None  # a DesktopSize rectangle in this update


@dataclass(frozen=True)
class ServerInit:
    width: int
    height: int
    pixel_format: PixelFormat
    name: bytes

    @property
    def raw(self) -> bytes:
        return struct.pack(">HH", self.width, self.height) + self.pixel_format.pack() + \
            struct.pack(">I", len(self.name)) + self.name


def vnc_auth_response(password: bytes, challenge: bytes) -> bytes:
    """VNC authentication (RFC 6143 7.2.2): the 16-byte challenge DES-encrypted with the password
    (first 8 bytes, zero-padded) as key, each key byte's bits reversed, as every VNC does.
    Single DES is what the protocol specifies; TripleDES with the key repeated is single DES."""
    if len(challenge) != 16:
        raise RfbError("a VNC challenge is 16 bytes")
    key = bytes(int(f"{b:08b}"[::-1], 2) for b in password[:8].ljust(8, b"\0"))
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(challenge) + encryptor.finalize()


def parse_version(data: bytes) -> tuple[int, int]:
    if len(data) != 12 or data[:4] != b"RFB " or data[7:8] != b"." or data[11:] != b"\n" \
            or not data[4:7].isdigit() or not data[8:11].isdigit():
        raise RfbError("not an RFB protocol version line (is this a VNC peer?)")
    return int(data[4:7]), int(data[8:11])


async def read_server_init(reader) -> ServerInit:
    head = await reader.readexactly(24)
    width, height = struct.unpack(">HH", head[:4])
    if width > MAX_SIZE or height > MAX_SIZE:  # as for DesktopSize: bounds every later rectangle
        raise RfbError(f"desktop size {width}x{height} out of range (at most {MAX_SIZE} each way)")
    (name_length,) = struct.unpack(">I", head[20:24])
    if name_length > MAX_NAME:
        raise RfbError(f"desktop name of {name_length} bytes (at most {MAX_NAME})")
    return ServerInit(width, height, PixelFormat.unpack(head[4:20]).check(), await reader.readexactly(name_length))


async def read_client_message(reader) -> ClientMessage:
    kind = (await reader.readexactly(1))[0]
    if kind == SET_PIXEL_FORMAT:
        rest = await reader.readexactly(19)
        return ClientMessage(kind, bytes([kind]) + rest, pixel_format=PixelFormat.unpack(rest[3:]).check())
    if kind == SET_ENCODINGS:
        head = await reader.readexactly(3)
        (count,) = struct.unpack(">H", head[1:])
        if count > MAX_ENCODINGS:
            raise RfbError(f"SetEncodings lists {count} encodings (at most {MAX_ENCODINGS})")
        body = await reader.readexactly(4 * count)
        return ClientMessage(kind, bytes([kind]) + head + body,
                             encodings=struct.unpack(f">{count}i", body))
    if kind == FB_UPDATE_REQUEST:
        return ClientMessage(kind, bytes([kind]) + await reader.readexactly(9))
    if kind == KEY_EVENT:
        rest = await reader.readexactly(7)
        return ClientMessage(kind, bytes([kind]) + rest, key_down=rest[0] != 0)
    if kind == POINTER_EVENT:
        return ClientMessage(kind, bytes([kind]) + await reader.readexactly(5))
    if kind == CLIENT_CUT_TEXT:
        head = await reader.readexactly(7)
        length = _cut_length(head[3:])
        return ClientMessage(kind, bytes([kind]) + head + await reader.readexactly(length), text_length=length)
    raise RfbError(f"client message type {kind} is not one skyguard relays")


def set_encodings(encodings) -> bytes:
    return struct.pack(f">BxH{len(encodings)}i", SET_ENCODINGS, len(encodings), *encodings)


def allowed_encodings(asked: tuple[int, ...]) -> tuple[int, ...]:
    """The client's encodings, in its order of preference, less those the recorder cannot decode."""
    kept = tuple(e for e in dict.fromkeys(asked) if e in ALLOWED_ENCODINGS)
    return kept if ENC_RAW in kept else kept + (ENC_RAW,)


async def read_server_message(reader, pixel_format: PixelFormat, size: tuple[int, int],
                              kind: int | None = None) -> ServerMessage:
    """One server -> client message. `size` is the framebuffer's current (width, height):
    rectangles must lie inside it. `kind`: the message type, when the caller read it already (to
    decide the pixel format once the message has begun)."""
    if kind is None:
        kind = (await reader.readexactly(1))[0]
    if kind == FB_UPDATE:
        head = await reader.readexactly(3)
        (count,) = struct.unpack(">H", head[1:])
        parts = [bytes([kind]), head]
        new_size = None
        width, height = size
        for _ in range(count):
            rect = await reader.readexactly(12)
            x, y, w, h, encoding = struct.unpack(">HHHHi", rect)
            parts.append(rect)
            if encoding == ENC_DESKTOP_SIZE:
                if not (0 < w <= MAX_SIZE and 0 < h <= MAX_SIZE):
                    raise RfbError(f"desktop size {w}x{h} out of range")
                new_size = width, height = w, h
                continue
            if x + w > width or y + h > height:
                raise RfbError(f"rectangle {w}x{h}+{x}+{y} lies outside the {width}x{height} framebuffer")
            if encoding == ENC_RAW:
                parts.append(await reader.readexactly(w * h * pixel_format.bytes_per_pixel))
            elif encoding == ENC_COPYRECT:
                src = await reader.readexactly(4)
                sx, sy = struct.unpack(">HH", src)
                if sx + w > width or sy + h > height:
                    raise RfbError("CopyRect source lies outside the framebuffer")
                parts.append(src)
            else:
                raise RfbError(f"the server used encoding {encoding}, which was not negotiated")
        return ServerMessage(kind, b"".join(parts), new_size=new_size)
    if kind == SET_COLOUR_MAP:
        head = await reader.readexactly(5)
        (count,) = struct.unpack(">H", head[3:])
        return ServerMessage(kind, bytes([kind]) + head + await reader.readexactly(6 * count))
    if kind == BELL:
        return ServerMessage(kind, bytes([kind]))
    if kind == SERVER_CUT_TEXT:
        head = await reader.readexactly(7)
        length = _cut_length(head[3:])
        return ServerMessage(kind, bytes([kind]) + head + await reader.readexactly(length), text_length=length)
    raise RfbError(f"server message type {kind} is not one skyguard relays")


def _cut_length(data: bytes) -> int:
    # A negative length (the top bit) is the extended clipboard extension, never negotiated here.
    (length,) = struct.unpack(">i", data)
    if not 0 <= length <= MAX_CUT_TEXT:
        raise RfbError(f"clipboard message of length {length} (0 to {MAX_CUT_TEXT} bytes allowed)")
    return length


def security_failure(reason: str) -> bytes:
    """A SecurityResult 'failed' with its reason (RFB 3.8)."""
    text = reason.encode()
    return struct.pack(">II", 1, len(text)) + text
