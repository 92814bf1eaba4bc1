"""The SSH access proxy as a part of the daemon: start(), stop() and set_policy() on its loop, seen
by real OpenSSH clients (the lab of test_admin_ssh.py: its own namespaces, its own proxy).
Its keys come from the sealed store off that loop, which it shares with the daemon's other parts.

A new policy takes effect at once: operators removed lose their open sessions and cannot log in
again, `admin.ssh` removed closes the listener, a new `listen` moves it, forwarding turned off
ends open tunnels; restoring the policy brings everything back.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from test_admin_ssh import MOVED_PORT, PROXY_PORT, lab  # noqa: F401 - lab: the module-scoped fixture

from skyguard import config
from skyguard.admin.keys import HOST_KEY_NAME
from skyguard.admin.proxy import AdminProxyConfig, AdminSshProxy
from skyguard.admin.recording import MAX_RECORD_WORK, SessionArchive
from skyguard.admin.transcript import PAUSE_AT
from skyguard.custody.store import SecretStore
from skyguard.errors import AdminError
from skyguard.parts import MemoryLog
from support.frozen_disk import FrozenDisk, blocked_in_the_kernel, threads_blocked_in_the_kernel

KEYS_WAIT_PORT = 24226  # a second proxy on the lab's loop, waiting for its keys


def open_session(lab, command):  # noqa: F811
    """An exec session that says it is up, then waits; returns the client once it is up."""
    client = subprocess.Popen(lab.ssh_args("alice", "alice+dc1") + [f"echo {command}-up; sleep 60"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert client.stdout.readline().strip() == f"{command}-up", client.stderr.read()
    return client


def ended(client) -> str:
    """Wait for a client the proxy should have cut off; its stderr."""
    try:
        _, stderr = client.communicate(timeout=30)
    finally:
        client.kill()
        client.wait()
    assert client.returncode == 255, stderr
    return stderr


def test_operator_removed_loses_open_sessions_and_cannot_log_in_again(lab):  # noqa: F811
    client = open_session(lab, "removed-operator")
    without_alice = tuple(op for op in lab.policy.admin_ssh.operators if op.name != "alice")
    try:
        lab.set_policy(replace(lab.policy, admin_ssh=replace(lab.policy.admin_ssh, operators=without_alice)))
        assert "access revoked by a policy change" in ended(client)
        again = lab.ssh("alice", "alice+dc1", "echo should-not-run")
        assert again.returncode == 255 and "Permission denied" in again.stderr, again.stderr
    finally:
        lab.set_policy(lab.policy)
    assert lab.ssh("alice", "alice+dc1", "echo back").stdout.strip() == "back"
    [meta] = lab.session_by_command("echo removed-operator-up; sleep 60")
    assert meta["result"] == "revoked"


def test_admin_ssh_removed_closes_the_listener_and_ends_sessions(lab):  # noqa: F811
    client = open_session(lab, "admin-removed")
    try:
        lab.set_policy(replace(lab.policy, admin_ssh=None))
        assert "SSH access was removed from the policy" in ended(client)
        refused = lab.ssh("alice", "alice+dc1", "echo should-not-run")
        assert refused.returncode == 255 and "Connection refused" in refused.stderr, refused.stderr
        assert lab.proxy.address is None
    finally:
        lab.set_policy(lab.policy)
    back = lab.ssh("alice", "alice+dc1", "echo listening-again")
    assert back.returncode == 0 and back.stdout.strip() == "listening-again", back.stderr
    assert any(e.get("reason") == "SSH access was removed from the policy" for e in lab.entries("admin_access_revoked"))


def test_listen_address_change_moves_the_listener(lab):  # noqa: F811
    client = open_session(lab, "before-the-move")
    moved = replace(lab.policy, admin_ssh=replace(lab.policy.admin_ssh, listen=f"127.0.0.1:{MOVED_PORT}"))
    try:
        lab.set_policy(moved)
        assert lab.proxy.address == ("127.0.0.1", MOVED_PORT)
        there = lab.ssh("alice", "alice+dc1", "echo on-the-new-port", port=MOVED_PORT)
        old = lab.ssh("alice", "alice+dc1", "echo should-not-run", port=PROXY_PORT)
        assert client.poll() is None  # an allowed session is not cut by the move
    finally:
        lab.set_policy(lab.policy)
        client.kill()
        client.wait()
    assert there.returncode == 0 and there.stdout.strip() == "on-the-new-port", there.stderr
    assert old.returncode == 255 and "Connection refused" in old.stderr, old.stderr
    assert lab.ssh("alice", "alice+dc1", "echo home-again").stdout.strip() == "home-again"


def test_port_forwarding_turned_off_ends_open_tunnels(lab):  # noqa: F811
    lab.set_policy(replace(lab.policy, admin_ssh=replace(lab.policy.admin_ssh, port_forwarding=True)))
    tunnel = subprocess.Popen(lab.ssh_args("alice", "alice+dc1", "-W", f"{lab.vm_ip}:22"), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert tunnel.stdout.readline().startswith(b"SSH-2.0-OpenSSH")  # the VM's sshd, through the tunnel
        lab.set_policy(lab.policy)
        # The client exits once the proxy closes the tunnel (the VM's sshd alone would keep it
        # open for its LoginGraceTime, 120 s).
        tunnel.wait(timeout=30)  # (stdin stays open: its EOF would end the tunnel too)
    finally:
        lab.set_policy(lab.policy)
        tunnel.kill()
        tunnel.wait()


def test_agent_forwarding_follows_the_policy(lab):  # noqa: F811
    """asyncssh fixes agent forwarding per listener: turning it on re-listens, and the VM sees the
    agent; turning it off ends the connections that relay one."""
    agent_socket = lab.tmp / "lifecycle-agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_socket)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    env = {"SSH_AUTH_SOCK": str(agent_socket), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    client = None
    try:
        for _ in range(200):  # ssh-agent -D creates its socket after it starts
            if agent_socket.exists():
                break
            time.sleep(0.02)
        subprocess.run(["ssh-add", str(lab.tmp / "carol")], env=env, check=True, capture_output=True, timeout=30)
        lab.set_policy(replace(lab.policy, admin_ssh=replace(lab.policy.admin_ssh, agent_forwarding=True)))
        client = subprocess.Popen(lab.ssh_args("alice", "alice+dc1", "-A") + ["ssh-add -l; sleep 60"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        listed = client.stdout.readline()
        assert "carol" in listed, listed  # the VM uses the operator's agent
        lab.set_policy(lab.policy)
        assert "agent forwarding was turned off by a policy change" in ended(client)
    finally:
        lab.set_policy(lab.policy)
        if client is not None:
            client.kill()
            client.wait()
        agent.terminate()
        agent.wait(10)


def test_stop_ends_sessions_and_start_listens_again(lab):  # noqa: F811
    client = open_session(lab, "before-stop")
    try:
        lab.proxy_thread.run(lab.proxy.stop())
        assert "shutting down" in ended(client)
        assert lab.ssh("alice", "alice+dc1", "true").returncode == 255
    finally:
        lab.proxy_thread.run(lab.proxy.start())
    assert lab.ssh("alice", "alice+dc1", "echo restarted").stdout.strip() == "restarted"


def test_file_transfer_turned_off_ends_open_sftp_sessions(lab):  # noqa: F811
    lab.set_policy(replace(lab.policy, admin_ssh=replace(lab.policy.admin_ssh, sftp=True)))
    sftp = subprocess.Popen(lab.ssh_args("alice", "alice+dc1", "-b", "-", tool="sftp"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    listing = "ls -1 /etc/hostname\n"  # a request to the server (sftp's pwd is answered locally)
    try:
        sftp.stdin.write(listing)
        sftp.stdin.flush()
        assert [sftp.stdout.readline(), sftp.stdout.readline()] == ["sftp> ls -1 /etc/hostname\n", "/etc/hostname\n"]
        lab.set_policy(lab.policy)  # sftp: false again
        # sftp notices its channel is gone at its next command.
        out, stderr = sftp.communicate(listing, timeout=30)
    finally:
        lab.set_policy(lab.policy)
        sftp.kill()
        sftp.wait()
    assert "no longer allowed by a policy change: file transfer" in stderr, stderr
    assert "/etc/hostname\n" not in out.replace("sftp> ls -1 /etc/hostname\n", "")
    revoked = [e for e in lab.entries("admin_access_revoked") if e.get("reason") == "file_transfer_refused"]
    assert revoked and revoked[-1]["operator"] == "alice"


def test_a_vm_address_moved_by_a_policy_change_ends_the_sessions_to_it(lab):  # noqa: F811
    """dc1 moves to another address and the machine at its old one becomes a workload of a zone
    alice may not reach: her open session to the old address must end (it no longer leads to dc1)."""
    from ipaddress import ip_address

    from skyguard.policy.model import Workload

    client = open_session(lab, "address-moved")
    zones = dict(lab.policy.zones)
    directory, auth = zones["directory"], zones["auth"]
    moved = tuple(replace(w, addresses=(ip_address("10.251.0.99"),)) if w.name == "dc1" else w
                  for w in directory.workloads)
    vault = Workload("vault", "auth", "sg-vault", "02:00:00:00:01:09", (ip_address(lab.vm_ip),))
    zones["directory"] = replace(directory, workloads=moved)
    zones["auth"] = replace(auth, workloads=auth.workloads + (vault,))
    try:
        lab.set_policy(replace(lab.policy, zones=zones))
        assert "address" in ended(client)
    finally:
        lab.set_policy(lab.policy)
        client.kill()
        client.wait()


def test_a_revoked_connection_opens_nothing_more_while_its_sessions_close(lab):  # noqa: F811
    """A revoked connection stays up for a moment (SHUTDOWN_GRACE) so the operator reads why; in
    that moment it must not open a new session on the VM (an asyncssh client on the proxy's own
    loop, so its new channel reaches the proxy before it answers the close of the old one)."""
    import asyncio

    import asyncssh

    marker = lab.tmp / "ran-after-revocation"
    without_alice = tuple(op for op in lab.policy.admin_ssh.operators if op.name != "alice")

    async def scenario():
        async with asyncssh.connect("127.0.0.1", PROXY_PORT, username="alice+dc1",
                                    client_keys=[str(lab.tmp / "alice")], known_hosts=str(lab.tmp / "known_hosts"),
                                    agent_path=None) as conn:
            first = await conn.create_process("echo first-up; sleep 60")
            assert (await first.stdout.readline()).strip() == "first-up"
            await lab.proxy.set_policy(replace(lab.policy, admin_ssh=replace(lab.policy.admin_ssh, operators=without_alice)))
            try:
                second = await conn.create_process(f"touch {marker}")
                await asyncio.wait_for(second.wait(), 10)
            except (asyncssh.Error, OSError, TimeoutError):
                pass

    try:
        lab.proxy_thread.run(scenario())
        time.sleep(0.5)
        assert not marker.exists()
    finally:
        lab.set_policy(lab.policy)


def opened_here(path: Path) -> int:
    """How many files this process has open at `path` (the lock is waited for by polling, which
    /proc/locks does not show: a waiter has the file open)."""
    fds = Path("/proc/self/fd")
    return sum(1 for fd in os.listdir(fds) if os.path.realpath(fds / fd) == os.path.realpath(path))


def test_a_proxy_waiting_for_its_keys_holds_up_no_other_connection(lab, monkeypatch):  # noqa: F811
    """The sealed store is locked by another process (`skyguard secret set`, say) just as a
    proxy on the shared loop needs its keys: while it waits for them, the loop serves the others
    (here the lab's proxy logs an operator in); once the lock is let go it listens."""
    # the wait is bounded (config.LOCK_WAIT_S, 30 s); an ssh login on a loaded machine must fit in it
    monkeypatch.setattr(config, "LOCK_WAIT_S", 300.0)
    store_dir = lab.tmp / "locked-store"
    store_dir.mkdir(mode=0o700)
    lock = os.open(store_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    policy = replace(lab.policy, admin_ssh=replace(lab.policy.admin_ssh, listen=f"127.0.0.1:{KEYS_WAIT_PORT}"))
    other = AdminSshProxy(policy, SecretStore(store_dir), lab.tmp / "locked-state", MemoryLog())
    starting = asyncio.run_coroutine_threadsafe(other.start(), lab.proxy_thread.loop)
    try:
        while opened_here(store_dir / ".lock") < 2:  # the new proxy waits for the store
            assert not starting.done(), starting.result()
            time.sleep(0.01)
        meanwhile = lab.ssh("alice", "alice+dc1", "echo while-the-store-is-locked", timeout=20)
        assert meanwhile.stdout.strip() == "while-the-store-is-locked", meanwhile.stderr
        assert not starting.done()
    finally:
        os.close(lock)
    try:
        assert starting.result(30) == ("127.0.0.1", KEYS_WAIT_PORT)
    finally:
        lab.proxy_thread.run(other.stop())


def test_keys_that_cannot_be_loaded_leave_the_proxy_closed_with_a_clear_error(lab):  # noqa: F811
    store = SecretStore(lab.tmp / "damaged-store")
    store.set(HOST_KEY_NAME, b"not a key at all")
    policy = replace(lab.policy, admin_ssh=replace(lab.policy.admin_ssh, listen=f"127.0.0.1:{KEYS_WAIT_PORT}"))
    other = AdminSshProxy(policy, store, lab.tmp / "damaged-state", MemoryLog())
    with pytest.raises(AdminError, match=f"not an OpenSSH private key; remove it with `skyguard secret rm {HOST_KEY_NAME}`"):
        lab.proxy_thread.run(other.start())
    assert other.address is None
    refused = lab.ssh("alice", "alice+dc1", "true", port=KEYS_WAIT_PORT)
    assert refused.returncode == 255 and "Connection refused" in refused.stderr, refused.stderr
    lab.proxy_thread.run(other.stop())


def test_a_session_ends_without_reading_its_transcript_back(lab, monkeypatch):  # noqa: F811
    """Ending a session hashed its transcript by reading the file whole, on the loop every
    connection shares (a long session's is hundreds of MiB). Here reading a transcript back is
    held: sessions still end and others log in, and each record's hash is its file's."""
    import skyguard.admin.recording as recording

    release = threading.Event()
    real = recording.sha256_file

    def held(path):
        release.wait(60)
        return real(path)

    monkeypatch.setattr(recording, "sha256_file", held)
    try:
        first = lab.ssh("alice", "alice+dc1", "echo first-of-two", timeout=20)
        second = lab.ssh("alice", "alice+dc1", "echo second-of-two", timeout=20)
    finally:
        release.set()
    assert (first.stdout.strip(), second.stdout.strip()) == ("first-of-two", "second-of-two"), first.stderr
    for command in ("echo first-of-two", "echo second-of-two"):
        [meta] = lab.session_by_command(command)
        assert lab.proxy.archive.verify(meta["id"]) == meta["transcript_sha256"]


SLOW_DISK_PORT = 24227  # a second proxy on the lab's loop, its state on a disk that stalls
STALLED_RECORDING_PORT = 24228  # another, its transcripts on a disk that stalls mid-session
THROUGH = ["-o", f"HostKeyAlias=[127.0.0.1]:{PROXY_PORT}"]  # the second proxies' host key is the lab proxy's


def test_a_stalled_disk_under_the_session_records_holds_up_no_other_connection(lab):  # noqa: F811
    """A proxy whose state (the VM host key pins, the session records) is on a disk that stalls:
    a frozen filesystem (fsfreeze) blocks every write to it until it is thawed, as a hung disk
    would. The first host key of a VM (trust on first use), a session's record at its start and at
    its end were written on the loop that every connection and part shares: a stall there
    stalled them all. Now each write waits off the loop, the session waiting for it (its record is
    on disk before it starts, its end before the operator hears the exit status), and the
    lab's proxy on the same loop logs an operator in meanwhile."""
    with FrozenDisk(lab.tmp / "slow-disk") as disk:
        policy = replace(lab.policy, admin_ssh=replace(lab.policy.admin_ssh, listen=f"127.0.0.1:{SLOW_DISK_PORT}"))
        other = AdminSshProxy(policy, SecretStore(lab.state / "secrets"), disk.path, MemoryLog())
        lab.proxy_thread.run(other.start())

        def held_while_another_gets_in(client, what):
            """`client` is held by a write to the frozen disk; another operator gets in meanwhile."""
            while not blocked_in_the_kernel():
                assert client.poll() is None, client.communicate()
                time.sleep(0.01)
            meanwhile = lab.ssh("alice", "alice+dc1", f"echo meanwhile-{what}", timeout=30)
            assert meanwhile.stdout.strip() == f"meanwhile-{what}", meanwhile.stderr
            assert client.poll() is None  # still waiting for its record
            disk.thaw()
            out, err = client.communicate(timeout=30)
            return client.returncode, out, err

        def session(command, **kw):
            return subprocess.Popen(lab.ssh_args("alice", "alice+dc1", *THROUGH, port=SLOW_DISK_PORT) + [command],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)

        try:
            # the first connection to dc1 pins its host key
            disk.freeze()
            assert held_while_another_gets_in(session("echo pinned"), "pin")[:2] == (0, "pinned\n")
            assert "dc1" in json.loads((disk.path / "admin" / "vm_host_keys.json").read_text())
            # a session's record at its start: on disk before the session starts
            disk.freeze()
            assert held_while_another_gets_in(session("echo started"), "start")[:2] == (0, "started\n")
            # a session's end: the record is closed before the operator hears the exit status
            client = session("echo up; read line; exit 3", stdin=subprocess.PIPE)
            assert client.stdout.readline() == "up\n"
            disk.freeze()
            client.stdin.close()  # the VM's `read` returns: the session ends, with no more output
            client.stdin = None  # closed here: communicate() has nothing to flush
            assert held_while_another_gets_in(client, "end")[0] == 3
            [meta] = [m for m in other.archive.list() if (m.get("command") or "").startswith("echo up")]
            assert meta["result"] == "ok" and meta["exit_status"] == 3
            assert other.archive.verify(meta["id"]) == meta["transcript_sha256"]
        finally:
            disk.thaw()
            lab.proxy_thread.run(other.stop())


# ~1.3 MB/s of output, a line every 50 ms: past the transcript's pause mark within a second of a
# stall, not enough to fill the small disk before it.
STREAM = "while :; do head -c 65536 /dev/zero | tr '\\0' x; echo; sleep 0.05; done"


def test_a_transcript_on_a_stalled_disk_holds_up_no_other_session(lab):  # noqa: F811
    """Each piece of a session's output went into its transcript on the loop every connection
    shares (written through): with the transcripts' disk stalled, one session printing stopped
    every other. Here a session streams output when its transcripts' disk freezes: another
    operator still logs in (on the lab's proxy, on the same loop). The session whose recording
    cannot keep up is paused, told so, then ended (fail closed) while the disk is still frozen;
    once it is thawed its record closes with the hash of exactly what was written."""
    registry, decisions = CollectorRegistry(), MemoryLog()
    with FrozenDisk(lab.tmp / "stalled-transcripts") as disk:
        policy = replace(lab.policy, admin_ssh=replace(lab.policy.admin_ssh,
                                                       listen=f"127.0.0.1:{STALLED_RECORDING_PORT}"))
        other = AdminSshProxy(policy, SecretStore(lab.state / "secrets"), disk.path, decisions, registry,
                              AdminProxyConfig(recording_notice_after=1.0, recording_stall_timeout=4.0))
        lab.proxy_thread.run(other.start())
        client = subprocess.Popen(lab.ssh_args("alice", "alice+dc1", *THROUGH, port=STALLED_RECORDING_PORT) + [STREAM],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            while not (records := [m for m in other.archive.list() if m.get("command") == STREAM]) or \
                    (cast := disk.path / "admin" / "sessions" / f"{records[0]['id']}.cast").stat().st_size < 1 << 18:
                assert client.poll() is None, client.communicate()
                time.sleep(0.05)
            disk.freeze()
            while not blocked_in_the_kernel():  # the next piece of output waits on the disk
                assert client.poll() is None, client.communicate()
                time.sleep(0.01)
            meanwhile = lab.ssh("alice", "alice+dc1", "echo meanwhile-streaming", timeout=30)
            assert meanwhile.stdout.strip() == "meanwhile-streaming", meanwhile.stderr
            _, stderr = client.communicate(timeout=60)
            assert disk.frozen  # told at once, not when the disk is back
            assert client.returncode == 255 and "output is paused: this session's recording is not keeping up" \
                in stderr and "this session is ended: its recording is not keeping up" in stderr, stderr
            # streamed on for seconds: what waits in memory is bounded by the pause
            assert 0 < registry.get_sample_value("skyguard_admin_ssh_recording_backlog_bytes") <= PAUSE_AT + (1 << 17)
            assert registry.get_sample_value("skyguard_admin_ssh_recording_pauses_total") >= 1
            assert registry.get_sample_value("skyguard_admin_ssh_sessions_total",
                                             {"operator": "alice", "result": "recording_stalled"}) == 1
            [stalled] = decisions.of_kind("admin_session_recording_failed")
            assert (stalled["session"], stalled["result"]) == (records[0]["id"], "recording_stalled")
            disk.thaw()
            for _ in range(600):  # a bound against a hang, not a timing
                if (meta := other.archive.load(records[0]["id"]))["result"] != "active":
                    break
                time.sleep(0.05)
            assert meta["result"] == "recording_stalled"
            assert other.archive.verify(meta["id"]) == meta["transcript_sha256"]
            assert "this session is ended" in cast.read_text().splitlines()[-1]
            assert registry.get_sample_value("skyguard_admin_ssh_recording_backlog_bytes") == 0
        finally:
            client.kill()
            client.wait()
            disk.thaw()
            lab.proxy_thread.run(other.stop())


BUSY_DISK_PORT = 24229  # another proxy on the lab's loop, its session records on a disk that stalls
HELD = MAX_RECORD_WORK + 1  # sessions started on the stalled disk: more than asyncio's default executor has threads


def test_session_records_waiting_on_a_stalled_disk_take_no_thread_from_the_rest(lab):  # noqa: F811
    """Session records were created and closed in asyncio's default executor, the threads every
    part's blocking work shares (the sealed store, the TPM, DNS state, the fleet, the log): six
    sessions starting on a stalled disk took them all, and the whole daemon waited on that disk.
    Now records have threads of their own and a bound on the record operations in flight: past it
    a new session is refused at once with a clear message. Meanwhile other work on the loop's
    executor is done and another operator logs in; once the disk is back the held sessions run."""
    with FrozenDisk(lab.tmp / "busy-disk") as disk:
        policy = replace(lab.policy, admin_ssh=replace(lab.policy.admin_ssh, listen=f"127.0.0.1:{BUSY_DISK_PORT}"))
        archive = SessionArchive(disk.path / "sessions", MemoryLog())
        (lab.tmp / "busy-state" / "admin").mkdir(parents=True, mode=0o700)  # the VM host key pins: not on the disk
        other = AdminSshProxy(policy, SecretStore(lab.state / "secrets"), lab.tmp / "busy-state", MemoryLog(),
                              archive=archive)
        lab.proxy_thread.run(other.start())
        clients = []
        try:
            disk.freeze()
            clients = [subprocess.Popen(lab.ssh_args("alice", "alice+dc1", *THROUGH, port=BUSY_DISK_PORT)
                                        + [f"echo held-{n}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                       for n in range(HELD)]
            # every session is held by its record, or refused (the bound reached)
            while not any(c.poll() is not None for c in clients) and threads_blocked_in_the_kernel() < 6:
                # (6: the threads of asyncio's default executor on 2 cores, which the records once used)
                time.sleep(0.01)
            done = lab.proxy_thread.run(asyncio.to_thread(str, "another part's work"), timeout=30)
            assert done == "another part's work"
            meanwhile = lab.ssh("alice", "alice+dc1", "echo meanwhile-held", timeout=30)
            assert meanwhile.stdout.strip() == "meanwhile-held", meanwhile.stderr
            assert disk.frozen
            refused = [c for c in clients if c.poll() is not None]
            assert len(refused) == 1, [c.communicate() for c in refused]
            _, stderr = refused[0].communicate()
            assert refused[0].returncode == 1 and "cannot be recorded now" in stderr, stderr
            disk.thaw()
            for client in clients:
                if client is not refused[0]:
                    out, err = client.communicate(timeout=30)
                    assert client.returncode == 0 and out.startswith("held-"), err
            held = [m for m in archive.list() if (m.get("command") or "").startswith("echo held-")]
            assert len(held) == HELD - 1
        finally:
            for client in clients:
                client.kill()
                client.wait()
            disk.thaw()
            lab.proxy_thread.run(other.stop())
