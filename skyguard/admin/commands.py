"""What may run in an SSH session through the access proxy: pure decisions, no I/O.

Two policy switches meet here, checked for every session (and again for every open session when
the policy changes):
- file transfer (`admin.ssh.sftp`): when off, the `sftp` subsystem is refused, and so is any exec
  command that names a known transfer program (TRANSFER_PROGRAMS) *anywhere* in it, as a path or
  not, in any letter case, inside `sh -c '...'`, `env`, `busybox`, quotes, backslashes, empty
  expansions, `\\xNN`/octal escapes, and base64, hex or gzip+base64 words (decoded, recursively).
  This is a tripwire for the ordinary tools and their obvious disguises, not a barrier: a shell
  decides at run time what it runs (`$(printf ...)`, a script it reads from stdin, a file it
  wrote earlier), and any command that reads stdin or prints a file moves bytes.
- the command allow-list (`admin.ssh.commands`): when set, it is the barrier. Only exec commands
  that match an entry run; shells are refused; a command may contain only plain words (letters,
  digits and `_ . / : = , @ % + -`), so that the VM's shell has nothing to expand or chain.
  An entry is words matched one for one (each may hold fnmatch wildcards `*`, `?`, `[...]`); a
  last word `*` on its own matches any number of further words, none included.
This module is not the SSH server (proxy.py) and does not know who the operator is (access.py).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import functools
import re
import zlib
from dataclasses import dataclass

from skyguard.admin.access import AccessRefused
from skyguard.errors import BadInput
from skyguard.policy.access import SSH_COMMAND_WORD
from skyguard.policy.model import Policy

# Programs whose only job is to move files over an SSH channel (their server side is what the
# client asks the VM to run). Matched as whole names, case-insensitively; a path ending in one
# counts. git's pack programs move a repository's files; borg/unison/rdiff-backup run a server.
TRANSFER_PROGRAMS = (
    "scp", "sftp", "sftp-server", "internal-sftp", "rsync", "rrsync", "unison", "rdiff-backup",
    "borg", "borgbackup", "git-upload-pack", "git-receive-pack", "git-upload-archive",
    "upload-pack", "receive-pack", "upload-archive",
)
# Longer exec commands are refused: they are checked, decoded and logged whole, so they are bounded.
MAX_COMMAND_CHARS = 32 * 1024
# Bounds on the decoding below (a command is attacker-supplied): nesting depth and total text.
MAX_DECODE_DEPTH = 4
MAX_DECODED_CHARS = 256 * 1024  # up to ~0.1 s for a hostile command: session.py runs it off the loop
# Shown in a refusal message: the first few allowed commands.
MAX_LISTED = 10

# A name is preceded and followed by a character that cannot be part of it. '.' may not precede
# (`notes.scp` is a file) but may follow (`scp.real` is still scp, fail closed).
_BEFORE = r"(?<![A-Za-z0-9_.+-])"
_AFTER = r"(?![A-Za-z0-9_+-])"
_TRANSFER_NAME = re.compile(
    _BEFORE + "(" + "|".join(re.escape(p) for p in sorted(TRANSFER_PROGRAMS, key=len, reverse=True))
    + ")" + _AFTER, re.IGNORECASE)
# Expansions that can be empty at run time: `s${x}cp`, `s$(true)cp`, `s``cp`, `s$@cp`. Innermost
# first (none inside another), one level per pass, each pass looked at: `$(s$()cp -t .)` and
# `$(s${u}cp)` are `$(scp ...)` after one.
_INNERMOST_EXPANSION = re.compile(r"\$\{[^{}$`]*\}|\$\([^()$`]*\)|`[^`$]*`|\$[A-Za-z_][A-Za-z0-9_]*|\$[@*#?$!0-9-]")
MAX_EXPANSION_PASSES = 16
_ESCAPES = re.compile(r"\\(x[0-9A-Fa-f]{1,2}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|0?[0-7]{1,3})")
_BASE64_WORD = re.compile(r"[A-Za-z0-9+/_-]{4,}={0,2}")  # 4: base64 of "scp" is c2Nw
_HEX_WORD = re.compile(r"(?:[0-9A-Fa-f]{2}){4,}")
# What an allow-listed command may consist of: plain words separated by spaces or tabs.
_PLAIN_COMMAND = re.compile(r"[A-Za-z0-9_./:=,@%+\- \t]+")
_PATTERN_WORD = SSH_COMMAND_WORD  # one definition, the policy parser's


@dataclass(frozen=True)
class Decision:
    """An allowed session: whether it moves files (to log file names when it does)."""

    transfer: bool
    programs: tuple[str, ...] = ()  # transfer programs named in the command (lower-case)


# -- the allow-list -------------------------------------------------------------------------------


def parse_allow_list(entries) -> tuple[tuple[str, ...], ...] | None:
    """`admin.ssh.commands` as tuples of pattern words; None when the policy sets no list.
    Raises BadInput naming the bad entry."""
    if entries is None:
        return None
    if isinstance(entries, str) or not isinstance(entries, (list, tuple)):
        raise BadInput("admin.ssh.commands must be a list of commands, e.g. [uptime, \"systemctl status *\"]")
    parsed = []
    for index, entry in enumerate(entries):
        words = entry.split() if isinstance(entry, str) else []
        if not words or not all(_PATTERN_WORD.fullmatch(w) for w in words):
            raise BadInput(f"admin.ssh.commands[{index}] {str(entry)[:80]!r} must be plain words: letters, digits, "
                           "_ . / : = , @ % + - and the wildcards * ? [ ] (no quotes or shell syntax)")
        parsed.append(tuple(words))
    return tuple(parsed)


def allow_list(policy: Policy) -> tuple[tuple[str, ...], ...] | None:
    """The policy's command allow-list (`admin.ssh.commands`), None when it has none."""
    ssh = policy.admin_ssh
    return parse_allow_list(ssh.commands if ssh is not None else None)


