"""The console proxy under load: six operators stream full screens from one real Xvnc through it
at once, and a seventh still logs in and gets its screen; every session is recorded whole. The
clients are asyncio RFB clients framed by skyguard's reader (the real VNC client, vncdotool, is
test_console_vnc.py's); Xvnc and the proxy are on loopback, no lab needed. No timing is asserted:
the bound below only turns a hang into a failure."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from skyguard.admin.decisionlog import JsonLinesDecisionLog
from skyguard.admin.transcript import PAUSE_AT
from skyguard.console import rfb
from skyguard.console.proxy import ConsoleConfig, ConsoleProxy
from skyguard.custody.store import SecretStore
from skyguard.parts import MemoryLog
from skyguard.policy.console import AdminConsole, ConsoleGrant, ConsoleTarget
from skyguard.policy.model import Policy, Workload, Zone
from support.frozen_disk import FrozenDisk, blocked_in_the_kernel, threads_blocked_in_the_kernel

PASSWORD = b"load-pw1"
VNC_PORT, PROXY_PORT = 24261, 24262
STREAMS = 6
HANG = 60.0  # seconds after which a session that has not finished counts as hung


def load_policy(port: int) -> Policy:
    workload = Workload("vm", "lab", "sg-vm", "02:00:00:00:00:01", (ipaddress.ip_address("127.0.0.1"),))
    return Policy(name="load", zones={"lab": Zone("lab", (workload,))}, networks={}, rules=(),
                  admin_console=AdminConsole(listen=f"127.0.0.1:{port}",
                                             targets=(ConsoleTarget("desk", "vm", "vnc", VNC_PORT, "vm-vnc"),),
                                             operators=(ConsoleGrant("alice", ("lab",)),)))


@pytest.fixture(scope="module")
def loop():
    """The loop the proxies run on, in a thread of its own (as the daemon's)."""
    the_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=the_loop.run_forever, daemon=True)
    thread.start()
    yield the_loop
    the_loop.call_soon_threadsafe(the_loop.stop)
    thread.join(10)


def on(loop, coro, timeout: float = 10):
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


