"""What may run in an SSH session (skyguard/admin/commands.py): file transfer refused by what
runs, not by the first word, and the command allow-list. Table-driven; no sockets (the same
commands are sent by real OpenSSH clients in tests/integration/test_admin_ssh.py)."""

import base64
import gzip
import subprocess
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skyguard.admin import commands
from skyguard.admin.access import AccessRefused
from skyguard.errors import BadInput
from skyguard.policy.model import AdminSsh, Policy

NO_TRANSFER = Policy(name="t", zones={}, networks={}, rules=(), admin_ssh=AdminSsh())
TRANSFER = replace(NO_TRANSFER, admin_ssh=replace(NO_TRANSFER.admin_ssh, sftp=True))


def with_allow_list(policy: Policy, entries) -> Policy:
    """The policy with `admin.ssh.commands` set to `entries`."""
    return replace(policy, admin_ssh=replace(policy.admin_ssh, commands=tuple(entries)))


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


NESTED = 'sh -c "echo ' + b64(" scp -t .") + ' | base64 -d | sh"'  # base64 inside base64

# Each is a way to run a transfer program's server side that the old first-word check let through
# (or let through in a variant); all must be seen.
DISGUISED = [
    ("scp -t /tmp", ["scp"]),
    ("/usr/bin/scp -f /etc/hostname", ["scp"]),
    ("/usr/lib/openssh/sftp-server", ["sftp-server"]),
    ("/usr/lib/openssh/sftp-server -e -l INFO", ["sftp-server"]),
    ("env scp -t /tmp", ["scp"]),
    ("env -i PATH=/usr/bin scp -t .", ["scp"]),
    ('sh -c "scp -t /tmp"', ["scp"]),
    ("bash -c 'exec scp -f /etc/shadow'", ["scp"]),
    ("busybox scp -t /tmp", ["scp"]),
    ("rsync --server -logDtpre.iLsfxCIvu . /tmp", ["rsync"]),
    ("rsync --server --sender -vlogDtpre.iLsfxCIvu . /etc/", ["rsync"]),
    ("SCP -t /tmp", ["scp"]),
    ("/USR/BIN/Rsync --server . /tmp", ["rsync"]),
    ("true; scp -t /tmp", ["scp"]),
    ("echo x | scp -t /tmp", ["scp"]),
    ("cd /tmp && scp -t .", ["scp"]),
    ("nice -n 5 ionice scp -t /tmp", ["scp"]),
    ("s''cp -t /tmp", ["scp"]),
    ('s"c"p -t /tmp', ["scp"]),
    ("s\\cp -t /tmp", ["scp"]),
    ("s\\\ncp -t /tmp", ["scp"]),  # a backslash-newline is removed by the shell (line continuation)
    ("sh -c 'r\\\nsync --server . /tmp'", ["rsync"]),
    ("s${nothing}cp -t /tmp", ["scp"]),
    ("s$(true)cp -t /tmp", ["scp"]),
    ("s`true`cp -t /tmp", ["scp"]),
    ("echo $(s$()cp -f /etc/shadow >&2)", ["scp"]),  # innermost expansions first (these two were
    ("$(s${u}c${u}p -f /etc/shadow >&2)", ["scp"]),  # found by the property below)
    ("scp${IFS}-t${IFS}/tmp", ["scp"]),
    ("$'\\x73\\x63\\x70' -t /tmp", ["scp"]),
    ("$(printf '\\163\\143\\160') -t /tmp", ["scp"]),
    (f"echo {b64('scp -t /tmp')} | base64 -d | sh", ["scp"]),
    (f"echo {b64('rsync --server . /tmp').rstrip('=')} | base64 -d | bash", ["rsync"]),
    (f'sh -c "$(echo {b64(NESTED)} | base64 -d)"', ["scp"]),
    ("echo IHNjcCA= | base64 -d | sh", ["scp"]),  # a short base64 word (found by the property below)
    ("echo 736370202d74202f746d70 | xxd -r -p | sh", ["scp"]),
    (f"echo {base64.b64encode(gzip.compress(b'sftp-server', mtime=0)).decode()} | base64 -d | gunzip | sh",
     ["sftp-server"]),
    ("git-upload-pack '/srv/repo.git'", ["git-upload-pack"]),
    ("git upload-pack /srv/repo.git", ["upload-pack"]),
    ("unison -server", ["unison"]),
    ("borg serve --restrict-to-path /backup", ["borg"]),
    ("ln -s /usr/bin/scp /tmp/copy", ["scp"]),
    ("scp.real -t /tmp", ["scp"]),
]


