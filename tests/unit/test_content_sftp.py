"""SFTP uploads under content rules: OpenSSH's own `sftp` client and `sftp-server`, with the SSH
access proxy's upload filter (skyguard.admin.sftp.SftpUploadFilter) between them (`sftp -D`
runs the relay of tests/support/content_support.py, which starts the real sftp-server), a real clamd
and a policy file loaded as `up` loads it. A blocked upload fails in the client and leaves no
file, not even a partial one, in the VM's directory; a clean one arrives byte-exact."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.content_support import EICAR, MARKER_FILE, LocalClamd, harmless_bytes, zipped

REPO = str(Path(__file__).resolve().parents[2])
POLICY = """apiVersion: skyguard/v1
kind: Policy
metadata: {{name: sftp}}
zones:
  web:
    workloads:
      - {{name: vm1, interface: sg-v1, mac: "02:00:00:00:01:02", addresses: [10.0.1.2]}}
content:
  clamd: {{socket: {socket}, timeout: 5}}
  max_inspect_bytes: 2MiB
  rules:
    - name: operator-uploads
      zones: [web]
      protocols: sftp
      block: {{clamav: true, max_size: 1MiB, patterns: ['AKIA[0-9A-Z]{{16}}']}}
"""


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("content-sftp")
    with LocalClamd(tmp / "clamd") as clamd:
        (tmp / "policy.yaml").write_text(POLICY.format(socket=clamd.socket))
        (tmp / "vm").mkdir()
        relay = tmp / "relay.sh"
        relay.write_text(f"#!/bin/sh\nexec env PYTHONPATH={REPO}:{REPO}/tests {sys.executable} "
                         "-m support.content_support sftp-relay "
                         f"--policy {tmp / 'policy.yaml'} --zone web --log {tmp / 'blocks.jsonl'} "
                         f"-- /usr/lib/openssh/sftp-server -d {tmp / 'vm'}\n")
        relay.chmod(0o755)
        yield tmp


def put(rig: Path, name: str, data: bytes, remote: str | None = None):
    local = rig / "local" / name
    local.parent.mkdir(exist_ok=True)
    local.write_bytes(data)
    batch = rig / "batch"
    batch.write_text(f"put {local} {remote or name}\n")
    return subprocess.run(["sftp", "-b", str(batch), "-D", str(rig / "relay.sh")], capture_output=True, text=True, timeout=60)


def blocks(rig: Path) -> list[dict]:
    path = rig / "blocks.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_clean_upload_arrives_byte_exact(rig):
    data = harmless_bytes(300_000)  # several WRITEs, pipelined
    result = put(rig, "clean.bin", data)
    assert result.returncode == 0, result.stderr
    assert (rig / "vm" / "clean.bin").read_bytes() == data


@pytest.mark.parametrize("name,data,engine", [
    ("eicar.txt", EICAR, "clamav"),
    ("holiday.jpg", zipped("notes.txt", b"x" * 70_000 + EICAR), "clamav"),  # a zip behind a harmless name
    ("keys.txt", b"aws=AKIAABCDEFGHIJKLMNOP\n", "pattern"),
    ("big.bin", b"\0" * ((1 << 20) + 1), "size"),
    ("huge.bin", os.urandom(3 << 20), "uninspectable"),  # past the inspection buffer: refused unscanned
], ids=["eicar", "eicar-zip-as-jpg", "pattern", "over-max-size", "over-inspection-buffer"])
def test_blocked_upload_fails_and_leaves_nothing(rig, name, data, engine):
    result = put(rig, name, data)
    assert result.returncode != 0, result.stdout
    assert not (rig / "vm" / name).exists()  # no partial file, no empty file
    entry = blocks(rig)[-1]
    assert (entry["type"], entry["protocol"], entry["zone"], entry["workload"], entry["rule"], entry["engine"]) == (
        "content_blocked", "sftp", "web", "vm1", "operator-uploads", engine)
    assert entry["path"] == str(rig / "vm" / name)  # as the client named it (sftp makes it absolute)
    if engine != "uninspectable":
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["size"] == len(data)
    assert "X5O!P" not in json.dumps(entry)


def test_clamd_down_fails_the_upload(rig, tmp_path):
    dead = LocalClamd(tmp_path / "dead").start()
    dead.kill()
    policy = rig / "policy.yaml"
    original = policy.read_text()
    policy.write_text(original.replace(str(rig / "clamd" / "clamd.sock"), dead.socket))
    try:
        result = put(rig, "plain.txt", b"plain words\n")
        assert result.returncode != 0 and not (rig / "vm" / "plain.txt").exists()
        assert "unavailable" in blocks(rig)[-1]["reason"]
    finally:
        policy.write_text(original)


# ---- the filter itself, sans-io: what it refuses to follow ----------------------------------------

def _filter(tmp_path, rules=True):
    from skyguard.admin.decisionlog import JsonLinesDecisionLog
    from skyguard.admin.sftp import SftpUploadFilter
    from skyguard.content.inspector import ContentEngine
    from skyguard.policy.content import ContentBlock, ContentPolicy, ContentRule

    rule = ContentRule("r", ("web",), ("upload",), ("sftp",), ContentBlock(max_size=10))
    return SftpUploadFilter(ContentEngine(ContentPolicy((rule,) if rules else ())), "web",
                            JsonLinesDecisionLog(tmp_path / "decisions.jsonl"))


def _packet(kind: int, request_id: int, payload: bytes = b"") -> bytes:
    import struct

    body = bytes([kind]) + struct.pack(">I", request_id) + payload
    return struct.pack(">I", len(body)) + body


def test_a_zone_without_sftp_rules_is_passed_through_untouched(tmp_path):
    import asyncio

    upload_filter = _filter(tmp_path, rules=False)
    data = _packet(3, 1, b"\0\0\0\1x\0\0\0\x1a\0\0\0\0") + b"\xff" * 7  # and half a packet
    assert asyncio.run(upload_filter.from_operator(data)) == (data, b"")
    assert upload_filter.from_vm(b"anything") == b"anything"


def test_streams_it_cannot_follow_end_the_channel(tmp_path):
    import asyncio

    from skyguard.admin.sftp import SftpProtocolError

    with pytest.raises(SftpProtocolError, match="own range"):
        asyncio.run(_filter(tmp_path).from_operator(_packet(6, 0xF0000001, b"\0\0\0\1h")))
    with pytest.raises(SftpProtocolError, match="SFTP packet of"):
        asyncio.run(_filter(tmp_path).from_operator(b"\x7f\xff\xff\xff\x06"))
    with pytest.raises(SftpProtocolError, match="truncated"):
        asyncio.run(_filter(tmp_path).from_operator(_packet(3, 1, b"\0\0\0\x09ab")))


def _raw_session(rig: Path, rounds) -> list[bytes]:
    """Hand-made SFTP packets through the relay (the filter and a real sftp-server): `rounds` is a
    generator that yields (packets, how many answers to wait for) and is sent the answers so far.
    Returns every answer (fewer if the relay ends the stream)."""
    import struct

    proc = subprocess.Popen([str(rig / "relay.sh")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)

    def read_packet() -> bytes | None:
        head = proc.stdout.read(4)
        return proc.stdout.read(struct.unpack(">I", head)[0]) if len(head) == 4 else None

    answers: list[bytes] = []
    try:
        proc.stdin.write(struct.pack(">IBI", 5, 1, 3))  # INIT, version 3
        proc.stdin.flush()
        if read_packet() is None:  # VERSION
            return answers
        step = next(rounds)
        while True:
            packets, wanted = step
            proc.stdin.write(b"".join(packets))
            proc.stdin.flush()
            goal = len(answers) + wanted
            while len(answers) < goal and (answer := read_packet()) is not None:
                answers.append(answer)
            if len(answers) < goal:
                return answers
            step = rounds.send(answers)
    except (StopIteration, BrokenPipeError):
        return answers
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_a_reused_request_id_cannot_open_a_file_the_filter_does_not_hold(rig):
    """A write OPEN given the id of another request still in flight (a STAT of a missing file, whose
    STATUS comes back first) must not get a handle whose WRITEs skip the content rules."""
    import struct

    def string(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    target = rig / "vm" / "reused-id.txt"

    def rounds():
        stat = _packet(17, 5, string(str(rig / "vm" / "no-such-file").encode()))
        open_ = _packet(3, 5, string(str(target).encode()) + struct.pack(">II", 0x02 | 0x08 | 0x10, 0))  # WRITE|CREAT|TRUNC
        answers = yield [stat, open_], 2
        handle = next(a[9:9 + struct.unpack_from(">I", a, 5)[0]] for a in answers if a[0] == 102)  # HANDLE
        yield [_packet(6, 6, string(handle) + struct.pack(">Q", 0) + string(b"aws=AKIAABCDEFGHIJKLMNOP\n")),
               _packet(4, 7, string(handle))], 2

    answers = _raw_session(rig, rounds())
    assert not target.exists() or b"AKIA" not in target.read_bytes(), answers


def test_a_file_cannot_be_put_together_from_uploads_judged_apart(rig):
    """`put` half a file, then `reput` (resume: the file opened for appending, not truncated) the
    rest: each upload alone is harmless, the file they leave on the VM must not be."""
    half = len(EICAR) // 2
    local = rig / "local"
    local.mkdir(exist_ok=True)
    (local / "first-half.txt").write_bytes(EICAR[:half])
    (local / "whole.txt").write_bytes(EICAR)
    batch = rig / "batch-resume"
    batch.write_text(f"put {local / 'first-half.txt'} resumed.txt\nreput {local / 'whole.txt'} resumed.txt\n")
    result = subprocess.run(["sftp", "-b", str(batch), "-D", str(rig / "relay.sh")], capture_output=True, text=True,
                            timeout=60)
    assert (rig / "vm" / "resumed.txt").read_bytes() != EICAR, result.stdout + result.stderr
    assert result.returncode != 0


# ---- a hostile client: raw SFTP through the relay to the real sftp-server ------------------------

class RawSftp:
    """An SFTP client that sends whatever packets it is told to, through the rig's relay (the
    filter in front of OpenSSH's sftp-server), and reads the answers."""

    def __init__(self, rig: Path):
        import struct

        self.struct = struct
        self.proc = subprocess.Popen([str(rig / "relay.sh")], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.send_raw(struct.pack(">IBI", 5, 1, 3))  # INIT, version 3
        assert self.recv()[0] == 2  # VERSION

    def packet(self, kind: int, request_id: int, *fields: bytes) -> bytes:
        body = bytes([kind]) + self.struct.pack(">I", request_id) + b"".join(fields)
        return self.struct.pack(">I", len(body)) + body

    def string(self, data: bytes) -> bytes:
        return self.struct.pack(">I", len(data)) + data

    def send_raw(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def recv(self) -> bytes | None:
        """The next packet, or None once the relay ended the stream."""
        head = self.proc.stdout.read(4)
        if len(head) < 4:
            return None
        (length,) = self.struct.unpack(">I", head)
        return self.proc.stdout.read(length)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


FIRST_HANDLE = b"\0\0\0\0"  # OpenSSH's sftp-server numbers its handles: the first is predictable
KEY = b"aws=AKIAABCDEFGHIJKLMNOP\n"


def test_a_write_sent_before_the_handle_is_answered_is_still_judged(rig):
    client = RawSftp(rig)
    try:
        opening = client.packet(3, 1, client.string(b"raced.txt"), b"\0\0\0\x1a", b"\0\0\0\0")  # WRITE|CREAT|TRUNC
        write = client.packet(6, 2, client.string(FIRST_HANDLE), b"\0" * 8, client.string(KEY))
        client.send_raw(opening + write)  # the WRITE names the handle the OPEN is about to get
        answers = [client.recv(), client.recv()]
        client.send_raw(client.packet(4, 3, client.string(FIRST_HANDLE)))
        answers.append(client.recv())
    finally:
        client.close()
    by_id = {answer[1:5]: answer for answer in answers}
    assert by_id[b"\0\0\0\1"][0] == 102  # the OPEN's HANDLE
    assert by_id[b"\0\0\0\2"][:5] == b"\x65\0\0\0\2" and by_id[b"\0\0\0\2"][5:9] != b"\0\0\0\0"  # WRITE refused
    path = rig / "vm" / "raced.txt"
    assert not path.exists() or KEY not in path.read_bytes()


def test_a_reused_request_id_does_not_unhold_a_write_handle(rig):
    client = RawSftp(rig)
    try:
        # A REMOVE and an OPEN for writing under the same id: the REMOVE's STATUS must not be
        # taken for the OPEN's failure (the OPEN's HANDLE then held nothing back). The filter may
        # also end the stream at the reused id (then nothing more reaches the VM).
        client.send_raw(client.packet(13, 7, client.string(b"nothing-here")) +
                        client.packet(3, 7, client.string(b"reused.txt"), b"\0\0\0\x1a", b"\0\0\0\0"))
        answers = [a for a in (client.recv(), client.recv()) if a]
        handles = [a for a in answers if a[0] == 102]
        if handles:
            handle = handles[0][9:9 + int.from_bytes(handles[0][5:9], "big")]
            client.send_raw(client.packet(6, 8, client.string(handle), b"\0" * 8, client.string(KEY)))
            client.recv()
            client.send_raw(client.packet(4, 9, client.string(handle)))
            client.recv()
    finally:
        client.close()
    path = rig / "vm" / "reused.txt"
    assert not path.exists() or KEY not in path.read_bytes()



def _handle(client: RawSftp, request_id: int, path: bytes, pflags: int) -> bytes | None:
    """OPEN `path` with `pflags`: its handle, or None when refused."""
    client.send_raw(client.packet(3, request_id, client.string(path), client.struct.pack(">II", pflags, 0)))
    answer = client.recv()
    if answer is None or answer[0] != 102:
        return None
    return answer[9:9 + int.from_bytes(answer[5:9], "big")]


def test_two_handles_to_one_file_cannot_each_carry_half_of_it(rig):
    """Each handle's bytes alone are harmless; the file both leave on the VM must not be."""
    half = KEY.index(b"EFGH")
    path = rig / "vm" / "two-handles.txt"
    client = RawSftp(rig)
    try:
        first = _handle(client, 1, str(path).encode(), 0x02 | 0x08 | 0x10)  # WRITE|CREAT|TRUNC
        second = _handle(client, 2, str(path).encode(), 0x02 | 0x10)  # WRITE|TRUNC, the same file
        for request_id, handle, offset, data in ((3, first, 0, KEY[:half]), (4, second, half, KEY[half:])):
            if handle is not None:
                client.send_raw(client.packet(6, request_id, client.string(handle), client.struct.pack(">Q", offset),
                                              client.string(data)))
                client.recv()
        for request_id, handle in ((5, first), (6, second)):
            if handle is not None:
                client.send_raw(client.packet(4, request_id, client.string(handle)))
                client.recv()
    finally:
        client.close()
    assert not path.exists() or KEY not in path.read_bytes()



def test_copy_data_cannot_put_a_file_together_from_files_judged_apart(rig):
    """OpenSSH's copy-data@openssh.com copies between two handles on the VM: two harmless uploads
    into a third file opened for writing (held for judging) must not leave the whole key there,
    not even when the channel ends without the CLOSE that judges it."""
    half = KEY.index(b"EFGH")
    for name, data in (("copy-a.txt", KEY[:half]), ("copy-b.txt", KEY[half:])):
        assert put(rig, name, data).returncode == 0
    target = rig / "vm" / "copied.txt"
    client = RawSftp(rig)
    try:
        out = _handle(client, 1, str(target).encode(), 0x02 | 0x08 | 0x10)
        sources = [_handle(client, 2 + i, str(rig / "vm" / name).encode(), 0x01)
                   for i, name in enumerate(("copy-a.txt", "copy-b.txt"))]
        for i, (source, offset) in enumerate(zip(sources, (0, half))):
            if out is not None and source is not None:
                client.send_raw(client.packet(200, 10 + i, client.string(b"copy-data"), client.string(source),
                                              client.struct.pack(">QQ", 0, 0), client.string(out),
                                              client.struct.pack(">Q", offset)))
                client.recv()
    finally:
        client.close()  # no CLOSE: the channel just ends, the VM's sftp-server closes the handle
    assert not target.exists() or KEY not in target.read_bytes()


def test_names_a_request_writes_on_the_vm_are_held_to_the_patterns(rig):
    """A symbolic link's target is bytes the VM keeps (readlink gives them back), and so is every
    name: `symlink`, `mkdir`, `rename` (posix-rename@openssh.com), `ln` (hardlink@openssh.com) and
    `put` to such a name put a key on the VM that no rule saw (patterns held only a file's bytes).
    Now the names a request writes are held to the rules' patterns, as an HTTP request's target is:
    refused, logged (without the name) and counted as a pattern block."""
    assert put(rig, "plain-name.txt", b"plain\n").returncode == 0
    key = "AKIAABCDEFGHIJKLMNOP"  # what KEY holds, the rule's pattern
    local = rig / "local" / "plain-name.txt"
    batch = rig / "names-batch"
    batch.write_text(f"-symlink aws={key} link-to-key\n-mkdir dir-{key}\n-rename plain-name.txt renamed-{key}\n"
                     f"-ln plain-name.txt linked-{key}\n-put {local} put-{key}\nsymlink plain-name.txt plain-link\n")
    before = len(blocks(rig))
    result = subprocess.run(["sftp", "-b", str(batch), "-D", str(rig / "relay.sh")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    on_vm = [p.name + "->" + os.readlink(p) if p.is_symlink() else p.name for p in (rig / "vm").iterdir()]
    assert "plain-link->plain-name.txt" in on_vm and not [n for n in on_vm if key in n], on_vm
    entries = blocks(rig)[before:]
    assert [(e["engine"], e["request"]) for e in entries] == [
        ("pattern", "symlink"), ("pattern", "mkdir"), ("pattern", "posix-rename"), ("pattern", "hardlink"),
        ("pattern", "open-write")], entries
    assert key not in json.dumps(entries)


@pytest.mark.parametrize("kind,by", [(9, "path"), (10, "handle")], ids=["setstat", "fsetstat"])
def test_a_judged_file_cannot_be_cut_to_one_no_rule_saw(rig, kind, by):
    """A file clamd knows by its hash, uploaded with a byte more (another hash: clean), then cut
    to its length by a SETSTAT or FSETSTAT of its size: the VM must not end up with it."""
    name = f"cut-{kind}.bin"
    assert put(rig, name, MARKER_FILE + b"!").returncode == 0
    client = RawSftp(rig)
    try:
        target = client.string(str(rig / "vm" / name).encode())
        if by == "handle":  # a handle opened for writing: held, judged and replayed at its CLOSE
            handle = _handle(client, 1, str(rig / "vm" / name).encode(), 0x02 | 0x10)
            target = client.string(handle or b"")
        client.send_raw(client.packet(kind, 2, target, client.struct.pack(">IQ", 0x01, len(MARKER_FILE))))
        client.recv()
        if by == "handle":
            client.send_raw(client.packet(4, 3, target))
            client.recv()
    finally:
        client.close()
    assert (rig / "vm" / name).read_bytes() != MARKER_FILE

# ---- two channels to one VM: each replays its judged file, never interleaved --------------------

class FilteredServer:
    """One SFTP channel as the access proxy has it: an upload filter in front of a real sftp-server
    (the VM's), with the test as the SSH transport between them, so it decides when the VM gets
    what the filter sends it."""

    def __init__(self, upload_filter, proc):
        self.filter, self.proc = upload_filter, proc

    @classmethod
    async def start(cls, upload_filter, directory: Path) -> FilteredServer:
        import asyncio

        proc = await asyncio.create_subprocess_exec("/usr/lib/openssh/sftp-server", "-d", str(directory),
                                                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        server = cls(upload_filter, proc)
        await server.request(b"\0\0\0\x05\x01\0\0\0\x03")  # INIT, version 3
        return server

    async def deliver(self, packets: list[bytes]) -> list[bytes]:
        """`packets` to the VM, and the answers the operator gets from the filter."""
        self.proc.stdin.write(b"".join(packets))
        answers = []
        for _ in packets:
            head = await self.proc.stdout.readexactly(4)
            answers.append(self.filter.from_vm(head + await self.proc.stdout.readexactly(int.from_bytes(head, "big"))))
        return answers

    async def request(self, packet: bytes) -> list[bytes]:
        to_vm, to_operator = await self.filter.from_operator(packet)
        return ([to_operator] if to_operator else []) + (await self.deliver(packets_of(to_vm)) if to_vm else [])

    async def close(self) -> None:
        self.proc.stdin.close()
        await self.proc.wait()


def packets_of(data: bytes) -> list[bytes]:
    out = []
    while data:
        end = 4 + int.from_bytes(data[:4], "big")
        out.append(data[:end])
        data = data[end:]
    return out


def test_two_channels_cannot_each_replay_half_of_a_file(tmp_path):
    """Two SFTP sessions open one file and each writes a harmless half; each CLOSE is judged
    alone and replayed (truncate, then the writes) on its own channel, so to its own sftp-server
    process on the VM: if the second truncation runs between the first's and its writes, both
    halves stay. Here the VM runs them in that order whenever it can."""
    import asyncio
    import struct

    from skyguard.admin.decisionlog import JsonLinesDecisionLog
    from skyguard.admin.sftp import ReplayTurn, SftpUploadFilter
    from skyguard.content.inspector import ContentEngine
    from skyguard.policy.content import ContentBlock, ContentPolicy, ContentRule

    turn = ReplayTurn()  # the VM's, as the access proxy gives every channel to it (sftp_turn)
    rule = ContentRule("keys", ("web",), ("upload",), ("sftp",), ContentBlock(patterns=(r"AKIA[0-9A-Z]{16}",)))
    engine = ContentEngine(ContentPolicy((rule,)))
    vm = tmp_path / "vm"
    vm.mkdir()
    target, half = b"halves.txt", KEY.index(b"EFGH")

    def string(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    async def scenario():
        channels = [await FilteredServer.start(
            SftpUploadFilter(engine, "web", JsonLinesDecisionLog(tmp_path / "log.jsonl"), workload="vm1", turn=turn), vm)
            for _ in range(2)]
        closes = []
        for channel, (offset, data) in zip(channels, ((0, KEY[:half]), (half, KEY[half:]))):
            answer = (await channel.request(_packet(3, 1, string(target) + struct.pack(">II", 0x1a, 0))))[0]
            handle = answer[13:13 + int.from_bytes(answer[9:13], "big")]  # WRITE|CREAT|TRUNC: its HANDLE
            await channel.request(_packet(6, 2, string(handle) + struct.pack(">Q", offset) + string(data)))
            closes.append(_packet(4, 3, string(handle)))
        first, second = (asyncio.ensure_future(c.filter.from_operator(p)) for c, p in zip(channels, closes))
        replay = packets_of((await first)[0])
        await channels[0].deliver(replay[:1])  # the first channel's truncation has run on the VM
        while not second.done() and not turn.waiting:  # its replay is ready, or it waits its turn
            await asyncio.sleep(0.01)
        interleaved = second.done()
        if interleaved:  # the second replay may start now: its truncation goes next
            await channels[1].deliver(packets_of(second.result()[0])[:1])
        await channels[0].deliver(replay[1:])
        await channels[1].deliver(packets_of((await second)[0])[1 if interleaved else 0:])
        for channel in channels:
            await channel.close()

    asyncio.run(scenario())
    assert (vm / "halves.txt").read_bytes() == bytes(half) + KEY[half:]  # the last image judged, whole


def test_a_vm_turn_outlives_a_channel_that_ended_mid_replay_then_passes_on(monkeypatch):
    """A channel that ends with a replay unanswered keeps the VM's turn for TURN_GRACE_S (its
    sftp-server may still be writing), then the next channel waiting gets it; a channel that ends
    while waiting is not handed it."""
    import asyncio

    from skyguard.admin import sftp

    monkeypatch.setattr(sftp, "TURN_GRACE_S", 0.05)

    async def scenario():
        turn, first, gone, second = sftp.ReplayTurn(), object(), object(), object()
        await turn.take(first)
        waits = [asyncio.ensure_future(turn.take(channel)) for channel in (gone, second)]
        while turn.waiting < 2:
            await asyncio.sleep(0)
        turn.leave(gone)
        turn.leave(first)
        assert turn.holder is first  # its replay may still be running on the VM
        with pytest.raises(sftp.SftpProtocolError):
            await waits[0]
        await waits[1]
        assert turn.holder is second

    asyncio.run(scenario())
