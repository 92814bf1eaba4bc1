"""The console proxy's protocol layer (skyguard/console/rfb.py), its one-time tickets and its
recordings, without sockets: framing both ways, bad input from either side refused with a reason,
VNC authentication checked against a real client's implementation, and a recording rendered back
to the pixels that were sent."""

import asyncio
import json
import struct
from pathlib import Path

import pytest
from PIL import Image

from skyguard.admin.decisionlog import JsonLinesDecisionLog
from skyguard.admin.recording import SessionArchive
from skyguard.console import rfb
from skyguard.console.recording import VncRecording, render_frames
from skyguard.console.tickets import TicketBook
from skyguard.errors import AdminError
from skyguard.policy.console import ConsoleTarget

# 32-bit little-endian pixels, red in the third byte: what noVNC and vncdotool ask for.
PF = rfb.PixelFormat(32, 24, False, True, 255, 255, 255, 16, 8, 0)


def feed(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def client(data: bytes) -> rfb.ClientMessage:
    return asyncio.run(_read(rfb.read_client_message, data))


def server(data: bytes, size=(4, 2)) -> rfb.ServerMessage:
    return asyncio.run(_read(lambda r: rfb.read_server_message(r, PF, size), data))


async def _read(fn, data):
    return await fn(feed(data))


@pytest.mark.filterwarnings("ignore:TripleDES has been moved")  # vncdotool uses the old TripleDES path
def test_vnc_auth_matches_a_real_clients_des():
    from vncdotool.rfb import _vnc_des, des_encrypt

    challenge = bytes(range(16))
    for password in ("vmsecret", "x", "longer-than-eight"):
        assert rfb.vnc_auth_response(password.encode(), challenge) == des_encrypt(_vnc_des(password), challenge)


def test_client_messages_are_framed():
    key = client(struct.pack(">BBxxI", rfb.KEY_EVENT, 1, 0x61))
    assert key.type == rfb.KEY_EVENT and key.key_down
    cut = client(struct.pack(">BxxxI", rfb.CLIENT_CUT_TEXT, 5) + b"hello")
    assert cut.text_length == 5 and cut.raw.endswith(b"hello")
    enc = client(struct.pack(">BxHiii", rfb.SET_ENCODINGS, 3, 16, 1, -239))
    assert enc.encodings == (16, 1, -239)
    assert rfb.allowed_encodings(enc.encodings) == (1, 0)  # ZRLE and the cursor dropped, Raw implied
    pf = client(bytes([rfb.SET_PIXEL_FORMAT, 0, 0, 0]) + PF.pack())
    assert pf.pixel_format == PF


@pytest.mark.parametrize("data,reason", [
    (bytes([99]), "client message type 99"),
    (struct.pack(">BxxxI", rfb.CLIENT_CUT_TEXT, 1 << 30), "clipboard message of length"),
    (struct.pack(">Bxxxi", rfb.CLIENT_CUT_TEXT, -8), "clipboard message of length -8"),  # extended clipboard
    (struct.pack(">BxH", rfb.SET_ENCODINGS, 5000), "lists 5000 encodings"),
    (bytes([rfb.SET_PIXEL_FORMAT, 0, 0, 0]) + rfb.PixelFormat(24, 24, False, True, 255, 255, 255, 16, 8, 0).pack(),
     "pixel format of 24 bits"),
    (bytes([rfb.SET_PIXEL_FORMAT, 0, 0, 0]) + rfb.PixelFormat(8, 8, False, False, 0, 0, 0, 0, 0, 0).pack(),
     "true colour False"),
])
def test_malformed_client_messages_are_refused(data, reason):
    with pytest.raises(rfb.RfbError, match=reason):
        client(data)


def test_a_message_cut_short_is_not_a_message():
    with pytest.raises(asyncio.IncompleteReadError):
        client(struct.pack(">BxxxI", rfb.CLIENT_CUT_TEXT, 10) + b"short")


def raw_rect(x, y, w, h, rgb):
    pixel = bytes([rgb[2], rgb[1], rgb[0], 0])
    return struct.pack(">HHHHi", x, y, w, h, rfb.ENC_RAW) + pixel * (w * h)


def update(*rects):
    return struct.pack(">BxH", rfb.FB_UPDATE, len(rects)) + b"".join(rects)


@pytest.mark.parametrize("data,reason", [
    (update(raw_rect(3, 0, 2, 1, (0, 0, 0))), "outside the 4x2 framebuffer"),
    (update(struct.pack(">HHHHi", 0, 0, 1, 1, 16)), "encoding 16, which was not negotiated"),
    (update(struct.pack(">HHHHiHH", 0, 0, 2, 2, rfb.ENC_COPYRECT, 3, 1)), "CopyRect source lies outside"),
    (update(struct.pack(">HHHHi", 0, 0, 0, 99999 % 65536, rfb.ENC_DESKTOP_SIZE)), "desktop size"),
    (bytes([7]), "server message type 7"),
    (struct.pack(">BxxxI", rfb.SERVER_CUT_TEXT, 1 << 31), "clipboard message of length"),
])
def test_malformed_server_messages_are_refused(data, reason):
    with pytest.raises(rfb.RfbError, match=reason):
        server(data)


def test_server_messages_are_framed():
    msg = server(update(raw_rect(0, 0, 4, 2, (1, 2, 3))) + bytes([rfb.BELL]))
    assert len(msg.raw) == 4 + 12 + 4 * 2 * 4  # header, rectangle, 4x2 pixels of 4 bytes
    resized = server(update(struct.pack(">HHHHi", 0, 0, 8, 8, rfb.ENC_DESKTOP_SIZE), raw_rect(6, 6, 2, 2, (0, 0, 0))))
    assert resized.new_size == (8, 8)  # the rectangle after the resize is checked against 8x8
    cut = server(struct.pack(">BxxxI", rfb.SERVER_CUT_TEXT, 3) + b"abc")
    assert cut.type == rfb.SERVER_CUT_TEXT and cut.text_length == 3


# ---- tickets ------------------------------------------------------------------------------------

def test_a_ticket_opens_once(tmp_path):
    book = TicketBook(tmp_path / "tickets")
    ticket = book.issue("alice", "dc1-desktop")
    assert len(ticket.password) == 8 and ticket.password not in repr(ticket)
    challenge = bytes(16)
    response = rfb.vnc_auth_response(ticket.password.encode(), challenge)
    assert book.redeem_vnc(challenge, response).operator == "alice"
    assert book.redeem_vnc(challenge, response) is None  # reused
    assert book.redeem_vnc(challenge, bytes(16)) is None  # forged


def test_an_expired_ticket_opens_nothing(tmp_path):
    book = TicketBook(tmp_path / "tickets", ttl=-1)
    ticket = book.issue("alice", "dc1-desktop")
    assert book.redeem_vnc(bytes(16), rfb.vnc_auth_response(ticket.password.encode(), bytes(16))) is None
    assert not list((tmp_path / "tickets").glob("*.json"))  # and it is removed


# ---- recording and replay ------------------------------------------------------------------------

def recorded_session(tmp_path: Path, recording=True):
    log = JsonLinesDecisionLog(tmp_path / "decisions.jsonl")
    archive = SessionArchive(tmp_path / "sessions", log)
    target = ConsoleTarget("dc1-desktop", "dc1", "vnc", 5901, "dc1-vnc", clipboard="to_vm", recording=recording)
    rec = VncRecording(archive, operator="alice", groups=(), target=target, zone="directory",
                       source="192.0.2.1:5000", auth="ticket", init=rfb.ServerInit(4, 2, PF, b"dc1"))
    rec.server(server(update(raw_rect(0, 0, 4, 2, (255, 0, 0)))))
    rec.clipboard("from_vm", 12, False)
    rec.client(client(struct.pack(">BBxxI", rfb.KEY_EVENT, 1, 0x61)))
    rec.server(server(update(raw_rect(0, 0, 1, 1, (0, 0, 255)),
                             struct.pack(">HHHHiHH", 3, 1, 1, 1, rfb.ENC_COPYRECT, 0, 0))))
    meta = rec.finish("closed")
    return archive, log, meta


def test_a_recording_renders_the_pixels_that_were_sent(tmp_path):
    archive, log, meta = recorded_session(tmp_path)
    assert meta["console"]["keystrokes"] == 1 and meta["console"]["clipboard_dropped"] == 1
    assert archive.verify(meta["id"], list(log.entries())) == meta["transcript_sha256"]
    frames = render_frames(archive.transcript_path(meta["id"]), tmp_path / "frames")
    assert frames == 2
    last = Image.open(tmp_path / "frames" / "frame-00001.png").convert("RGB")
    assert last.getpixel((0, 0)) == (0, 0, 255)  # Raw
    assert last.getpixel((3, 1)) == (0, 0, 255)  # CopyRect of (0, 0)
    assert last.getpixel((1, 0)) == (255, 0, 0)
    assert float(Image.open(tmp_path / "frames" / "frame-00000.png").text["time"]) >= 0


def test_the_log_holds_the_hash_and_a_changed_recording_is_detected(tmp_path):
    archive, log, meta = recorded_session(tmp_path)
    ends = [e for e in log.entries() if e["type"] == "admin_session_end"]
    assert ends[0]["transcript_sha256"] == meta["transcript_sha256"] and ends[0]["console"]["target"] == "dc1-desktop"
    path = archive.transcript_path(meta["id"])
    data = bytearray(path.read_bytes())
    data[-30] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(AdminError, match="was modified"):
        archive.verify(meta["id"], list(log.entries()))


def test_recording_off_keeps_events_but_no_screen(tmp_path):
    archive, _, meta = recorded_session(tmp_path, recording=False)
    assert render_frames(archive.transcript_path(meta["id"]), tmp_path / "frames") == 0
    assert b"clipboard" in archive.transcript_path(meta["id"]).read_bytes()


def test_a_file_that_is_not_a_recording_is_refused(tmp_path):
    path = tmp_path / "x.vnc"
    path.write_text(json.dumps({"format": "asciicast"}) + "\n")
    with pytest.raises(AdminError, match="not a skyguard VNC recording"):
        render_frames(path, tmp_path / "frames")


def test_web_tickets_and_vnc_passwords_do_not_open_each_others_door(tmp_path):
    book = TicketBook(tmp_path / "tickets")
    web = book.issue("alice", "dc1-desktop", web=True)
    vnc = book.issue("alice", "dc1-desktop")
    assert len(web.password) >= 32
    # DES uses only 8 characters: a web token's first 8 must not log a VNC client in.
    assert book.redeem_vnc(bytes(16), rfb.vnc_auth_response(web.password[:8].encode(), bytes(16))) is None
    assert book.redeem_token(vnc.password) is None
    assert book.redeem_token(web.password).target == "dc1-desktop"
    assert book.redeem_token(web.password) is None  # once


def test_the_web_console_serves_files_only_from_inside_its_folder(tmp_path):
    from skyguard.console.web import static_file

    (tmp_path / "pub").mkdir()
    (tmp_path / "pub" / "rfb.js").write_text("x")
    (tmp_path / "secret").write_text("s")
    (tmp_path / "pub" / "link").symlink_to(tmp_path / "secret")
    assert static_file(tmp_path / "pub", "rfb.js") == (tmp_path / "pub" / "rfb.js").resolve()
    for bad in ("../secret", "link", "/etc/passwd", "", "missing.js"):
        assert static_file(tmp_path / "pub", bad) is None


def test_a_vms_server_init_is_held_to_the_desktop_size_limit():
    # A hostile VM announcing 65535x65535 could then send one Raw rectangle of 17 GiB, which the
    # proxy buffers whole (and the replay allocates that screen): the limit DesktopSize has.
    huge = rfb.ServerInit(65535, 65535, PF, b"vm").raw
    with pytest.raises(rfb.RfbError, match="desktop size 65535x65535"):
        asyncio.run(_read(rfb.read_server_init, huge))
    assert asyncio.run(_read(rfb.read_server_init, rfb.ServerInit(1024, 768, PF, b"vm").raw)).width == 1024
