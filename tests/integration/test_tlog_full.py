"""The signed log's filesystem fills up under a real `skyguard up` in the lab (one VM's events can
do it): the writer refuses entries below its reserve, before writing anything; DNS then answers
nothing (fail closed), enforcement goes on, status and metrics say why, the daemon lives, and once
the space is back logging resumes on its own and `skyguard log verify` passes.

The log directory is a small tmpfs this module mounts and unmounts, never the machine's disk.
"""

import os
import subprocess
import sys

import pytest
from daemon_support import RunningDaemon, probe_one, wait_for

from skyguard.lab.addressing import addresses_for_name

EXPORTER = "127.0.0.1:26031"  # loopback of the lab's host namespace
LOG_FS_BYTES = 8 << 20  # its reserve is then 1/50 of it (skyguard/tlog/store.py)


@pytest.fixture(scope="module")
def daemon(lab, tmp_path_factory):
    work = tmp_path_factory.mktemp("logfull-daemon")
    mount = work / "state" / "log"
    mount.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={LOG_FS_BYTES},mode=0700", "tmpfs", str(mount)], check=True)
    d = RunningDaemon(lab, work, metrics=EXPORTER, wait_attached=True)
    try:
        d.start()
        yield d
    finally:
        d.cleanup()
        subprocess.run(["umount", str(mount)], check=False)


def dig(lab, vm: str, name: str) -> str:
    return lab.exec(vm, ["dig", "+tries=1", "+time=1", "+noall", "+comments", name], capture_output=True,
                    text=True, timeout=60).stdout


def metrics(daemon) -> dict[str, float]:
    out = subprocess.run(["nsenter", f"--net={daemon.host_netns}", "--", "curl", "-sf", f"http://{EXPORTER}/metrics"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
            if line.startswith("skyguard_log_")}


def connects(lab, vm: str, address: str, port: int) -> bool:
    """Does a TCP connection from vm to address:port open (the datapath passes its SYN)?"""
    out = lab.exec(vm, [sys.executable, "-c", CONNECT, address, str(port)], lab_resolver=False,
                   capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "open"


CONNECT = """import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
    print("open")
except OSError:
    print("closed")
"""


def fill_below_reserve(lab, daemon):
    """Another file (a VM's disk image, say) leaves half the log's reserve free; returns it once
    the log refuses entries (unlink it to give the space back)."""
    log_dir = daemon.state_dir / "log"
    filler = log_dir / "filler"
    space = os.statvfs(log_dir)
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, space.f_bavail * space.f_frsize - daemon.status()["log"]["reserve_bytes"] // 2)
    dig(lab, "agent1", "payroll.corp.test")  # its entry finds the log below its reserve
    refusing = wait_for(lambda: daemon.status()["log"]["refusing"], 30, "the log refusing entries")
    assert "refuses new entries: its filesystem has" in refusing
    return filler


def test_a_full_log_filesystem_refuses_entries_fails_dns_closed_and_recovers_without_a_restart(lab, daemon):
    assert "status: NOERROR" in dig(lab, "agent1", "pypi.sandbox.test")
    head = daemon.status()["log"]
    reserve = head["reserve_bytes"]
    assert head["refusing"] is None and 0 < reserve <= LOG_FS_BYTES // 50

    filler = fill_below_reserve(lab, daemon)

    # Fail closed: a decision that cannot be logged gives no address (SERVFAIL once forwarded) or no answer.
    assert "status: SERVFAIL" in dig(lab, "agent1", "pypi.sandbox.test")
    assert "status:" not in dig(lab, "agent1", "payroll.corp.test")
    assert probe_one(lab, "radius1", "icmp", "10.10.2.2")  # enforcement does not need the log
    assert daemon.running()
    status = daemon.status()
    assert status["parts"]["dns"] == "running" and status["log"]["refused_entries"] >= 2
    seen = metrics(daemon)
    assert seen["skyguard_log_accepting"] == 0 and seen["skyguard_log_refused_entries_total"] >= 2
    assert seen["skyguard_log_filesystem_free_bytes"] < seen["skyguard_log_reserve_bytes"] == reserve
    said = daemon.log_tail(1 << 20)
    assert said.count("CRITICAL skyguard.tlog") == 1 and "Traceback" not in said and "failed to write" not in said

    filler.unlink()  # space is back: no restart
    wait_for(lambda: "status: NOERROR" in dig(lab, "agent1", "pypi.sandbox.test"), 60, "DNS answering again")
    assert daemon.status()["log"]["refusing"] is None
    assert metrics(daemon)["skyguard_log_accepting"] == 1
    kinds = [(e["type"], e.get("refused")) for e in daemon.log_entries()]
    low, restored = kinds.index(("log_space_low", None)), [k for k in kinds if k[0] == "log_space_restored"]
    assert len(restored) == 1 and restored[0][1] >= 2 and kinds.index(restored[0]) > low
    assert ("dns", None) in kinds[kinds.index(restored[0]):]  # the answered query is on record
    daemon.cli("log", "verify", check=True)


def test_an_answer_the_log_refuses_opens_nothing_in_the_datapath_and_closes_no_logged_one(lab, daemon):
    # Allowed names of the sandbox (rule sandbox-packages, tcp/443) no other test of this module asks.
    logged, refused = (str(addresses_for_name(n)[0]) for n in ("mirror.pythonhosted.test", "wheels.pythonhosted.test"))
    assert "status: NOERROR" in dig(lab, "agent1", "mirror.pythonhosted.test")  # decided and logged
    filler = fill_below_reserve(lab, daemon)
    try:
        # Fail closed: the VM gets no address, and the datapath does not open it behind its back.
        assert "status: SERVFAIL" in dig(lab, "agent1", "wheels.pythonhosted.test")
        assert "status: SERVFAIL" in dig(lab, "agent1", "mirror.pythonhosted.test")  # asked again: refused too
        assert not connects(lab, "agent1", refused, 443)
        assert connects(lab, "agent1", logged, 443)  # the earlier, logged decision still holds
    finally:
        filler.unlink()
    wait_for(lambda: "status: NOERROR" in dig(lab, "agent1", "wheels.pythonhosted.test"), 60, "DNS answering again")
    assert connects(lab, "agent1", refused, 443)  # logged now: open
