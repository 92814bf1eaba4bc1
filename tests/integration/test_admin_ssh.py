"""The SSH access proxy end to end, with the real OpenSSH client and a real sshd as the VM.

Layout (two network namespaces this module creates and removes, prefix shx-):
- shx-vm-N: the "VM": a real sshd on 10.251.N.2:22 whose AuthorizedKeysFile holds only
  skyguard's VM key (printed by `skyguard admin vm-key`).
- shx-px-N: the proxy (an asyncio thread that entered this namespace) on 127.0.0.1 and the
  OpenSSH client (`ssh`, `sftp`, run with nsenter); a veth joins it to the VM.
10.251.N.9 is on the veth's subnet but nobody answers there: the "VM that does not answer".
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import replace
from ipaddress import ip_address
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from skyguard.admin import keys
from skyguard.admin.decisionlog import JsonLinesDecisionLog, fallback_log_path
from skyguard.admin.proxy import AdminProxyConfig, AdminSshProxy
from skyguard.admin.recording import SessionArchive
from skyguard.custody.store import SecretStore
from skyguard.errors import AdminError
from skyguard.policy.model import AdminSsh, Policy, SshOperator, Workload, Zone
from support.client_waits import ssh_wait_options
from support.netns_support import NamespaceLoop

REPO = Path(__file__).resolve().parents[2]
PROXY_PORT = 24222
KILLABLE_PROXY_PORT = 24223  # the proxy run as its own process, to be killed
MOVED_PORT = 24224  # where a policy change moves the listener (test_admin_lifecycle.py)
IPV6_PORT = 24225  # where a policy change moves it to [::1] (test_admin_attack.py, one IPv6 /64)


def build_policy(spec: dict, port: int) -> Policy:
    vm_ip, ghost_ip, operators = spec["vm_ip"], spec["ghost_ip"], spec["operators"]
    return Policy(
        name="admin-test",
        zones={
            "directory": Zone("directory", (
                Workload("dc1", "directory", "sg-dc1", "02:00:00:00:02:02", (ip_address(vm_ip),)),
                Workload("ghost", "directory", "sg-ghost", "02:00:00:00:02:09", (ip_address(ghost_ip),)),
                # Up, but no sshd: the proxy's own end of the veth.
                Workload("nosshd", "directory", "sg-nosshd", "02:00:00:00:02:0a", (ip_address(spec["px_ip"]),)),
            )),
            "auth": Zone("auth", (
                Workload("radius1", "auth", "sg-radius1", "02:00:00:00:01:02", (ip_address("10.251.0.3"),)),
            )),
        },
        networks={}, rules=(),
        admin_ssh=AdminSsh(listen=f"127.0.0.1:{port}", operators=(
            SshOperator("alice", operators["alice"], ("directory",)),
            SshOperator("bob", operators["bob"], ("auth",)),
        )),
    )


def serve_until_killed(spec_file: str, state_dir: str, secrets_dir: str) -> None:
    """Run as a separate process (see the killed-proxy test): the proxy alone, until a signal."""
    spec = json.loads(Path(spec_file).read_text())
    state = Path(state_dir)

    async def main():
        proxy = AdminSshProxy(build_policy(spec, KILLABLE_PROXY_PORT), SecretStore(secrets_dir), state,
                              JsonLinesDecisionLog(fallback_log_path(state)))
        await proxy.start()
        await asyncio.Event().wait()

    asyncio.run(main())


def sh(*args, check=True, **kw):
    return subprocess.run(args, check=check, capture_output=True, text=True, **kw)


def keygen(path: Path) -> str:
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path))
    return (path.with_suffix(".pub") if path.suffix else Path(str(path) + ".pub")).read_text().strip()


@pytest.fixture(scope="module")
def lab(root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("admin-ssh")
    os.chmod(tmp, 0o700)
    net = 200 + secrets.randbelow(50)
    suffix = secrets.token_hex(2)
    vm_ns, px_ns = f"shx-vm-{suffix}", f"shx-px-{suffix}"
    vm_ip, px_ip, ghost_ip = f"10.251.{net}.2", f"10.251.{net}.1", f"10.251.{net}.9"
    state = tmp / "state"
    state.mkdir(mode=0o700)
    sshd = proxy_thread = proxy = None
    try:
        for ns in (vm_ns, px_ns):
            sh("ip", "netns", "add", ns)
        sh("ip", "-n", px_ns, "link", "add", "shx-px0", "type", "veth", "peer", "name", "shx-vm0",
           "netns", vm_ns)
        sh("ip", "-n", px_ns, "addr", "add", f"{px_ip}/24", "dev", "shx-px0")
        sh("ip", "-n", vm_ns, "addr", "add", f"{vm_ip}/24", "dev", "shx-vm0")
        for ns, dev in ((px_ns, "shx-px0"), (vm_ns, "shx-vm0")):
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

        # skyguard's VM key, public half through the CLI, into the VM's authorized_keys.
        env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'tests'}", SKYGUARD_STATE_DIR=str(state))  # tests/: support.*
        vm_key_line = sh(sys.executable, "-m", "skyguard.cli.main", "admin", "vm-key", env=env).stdout.strip()
        assert vm_key_line.startswith("ssh-ed25519 ")
        (tmp / "authorized_keys").write_text(vm_key_line + "\n")
        keygen(tmp / "vm_host_key")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        (tmp / "sshd_config").write_text(f"""
