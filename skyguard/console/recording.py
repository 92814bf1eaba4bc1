"""Recording of VNC console sessions, and rendering a recording's frames to PNG.

A session's files sit beside the SSH sessions' in `<state>/admin/sessions/` (one archive, so
`skyguard admin sessions` lists both, and the SSH archive's verify, recovery and log entries serve
both): `ID.json` is the same metadata record (kind "vnc", plus a `console` object), `ID.vnc` the
recording, in this open format (all integers big-endian):

    line 1   a JSON header and "\\n": {"format": "skyguard-vnc-recording", "version": 1, "id",
             "operator", "target", "workload", "start", "width", "height", "pixel_format": {...},
             "desktop_name"}
    then     records, each: kind (u8), time in seconds since the start (IEEE float64),
             payload length (u32), payload:
               1  a server -> client RFB message exactly as relayed (FramebufferUpdate, Bell, ...)
               2  a new pixel format (16 bytes, RFC 6143 7.4), from then on
               3  an event as JSON: clipboard (direction, bytes, allowed), end (result)

Each record is written through as it happens, by the recording's own thread (admin/transcript.py:
never on the event loop, in order, bounded; the session waits while it is behind): a killed proxy
leaves a recording complete up to then, which recovery hashes. With `recording: false` the screen records (1) are left out; the
events are still kept. Clipboard contents are never stored (they may hold passwords), only their
length and whether they passed; keystrokes are counted, not stored. The recording decodes only
the encodings the proxy lets through (rfb.ALLOWED_ENCODINGS), so the renderer stays small.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from skyguard.admin.recording import SessionArchive, _atomic_write_json, abandon, new_session_id, utc_iso
from skyguard.admin.transcript import RecordingError, Transcript
from skyguard.console import rfb
from skyguard.errors import AdminError, LogError
from skyguard.parts import wait_durable

FORMAT = "skyguard-vnc-recording"
SERVER, PIXEL_FORMAT, EVENT = 1, 2, 3
_RECORD = struct.Struct(">BdI")
SUFFIX = ".vnc"


class VncRecording:
    """One console session being recorded; `finish()` hashes it and logs the end. Creating one and
    finishing it block on the disk (files created, fsynced): do both off the event loop. The
    events in between are queued (server, pixel_format, clipboard raise RecordingError when the
    recording cannot take them: the session must end without relaying them)."""

    def __init__(self, archive: SessionArchive, *, operator: str, groups: tuple[str, ...], target,
                 zone: str, source: str, auth: str, init: rfb.ServerInit, notify=None):
        """`notify`: called from the writer thread when it has caught up or failed (Transcript)."""
        archive.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        start = time.time()
        self.archive, self.screen = archive, target.recording
        self._t0 = time.monotonic()
        self._finished = False
        self.meta = {
            "id": new_session_id(start), "operator": operator, "key_fingerprint": None,
            "workload": target.workload, "zone": zone, "source": source, "kind": "vnc", "command": None,
            "start": utc_iso(start), "start_ts": start, "end": None, "exit_status": None,
            "exit_signal": None, "bytes_in": 0, "bytes_out": 0, "result": "active",
            "transcript_sha256": None, "archive_instance": archive.instance,
            "console": {"target": target.name, "protocol": "vnc", "auth": auth, "groups": list(groups),
                        "clipboard_policy": target.clipboard, "recording": target.recording,
                        "keystrokes": 0, "clipboard_events": 0, "clipboard_dropped": 0},
        }
        self.id = self.meta["id"]
        self.path = archive.directory / f"{self.id}{SUFFIX}"
        header = {"format": FORMAT, "version": 1, "id": self.id, "operator": operator, "target": target.name,
                  "workload": target.workload, "start": self.meta["start"], "width": init.width,
                  "height": init.height, "pixel_format": init.pixel_format.as_dict(),
                  "desktop_name": init.name.decode("utf-8", "replace")}
        self._file = Transcript(self.path, notify)  # hashed as written: ending reads nothing back
        self._file.write(json.dumps(header, sort_keys=True).encode() + b"\n")
        _atomic_write_json(archive.directory / f"{self.id}.json", self.meta)
        try:
            wait_durable(archive._log("admin_session_start", session=self.id, operator=operator, key_fingerprint=None,
                         workload=target.workload, zone=zone, source=source, kind="vnc", command=None,
                         start=self.meta["start"], target=target.name), archive.decision_log)
        except LogError:  # no session without its start entry (see SessionArchive.begin)
            abandon(self._file, self.path, archive.directory / f"{self.id}.json")
            raise

    @property
    def behind(self) -> bool:
        """The writer is behind (transcript.PAUSE_AT): the session should wait before relaying more."""
        return self._file.behind

    @property
    def queued(self) -> int:
        return self._file.queued

    @property
    def failed(self) -> bool:
        return self._file.error is not None

    def _write(self, kind: int, payload: bytes) -> None:
        if not self._finished:
            self._file.write(_RECORD.pack(kind, time.monotonic() - self._t0, len(payload)) + payload)

    def server(self, message: rfb.ServerMessage) -> None:
        self.meta["bytes_out"] += len(message.raw)
        if self.screen:
            self._write(SERVER, message.raw)

    def client(self, message: rfb.ClientMessage) -> None:
        self.meta["bytes_in"] += len(message.raw)
        if message.type == rfb.KEY_EVENT and message.key_down:
            self.meta["console"]["keystrokes"] += 1

    def pixel_format(self, pf: rfb.PixelFormat) -> None:
        self._write(PIXEL_FORMAT, pf.pack())

    def clipboard(self, direction: str, length: int, allowed: bool) -> None:
        console = self.meta["console"]
        console["clipboard_events"] += 1
        console["clipboard_dropped"] += not allowed
        self._write(EVENT, json.dumps({"event": "clipboard", "direction": direction, "bytes": length,
                                       "allowed": allowed}).encode())

    def finish(self, result: str) -> dict:
        """Close (waiting for the writer), hash, store the record and log the end (with the hash).
        Blocks on the disk: call off the event loop. Idempotent."""
        if self._finished:
            return self.meta
        try:
            self._write(EVENT, json.dumps({"event": "end", "result": result}).encode())
        except RecordingError:
            pass  # the session was ended for it; the hash is of what was written
        self._finished = True
        digest = self._file.close()
        end = time.time()
        self.meta.update(end=utc_iso(end), end_ts=end, result=result, transcript_sha256=digest,
                         duration=round(end - self.meta["start_ts"], 3))
        if self._file.error is not None:  # the recording stops where its writing failed
            self.meta["transcript_error"] = self._file.error.strerror or str(self._file.error)
        self.archive.log_end(self.meta)  # before the record: see SessionRecording.finish
        _atomic_write_json(self.archive.directory / f"{self.id}.json", self.meta)
        return self.meta


# ---- reading and rendering ----------------------------------------------------------------------

def read(path: Path):
    """(header, iterator of (kind, time, payload)). AdminError on a file that is not a recording;
    a record cut short at the end (a killed proxy) ends the iteration quietly."""
    f = open(path, "rb")
    try:
        header = json.loads(f.readline())
        if header.get("format") != FORMAT or header.get("version") != 1:
            raise ValueError
    except (ValueError, AttributeError):
        f.close()
        raise AdminError(f"{path} is not a skyguard VNC recording") from None

    def records():
        with f:
            while len(head := f.read(_RECORD.size)) == _RECORD.size:
                kind, at, length = _RECORD.unpack(head)
                payload = f.read(length)
                if len(payload) < length:
                    return
                yield kind, at, payload
    return header, records()


class _Reader:
    """readexactly over bytes, for rfb's readers."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    async def readexactly(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise AdminError("a recorded message is cut short")
        self.pos += n
        return self.data[self.pos - n:self.pos]


