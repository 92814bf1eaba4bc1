"""File transfer by another name, attacked with real OpenSSH, scp and rsync clients through the
access proxy to a real sshd (the lab of test_admin_ssh.py: its own namespaces, its own proxy).

With `admin.ssh.sftp` off, the proxy used to refuse only the `sftp` subsystem and an exec whose
first word was `scp`; everything below got a file out of the VM. Now the decision is by what the
command runs (skyguard/admin/commands.py), and every exec command, refused or run, is in the log.
The command allow-list (`admin.ssh.commands`) is tested here too.
"""

from __future__ import annotations

import base64
import secrets
import shlex
import subprocess
from dataclasses import replace

import pytest
from test_admin_ssh import lab  # noqa: F401 - the module-scoped fixture, a lab of this module's own

SCP_SINK_ACKS = "\0\0\0"  # what an scp sink answers; makes `scp -f` send the file


@pytest.fixture(scope="module")
def secret_file(lab):  # noqa: F811 - the fixture above
    """A file on the "VM" whose content must not come out while file transfer is off."""
    path = lab.tmp / "vm-secret.txt"
    marker = f"vm-secret-{secrets.token_hex(8)}"
    path.write_text(marker + "\n")
    return path, marker


def with_allow_list(policy, entries):
    """The policy with `admin.ssh.commands` set to `entries`."""
    return replace(policy, admin_ssh=replace(policy.admin_ssh, commands=tuple(entries)))


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def assert_refused_and_logged(lab, out, command, marker, programs):  # noqa: F811
    assert marker not in out.stdout, f"the file came out: {out.stdout!r}"
    assert out.returncode != 0
    assert "file transfer (SFTP/scp/rsync) is disabled by policy" in out.stderr, out.stderr
    logged = [e for e in lab.entries("admin_session_refused") if e["command"] == command]
    assert logged and logged[-1]["reason"] == "file_transfer_refused", logged
    assert logged[-1]["transfer_programs"] == programs


EXEC_DISGUISES = [
    ("env scp -f {path}", ["scp"]),
    ('sh -c "scp -f {path}"', ["scp"]),
    ("SCP -f {path}", ["scp"]),
    ("busybox scp -f {path}", ["scp"]),
    ("s''cp -f {path}", ["scp"]),
    ("cd / && exec /usr/bin/scp -f {path}", ["scp"]),
    ("BASE64", ["scp"]),
]


@pytest.mark.parametrize("template,programs", EXEC_DISGUISES)
def test_scp_by_another_name_is_refused_and_logged(lab, secret_file, template, programs):  # noqa: F811
    path, marker = secret_file
    command = (f"echo {b64(f'scp -f {path}')} | base64 -d | sh" if template == "BASE64"
               else template.format(path=path))
    out = lab.ssh("alice", "alice+dc1", command, input=SCP_SINK_ACKS)
    assert_refused_and_logged(lab, out, command, marker, programs)


def test_sftp_server_run_as_a_command_is_refused(lab, secret_file):  # noqa: F811
    path, marker = secret_file
    fetched = lab.tmp / "fetched-by-sftp-exec"
    # `sftp -s PATH` runs the server as an exec command instead of the sftp subsystem.
    out = lab.ssh("alice", "alice+dc1", tool="sftp", extra=["-s", "/usr/lib/openssh/sftp-server", "-b", "-"],
                  input=f"get {path} {fetched}\n")
    assert out.returncode != 0 and not fetched.exists()
    assert "disabled by policy" in out.stderr, out.stderr
    [entry] = [e for e in lab.entries("admin_session_refused") if e["command"] == "/usr/lib/openssh/sftp-server"]
    assert entry["transfer_programs"] == ["sftp-server"] and entry["kind"] == "exec"