ListenAddress {vm_ip}
Port 22
HostKey {tmp}/vm_host_key
AuthorizedKeysFile {tmp}/authorized_keys
PidFile {tmp}/sshd.pid
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
Subsystem sftp /usr/lib/openssh/sftp-server
LogLevel VERBOSE
""")
        sshd = subprocess.Popen(["nsenter", f"--net=/run/netns/{vm_ns}", "/usr/sbin/sshd", "-D", "-e",
                                 "-f", str(tmp / "sshd_config")],
                                stdout=subprocess.DEVNULL, stderr=open(tmp / "sshd.log", "w"))

        operators = {name: keygen(tmp / name) for name in ("alice", "bob", "carol")}
        spec = {"vm_ip": vm_ip, "ghost_ip": ghost_ip, "px_ip": px_ip, "operators": operators}
        (tmp / "policy-spec.json").write_text(json.dumps(spec))
        policy = build_policy(spec, PROXY_PORT)
        registry = CollectorRegistry()
        decision_log = JsonLinesDecisionLog(fallback_log_path(state))
        proxy_thread = NamespaceLoop(px_ns, timeout=30)
        config = AdminProxyConfig(connect_timeout=2.0, max_failures=3, failure_window=600, block_for=600)
        proxy = AdminSshProxy(policy, SecretStore(state / "secrets"), state, decision_log, registry, config)
        proxy_thread.run(proxy.start())
        (tmp / "known_hosts").write_text("".join(f"[{host}]:{port} {keys.public_line(proxy.host_key)}\n"
                                                 for host, port in (("127.0.0.1", PROXY_PORT),
                                                                    ("127.0.0.1", KILLABLE_PROXY_PORT),
                                                                    ("127.0.0.1", MOVED_PORT), ("::1", IPV6_PORT))))

        # Wait until the VM's sshd listens (a real TCP connect from the proxy's namespace).
        for _ in range(100):
            probe = sh("nsenter", f"--net=/run/netns/{px_ns}", "bash", "-c",
                       f"exec 3<>/dev/tcp/{vm_ip}/22 && head -c 4 <&3", check=False)
            if probe.stdout.startswith("SSH-"):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the VM's sshd did not start: {(tmp / 'sshd.log').read_text()}")

        yield Lab(tmp, state, px_ns, vm_ip, policy, proxy, proxy_thread, registry, decision_log, env)
    finally:
        if proxy is not None:
            proxy_thread.run(proxy.stop())
        if proxy_thread is not None:
            proxy_thread.close()
        if sshd is not None:
            sshd.terminate()
            sshd.wait(10)
        for ns in (vm_ns, px_ns):
            sh("ip", "netns", "del", ns, check=False)


class Lab:
    def __init__(self, tmp, state, px_ns, vm_ip, policy, proxy, proxy_thread, registry, decision_log, env):
        self.tmp, self.state, self.px_ns, self.vm_ip = tmp, state, px_ns, vm_ip
        self.policy, self.proxy, self.proxy_thread = policy, proxy, proxy_thread
        self.registry, self.decision_log, self.env = registry, decision_log, env

    def ssh_args(self, key: str, user: str, *extra, tool="ssh", source=None, port=PROXY_PORT, host="127.0.0.1"):
        port_flag = "-P" if tool == "sftp" else "-p"
        args = ["nsenter", f"--net=/run/netns/{self.px_ns}", tool, "-F", "/dev/null",
                "-i", str(self.tmp / key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={self.tmp / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
                *ssh_wait_options(), port_flag, str(port)]
        if source:
            args += ["-o", f"BindAddress={source}"]
        return args + list(extra) + [f"{user}@{host}"]

    def ssh(self, key, user, *command, extra=(), input=None, tool="ssh", source=None, timeout=60,
            port=PROXY_PORT, host="127.0.0.1"):
        return subprocess.run(self.ssh_args(key, user, *extra, tool=tool, source=source, port=port, host=host)
                              + list(command), input=input, capture_output=True, text=True, timeout=timeout)

    def set_policy(self, policy):
        """The policy swap as the daemon does it: on the proxy's loop."""
        self.proxy_thread.run(self.proxy.set_policy(policy))

    def cli(self, *args):
        return subprocess.run([sys.executable, "-m", "skyguard.cli.main", *args],
                              capture_output=True, text=True, env=self.env, timeout=60)

    def entries(self, type_=None):
        return [e for e in self.decision_log.entries() if type_ is None or e["type"] == type_]

    def metric(self, name, **labels):
        value = self.registry.get_sample_value(name, labels)
        return value or 0.0

    def session_by_command(self, command):
        return [m for m in self.proxy.archive.list() if m.get("command") == command]