def _words_match(pattern: tuple[str, ...], words: list[str]) -> bool:
    if pattern and pattern[-1] == "*":
        head = pattern[:-1]
        return len(words) >= len(head) and all(fnmatch.fnmatchcase(w, p) for w, p in zip(words, head, strict=False))
    return len(words) == len(pattern) and all(fnmatch.fnmatchcase(w, p) for w, p in zip(words, pattern, strict=True))


def command_allowed(command: str, patterns: tuple[tuple[str, ...], ...]) -> bool:
    """True when `command` is plain words matching one entry of the allow-list."""
    if not _PLAIN_COMMAND.fullmatch(command):
        return False
    words = command.split()
    return bool(words) and any(_words_match(p, words) for p in patterns)


# -- transfer programs named in a command ----------------------------------------------------------


def _unescape(text: str) -> str:
    def one(m: re.Match) -> str:
        code = m.group(1)
        value = int(code[1:], 16) if code[0] in "xuU" else int(code, 8)
        return chr(value) if value < 0x110000 else ""
    return _ESCAPES.sub(one, text)


def _printable(data: bytes) -> str | None:
    """`data` as text if it looks like text (what a shell could run), else None."""
    if data[:2] == b"\x1f\x8b":  # gzip: `echo H4sI... | base64 -d | gunzip | sh`
        try:
            data = zlib.decompressobj(wbits=31).decompress(data, MAX_DECODED_CHARS)
        except zlib.error:
            return None
    text = data.decode("utf-8", "replace")
    good = sum(ch != "\ufffd" and (ch.isprintable() or ch in "\t\n\r") for ch in text)
    return text if text and good >= 0.9 * len(text) else None


def _decoded_words(text: str) -> list[str]:
    """Base64 (standard or URL-safe, unpadded too) and hex words of `text`, decoded where the
    result reads as text; the words joined as one as well (base64 wrapped over lines)."""
    found = []
    words = _BASE64_WORD.findall(text)
    for word in words + ["".join(words)] if len(words) > 1 else words:
        raw = word.rstrip("=")
        if len(raw) % 4 == 1:
            continue
        padded = raw + "=" * (-len(raw) % 4)
        try:
            data = base64.urlsafe_b64decode(padded.replace("+", "-").replace("/", "_"))
        except (binascii.Error, ValueError):
            continue
        decoded = _printable(data)
        if decoded is not None:
            found.append(decoded)
    for word in _HEX_WORD.findall(text):
        decoded = _printable(bytes.fromhex(word))
        if decoded is not None:
            found.append(decoded)
    return found