def rsync(lab, source, dest, *options):  # noqa: F811
    remote_shell = " ".join(shlex.quote(a) for a in lab.ssh_args("alice", "alice+dc1")[2:-1])
    return subprocess.run(["nsenter", f"--net=/run/netns/{lab.px_ns}", "rsync", "-e", remote_shell, *options,
                           f"alice+dc1@127.0.0.1:{source}", str(dest)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("options", [(), ("--rsync-path=env rsync",), ("--rsync-path=/usr/bin/RSYNC",)],
                         ids=["rsync", "env-rsync", "upper-case-path"])
def test_rsync_is_refused(lab, secret_file, options):  # noqa: F811
    path, marker = secret_file
    dest = lab.tmp / f"fetched-by-rsync-{secrets.token_hex(4)}"
    out = rsync(lab, path, dest, *options)
    assert out.returncode != 0 and not dest.exists()
    assert "disabled by policy" in out.stderr, out.stderr
    commands = [e["command"] for e in lab.entries("admin_session_refused")]
    assert any(c.endswith(str(path)) and "--server" in c for c in commands)


def test_legacy_scp_client_is_refused(lab, secret_file):  # noqa: F811
    path, marker = secret_file
    dest = lab.tmp / "fetched-by-scp"
    args = lab.ssh_args("alice", "alice+dc1", tool="sftp")  # same flags; scp also takes -P
    args[2] = "scp"
    out = subprocess.run(args[:-1] + ["-O", f"{args[-1]}:{path}", str(dest)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and not dest.exists()
    assert "disabled by policy" in out.stderr, out.stderr


def test_when_transfer_is_allowed_sftp_server_by_exec_works_and_its_file_names_are_logged(lab, secret_file):  # noqa: F811,E501
    path, marker = secret_file
    fetched = lab.tmp / "fetched-allowed"
    lab.set_policy(replace(lab.policy, admin_ssh=replace(lab.policy.admin_ssh, sftp=True)))
    try:
        out = lab.ssh("alice", "alice+dc1", tool="sftp", extra=["-s", "/usr/lib/openssh/sftp-server", "-b", "-"],
                      input=f"get {path} {fetched}\n")
    finally:
        lab.set_policy(lab.policy)
    assert out.returncode == 0, out.stderr
    assert fetched.read_text().strip() == marker
    assert any(e["path"] == str(path) and e["op"] == "open-read" for e in lab.entries("admin_file_transfer"))


def test_ordinary_commands_still_run_and_are_logged(lab):  # noqa: F811
    command = "echo ordinary-$((20+22)) | tr a-z A-Z"
    out = lab.ssh("alice", "alice+dc1", command)
    assert out.returncode == 0 and out.stdout.strip() == "ORDINARY-42", out.stderr
    assert any(e["command"] == command and e["kind"] == "exec" for e in lab.entries("admin_session_start"))


def test_allow_list_runs_only_listed_commands_and_no_shell(lab, secret_file):  # noqa: F811
    path, marker = secret_file
    shell = subprocess.Popen(lab.ssh_args("alice", "alice+dc1", "-tt"), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        shell.stdin.write("echo shell-$((6*7))-up\n")
        shell.stdin.flush()
        while "shell-42-up" not in shell.stdout.readline():  # the echo of the input does not match
            assert shell.poll() is None, shell.stderr.read()
        restricted = with_allow_list(lab.policy, ["echo allowed-*", f"cat {path}"])
        lab.set_policy(restricted)
        _, stderr = shell.communicate(timeout=30)  # the open shell is ended by the new policy
        assert shell.returncode == 255 and "no longer allowed by a policy change" in stderr, stderr

        ok = lab.ssh("alice", "alice+dc1", "echo allowed-one")
        listed = lab.ssh("alice", "alice+dc1", f"cat {path}")
        chained = lab.ssh("alice", "alice+dc1", f"echo allowed-one; cat {path}")
        substituted = lab.ssh("alice", "alice+dc1", "echo allowed-$(id -u)")
        other = lab.ssh("alice", "alice+dc1", "id")
        new_shell = lab.ssh("alice", "alice+dc1", extra=["-tt"], input="id\nexit\n")
    finally:
        lab.set_policy(lab.policy)
        shell.kill()
        shell.wait()
    assert ok.returncode == 0 and ok.stdout.strip() == "allowed-one", ok.stderr
    assert listed.returncode == 0 and listed.stdout.strip() == marker, listed.stderr
    for refused in (chained, substituted, other):
        assert refused.returncode == 1 and "not in the policy's allow-list" in refused.stderr, refused.stderr
        assert "uid=" not in refused.stdout and marker not in refused.stdout
    assert new_shell.returncode == 1 and "no shell here" in new_shell.stderr, new_shell.stderr
    reasons = {e["command"]: e["reason"] for e in lab.entries("admin_session_refused")}
    assert reasons["id"] == "command_not_allowed" and reasons["echo allowed-$(id -u)"] == "command_not_allowed"