def test_exec_output_and_exit_status_propagate(lab):
    out = lab.ssh("alice", "alice+dc1", "echo hi from $(hostname -I); echo err >&2; exit 3")
    assert out.returncode == 3, out.stderr
    assert out.stdout.strip() == f"hi from {lab.vm_ip}"
    assert "err" in out.stderr
    [meta] = lab.session_by_command("echo hi from $(hostname -I); echo err >&2; exit 3")
    assert meta["operator"] == "alice" and meta["workload"] == "dc1" and meta["zone"] == "directory"
    assert meta["exit_status"] == 3 and meta["result"] == "ok"
    assert meta["key_fingerprint"].startswith("SHA256:") and meta["bytes_out"] > 0
    assert lab.metric("skyguard_admin_ssh_sessions_total", operator="alice", result="ok") >= 1


def test_interactive_shell_is_recorded_hashed_logged_and_replayed(lab):
    out = lab.ssh("alice", "alice+dc1", extra=["-tt"], input="echo shell-marker-$((6*7))\nexit 5\n")
    assert out.returncode == 5, out.stderr
    assert "shell-marker-42" in out.stdout
    shells = [m for m in lab.proxy.archive.list() if m["kind"] == "shell" and m["result"] == "ok"]
    meta = shells[-1]
    cast = (lab.state / "admin" / "sessions" / f"{meta['id']}.cast").read_text().splitlines()
    header = json.loads(cast[0])
    assert header["version"] == 2 and header["width"] > 0 and header["env"]["TERM"]
    assert "shell-marker-42" in "".join(json.loads(line)[2] for line in cast[1:])
    [end] = [e for e in lab.entries("admin_session_end") if e["session"] == meta["id"]]
    assert end["transcript_sha256"] == meta["transcript_sha256"]
    assert lab.proxy.archive.verify(meta["id"], list(lab.decision_log.entries())) == meta["transcript_sha256"]

    listed = lab.cli("admin", "sessions", "--json")
    assert listed.returncode == 0, listed.stderr
    assert meta["id"] in [s["id"] for s in json.loads(listed.stdout)]
    replayed = lab.cli("admin", "replay", meta["id"], "--speed", "1000")
    assert replayed.returncode == 0, replayed.stderr
    assert "shell-marker-42" in replayed.stdout