@functools.lru_cache(maxsize=128)  # a session's command is checked again at every policy change
def transfer_programs(command: str) -> tuple[str, ...]:
    """The transfer programs `command` names anywhere, seen as the VM's shell could see it:
    as written; with escapes decoded; with quotes, backslashes and line continuations removed
    (the shell's quote removal); with expansions taken as empty; and the same for every base64,
    hex or gzip word it carries, decoded. Lower-case, sorted, without repeats."""
    found: set[str] = set()
    budget = [MAX_DECODED_CHARS]

    def scan(text: str, depth: int) -> None:
        if budget[0] <= 0:
            return
        budget[0] -= len(text)
        unescaped = _unescape(text)
        dequoted = re.sub(r"\\\n|['\"\\]", "", unescaped)  # a backslash-newline goes whole (line continuation)
        views = [text, unescaped, dequoted]
        for _ in range(MAX_EXPANSION_PASSES):
            stripped = _INNERMOST_EXPANSION.sub("", views[-1])
            if stripped == views[-1]:
                break
            views.append(stripped)
        for view in views:
            found.update(m.group(1).lower() for m in _TRANSFER_NAME.finditer(view))
        if depth < MAX_DECODE_DEPTH:
            for decoded in _decoded_words(dequoted):
                scan(decoded, depth + 1)

    scan(command, 0)
    return tuple(sorted(found))


# -- the decision ------------------------------------------------------------------------------------


def decide(policy: Policy, kind: str | None, command: str | None,
           programs: tuple[str, ...] | None = None) -> Decision:
    """May a session of `kind` ('shell', 'exec' or 'subsystem') with `command` run under
    `policy`? A Decision if so, else AccessRefused (its message is for the operator).
    `programs`: transfer_programs(command) when already known (a re-check of an open session)."""
    ssh = policy.admin_ssh
    if ssh is None:
        raise AccessRefused("no_admin", "skyguard: SSH access is not enabled in the policy")
    transfer_on = ssh.sftp
    patterns = allow_list(policy)
    if kind == "subsystem":
        if command != "sftp":
            raise AccessRefused("subsystem", f"skyguard: subsystem {command!r} is not allowed")
        if not transfer_on:
            raise _transfer_refused()
        return Decision(transfer=True, programs=("sftp",))
    if kind == "exec":
        command = command or ""
        if len(command) > MAX_COMMAND_CHARS:
            raise AccessRefused("command_too_long", f"skyguard: commands longer than {MAX_COMMAND_CHARS} "
                                "characters are refused (they could not be checked and logged whole)")
        if programs is None:
            programs = transfer_programs(command)
        if programs and not transfer_on:
            raise _transfer_refused(programs)
        if patterns is not None and not command_allowed(command, patterns):
            raise AccessRefused("command_not_allowed",
                                "skyguard: this command is not in the policy's allow-list "
                                f"(admin.ssh.commands); {_listed(patterns)}")
        return Decision(transfer=bool(programs), programs=programs)
    # A shell, with or without a terminal: it runs whatever it is given, so an allow-list rules it out.
    if patterns is not None:
        raise AccessRefused("shell_not_allowed",
                            "skyguard: no shell here: only the commands in the policy's allow-list may run "
                            f"(admin.ssh.commands); {_listed(patterns)}")
    return Decision(transfer=False)


def _transfer_refused(programs: tuple[str, ...] = ()) -> AccessRefused:
    named = f" (the command names {', '.join(programs)})" if programs else ""
    return AccessRefused("file_transfer_refused",
                         f"skyguard: file transfer (SFTP/scp/rsync) is disabled by policy (admin.ssh.sftp){named}",
                         transfer_programs=list(programs))


def _listed(patterns: tuple[tuple[str, ...], ...]) -> str:
    shown = [" ".join(p) for p in patterns[:MAX_LISTED]]
    more = f", and {len(patterns) - MAX_LISTED} more" if len(patterns) > MAX_LISTED else ""
    return "you may run: " + (", ".join(shown) + more if shown else "nothing")
