"""The console proxy against a hostile VNC server, over loopback: a VM that breaks RFB after the
login ends that one session (protocol error, recorded and logged) and the proxy goes on serving;
a VM that refuses the stored password gives the operator a refusal that names neither the VM's
reason nor the password. The VM here is the attacker's tool, written by hand on purpose; the real
Xvnc is in tests/integration/test_console_vnc.py."""

import asyncio
import contextlib
import ipaddress
import struct
import threading
from dataclasses import replace

from skyguard.admin.decisionlog import JsonLinesDecisionLog
from skyguard.console import rfb
from skyguard.console.proxy import ConsoleProxy
from skyguard.custody.store import SecretStore
from skyguard.policy.console import AdminConsole, ConsoleGrant, ConsoleTarget
from skyguard.policy.model import Policy, Workload, Zone

PF = rfb.PixelFormat(32, 24, False, True, 255, 255, 255, 16, 8, 0)
VM_PASSWORD = b"vm-only1"


async def hostile_vm(reader, writer, after_login: bytes, accept: bool = True):
    """A VM's VNC server that misbehaves after login. The proxy hanging up on it early is an
    outcome the tests check, not an error of the VM's task (left unretrieved, its exception was
    logged at a later garbage collection, inside another test)."""
    try:
        await _hostile_vm(reader, writer, after_login, accept)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def _hostile_vm(reader, writer, after_login: bytes, accept: bool):
    writer.write(rfb.VERSION_3_8)
    await reader.readexactly(12)
    writer.write(bytes([1, rfb.SECURITY_VNC]))
    await reader.readexactly(1)
    writer.write(bytes(16))
    await reader.readexactly(16)
    if not accept:
        writer.write(rfb.security_failure("password is " + VM_PASSWORD.decode()))  # a VM that leaks
        await writer.drain()
        writer.close()
        return
    writer.write(bytes(4))
    await reader.readexactly(1)
    writer.write(rfb.ServerInit(4, 2, PF, b"vm").raw)
    await writer.drain()
    writer.write(after_login)
    await writer.drain()
    await asyncio.sleep(1)
    writer.close()