def _image_from_pixels(data: bytes, w: int, h: int, pf: rfb.PixelFormat):
    from PIL import Image

    bpp = pf.bytes_per_pixel
    shifts = (pf.red_shift, pf.green_shift, pf.blue_shift)
    if bpp == 4 and (pf.red_max, pf.green_max, pf.blue_max) == (255, 255, 255) and all(s % 8 == 0 for s in shifts):
        # Byte-aligned 32-bit pixels (what clients ask for): Pillow unpacks them directly.
        order = ["X"] * 4
        for channel, shift in zip("RGB", shifts):
            order[3 - shift // 8 if pf.big_endian else shift // 8] = channel
        return Image.frombytes("RGB", (w, h), data, "raw", "".join(order))
    out = bytearray()
    fmt = {1: "B", 2: "H", 4: "I"}[bpp]
    values = struct.unpack(f"{'>' if pf.big_endian else '<'}{w * h}{fmt}", data)
    for v in values:
        for shift, top in zip(shifts, (pf.red_max, pf.green_max, pf.blue_max)):
            out.append(((v >> shift) & top) * 255 // (top or 1))
    return Image.frombytes("RGB", (w, h), bytes(out))


def render_frames(path: Path, out_dir: Path, max_frames: int | None = None) -> int:
    """Write the screen after each recorded framebuffer update as out_dir/frame-NNNNN.png (the
    time of the update in seconds is in the PNG's text chunk 'time'). Returns the frames written."""
    from PIL import Image, PngImagePlugin

    header, records = read(path)
    pf = rfb.PixelFormat(**header["pixel_format"]).check()
    screen = Image.new("RGB", (header["width"], header["height"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for kind, at, payload in records:
        if kind == PIXEL_FORMAT:
            pf = rfb.PixelFormat.unpack(payload).check()
            continue
        if kind != SERVER or payload[:1] != bytes([rfb.FB_UPDATE]):
            continue
        screen = _apply_update(screen, payload, pf)
        info = PngImagePlugin.PngInfo()
        info.add_text("time", f"{at:.6f}")
        screen.save(out_dir / f"frame-{written:05d}.png", pnginfo=info)
        written += 1
        if max_frames is not None and written >= max_frames:
            break
    return written


def _run_sync(coro):
    """Run a coroutine that never suspends (rfb's readers over _Reader) to its result."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AdminError("a recorded message could not be read")


def _apply_update(screen, payload: bytes, pf: rfb.PixelFormat):
    from PIL import Image

    # Re-frame the update with rfb's own reader: it checks every rectangle against the screen.
    _run_sync(rfb.read_server_message(_Reader(payload), pf, screen.size))
    (count,) = struct.unpack(">H", payload[2:4])
    pos = 4
    for _ in range(count):
        x, y, w, h, encoding = struct.unpack(">HHHHi", payload[pos:pos + 12])
        pos += 12
        if encoding == rfb.ENC_DESKTOP_SIZE:
            resized = Image.new("RGB", (w, h))
            resized.paste(screen, (0, 0))
            screen = resized
        elif encoding == rfb.ENC_RAW:
            size = w * h * pf.bytes_per_pixel
            if w and h:
                screen.paste(_image_from_pixels(payload[pos:pos + size], w, h, pf), (x, y))
            pos += size
        elif encoding == rfb.ENC_COPYRECT:
            sx, sy = struct.unpack(">HH", payload[pos:pos + 4])
            pos += 4
            if w and h:
                screen.paste(screen.crop((sx, sy, sx + w, sy + h)), (x, y))
    return screen