def test_tampered_transcript_is_detected(lab):
    out = lab.ssh("alice", "alice+dc1", "echo original-output")
    assert out.returncode == 0
    [meta] = lab.session_by_command("echo original-output")
    cast = lab.state / "admin" / "sessions" / f"{meta['id']}.cast"
    cast.write_text(cast.read_text().replace("original-output", "innocent-output"))
    with pytest.raises(AdminError, match="was modified"):
        lab.proxy.archive.verify(meta["id"], list(lab.decision_log.entries()))
    replayed = lab.cli("admin", "replay", meta["id"])
    assert replayed.returncode == 1 and "was modified" in replayed.stderr
    assert "innocent-output" not in replayed.stdout


def test_operator_outside_may_access_is_refused(lab):
    out = lab.ssh("bob", "bob+dc1", "echo should-not-run")
    assert out.returncode == 1
    assert "should-not-run" not in out.stdout
    assert "may not access dc1" in out.stderr and "radius1" in out.stderr
    assert lab.metric("skyguard_admin_ssh_sessions_total", operator="bob", result="not_allowed") >= 1
    assert any(e["operator"] == "bob" and e["reason"] == "not_allowed" for e in lab.entries("admin_session_refused"))


@pytest.mark.parametrize("key,user,source", [("carol", "carol+dc1", "127.0.0.11"),
                                             ("carol", "alice+dc1", "127.0.0.12"),
                                             ("bob", "alice+dc1", "127.0.0.13")])
def test_unknown_or_wrong_key_is_refused(lab, key, user, source):
    # Each from its own address, so that the brute-force brake (tested below) stays out of the way.
    out = lab.ssh(key, user, "echo should-not-run", source=source)
    assert out.returncode == 255 and "Permission denied" in out.stderr
    assert "should-not-run" not in out.stdout


def test_unknown_vm_is_refused_with_a_clear_message(lab):
    out = lab.ssh("alice", "alice+nosuchvm", "true")
    assert out.returncode == 1
    assert "no workload named 'nosuchvm'" in out.stderr and "dc1" in out.stderr


