"""The lab's QEMU guests without booting one: which workloads become guests, what QEMU is told
(tap, MAC, addresses, agent port), the host side of the tap, and the agent's wire protocol
against a peer that speaks it over a real unix socket."""

from __future__ import annotations

import base64
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from skyguard import config
from skyguard.errors import BadInput, LabError
from skyguard.lab import guests, qemu
from skyguard.lab.topology import read_workloads

WORKLOADS = read_workloads(config.DEFAULT_POLICY)


def test_vms_choice():
    assert guests.parse_vms("netns", WORKLOADS) == set()
    assert guests.parse_vms(None, WORKLOADS) == set()
    assert guests.parse_vms("qemu", WORKLOADS) == {w.name for w in WORKLOADS}
    assert guests.parse_vms("qemu=agent1, dc1", WORKLOADS) == {"agent1", "dc1"}
    for bad in ("kvm", "qemu=nobody", "netns=agent1", "qemu=,"):
        with pytest.raises(BadInput):
            guests.parse_vms(bad, WORKLOADS)


def _spec(tmp_path):
    agent1 = next(w for w in WORKLOADS if w.name == "agent1")
    return guests.spec_for(tmp_path, agent1)


def test_qemu_is_given_the_workloads_identity(tmp_path):
    spec = _spec(tmp_path)
    image = qemu.GuestImage(Path("/k"), Path("/i"), "key")
    argv = qemu.qemu_argv(spec, image, "tcg")
    joined = " ".join(argv)
    assert "accel=tcg" in joined
    assert f"tap,id=net0,ifname=sg-agent1,script={spec.ifup_script},downscript=no" in argv
    assert "virtio-net-pci,netdev=net0,mac=02:00:00:00:05:02,romfile=" in argv
    cmdline = argv[argv.index("-append") + 1]
    assert "skyguard.addr=10.10.5.2,fd00:10:5::2" in cmdline
    assert "skyguard.gw4=169.254.1.1 skyguard.gw6=fe80::1" in cmdline
    assert "skyguard.dns=192.0.2.53,2001:db8::53" in cmdline
    assert f"socket,id=agent,path={spec.agent_socket},server=on,wait=off" in argv
    assert "-no-reboot" in argv and "-nodefaults" in argv
    # sealed: the tap is the guest's only network (no user-mode networking, no second NIC)
    netdevs = [argv[i + 1] for i, a in enumerate(argv) if a in ("-netdev", "-nic", "-net")]
    assert netdevs == [f"tap,id=net0,ifname=sg-agent1,script={spec.ifup_script},downscript=no"]


def test_the_tap_gets_the_same_host_side_as_a_veth(tmp_path):
    spec = _spec(tmp_path)
    spec.dir.mkdir(parents=True)
    text = qemu.write_ifup(spec).read_text()
    assert 'ip addr add 169.254.1.1/32 dev "$1"' in text
    assert 'ip addr add fe80::1/64 dev "$1" nodad' in text
    assert 'ip route replace 10.10.5.2/32 dev "$1"' in text
    assert 'ip route replace fd00:10:5::2/128 dev "$1"' in text
    assert spec.ifup_script.stat().st_mode & 0o111


def test_a_missing_image_says_how_to_build_it(tmp_path):
    with pytest.raises(LabError, match="scripts/setup"):
        qemu.find_image(tmp_path)


class _Peer:
    """Speaks the guest side of the agent protocol on a unix socket (as /etc/agent does): answers
    pings, and answers each request after `noise` (lines that are not its answer)."""

    def __init__(self, path: Path, noise: bytes = b""):
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(1)
        self.noise = noise
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.server.accept()
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                fields = line.split(b" ")
                if len(fields) == 1:
                    conn.sendall(fields[0] + b" 0 b b\n")
                    continue
                rid, cmd, stdin = fields
                out = base64.b64decode(cmd) + b"|" + base64.b64decode(stdin)
                conn.sendall(self.noise + rid + b" 7 b" + base64.b64encode(out) + b" b" +
                             base64.b64encode(b"err") + b"\n")


def test_agent_request_and_answer(tmp_path):
    sock = tmp_path / "agent.sock"
    _Peer(sock, noise=b"junk line\nabc 0 b b\n\n")
    done = qemu.Agent(sock).run(["echo", "a b"], input="in")
    assert done.returncode == 7
    assert done.stdout == b"echo 'a b'|in" and done.stderr == b"err"


def test_agent_gives_up_at_its_timeout_and_when_unreachable(tmp_path):
    sock = tmp_path / "agent.sock"
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(sock))
    silent.listen(1)
    with pytest.raises(subprocess.TimeoutExpired):
        qemu.Agent(sock).run("true", timeout=1.0)
    silent.close()
    with pytest.raises(LabError, match="not reachable"):
        qemu.Agent(tmp_path / "none.sock").run("true", timeout=1.0)
