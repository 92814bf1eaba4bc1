"""Content rules on SFTP uploads through the SSH access proxy, end to end: the operator's OpenSSH
`sftp` client, the proxy, and the VM's real sshd and sftp-server (the lab of test_admin_ssh.py),
with a real clamd. A blocked upload fails in the client, leaves no file on the VM and is logged
with the operator; a clean one arrives byte-exact."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from dataclasses import replace

import pytest
from test_admin_ssh import lab  # noqa: F401 - the module-scoped fixture, a lab of this module's own

from skyguard.admin import sftp
from skyguard.policy.content import ContentBlock, ContentPolicy, ContentRule
from support.content_support import EICAR, LocalClamd, harmless_bytes, zipped


@pytest.fixture(scope="module")
def guarded(lab, tmp_path_factory):  # noqa: F811 - the fixture above
    """The lab's policy with SFTP on and a content rule for the VM's zone."""
    with LocalClamd(tmp_path_factory.mktemp("sftp-clamd")) as clamd:
        rule = ContentRule("operator-uploads", ("directory",), ("upload",), ("sftp",),
                           ContentBlock(clamav=True, max_size=1 << 20))
        policy = replace(lab.policy, admin_ssh=replace(lab.policy.admin_ssh, sftp=True),
                         content=ContentPolicy((rule,), clamd_socket=clamd.socket, scan_timeout=5, max_inspect_bytes=2 << 20))
        lab.set_policy(policy)
        uploads = lab.tmp / "uploads"
        uploads.mkdir(exist_ok=True)
        try:
            yield uploads
        finally:
            lab.set_policy(lab.policy)


def put(lab, local, remote):  # noqa: F811
    return lab.ssh("alice", "alice+dc1", extra=["-b", "-"], tool="sftp", input=f"put {local} {remote}\n")


def judged(lab, verdict):  # noqa: F811
    """SFTP uploads the access proxy's Prometheus counter has seen with this verdict."""
    rule = "operator-uploads" if verdict == "blocked" else "-"
    return lab.metric("skyguard_admin_sftp_content_decisions_total", zone="directory", rule=rule, protocol="sftp",
                      verdict=verdict)


def test_clean_upload_through_the_proxy_arrives_byte_exact(lab, guarded):  # noqa: F811
    data = harmless_bytes(200_000)
    (lab.tmp / "clean.bin").write_bytes(data)
    allowed = judged(lab, "allowed")
    result = put(lab, lab.tmp / "clean.bin", guarded / "clean.bin")
    assert result.returncode == 0, result.stderr
    assert (guarded / "clean.bin").read_bytes() == data
    assert judged(lab, "allowed") == allowed + 1


@pytest.mark.parametrize("name,data", [("eicar.txt", EICAR), ("holiday.jpg", zipped("a.txt", EICAR)),
                                       ("big.bin", os.urandom((1 << 20) + 10))],
                         ids=["eicar", "eicar-zip-as-jpg", "over-max-size"])
def test_blocked_upload_through_the_proxy_fails_and_leaves_nothing(lab, guarded, name, data):  # noqa: F811
    (lab.tmp / name).write_bytes(data)
    blocked = judged(lab, "blocked")
    result = put(lab, lab.tmp / name, guarded / name)
    assert result.returncode != 0
    assert judged(lab, "blocked") == blocked + 1  # counted, not only logged
    assert not (guarded / name).exists()
    entry = lab.entries("content_blocked")[-1]
    assert (entry["operator"], entry["workload"], entry["zone"], entry["protocol"], entry["path"]) == (
        "alice", "dc1", "directory", "sftp", str(guarded / name))
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    # every field of a block, as the filter reports it through the proxy's record(kind, **fields)
    assert set(entry) == {"type", "operator", "session", "zone", "workload", "rule", "engine", "protocol", "direction",
                          "destination", "size", "sha256", "mime", "reason", "path"}, entry
    assert (entry["direction"], entry["destination"], entry["rule"]) == ("upload", "dc1", "operator-uploads")


def test_a_server_side_copy_is_on_record_and_refused_where_uploads_are_judged(lab, guarded):  # noqa: F811
    """`cp` in OpenSSH's sftp is copy-data: bytes copied on the VM into a file opened for writing,
    which no rule would see. The log gate puts it on record with both files, the upload filter
    refuses it (counted as content_rules), and the copy holds nothing."""
    data = harmless_bytes(10_000)
    (guarded / "on-vm.bin").write_bytes(data)
    refused = lab.metric("skyguard_admin_ssh_sftp_refused_requests_total", reason="content_rules")
    result = lab.ssh("alice", "alice+dc1", extra=["-b", "-"], tool="sftp",
                     input=f"cp {guarded / 'on-vm.bin'} {guarded / 'copy.bin'}\n")
    assert result.returncode != 0
    assert not (guarded / "copy.bin").exists() or (guarded / "copy.bin").stat().st_size == 0
    assert lab.metric("skyguard_admin_ssh_sftp_refused_requests_total", reason="content_rules") == refused + 1
    assert [(e["path"], e["new_path"]) for e in lab.entries("admin_file_transfer") if e["op"] == "copy-data"][-1] == (
        str(guarded / "on-vm.bin"), str(guarded / "copy.bin"))