def test_the_proxys_own_ssh_client_ignores_the_users_ssh_files(lab, tmp_path, monkeypatch):
    # skyguard connects to VMs with its own settings only: an OpenSSH config, known_hosts or agent
    # of the user it runs as (root's ~/.ssh) must not redirect, proxy or otherwise change it.
    ghost = json.loads((lab.tmp / "policy-spec.json").read_text())["ghost_ip"]
    home, used = tmp_path / "home", tmp_path / "proxy-command-ran"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    (home / ".ssh" / "config").write_text(f"""Host *
    Hostname {ghost}
    Port 2
    User nobody
    ProxyCommand sh -c 'touch {used}; exec false'
    UserKnownHostsFile {home}/.ssh/known_hosts
    ConnectTimeout 1
""")
    (home / ".ssh" / "known_hosts").write_text(f"{lab.vm_ip} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIL3Bn450ZXB8e+M670v9a"
                                               "/bGPeCAylCnYQHGLc0Q/ZkV\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "no-agent.sock"))
    out = lab.ssh("alice", "alice+dc1", "echo reached-$((6*7))")
    assert out.returncode == 0 and out.stdout.strip() == "reached-42", out.stderr
    assert not used.exists(), "the proxy ran a ProxyCommand from the user's ~/.ssh/config"


def test_vm_that_does_not_answer_gets_a_clear_message(lab):
    out = lab.ssh("alice", "alice+ghost", "true")
    assert out.returncode == 255
    assert "ghost" in out.stderr and "did not answer" in out.stderr


def test_vm_without_sshd_gets_a_clear_message(lab):
    out = lab.ssh("alice", "alice+nosshd", "true")
    assert out.returncode == 255
    assert "cannot reach nosshd" in out.stderr and "refused" in out.stderr.lower(), out.stderr


def test_port_forwarding_is_refused_by_default(lab):
    before = lab.metric("skyguard_admin_ssh_refused_requests_total", request="port_forward")
    local = lab.ssh("alice", "alice+dc1", extra=["-W", f"{lab.vm_ip}:22"])
    assert local.returncode != 0 and "administratively prohibited" in local.stderr
    remote = lab.ssh("alice", "alice+dc1", "true", extra=["-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9"])
    assert remote.returncode == 255 and "forwarding failed" in remote.stderr
    assert lab.metric("skyguard_admin_ssh_refused_requests_total", request="port_forward") == before + 1
    assert lab.entries("admin_request_refused")


@pytest.mark.parametrize("mode", ["point-to-point", "ethernet"])
def test_tunnel_devices_are_refused_and_logged(lab, mode):
    before = lab.metric("skyguard_admin_ssh_refused_requests_total", request="tunnel")
    out = lab.ssh("alice", "alice+dc1", "echo should-not-run",
                  extra=["-o", f"Tunnel={mode}", "-w", "any:any", "-o", "ExitOnForwardFailure=yes"])
    assert out.returncode == 255 and "should-not-run" not in out.stdout, out.stderr
    assert "tunnel" in out.stderr.lower() and "not allowed" in out.stderr, out.stderr
    assert lab.metric("skyguard_admin_ssh_refused_requests_total", request="tunnel") == before + 1
    assert lab.entries("admin_request_refused")[-1]["request"] == "tunnel"


def test_port_forwarding_when_policy_allows_opens_from_the_vm(lab):
    allowing = replace(lab.policy, admin_ssh=replace(lab.policy.admin_ssh, port_forwarding=True))
    lab.set_policy(allowing)
    try:
        # -W joins our stdio to a TCP connection that the VM opens: here to its own sshd.
        out = subprocess.run(lab.ssh_args("alice", "alice+dc1", "-W", f"{lab.vm_ip}:22"),
                             input=b"", capture_output=True, timeout=60)
    finally:
        lab.set_policy(lab.policy)
    assert out.stdout.startswith(b"SSH-2.0-OpenSSH"), out.stderr
    assert any(e["dest"] == f"{lab.vm_ip}:22" for e in lab.entries("admin_port_forward"))


def test_policy_change_revokes_open_sessions(lab):
    command = "echo revocable-session-up; sleep 60"
    client = subprocess.Popen(lab.ssh_args("alice", "alice+dc1") + [command], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "revocable-session-up"
        alice_elsewhere = tuple(replace(op, may_access=("auth",)) if op.name == "alice" else op
                                for op in lab.policy.admin_ssh.operators)
        lab.set_policy(replace(lab.policy, admin_ssh=replace(lab.policy.admin_ssh,
                                                                       operators=alice_elsewhere)))
        _, stderr = client.communicate(timeout=30)
    finally:
        lab.set_policy(lab.policy)
        client.kill()
        client.wait()
    assert client.returncode == 255 and "access revoked by a policy change" in stderr
    [meta] = lab.session_by_command(command)
    assert meta["result"] == "revoked"
    assert any(e["operator"] == "alice" for e in lab.entries("admin_access_revoked"))


def test_agent_forwarding_is_refused_by_default(lab):
    agent_socket = lab.tmp / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_socket)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if agent_socket.exists():
                break
            time.sleep(0.02)
        args = lab.ssh_args("alice", "alice+dc1", "-A") + ['echo "agent=[$SSH_AUTH_SOCK]"']
        out = subprocess.run(args, capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, SSH_AUTH_SOCK=str(agent_socket)))
    finally:
        agent.terminate()
        agent.wait(10)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "agent=[]"


def test_sftp_refused_by_default_and_logged_with_file_names_when_allowed(lab):
    batch = "ls /etc/hostname\nget /etc/hostname {}\n".format(lab.tmp / "fetched")
    refused = lab.ssh("alice", "alice+dc1", extra=["-b", "-"], tool="sftp", input=batch)
    assert refused.returncode != 0 and "disabled by policy" in refused.stderr
    scp = lab.ssh("alice", "alice+dc1", "scp -f /etc/hostname")
    assert scp.returncode == 1 and "disabled by policy" in scp.stderr

    allowing = replace(lab.policy, admin_ssh=replace(lab.policy.admin_ssh, sftp=True))
    lab.set_policy(allowing)
    try:
        allowed = lab.ssh("alice", "alice+dc1", extra=["-b", "-"], tool="sftp", input=batch)
    finally:
        lab.set_policy(lab.policy)
    assert allowed.returncode == 0, allowed.stderr
    assert (lab.tmp / "fetched").read_text() == Path("/etc/hostname").read_text()
    transfers = lab.entries("admin_file_transfer")
    assert {"op": "open-read", "path": "/etc/hostname"}.items() <= transfers[-1].items()


