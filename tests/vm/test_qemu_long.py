"""The long version of the vm tier (marker `fuzz`, not in the default run: `pytest -m fuzz
tests/vm/test_qemu_long.py`): every workload of policies/keysystems.yaml a QEMU guest, the
integration tier's whole TCP/ICMP matrix (and UDP to the internet) from inside the guests, floods of
garbage and MAC addresses from two guests at once, and QEMU killed and rebooted again and again
under the daemon.
"""

from __future__ import annotations

import subprocess
import threading

import pytest
from guest_support import RunningDaemon, attached_programs, drop_count, gsh, probe, start_tcp_echo, vm_lab, wait_for
from test_daemon import LISTEN, MATRIX, SYSLOG_V4

pytestmark = pytest.mark.fuzz

# Rows a busybox guest can play: TCP and ICMP anywhere, UDP only to the internet's echo servers
# (busybox has no UDP server for the guests to run).
ROWS = [r for r in MATRIX if r[1] != "udp" or r[2].startswith(("192.0.2.", "2001:db8:"))]
FLOOD_FRAMES = 200_000
REBOOTS = 5
FLOODERS = ("agent1", "vfw1")


@pytest.fixture(scope="module")
def lab(root, tmp_path_factory):
    yield from vm_lab(tmp_path_factory, "l", "qemu")


@pytest.fixture(scope="module")
def daemon(lab, tmp_path_factory):
    d = RunningDaemon(lab, tmp_path_factory.mktemp("vmlong"))
    for vm, (tcp, _udp) in LISTEN.items():
        start_tcp_echo(lab, vm, tcp)
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


def _matrix_holds(lab, skip=()) -> None:
    for source in sorted({r[0] for r in ROWS} - set(skip)):
        rows = [r for r in ROWS if r[0] == source]
        got = probe(lab, source, [(kind, dst, port) for _, kind, dst, port, _ in rows])
        wrong = [row for row, ok in zip(rows, got) if ok != row[4]]
        assert not wrong, f"from {source}: {wrong}"


def test_the_whole_matrix_from_inside_guests(lab, daemon):
    _matrix_holds(lab)


def test_floods_from_two_guests_change_nothing_for_the_others(lab, daemon):
    before = drop_count(daemon.status(), "sandbox", "spoof_mac")
    line = f"rawsend eth0 garbage {FLOOD_FRAMES} && rawsend eth0 macflood {FLOOD_FRAMES}"
    results = {}

    def flood(vm):
        results[vm] = gsh(lab, vm, line, timeout=1800)

    threads = [threading.Thread(target=flood, args=(vm,)) for vm in FLOODERS]
    [t.start() for t in threads]
    _matrix_holds(lab, skip=FLOODERS)  # while they flood (their own vCPU is busy sending)
    [t.join() for t in threads]
    for vm, out in results.items():
        assert out.returncode == 0 and out.stdout.split() == [str(FLOOD_FRAMES)] * 2, (vm, out.stderr)
    assert daemon.running()
    assert drop_count(daemon.status(), "sandbox", "spoof_mac") >= before + FLOOD_FRAMES
    _matrix_holds(lab)


def test_qemu_killed_and_rebooted_again_and_again(lab, daemon):
    for _ in range(REBOOTS):
        vm = next(v for v in lab.status()["vms"] if v["name"] == "agent1")
        subprocess.run(["kill", "-9", str(vm["pid"])], check=True)
        wait_for(lambda: "sg-agent1" not in attached_programs(daemon.status()), 20, "sg-agent1 forgotten")
        lab.restart_guest("agent1")
        wait_for(lambda: attached_programs(daemon.status()).get("sg-agent1"), 20, "sg-agent1 attached")
        assert probe(lab, "agent1", [("udp", SYSLOG_V4, 514), ("tcp", "10.10.2.2", 389)]) == [True, False]
    assert daemon.running()