@pytest.mark.parametrize("command,programs", DISGUISED)
def test_transfer_programs_are_found_however_they_are_written(command, programs):
    assert list(commands.transfer_programs(command)) == programs
    with pytest.raises(AccessRefused, match=r"file transfer .* disabled by policy") as refused:
        commands.decide(NO_TRANSFER, "exec", command)
    assert refused.value.reason == "file_transfer_refused"
    assert refused.value.details == {"transfer_programs": programs}


ORDINARY = [
    "uptime", "echo hi from $(hostname -I); echo err >&2; exit 3", "systemctl status sshd",
    "journalctl -u nginx --since today", "cat /etc/notes.scp", "ls /srv/rsyncd", "grep -r scpi /var/log",
    "tail -f /var/log/syslog", "echo original-output", "df -h && free -m", "python3 -c 'print(42)'",
    "sha256sum /boot/vmlinuz", "echo dGhpcyBpcyBqdXN0IGEgdGVzdA== | base64 -d",
]


@pytest.mark.parametrize("command", ORDINARY)
def test_ordinary_commands_run_with_transfer_off(command):
    assert commands.transfer_programs(command) == ()
    assert commands.decide(NO_TRANSFER, "exec", command) == commands.Decision(transfer=False)


def test_transfer_allowed_by_policy_is_marked_as_transfer():
    assert commands.decide(TRANSFER, "exec", "scp -t /tmp") == commands.Decision(True, ("scp",))
    assert commands.decide(TRANSFER, "subsystem", "sftp").transfer
    assert commands.decide(NO_TRANSFER, "shell", None) == commands.Decision(transfer=False)
    with pytest.raises(AccessRefused, match="disabled by policy"):
        commands.decide(NO_TRANSFER, "subsystem", "sftp")
    with pytest.raises(AccessRefused, match="subsystem 'netconf' is not allowed"):
        commands.decide(TRANSFER, "subsystem", "netconf")


def test_a_command_too_long_to_check_and_log_is_refused():
    with pytest.raises(AccessRefused) as refused:
        commands.decide(NO_TRANSFER, "exec", "echo " + "a" * commands.MAX_COMMAND_CHARS)
    assert refused.value.reason == "command_too_long"


