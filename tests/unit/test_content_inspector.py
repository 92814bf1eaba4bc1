"""The content engines and the Inspector against a real clamd (started here, with signatures
written here), real libmagic and real YARA. Table-driven: each case is a file, the rules that
apply, and the verdict (blocked or not, the engine and rule that blocked)."""

from __future__ import annotations

import asyncio
import bz2
import gzip
import io
import lzma
import os
import tarfile

import pytest

from skyguard.content import engines
from skyguard.content.clamd import ClamdStream, ClamdUnavailable, parse_reply, scan_bytes
from skyguard.content.http import Uninspectable, body_files
from skyguard.content.inspector import ContentEngine, inspect_bytes
from skyguard.policy.content import ContentBlock, ContentPolicy, ContentRule
from support.content_support import EICAR, EICAR_SIGNATURE, MARKER_FILE, MARKER_SIGNATURE, LocalClamd, zip_bomb, zipped

YARA_RULE = 'rule SkyguardSecretMarker { strings: $a = "TOP-SECRET-PROJECT-ORION" condition: $a }\n'
ELF = b"\x7fELF\x02\x01\x01\x00" + b"\0" * 8 + b"\x02\x00\x3e\x00\x01\x00\x00\x00" + b"\0" * 200


@pytest.fixture(scope="module")
def clamd(tmp_path_factory):
    with LocalClamd(tmp_path_factory.mktemp("clamd")) as running:
        yield running


@pytest.fixture(scope="module")
def yara_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("yara") / "marker.yar"
    path.write_text(YARA_RULE)
    return str(path)