async def operator(port: int, password: str) -> tuple[bytes, bytes]:
    """Log in through the proxy; (SecurityResult and what follows it, the rest until closed)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    await r.readexactly(12)
    w.write(rfb.VERSION_3_8)
    await r.readexactly(2)
    w.write(bytes([rfb.SECURITY_VNC]))
    w.write(rfb.vnc_auth_response(password.encode(), await r.readexactly(16)))
    result = await r.readexactly(4)
    if result != bytes(4):
        return result, await r.read()
    w.write(b"\x01")
    rest = await asyncio.wait_for(r.read(), 5)
    w.close()
    return result, rest


async def scenario(tmp_path, vm_behaviour):
    vm = await asyncio.start_server(vm_behaviour, "127.0.0.1", 0)
    vm_port = vm.sockets[0].getsockname()[1]
    workload = Workload("dc1", "directory", "sg-dc1", "02:00:00:00:00:01", (ipaddress.ip_address("127.0.0.1"),))
    policy = Policy(name="t", zones={"directory": Zone("directory", (workload,))}, networks={}, rules=(),
                    admin_console=AdminConsole(listen="127.0.0.1:0", targets=(
                        ConsoleTarget("desk", "dc1", "vnc", vm_port, "dc1-vnc"),),
                        operators=(ConsoleGrant("alice", ("directory",)),)))
    store = SecretStore(tmp_path / "secrets")
    store.set("dc1-vnc", VM_PASSWORD)
    log = JsonLinesDecisionLog(tmp_path / "log.jsonl")
    proxy = ConsoleProxy(policy, store, tmp_path, log)
    port = (await proxy.start())[1]
    try:
        first = await operator(port, proxy.tickets.issue("alice", "desk").password)
        second = await operator(port, proxy.tickets.issue("alice", "desk").password)
    finally:
        await proxy.stop()
        vm.close()
    return first, second, proxy, log


def test_a_vm_breaking_rfb_ends_that_session_only(tmp_path):
    bad = struct.pack(">BxH", rfb.FB_UPDATE, 1) + struct.pack(">HHHHi", 0, 0, 9, 9, rfb.ENC_RAW)  # outside 4x2
    first, second, proxy, log = asyncio.run(scenario(tmp_path, lambda r, w: hostile_vm(r, w, bad)))
    assert first[0] == bytes(4) and second[0] == bytes(4)  # both logged in: the listener went on
    assert bad not in first[1]  # the broken update never reached the operator
    results = [s["result"] for s in proxy.archive.list()]
    assert results == ["protocol_error", "protocol_error"]
    errors = [e for e in log.entries() if e["type"] == "console_session_error"]
    assert "outside the 4x2 framebuffer" in errors[0]["reason"]


def test_a_vm_refusing_the_password_is_reported_without_its_words(tmp_path):
    first, _, proxy, log = asyncio.run(scenario(tmp_path, lambda r, w: hostile_vm(r, w, b"", accept=False)))
    assert first[0] == struct.pack(">I", 1)
    assert b"could not open the console of desk (VM side)" in first[1]
    assert VM_PASSWORD not in first[1] and VM_PASSWORD not in log.path.read_bytes()
    assert [e["reason"] for e in log.entries() if e["type"] == "console_access_refused"] == ["vm_login_failed"] * 2


# ---- policy swaps and the limiter, against a VM the test paces -----------------------------------

def two_policies(vm_port: int, clipboard: str = "none"):
    workload = Workload("dc1", "directory", "sg-dc1", "02:00:00:00:00:01", (ipaddress.ip_address("127.0.0.1"),))
    target = ConsoleTarget("desk", "dc1", "vnc", vm_port, "dc1-vnc", clipboard=clipboard)
    console = AdminConsole(listen="127.0.0.1:0", targets=(target,), operators=(ConsoleGrant("alice", ("directory",)),))
    policy = Policy(name="t", zones={"directory": Zone("directory", (workload,))}, networks={}, rules=(),
                    admin_console=console)
    return policy, console


async def paced_vm(reader, writer, login_may_finish: asyncio.Event, login_waiting: asyncio.Event,
                   after_login: bytes = b"", send_after: asyncio.Event | None = None):
    writer.write(rfb.VERSION_3_8)
    await reader.readexactly(12)
    writer.write(bytes([1, rfb.SECURITY_VNC]))
    await reader.readexactly(1)
    writer.write(bytes(16))
    await reader.readexactly(16)
    login_waiting.set()
    await login_may_finish.wait()  # the skyguard -> VM login is under way while the test swaps
    writer.write(bytes(4))
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):  # skyguard may leave here
        await reader.readexactly(1)
        writer.write(rfb.ServerInit(4, 2, PF, b"vm").raw)
        await writer.drain()
        if send_after is not None:
            await send_after.wait()
        writer.write(after_login)
        await writer.drain()
        await asyncio.sleep(2)
    writer.close()


async def start_proxy(tmp_path, policy, **config):
    from skyguard.console.proxy import ConsoleConfig

    store = SecretStore(tmp_path / "secrets")
    store.set("dc1-vnc", VM_PASSWORD)
    log = JsonLinesDecisionLog(tmp_path / "log.jsonl")
    proxy = ConsoleProxy(policy, store, tmp_path, log, config=ConsoleConfig(**config))
    port = (await proxy.start())[1]
    return proxy, port, log


def test_a_swap_during_the_vm_login_applies_to_that_login(tmp_path):
    # alice's ticket was checked before skyguard logged into the VM; a swap that removes her grant
    # while that login is under way must not let her in when it completes.
    async def run():
        may_finish, waiting = asyncio.Event(), asyncio.Event()
        vm = await asyncio.start_server(lambda r, w: paced_vm(r, w, may_finish, waiting), "127.0.0.1", 0)
        policy, console = two_policies(vm.sockets[0].getsockname()[1])
        proxy, port, log = await start_proxy(tmp_path, policy)
        try:
            login = asyncio.create_task(operator(port, proxy.tickets.issue("alice", "desk").password))
            await asyncio.wait_for(waiting.wait(), 10)
            await proxy.set_policy(replace(policy, admin_console=replace(console, operators=())))
            may_finish.set()
            result, rest = await asyncio.wait_for(login, 10)
        finally:
            await proxy.stop()
            vm.close()
        return result, rest, proxy
    result, rest, proxy = asyncio.run(run())
    assert result == struct.pack(">I", 1) and b"alice may not open the console desk" in rest
    assert [s["result"] for s in proxy.archive.list()] == []  # no session was opened


def test_a_swap_that_narrows_the_clipboard_applies_to_open_sessions(tmp_path):
    # The target allowed the VM's clipboard out when the session opened; a swap turns it to none:
    # what the VM copies afterwards must not reach the operator through the session left open.
    secret = b"copied-on-the-vm-after-the-swap"
    cut = struct.pack(">BxxxI", rfb.SERVER_CUT_TEXT, len(secret)) + secret

    async def run():
        may_finish, waiting, send = asyncio.Event(), asyncio.Event(), asyncio.Event()
        may_finish.set()
        vm = await asyncio.start_server(lambda r, w: paced_vm(r, w, may_finish, waiting, cut, send),
                                        "127.0.0.1", 0)
        policy, console = two_policies(vm.sockets[0].getsockname()[1], clipboard="from_vm")
        proxy, port, log = await start_proxy(tmp_path, policy)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            await r.readexactly(12)
            w.write(rfb.VERSION_3_8)
            await r.readexactly(2)
            w.write(bytes([rfb.SECURITY_VNC]))
            w.write(rfb.vnc_auth_response(proxy.tickets.issue("alice", "desk").password.encode(),
                                          await r.readexactly(16)))
            assert await r.readexactly(4) == bytes(4)
            w.write(b"\x01")
            await r.readexactly(len(rfb.ServerInit(4, 2, PF, b"vm").raw))
            narrowed = replace(console.targets[0], clipboard="none")
            await proxy.set_policy(replace(policy, admin_console=replace(console, targets=(narrowed,))))
            send.set()
            rest = await asyncio.wait_for(r.read(), 10)
            w.close()
        finally:
            await proxy.stop()
            vm.close()
        return rest, proxy
    rest, proxy = asyncio.run(run())
    assert secret not in rest
    assert [s["result"] for s in proxy.archive.list()] == ["revoked"]


def test_logins_opened_together_cannot_outrun_the_failure_limit(tmp_path):
    # A guesser opens many connections at once: each passed the "blocked?" check before any guess
    # failed. Once the source is blocked, a guess on a connection opened earlier must not be tried.
    async def run():
        vm = await asyncio.start_server(lambda r, w: hostile_vm(r, w, b""), "127.0.0.1", 0)
        policy, _ = two_policies(vm.sockets[0].getsockname()[1])
        proxy, port, log = await start_proxy(tmp_path, policy, max_failures=3)
        conns = []
        try:
            for _ in range(4):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                await r.readexactly(12)
                w.write(rfb.VERSION_3_8)
                await r.readexactly(2)
                w.write(bytes([rfb.SECURITY_VNC]))
                conns.append((r, w, await r.readexactly(16)))
            for r, w, _ in conns[:3]:  # three wrong guesses: the source is now blocked
                w.write(bytes(16))
                assert await r.readexactly(4) == struct.pack(">I", 1)
            r, w, challenge = conns[3]
            w.write(rfb.vnc_auth_response(proxy.tickets.issue("alice", "desk").password.encode(), challenge))
            result = await asyncio.wait_for(r.read(4), 10)
            for _, w, _ in conns:
                w.close()
        finally:
            await proxy.stop()
            vm.close()
        return result
    assert asyncio.run(run()) != bytes(4)  # the fourth guess was not tried, right as it was


def test_a_vm_cannot_frame_its_updates_in_a_pixel_format_the_proxy_does_not_follow(tmp_path):
    # The operator's client asks for 8-bit pixels before its first update request (allowed). The
    # proxy must read the VM's answer in 8 bits, as the client does: read in the ServerInit's 32
    # bits, a 4x2 rectangle's 32 bytes would hide (from the clipboard rule) a ServerCutText that
    # the client, reading 8 bytes of pixels, takes as the VM's clipboard.
    secret = b"vm-clip-passes"  # 14 bytes: pixels, the cut text and two Bells fill the 32
    cut = struct.pack(">BxxxI", rfb.SERVER_CUT_TEXT, len(secret)) + secret
    pixels8 = bytes(8)
    hidden = pixels8 + cut + bytes([rfb.BELL]) * (32 - len(pixels8) - len(cut))  # Bells pad it to 32 bytes
    update8 = struct.pack(">BxH", rfb.FB_UPDATE, 1) + struct.pack(">HHHHi", 0, 0, 4, 2, rfb.ENC_RAW) + hidden
    pf8 = rfb.PixelFormat(8, 8, False, True, 7, 7, 3, 5, 2, 0)
    # An unasked update before the client's format change is the other way to disagree.
    unasked = struct.pack(">BxH", rfb.FB_UPDATE, 1) + struct.pack(">HHHHi", 0, 0, 1, 1, rfb.ENC_RAW) + bytes(4)

    async def vm_behaviour(reader, writer, first: bytes):
        writer.write(rfb.VERSION_3_8)
        await reader.readexactly(12)
        writer.write(bytes([1, rfb.SECURITY_VNC]))
        await reader.readexactly(1)
        writer.write(bytes(16))
        await reader.readexactly(16)
        writer.write(bytes(4))
        await reader.readexactly(1)
        writer.write(rfb.ServerInit(4, 2, PF, b"vm").raw + first)
        await writer.drain()
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):  # ended already
            await reader.readexactly(20 + 10)  # SetPixelFormat, FramebufferUpdateRequest
            writer.write(update8)
            await writer.drain()
            await asyncio.sleep(1)
        writer.close()

    async def run(first: bytes):
        vm = await asyncio.start_server(lambda r, w: vm_behaviour(r, w, first), "127.0.0.1", 0)
        policy, _ = two_policies(vm.sockets[0].getsockname()[1])
        proxy, port, log = await start_proxy(tmp_path / str(len(first)), policy)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            await r.readexactly(12)
            w.write(rfb.VERSION_3_8)
            await r.readexactly(2)
            w.write(bytes([rfb.SECURITY_VNC]))
            w.write(rfb.vnc_auth_response(proxy.tickets.issue("alice", "desk").password.encode(),
                                          await r.readexactly(16)))
            assert await r.readexactly(4) == bytes(4)
            w.write(b"\x01")
            await r.readexactly(len(rfb.ServerInit(4, 2, PF, b"vm").raw))
            await asyncio.sleep(0.2)  # the VM's unasked update (if any) is on its way
            w.write(bytes([rfb.SET_PIXEL_FORMAT, 0, 0, 0]) + pf8.pack())
            w.write(struct.pack(">BBHHHH", rfb.FB_UPDATE_REQUEST, 0, 0, 0, 4, 2))
            rest = b""
            with contextlib.suppress(ConnectionError):  # the proxy may have ended it already
                while chunk := await asyncio.wait_for(r.read(4096), 10):
                    rest += chunk
            w.close()
        finally:
            await proxy.stop()
            vm.close()
        return rest, proxy
    rest, proxy = asyncio.run(run(b""))
    assert secret not in rest
    assert [s["result"] for s in proxy.archive.list()] == ["disconnected"]  # the VM left; no protocol error
    rest, proxy = asyncio.run(run(unasked))
    assert unasked not in rest and secret not in rest
    assert [s["result"] for s in proxy.archive.list()] == ["protocol_error"]


def test_a_session_is_refused_with_a_clear_message_while_the_records_wait_on_the_disk(tmp_path):
    # The archive's record operations are held (as a stalled disk holds them) up to their bound: a
    # new session is refused at login, with a reason the client shows, instead of queueing.
    from skyguard.admin.recording import MAX_RECORD_WORK

    async def run():
        vm = await asyncio.start_server(lambda r, w: hostile_vm(r, w, b""), "127.0.0.1", 0)
        policy, _ = two_policies(vm.sockets[0].getsockname()[1])
        proxy, port, log = await start_proxy(tmp_path, policy)
        release = threading.Event()
        held = [asyncio.create_task(proxy.archive.work.run(release.wait, 30)) for _ in range(MAX_RECORD_WORK)]
        try:
            refused = await operator(port, proxy.tickets.issue("alice", "desk").password)
            release.set()
            await asyncio.gather(*held)
            served = await operator(port, proxy.tickets.issue("alice", "desk").password)
        finally:
            release.set()
            await proxy.stop()
            vm.close()
        return refused, served, log
    refused, served, log = asyncio.run(run())
    assert refused[0] == struct.pack(">I", 1) and b"cannot be recorded now" in refused[1]
    assert served[0] == bytes(4)  # once the disk answers
    assert [e["reason"] for e in log.entries() if e["type"] == "console_access_refused"] == ["recording_busy"]