def test_decoding_is_bounded_on_hostile_input():
    nested = "scp -t ."
    for _ in range(20):
        nested = f"echo {b64(nested)} | base64 -d | sh"
        if len(nested) > commands.MAX_COMMAND_CHARS:
            break
    commands.transfer_programs(nested)  # returns (found or not): depth and size are bounded
    commands.transfer_programs("A" * commands.MAX_COMMAND_CHARS)
    commands.transfer_programs("\\x" * (commands.MAX_COMMAND_CHARS // 2))


ALLOW = ["uptime", "systemctl status *", "journalctl -u * --no-pager", "cat /etc/hostname", "scp -f /srv/out/*"]


@pytest.mark.parametrize("command,allowed", [
    ("uptime", True),
    ("uptime   ", True),
    ("systemctl status", True),
    ("systemctl status sshd nginx", True),
    ("journalctl -u sshd --no-pager", True),
    ("cat /etc/hostname", True),
    ("uptime; id", False),
    ("uptime && id", False),
    ("uptime | nc host 1", False),
    ("uptime $(id)", False),
    ("uptime `id`", False),
    ("uptime > /tmp/x", False),
    ("uptime\nid", False),
    ("'uptime'", False),
    ("uptime -p", False),
    ("/usr/bin/uptime", False),
    ("cat /etc/shadow", False),
    ("journalctl -u sshd", False),
    ("systemctl restart sshd", False),
    ("systemctl status ~root", False),
    ("", False),
])
def test_allow_list_runs_only_plain_listed_commands(command, allowed):
    policy = with_allow_list(NO_TRANSFER, ALLOW)
    assert commands.command_allowed(command, commands.allow_list(policy)) is allowed
    if allowed:
        assert commands.decide(policy, "exec", command) == commands.Decision(transfer=False)
    else:
        with pytest.raises(AccessRefused, match=r"not in the policy's allow-list .* you may run: uptime") as refused:
            commands.decide(policy, "exec", command)
        assert refused.value.reason == "command_not_allowed"


def test_allow_list_rules_out_shells_and_does_not_override_transfer_off():
    policy = with_allow_list(NO_TRANSFER, ALLOW)
    with pytest.raises(AccessRefused, match="no shell here") as refused:
        commands.decide(policy, "shell", None)
    assert refused.value.reason == "shell_not_allowed"
    with pytest.raises(AccessRefused, match="disabled by policy"):
        commands.decide(policy, "exec", "scp -f /srv/out/report")
    allowing = with_allow_list(TRANSFER, ALLOW)
    assert commands.decide(allowing, "exec", "scp -f /srv/out/report").transfer
    with pytest.raises(AccessRefused, match="allow-list"):
        commands.decide(allowing, "exec", "scp -t /srv/out/report")
    assert commands.decide(allowing, "subsystem", "sftp").transfer
    with pytest.raises(AccessRefused, match="you may run: nothing"):
        commands.decide(with_allow_list(NO_TRANSFER, []), "exec", "uptime")


@pytest.mark.parametrize("entries,message", [
    ("uptime", "must be a list"),
    ({"uptime": 1}, "must be a list"),
    (["uptime", 3], r"commands\[1\]"),
    ([""], r"commands\[0\]"),
    (["uptime; id"], r"commands\[0\] 'uptime; id' must be plain words"),
    (["echo $(id)"], "must be plain words"),
])
def test_bad_allow_lists_are_refused_with_the_entry_named(entries, message):
    with pytest.raises(BadInput, match=message):
        commands.parse_allow_list(entries)
    with pytest.raises(BadInput, match=message):
        commands.allow_list(replace(NO_TRANSFER, admin_ssh=replace(NO_TRANSFER.admin_ssh, commands=entries)))


# -- properties over generated commands ------------------------------------------------------------

# What may stand between words in a shell command line without joining them into one name (quotes
# and backticks are left to disguise(): a lone one here would pair with one of its own instead).
SEPARATORS = st.sampled_from([" ", "\t", ";", "|", "&&", "\n", "(", ")", "$(", "=", "/", "{ ", "' '", '" "'])
ORDINARY_WORDS = st.sampled_from(["echo", "cd", "/tmp", "-t", "-f", "x", "sh", "-c", "env", "nice", "sudo", "exec"])


def disguise(name: str, how: list[int], case: list[bool]) -> str:
    """`name` with quote pairs, backslashes or empty expansions between its letters, in mixed case:
    the forms a shell turns back into `name`."""
    pieces = {0: "", 1: "''", 2: '""', 3: "\\", 4: "${u}", 5: "$()", 6: "``"}
    letters = [ch.upper() if up else ch for ch, up in zip(name, case + [False] * len(name), strict=False)]
    out = letters[0]
    for i, ch in enumerate(letters[1:]):
        out += pieces[how[i % len(how)] if how else 0] + ch
    return out


def wrap(command: str, how: str) -> str:
    """`command` carried in a form that a shell turns back into it at run time."""
    if how == "base64":
        return f"echo {b64(command)} | base64 -d | sh"
    if how == "base64-twice":
        return f"echo {b64(b64(command))} | base64 -d | base64 -d | sh"
    if how == "hex":
        return f"echo {command.encode().hex()} | xxd -r -p | sh"
    if how == "gzip":
        return f"echo {base64.b64encode(gzip.compress(command.encode())).decode()} | base64 -d | gunzip | sh"
    if how == "octal":
        return "sh -c \"$(printf '" + "".join(f"\\{ord(ch):03o}" for ch in command) + "')\""
    return command


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(commands.TRANSFER_PROGRAMS), st.lists(ORDINARY_WORDS, max_size=6),
       st.lists(ORDINARY_WORDS, max_size=6), SEPARATORS, SEPARATORS,
       st.lists(st.integers(0, 6), max_size=12), st.lists(st.booleans(), max_size=20),
       st.sampled_from(["", "/usr/bin/", "/USR/LOCAL/BIN/", "./"]),
       st.sampled_from(["", "base64", "base64-twice", "hex", "gzip", "octal"]))
def test_a_transfer_program_anywhere_is_found(name, before, after, sep1, sep2, how, case, path, encoding):
    """However a transfer program's name is placed, split, cased or encoded in a command line,
    the check names it (and so refuses the command with transfer off)."""
    word = path + disguise(name, how, case)
    command = wrap(" ".join(before) + sep1 + word + sep2 + " ".join(after), encoding)
    assert name in commands.transfer_programs(command), command
    with pytest.raises(AccessRefused):
        commands.decide(NO_TRANSFER, "exec", command)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=2000))