@pytest.mark.parametrize("how", ["sftp-server-after-env", "legacy-scp"])
def test_an_upload_by_a_transfer_command_the_filter_cannot_follow_is_refused(lab, guarded, how):  # noqa: F811
    """With content rules on SFTP uploads, a transfer program run by a command (sftp-server behind
    `env`, `scp -t` of the legacy scp protocol) must not carry a file to the VM unjudged."""
    name = f"eicar-{how}.txt"
    (lab.tmp / name).write_bytes(EICAR)
    if how == "legacy-scp":
        args = lab.ssh_args("alice", "alice+dc1", tool="sftp")  # scp takes sftp's flags (-P)
        args[2] = "scp"
        result = subprocess.run(args[:-1] + ["-O", str(lab.tmp / name), f"{args[-1]}:{guarded / name}"],
                                capture_output=True, text=True, timeout=60)
    else:
        result = lab.ssh("alice", "alice+dc1", tool="sftp", extra=["-s", "env /usr/lib/openssh/sftp-server", "-b", "-"],
                         input=f"put {lab.tmp / name} {guarded / name}\n")
    assert result.returncode != 0, result.stderr
    assert not (guarded / name).exists()


def _scp_legacy(lab, local, remote):  # noqa: F811
    """OpenSSH's scp in its old protocol (-O): an exec of `scp -t` on the VM, not SFTP."""
    args = lab.ssh_args("alice", "alice+dc1", tool="scp")
    args[args.index("-p")] = "-P"  # scp's port flag
    return subprocess.run(args[:-1] + ["-O", str(local), f"{args[-1]}:{remote}"], capture_output=True, text=True,
                          timeout=60)


def test_transfers_the_filter_cannot_read_are_refused_where_content_rules_apply(lab, guarded):  # noqa: F811
    """Under an SFTP content rule, file transfer by exec (scp -O, rsync) would move files the
    filter never sees: such sessions are refused; SFTP (OpenSSH 9's scp included) is judged."""
    (lab.tmp / "eicar-scp.txt").write_bytes(EICAR)
    result = _scp_legacy(lab, lab.tmp / "eicar-scp.txt", guarded / "eicar-scp.txt")
    assert result.returncode != 0
    assert not (guarded / "eicar-scp.txt").exists()
    result = subprocess.run(["rsync", "-e", " ".join(lab.ssh_args("alice", "alice+dc1")[:-1]),
                             str(lab.tmp / "eicar-scp.txt"), f"alice+dc1@127.0.0.1:{guarded}/eicar-rsync.txt"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert not (guarded / "eicar-rsync.txt").exists()


def test_an_sftp_session_open_before_content_rules_does_not_escape_them(lab, guarded):  # noqa: F811
    """SFTP on, no content rule: a session opens (unfiltered, nothing to judge). A policy change
    then puts the VM's zone under a rule: the open session must not go on uploading unjudged."""
    before = lab.proxy.policy
    no_rules = replace(before, content=ContentPolicy())
    ruled = replace(before, content=ContentPolicy((ContentRule("tiny", ("directory",), ("upload",), ("sftp",),
                                                               ContentBlock(max_size=10)),)))
    (lab.tmp / "late.txt").write_bytes(b"more than ten bytes\n")
    lab.set_policy(no_rules)
    client = subprocess.Popen(lab.ssh_args("alice", "alice+dc1", "-b", "-", tool="sftp"), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client.stdin.write("pwd\n")
        client.stdin.flush()
        while "Remote working directory" not in (line := client.stdout.readline()):
            assert line, client.stderr.read()
        lab.set_policy(ruled)
        client.stdin.write(f"put {lab.tmp / 'late.txt'} {guarded / 'late.txt'}\n")
        client.stdin.close()
        client.wait(60)
    finally:
        if client.poll() is None:
            client.kill()
        lab.set_policy(before)
    assert not (guarded / "late.txt").exists() or (guarded / "late.txt").read_bytes() != b"more than ten bytes\n"


def test_an_upload_the_vm_never_answers_holds_the_vms_turn_only_for_a_while(lab, guarded, monkeypatch):  # noqa: F811
    """One operator's upload to a FIFO on the VM: the VM's sftp-server never answers its OPEN, so
    that channel held the VM's replay turn for good and every other upload to the VM waited, then
    failed after TURN_WAIT_S. Now a channel holding the turn past TURN_HOLD_S while another waits
    is ended (saying why), and the other upload goes through."""
    monkeypatch.setattr(sftp, "TURN_HOLD_S", 2.0)  # 60 s by default
    monkeypatch.setattr(sftp, "TURN_GRACE_S", 0.5)
    monkeypatch.setattr(sftp, "TURN_WAIT_S", 30.0)
    stuck = guarded / "stuck"
    os.mkfifo(stuck)
    (lab.tmp / "small.txt").write_bytes(b"a small upload\n")
    data = harmless_bytes(50_000)
    (lab.tmp / "after.bin").write_bytes(data)
    holder = subprocess.Popen(lab.ssh_args("alice", "alice+dc1", "-b", "-", tool="sftp"), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        holder.stdin.write(f"put {lab.tmp / 'small.txt'} {stuck}\n")
        holder.stdin.flush()
        turn = lab.proxy.sftp_turn("dc1")
        deadline = time.monotonic() + 30
        while turn.holder is None:  # its OPEN reached the VM, which waits for a reader of the FIFO
            assert time.monotonic() < deadline and holder.poll() is None, holder.communicate()
            time.sleep(0.05)
        other = put(lab, lab.tmp / "after.bin", guarded / "after.bin")
        assert other.returncode == 0, other.stderr
        assert (guarded / "after.bin").read_bytes() == data
        _, err = holder.communicate(timeout=30)
        assert holder.returncode != 0 and "held the VM's upload turn" in err, err
    finally:
        if holder.poll() is None:
            holder.kill()
        reader = os.open(stuck, os.O_RDONLY | os.O_NONBLOCK)  # lets the VM's sftp-server go on
        os.close(reader)
        holder.wait()
        stuck.unlink()