def tarred(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def engine_for(socket, yara_file, **block) -> ContentEngine:
    rule = ContentRule("r1", ("web",), ("upload",), ("http", "sftp"), ContentBlock(**block))
    return ContentEngine(ContentPolicy((rule,), clamd_socket=socket, scan_timeout=5, max_inspect_bytes=8 << 20))


def run(coroutine):
    return asyncio.run(coroutine)


CASES = [
    # (description, block settings, file, blocked, engine)
    ("clean text passes ClamAV", {"clamav": True}, b"hello world\n", False, None),
    ("EICAR is found by ClamAV", {"clamav": True}, EICAR, True, "clamav"),
    ("EICAR inside a zip", {"clamav": True}, zipped("notes.txt", b"x" * 1000 + EICAR), True, "clamav"),
    ("EICAR inside a tar", {"clamav": True}, tarred("a/b.txt", EICAR), True, "clamav"),
    ("EICAR gzip-compressed", {"clamav": True}, gzip.compress(EICAR), True, "clamav"),
    ("a file known by its hash", {"clamav": True}, MARKER_FILE, True, "clamav"),
    ("ELF blocked by type", {"mime_types": ["application/x-executable", "application/x-sharedlib"]}, ELF, True, "mime"),
    ("a zip blocked by type whatever its name", {"mime_types": ["application/zip"]}, zipped("a.txt", b"hi"), True, "mime"),
    ("text passes a type rule", {"mime_types": ["application/*"]}, b"just words\n", False, None),
    ("YARA marker", {"yara": True}, b"header TOP-SECRET-PROJECT-ORION footer", True, "yara"),
    ("no YARA marker", {"yara": True}, b"header footer", False, None),
    ("pattern", {"patterns": [r"AKIA[0-9A-Z]{16}"]}, b"key=AKIAABCDEFGHIJKLMNOP", True, "pattern"),
    ("over max_size", {"max_size": 100}, b"x" * 101, True, "size"),
    ("at max_size", {"max_size": 100}, b"x" * 100, False, None),
]


@pytest.mark.parametrize("description,block,data,blocked,engine", CASES, ids=[c[0] for c in CASES])
def test_verdicts(clamd, yara_file, description, block, data, blocked, engine):
    if block.get("yara"):
        block = dict(block, yara=(yara_file,))
    for key in ("mime_types", "patterns"):
        if key in block:
            block[key] = tuple(block[key])
    verdict = run(inspect_bytes(engine_for(clamd.socket, yara_file, **block), "web", "upload", "http", data))
    assert (verdict.blocked, verdict.engine) == (blocked, engine), verdict.reason
    assert verdict.size == len(data) or engine == "size"
    if blocked:
        assert verdict.rule == "r1"
        assert data.decode("latin-1") not in verdict.reason  # the reason never holds the content


def test_no_rule_for_the_zone_means_no_inspection(clamd, yara_file):
    engine = engine_for(clamd.socket, yara_file, clamav=True)
    assert engine.inspector("other", "upload", "http") is None
    assert engine.inspector("web", "download", "http") is None


def test_signature_names_come_back(clamd):
    assert run(scan_bytes(clamd.socket, EICAR, 5)).signature.startswith(EICAR_SIGNATURE)
    assert run(scan_bytes(clamd.socket, MARKER_FILE, 5)).signature.startswith(MARKER_SIGNATURE)


def test_marker_split_across_feeds_is_found(clamd, yara_file):
    """Bytes arrive in pieces (chunks, SFTP writes): the marker split between two is still found."""
    engine = engine_for(clamd.socket, yara_file, clamav=True, patterns=(rb"AKIA[0-9A-Z]{16}".decode(),))

    async def pieces(data, cut):
        inspector = engine.inspector("web", "upload", "sftp")
        await inspector.feed(data[:cut])
        await inspector.feed(data[cut:])
        return await inspector.finish()

    assert run(pieces(b"a" * 100 + EICAR, 120)).engine == "clamav"
    assert run(pieces(b"key AKIAABCDEFGHIJKLMNOP", 10)).engine == "pattern"


def test_oversize_is_decided_early_and_stops_buffering(clamd, yara_file):
    engine = engine_for(clamd.socket, yara_file, max_size=1000, clamav=True)

    async def go():
        inspector = engine.inspector("web", "upload", "http")
        assert await inspector.feed(b"x" * 600) is None
        early = await inspector.feed(b"x" * 600)
        assert early is not None and early.engine == "size"
        await inspector.feed(b"x" * 10_000)  # after the verdict: counted, not kept
        assert len(inspector._buffer) == 0
        return await inspector.finish()

    assert run(go()).blocked


def test_larger_than_the_inspection_buffer_is_refused(clamd, yara_file):
    rule = ContentRule("r1", ("web",), ("upload",), ("http",), ContentBlock(clamav=True))
    engine = ContentEngine(ContentPolicy((rule,), clamd_socket=clamd.socket, max_inspect_bytes=1000))
    verdict = run(inspect_bytes(engine, "web", "upload", "http", b"x" * 1001))
    assert verdict.blocked and verdict.engine == "uninspectable" and "inspection buffer" in verdict.reason


@pytest.fixture(scope="module")
def small_clamds(tmp_path_factory):
    """Two clamds with a 1 MiB MaxFileSize: one as clamd ships (AlertExceedsMax off), one as the
    README asks (on)."""
    tmp = tmp_path_factory.mktemp("small-clamds")
    with LocalClamd(tmp / "lax", max_file_mb=1, alert_exceeds_max=False) as lax, \
            LocalClamd(tmp / "strict", max_file_mb=1) as strict:
        yield {"lax": lax, "strict": strict}


def test_larger_than_clamd_scans_is_refused_not_passed(small_clamds):
    """A clamd as it ships (AlertExceedsMax off) answers clean for a file past its MaxFileSize
    (1 MiB here): EICAR padded past content.clamd.max_file_bytes, plain or in a zip, is refused
    unscanned by skyguard's own bounds, before clamd (one with AlertExceedsMax here) sees it."""
    padded = EICAR + bytes(2 << 20)
    assert not run(scan_bytes(small_clamds["lax"].socket, padded, 10)).infected  # the gap: clamd calls it clean
    rule = ContentRule("r1", ("web",), ("upload",), ("http",), ContentBlock(clamav=True))
    engine = ContentEngine(ContentPolicy((rule,), clamd_socket=small_clamds["strict"].socket, scan_timeout=10,
                                         max_inspect_bytes=8 << 20, clamd_max_file_bytes=1 << 20))
    verdict = run(inspect_bytes(engine, "web", "upload", "http", padded))
    assert verdict.blocked and verdict.engine == "uninspectable", verdict
    assert "larger than clamd scans (1048576 bytes" in verdict.reason
    verdict = run(inspect_bytes(engine, "web", "upload", "http", zipped("padded.bin", padded)))
    assert verdict.blocked and verdict.engine == "archive" and "expands past 1048576" in verdict.reason
    verdict = run(inspect_bytes(engine, "web", "upload", "http", EICAR + bytes(900 << 10)))
    assert verdict.blocked and verdict.engine == "clamav" and "EICAR" in verdict.reason  # within the limit: found


@pytest.mark.parametrize("wrap", [bz2.compress, lzma.compress, lambda data: bz2.compress(tarred("in.bin", data))],
                         ids=["bzip2", "xz", "tar-bzip2"])
def test_a_file_clamd_skips_past_its_limits_is_refused(small_clamds, wrap):
    """EICAR after 2 MiB of zeros, compressed to a few hundred bytes: past clamd's MaxFileSize
    once expanded, where clamd without AlertExceedsMax skips the rest and answers clean. skyguard
    refuses to scan with such a clamd (it probes it first), and a clamd with it flags the file."""
    data = wrap(bytes(2 << 20) + EICAR)
    assert len(data) < 64 << 10  # within every size skyguard itself bounds
    assert not run(scan_bytes(small_clamds["lax"].socket, data, 10)).infected  # the gap: clamd calls it clean
    rule = ContentRule("r1", ("web",), ("upload",), ("http",), ContentBlock(clamav=True))
    for which, reason in (("lax", "AlertExceedsMax yes"), ("strict", "Heuristics.Limits.Exceeded")):
        engine = ContentEngine(ContentPolicy((rule,), clamd_socket=small_clamds[which].socket, scan_timeout=10,
                                             max_inspect_bytes=8 << 20, clamd_max_file_bytes=1 << 20))
        verdict = run(inspect_bytes(engine, "web", "upload", "http", data))
        assert verdict.blocked and verdict.engine == "clamav" and reason in verdict.reason, (which, verdict)


def test_zip_bomb_is_refused_by_its_bounds(clamd, yara_file):
    """20 MiB of zeros in a 20 KB zip, inside a zip: refused by the expansion bound (8 MiB here),
    decompressed as a stream and never held."""
    bomb = zip_bomb(20, nested=2)
    assert len(bomb) < 1 << 20
    verdict = run(inspect_bytes(engine_for(clamd.socket, yara_file, clamav=True), "web", "upload", "http", bomb))
    assert verdict.blocked and verdict.engine == "archive"
    assert "decompression bomb" in verdict.reason
    deep = b"innermost"
    for _ in range(5):
        deep = zipped("next.zip", deep)
    verdict = run(inspect_bytes(engine_for(clamd.socket, yara_file, clamav=True), "web", "upload", "http", deep))
    assert verdict.blocked and "nested deeper" in verdict.reason


def _without_central_directory(archive: bytes) -> bytes:
    return archive[:archive.rfind(b"PK\x01\x02")]  # local headers and data only


def _past_clamd_file_limit() -> bytes:
    """EICAR after 40 MiB of zeros in a zip: past the test clamd's MaxFileSize (25 MiB), where
    clamd 1.4 skips the entry as clean, AlertExceedsMax or not."""
    return zipped("padded.bin", bytes(40 << 20) + EICAR)


@pytest.mark.parametrize("wrap", [
    lambda z: b"MZ" + b"\0" * 100 + z,  # after a prefix (a self-extractor's stub): unzip and clamd still open it
    lambda z: b"MZ" + b"\0" * 100 + _without_central_directory(z),  # clamd walks the local headers
    lambda z: zipped("setup.exe", b"MZ" + b"\0" * 100 + z),  # such a file inside a zip
], ids=["prefixed", "prefixed-no-central-directory", "nested-prefixed"])
def test_a_zip_clamd_opens_is_bounded_wherever_it_sits(clamd, yara_file, wrap):
    data = wrap(_past_clamd_file_limit())
    verdict = run(inspect_bytes(engine_for(clamd.socket, yara_file, clamav=True), "web", "upload", "http", data))
    assert verdict.blocked and verdict.engine in ("archive", "clamav"), verdict.reason


def test_clamd_unreachable_or_silent_fails_closed(tmp_path, yara_file):
    engine = engine_for(str(tmp_path / "no-such.sock"), yara_file, clamav=True)
    verdict = run(inspect_bytes(engine, "web", "upload", "http", b"harmless"))
    assert verdict.blocked and verdict.engine == "clamav" and "unavailable" in verdict.reason

    # A socket that accepts and never answers: the deadline refuses.
    async def silent():
        server = await asyncio.start_unix_server(lambda r, w: None, str(tmp_path / "silent.sock"))
        async with server:
            stream = ClamdStream(str(tmp_path / "silent.sock"), 0.5)
            await stream.open()
            await stream.send(b"data")
            with pytest.raises(ClamdUnavailable, match="did not answer within"):
                await stream.finish()

    run(silent())


def test_clamd_killed_mid_stream_fails_closed(tmp_path, yara_file):
    with LocalClamd(tmp_path / "own") as own:
        engine = engine_for(own.socket, yara_file, clamav=True)

        async def go():
            inspector = engine.inspector("web", "upload", "http")
            assert await inspector.feed(b"first half ") is None
            own.kill()
            await inspector.feed(b"second half" * 10000)
            return await inspector.finish()

        verdict = run(go())
        assert verdict.blocked and verdict.engine == "clamav" and "unavailable" in verdict.reason


@pytest.mark.parametrize("reply,expected", [
    (b"stream: OK\0", (False, None)),
    (b"stream: Win.Test.EICAR_HDB-1 FOUND\0", (True, "Win.Test.EICAR_HDB-1")),
])
def test_reply_parsing(reply, expected):
    result = parse_reply(reply)
    assert (result.infected, result.signature) == expected


@pytest.mark.parametrize("reply", [b"INSTREAM size limit exceeded. ERROR\0", b"", b"stream: FOUND\0", b"garbage\0"])
def test_replies_that_are_not_verdicts_fail_closed(reply):
    with pytest.raises(ClamdUnavailable):
        parse_reply(reply)


def test_http_bodies_to_files():
    multipart = (b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nfield\r\n"
                 b"--XyZ\r\nContent-Disposition: form-data; name=\"f\"; filename=\"cat.jpg\"\r\n"
                 b"Content-Type: image/jpeg\r\n\r\n" + EICAR + b"\r\n--XyZ--\r\n")
    headers = ((b"content-type", b"multipart/form-data; boundary=XyZ"),)
    assert body_files(headers, multipart, 1 << 20) == [b"field", EICAR]
    gz = ((b"content-encoding", b"gzip"),)
    assert body_files(gz, gzip.compress(EICAR), 1 << 20) == [EICAR]
    with pytest.raises(Uninspectable, match="inspection buffer"):
        body_files(gz, gzip.compress(b"\0" * (10 << 20)), 1 << 20)
    with pytest.raises(Uninspectable, match="which skyguard cannot inspect"):
        body_files(((b"content-encoding", b"br"),), b"x", 1 << 20)
    with pytest.raises(Uninspectable, match="closing boundary"):
        body_files(headers, multipart[:-10], 1 << 20)


def test_mime_comes_from_the_bytes():
    assert engines.mime_of(zipped("photo.jpg", b"x")) == "application/zip"
    assert engines.mime_of(os.urandom(0) + b"%PDF-1.4\n") == "application/pdf"