def test_any_text_gets_a_verdict_never_an_exception(command):
    try:
        decision = commands.decide(NO_TRANSFER, "exec", command)
    except AccessRefused as refused:
        assert refused.reason == "file_transfer_refused"
    else:
        assert decision.transfer is False
    policy = with_allow_list(NO_TRANSFER, ALLOW)
    try:
        commands.decide(policy, "exec", command)
    except AccessRefused as refused:
        assert refused.reason in ("file_transfer_refused", "command_not_allowed")


PLAIN_TEXT = st.text(alphabet="abcXYZ019_./:=,@%+- \t", min_size=1, max_size=60)


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
@settings(max_examples=60, deadline=None)
@given(PLAIN_TEXT)
def test_what_the_allow_list_accepts_a_real_shell_runs_as_those_words(shell, command):
    """The allow-list matches words; that is only sound if the VM's shell sees the same words,
    with nothing expanded, chained or redirected. Checked with the real shells."""
    if not commands.command_allowed(command, (("*",),)):
        assert not command.split()  # only blank commands are turned away by the syntax check
        return
    shown = subprocess.run([shell, "-c", "printf '<%s>' " + command], capture_output=True, text=True,
                           timeout=10, cwd="/")
    assert shown.returncode == 0 and shown.stdout == "".join(f"<{w}>" for w in command.split()), command


def test_policy_validate_refuses_what_the_proxy_would_refuse_with_the_line():
    from skyguard import config
    from skyguard.errors import PolicyError
    from skyguard.policy.parse import parse_policy

    text = (config.POLICIES_DIR / "examples" / "ssh-admin.yaml").read_text()
    good = text.replace("    sftp: true\n", '    sftp: true\n    commands: [uptime, "systemctl status *"]\n')
    assert commands.allow_list(parse_policy(good)) == (("uptime",), ("systemctl", "status", "*"))
    bad = text.replace("    sftp: true\n", '    sftp: true\n    commands: [uptime, "echo $(id)"]\n')
    with pytest.raises(PolicyError) as refused:
        parse_policy(bad, source="ssh.yaml")
    line = bad.splitlines().index('    commands: [uptime, "echo $(id)"]') + 1
    assert f"ssh.yaml:{line}: admin.ssh.commands[1]" in str(refused.value)