def sftp_packet(kind: int, request_id: int, *strings: bytes, tail: bytes = b"") -> bytes:
    body = bytes([kind]) + struct.pack(">I", request_id) + b"".join(struct.pack(">I", len(s)) + s for s in strings) + tail
    return struct.pack(">I", len(body)) + body


def test_sftp_requests_skyguard_cannot_put_on_record_never_reach_the_vm(lab):
    """Extended requests the log gate does not know (any name a client makes up), request types of
    no SFTP version 3, and copy-data on handles no OPEN named were passed to the VM unlogged. Now
    skyguard answers them itself (OP_UNSUPPORTED; FAILURE for the handles), counts each in
    skyguard_admin_ssh_sftp_refused_requests_total and logs a session's first unsupported one; the
    session goes on. An SFTP client speaking raw packets through OpenSSH's ssh (sftp-server by exec)."""
    evil = sftp_packet(200, 1, b"evil@example.com", b"/etc/shadow", b"/tmp/shadow")
    stream = (struct.pack(">IBI", 5, 1, 3) + evil + sftp_packet(21, 2, b"/etc/shadow", b"/tmp/l")
              + sftp_packet(200, 3, b"copy-data", b"\0\0\0\0", tail=bytes(16) + struct.pack(">I4sQ", 4, bytes(4), 0))
              + evil.replace(struct.pack(">I", 1), struct.pack(">I", 4), 1) + sftp_packet(16, 5, b"/"))
    unsupported = lab.metric("skyguard_admin_ssh_sftp_refused_requests_total", reason="unsupported")
    unknown = lab.metric("skyguard_admin_ssh_sftp_refused_requests_total", reason="unknown_handle")
    lab.set_policy(replace(lab.policy, admin_ssh=replace(lab.policy.admin_ssh, sftp=True)))
    client = subprocess.Popen(lab.ssh_args("alice", "alice+dc1") + ["/usr/lib/openssh/sftp-server"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    answers: dict[int, tuple[int, str]] = {}
    hang = threading.Timer(60, client.kill)  # a bound on the reads below, never reached when answers come
    hang.start()
    try:
        client.stdin.write(stream)
        client.stdin.flush()
        while 5 not in answers:  # until the VM answers the last (sftp-server drops what it has not sent at EOF)
            head = client.stdout.read(4)
            assert len(head) == 4, (answers, client.stderr.read())
            body = client.stdout.read(struct.unpack(">I", head)[0])
            if body[0] == 101:  # STATUS: id, code, message
                request_id, code, size = struct.unpack_from(">III", body, 1)
                answers[request_id] = (code, body[13:13 + size].decode())
            elif body[0] != 2:  # not the VERSION
                answers[struct.unpack_from(">I", body, 1)[0]] = (body[0], "")
        client.stdin.close()
        assert client.wait(30) == 0
    finally:
        hang.cancel()
        client.kill()
        client.wait()
        lab.set_policy(lab.policy)
    not_passed = "skyguard: this SFTP request is not passed (skyguard cannot put it on record)"
    assert answers == {1: (8, not_passed), 2: (8, not_passed), 4: (8, not_passed),
                       3: (4, "skyguard: not done: the file of this handle is not known here (open it again)"),
                       5: (104, "")}, answers  # the REALPATH after them: the VM's NAME
    assert lab.metric("skyguard_admin_ssh_sftp_refused_requests_total", reason="unsupported") == unsupported + 3
    assert lab.metric("skyguard_admin_ssh_sftp_refused_requests_total", reason="unknown_handle") == unknown + 1
    [meta] = lab.session_by_command("/usr/lib/openssh/sftp-server")[-1:]
    logged = [e for e in lab.entries("admin_sftp_refused") if e["session"] == meta["id"]]
    assert [(e["request"], e["reason"], e["operator"]) for e in logged] == [
        ("extended request 'evil@example.com'", "unsupported", "alice")]


def test_session_killed_midway_is_complete_up_to_then(lab):
    command = "echo started-long-job; sleep 60"
    client = subprocess.Popen(lab.ssh_args("alice", "alice+dc1") + [command], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "started-long-job"
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait()
    for _ in range(200):
        metas = lab.session_by_command(command)
        if metas and metas[0]["result"] != "active":
            break
        time.sleep(0.05)
    [meta] = lab.session_by_command(command)
    assert meta["result"] == "client_disconnected" and meta["end"]
    cast = (lab.state / "admin" / "sessions" / f"{meta['id']}.cast").read_text()
    assert "started-long-job" in cast
    lab.proxy.archive.verify(meta["id"], list(lab.decision_log.entries()))


def test_repeated_failures_from_one_address_are_rate_limited(lab):
    source = "127.0.0.9"
    for _ in range(3):
        assert lab.ssh("carol", "alice+dc1", "true", source=source).returncode == 255
    blocked = lab.ssh("alice", "alice+dc1", "echo should-not-run", source=source)
    assert blocked.returncode == 255 and "should-not-run" not in blocked.stdout
    assert "too many failed logins" in blocked.stderr
    assert any(e["source"] == source for e in lab.entries("admin_source_blocked"))
    assert lab.metric("skyguard_admin_ssh_auth_failures_total", reason="rate_limited") >= 1
    # Other addresses are not affected.
    assert lab.ssh("alice", "alice+dc1", "true").returncode == 0


def test_metrics_after_sessions(lab):
    assert lab.metric("skyguard_admin_ssh_auth_failures_total", reason="bad_key") >= 1
    assert lab.metric("skyguard_admin_ssh_active_sessions") == 0
    text = __import__("prometheus_client").generate_latest(lab.registry).decode()
    assert "carol" not in text and "127.0.0" not in text


def wait_for_ssh_banner(lab, port, process):
    for _ in range(200):
        probe = sh("nsenter", f"--net=/run/netns/{lab.px_ns}", "bash", "-c",
                   f"exec 3<>/dev/tcp/127.0.0.1/{port} && head -c 4 <&3", check=False)
        if probe.stdout.startswith("SSH-"):
            return
        assert process.poll() is None, process.stderr.read()[-500:]
        time.sleep(0.05)
    pytest.fail(f"the proxy on port {port} did not start")


def test_proxy_killed_midway_leaves_a_complete_record(lab):
    state = lab.tmp / "killable-state"
    state.mkdir(mode=0o700)

    def start_proxy():
        process = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{lab.px_ns}", sys.executable, __file__, "serve",
             str(lab.tmp / "policy-spec.json"), str(state), str(lab.state / "secrets")],
            env=lab.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for_ssh_banner(lab, KILLABLE_PROXY_PORT, process)
        return process

    proxy = start_proxy()
    command = "echo before-the-kill; sleep 60"
    client = subprocess.Popen(lab.ssh_args("alice", "alice+dc1", port=KILLABLE_PROXY_PORT) + [command],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    archive = SessionArchive(state / "admin" / "sessions")
    try:
        assert client.stdout.readline().strip() == "before-the-kill"
        # The transcript is written behind, by its own thread (transcript.py): what the kernel has
        # survives the kill, what was still queued in that instant does not. Kill once it is there.
        [meta] = archive.list()
        deadline = time.monotonic() + 20
        while "before-the-kill" not in archive.transcript_path(meta["id"]).read_text():
            assert time.monotonic() < deadline, "the transcript never got the session's output"
            time.sleep(0.02)
    finally:
        proxy.kill()  # SIGKILL: no cleanup code runs
        proxy.wait()
        client.kill()
        client.wait()
    [meta] = archive.list()
    assert meta["result"] == "active" and "before-the-kill" in archive.transcript_path(meta["id"]).read_text()
    log = JsonLinesDecisionLog(fallback_log_path(state))
    assert [e["type"] for e in log.entries()] == ["admin_session_start"]

    restarted = start_proxy()  # the next start closes the record of the dead one's session
    try:
        meta = archive.load(meta["id"])
        assert meta["result"] == "interrupted"
        [end] = [e for e in log.entries() if e["type"] == "admin_session_end"]
        assert end["session"] == meta["id"] and end["transcript_sha256"] == meta["transcript_sha256"]
        assert archive.verify(meta["id"], list(log.entries()))
    finally:
        restarted.terminate()
        restarted.wait(10)


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve_until_killed(*sys.argv[2:5])