@pytest.fixture(scope="module")
def proxy(loop, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console-load")
    (tmp / "passwd").write_bytes(subprocess.run(["vncpasswd", "-f"], input=PASSWORD, capture_output=True,
                                                check=True).stdout)
    display = next(n for n in range(500 + os.getpid() % 400, 1000) if not Path(f"/tmp/.X{n}-lock").exists())
    xvnc = subprocess.Popen(["Xvnc", f":{display}", "-rfbport", str(VNC_PORT), "-localhost", "-interface",
                             "127.0.0.1", "-geometry", "640x480", "-depth", "24", "-SecurityTypes", "VncAuth",
                             "-PasswordFile", str(tmp / "passwd"), "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = SecretStore(tmp / "secrets")
    store.set("vm-vnc", PASSWORD)
    the_proxy = ConsoleProxy(load_policy(PROXY_PORT), store, tmp, JsonLinesDecisionLog(tmp / "log.jsonl"))
    try:
        for _ in range(100):
            if subprocess.run(["ss", "-Hltn", f"sport = :{VNC_PORT}"], capture_output=True, text=True).stdout:
                break
            time.sleep(0.1)
        on(loop, the_proxy.start())
        yield the_proxy
    finally:
        on(loop, the_proxy.stop())
        xvnc.terminate()
        xvnc.wait(10)


async def session(password: bytes, frames: int, port: int = PROXY_PORT) -> int:
    """Log in through the proxy and fetch `frames` full screens; the number fetched."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    await r.readexactly(12)
    w.write(rfb.VERSION_3_8)
    await r.readexactly(2)
    w.write(bytes([rfb.SECURITY_VNC]))
    w.write(rfb.vnc_auth_response(password, await r.readexactly(16)))
    result = await r.readexactly(4)
    assert result == bytes(4), f"login refused: {await r.read(200)!r}"
    w.write(b"\x01")
    init = await rfb.read_server_init(r)
    w.write(rfb.set_encodings((rfb.ENC_RAW,)))
    got = 0
    for _ in range(frames):
        w.write(struct.pack(">BBHHHH", rfb.FB_UPDATE_REQUEST, 0, 0, 0, init.width, init.height))
        while (await rfb.read_server_message(r, init.pixel_format, (init.width, init.height))).type != rfb.FB_UPDATE:
            pass
        got += 1
    w.close()
    return got


def test_a_new_session_opens_while_others_stream(proxy):
    async def main():
        streams = [asyncio.create_task(session(proxy.tickets.issue("alice", "desk").password.encode(), 20))
                   for _ in range(STREAMS)]
        await asyncio.sleep(0.5)  # the streams are under way
        probe = await asyncio.wait_for(session(proxy.tickets.issue("alice", "desk").password.encode(), 1), HANG)
        return probe, await asyncio.wait_for(asyncio.gather(*streams), HANG)

    try:
        probe, streamed = asyncio.run(main())
    except AssertionError:
        raise AssertionError(list(proxy.decision_log.entries())) from None
    assert probe == 1 and streamed == [20] * STREAMS
    for _ in range(100):
        records = proxy.archive.list()
        if len(records) == STREAMS + 1 and all(r["result"] != "active" for r in records):
            break
        time.sleep(0.1)
    assert len(records) == STREAMS + 1 and all(r["transcript_sha256"] for r in records), \
        list(proxy.decision_log.entries())
    assert all(r["bytes_out"] >= 640 * 480 * 4 for r in records)
    # hashed as written (ending a session reads nothing back): the hash is the file's all the same
    assert all(proxy.archive.verify(r["id"]) == r["transcript_sha256"] for r in records)


def test_a_session_waiting_for_the_sealed_store_holds_up_no_other(proxy, monkeypatch):
    """The VM's password comes from the sealed store, which may wait on a slow disk or on the
    TPM unsealing its key. Here the first session's read of it is held: meanwhile another
    client's login is answered (refused: a wrong ticket; a good one would wait its turn at the
    VM, one login at a time), and the first session gets its screen once the store answers."""
    asked, release = threading.Event(), threading.Event()
    real = proxy.store.get

    def held(name):
        asked.set()
        release.wait(HANG)
        return real(name)

    monkeypatch.setattr(proxy.store, "get", held)

    async def refused_login() -> bytes:
        r, w = await asyncio.open_connection("127.0.0.1", PROXY_PORT)
        await r.readexactly(12)
        w.write(rfb.VERSION_3_8)
        await r.readexactly(2)
        w.write(bytes([rfb.SECURITY_VNC]))
        w.write(rfb.vnc_auth_response(b"not-a-ticket", await r.readexactly(16)))
        result = await r.readexactly(4)
        w.close()
        return result

    async def main():
        first = asyncio.create_task(session(proxy.tickets.issue("alice", "desk").password.encode(), 1))
        try:
            while not asked.is_set():
                await asyncio.sleep(0.01)
            # (a third of HANG: a loop held by the store would free itself after HANG)
            other = await asyncio.wait_for(refused_login(), HANG / 3)
            return other != bytes(4), first.done()
        finally:
            release.set()
            assert await asyncio.wait_for(first, HANG) == 1

    assert asyncio.run(main()) == (True, False)


STALLED_PORT = 24263  # a second proxy on the same loop, its recordings on a disk that stalls


def test_a_recording_on_a_stalled_disk_holds_up_no_other_session(proxy, loop, tmp_path):
    """Each relayed screen update went into its session's recording on the loop every session
    shares: with the recordings' disk stalled, one session's screen stopped every other. Here a
    session streams full screens through a second proxy whose state is on a disk that freezes
    (fsfreeze): a session through the first proxy, on the same loop, still gets its screen. The
    stalled session waits (what waits in memory bounded), then is ended while the disk is still
    frozen, and its record closes, hashed as written, once the disk is back; the proxy's stop()
    meanwhile waits for that record a while, not for the disk, and says it left it open."""
    registry, decisions = CollectorRegistry(), MemoryLog()
    with FrozenDisk(tmp_path / "stalled-recordings") as disk:
        other = ConsoleProxy(load_policy(STALLED_PORT), proxy.store, disk.path, decisions, registry,
                             ConsoleConfig(recording_notice_after=1.0, recording_stall_timeout=4.0,
                                           recording_close_wait=0.5))
        on(loop, other.start())

        async def main():
            stream = asyncio.create_task(session(other.tickets.issue("alice", "desk").password.encode(), 100_000,
                                                 STALLED_PORT))
            while not any(disk.path.glob("admin/sessions/*.vnc")) or \
                    next(disk.path.glob("admin/sessions/*.vnc")).stat().st_size < 1 << 20:
                assert not stream.done(), stream.result()
                await asyncio.sleep(0.05)
            disk.freeze()
            while not blocked_in_the_kernel():  # the next update waits on the disk
                assert not stream.done(), stream.result()
                await asyncio.sleep(0.01)
            first = await asyncio.wait_for(session(proxy.tickets.issue("alice", "desk").password.encode(), 1),
                                           HANG / 3)
            ended, _ = await asyncio.wait([stream], timeout=HANG)  # (a bound against a hang)
            assert ended and isinstance(stream.exception(), (asyncio.IncompleteReadError, ConnectionError))
            then = await asyncio.wait_for(session(proxy.tickets.issue("alice", "desk").password.encode(), 1),
                                          HANG / 3)
            return first, then

        try:
            assert asyncio.run(main()) == (1, 1)
            assert disk.frozen  # ended while the disk is frozen
            backlog = registry.get_sample_value("skyguard_console_recording_backlog_bytes")
            assert 0 < backlog <= PAUSE_AT + 640 * 480 * 4 + 4096  # at most one screen past the pause
            assert registry.get_sample_value("skyguard_console_recording_pauses_total") >= 1
            assert registry.get_sample_value("skyguard_console_sessions_total",
                                             {"operator": "alice", "result": "recording_stalled"}) == 1
            [stalled] = decisions.of_kind("admin_session_recording_failed")
            assert stalled["result"] == "recording_stalled" and "not keeping up" in stalled["reason"]
            on(loop, other.stop(), HANG)  # a stop waits for the record a while, not for the disk
            assert disk.frozen
            [left] = decisions.of_kind("admin_session_records_left_open")
            assert (left["part"], left["sessions"]) == ("console", [stalled["session"]])
            disk.thaw()
            for _ in range(600):  # a bound against a hang, not a timing
                if (record := other.archive.load(stalled["session"]))["result"] != "active":
                    break
                time.sleep(0.05)
            assert record["result"] == "recording_stalled"
            assert other.archive.verify(record["id"]) == record["transcript_sha256"]
        finally:
            disk.thaw()
            on(loop, other.stop(), HANG)


TICKETS_PORT = 24264  # a third proxy on the same loop, its tickets on a disk that stalls


async def admitted(password: bytes, port: int) -> bool:
    """A login with `password` gets its screen (True), or is refused as a used ticket (False)."""
    try:
        return await session(password, 1, port) == 1
    except AssertionError as e:
        assert "unknown, used or expired console ticket" in str(e), e
        return False


def test_a_console_login_on_a_stalled_disk_holds_up_no_other_session(proxy, loop, tmp_path):
    """A console ticket was read and deleted (redeemed) on the loop every session shares: a login
    whose tickets' disk stalled stopped every console and SSH session. Here a proxy's tickets are
    on a disk that freezes (fsfreeze): two logins with the same ticket wait, each to delete it,
    while a session through another proxy on the same loop gets its screen. Once the disk is
    back the ticket admits one of the two, and only one."""
    with FrozenDisk(tmp_path / "stalled-tickets") as disk:
        other = ConsoleProxy(load_policy(TICKETS_PORT), proxy.store, disk.path, MemoryLog())
        on(loop, other.start())
        password = other.tickets.issue("alice", "desk").password.encode()

        async def main():
            disk.freeze()
            twice = [asyncio.create_task(admitted(password, TICKETS_PORT)) for _ in range(2)]
            while not blocked_in_the_kernel():  # a redemption waits on the disk
                assert not any(t.done() for t in twice), [t.result() for t in twice if t.done()]
                await asyncio.sleep(0.01)
            meanwhile = await asyncio.wait_for(session(proxy.tickets.issue("alice", "desk").password.encode(), 1),
                                               HANG / 3)
            while threads_blocked_in_the_kernel() < 2:  # both redemptions wait on the disk
                assert not any(t.done() for t in twice), [t.result() for t in twice if t.done()]
                await asyncio.sleep(0.01)
            assert disk.frozen and not any(t.done() for t in twice)
            disk.thaw()
            return meanwhile, await asyncio.wait_for(asyncio.gather(*twice), HANG)

        try:
            meanwhile, results = asyncio.run(main())
            assert meanwhile == 1 and sorted(results) == [False, True]
        finally:
            disk.thaw()
            on(loop, other.stop(), HANG)
