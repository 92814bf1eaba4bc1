"""`skyguard admin`: the SSH access proxy's keys, console tickets and recorded sessions.

Thin commands over skyguard.admin and skyguard.console: print the public half of skyguard's VM key
(for the VMs' authorized_keys) and of the proxy's host key (for operators' known_hosts), issue a
one-time console ticket, list recorded SSH and VNC sessions and replay one (a terminal transcript
in the terminal, a VNC recording as PNG frames) after checking it against the record and the log.
Running the proxies is the daemon's job (`skyguard up`), not this module's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from skyguard import config
from skyguard.cli.common import emit_json, json_option, state_dir_option


def _state(state_dir: Path | None) -> Path:
    return state_dir or config.STATE_DIR


def _archive(state_dir: Path | None):
    from skyguard.admin.recording import SessionArchive

    return SessionArchive(_state(state_dir) / "admin" / "sessions")


@click.group("admin")
def admin():
    """Administrative access to VMs through skyguard: SSH and VNC consoles.

    Operators connect with the OpenSSH client, naming the VM after a '+' in the user name:

    \b
      ssh -p 2222 alice+dc1@skyguard-host              a shell on dc1
      ssh -p 2222 alice+dc1@skyguard-host uptime       one command

    and to a console target of admin.console with any VNC client, typing a one-time ticket
    (from `skyguard admin console-ticket`) as the VNC password: the VM's own password stays in
    skyguard.

    \b
    Examples:
      skyguard admin vm-key        the line for each VM's /root/.ssh/authorized_keys
      skyguard admin host-key      the line for operators' known_hosts
      skyguard admin sessions --json
      skyguard admin replay 20261130T031500Z-1a2b3c4d --speed 2
      skyguard admin console-ticket alice dc1-desktop
      skyguard admin replay 20261130T031500Z-5e6f7a8b --frames /tmp/frames
    """


@admin.command("vm-key")
@state_dir_option
def vm_key_command(state_dir):
    """Print the public half of the key skyguard logs into VMs with (generated on first use).

    Put it in the authorized_keys of the VM account skyguard uses (root by default); the
    private half never leaves skyguard's sealed store.
    """
    from skyguard.admin import keys
    from skyguard.custody.store import SecretStore

    click.echo(keys.public_line(keys.vm_key(SecretStore(_state(state_dir) / "secrets"))))


@admin.command("host-key")
@state_dir_option
def host_key_command(state_dir):
    """Print the SSH access proxy's host public key (for operators' known_hosts)."""
    from skyguard.admin import keys
    from skyguard.custody.store import SecretStore

    key = keys.proxy_host_key(SecretStore(_state(state_dir) / "secrets"))
    click.echo(keys.public_line(key))
    click.echo(f"fingerprint: {keys.fingerprint(key)}", err=True)


@admin.command("console-ticket")
@click.argument("operator")
@click.argument("target")
@click.option("--group", "groups", multiple=True, help="A group the operator is in (repeatable).")
@click.option("--web", is_flag=True, help="A ticket for the web console (a long token) instead of a VNC password.")
@state_dir_option
def console_ticket_command(operator, target, groups, web, state_dir):
    """Issue a one-time password that opens console TARGET once, as OPERATOR.

    The operator types it as the VNC password in their VNC client, connecting to
    admin.console.listen; with --web it is a token for the web console on admin.console.web,
    opened as http://HOST:PORT/console/#ticket=TOKEN. It works once, for 2 minutes; whether
    OPERATOR may open TARGET is decided by the policy in force when it is used, and refusals
    are logged.

    \b
    Examples:
      skyguard admin console-ticket alice dc1-desktop
      vncviewer skyguard-host::5999          (then type the ticket)
      skyguard admin console-ticket --web alice dc1-desktop
    """
    from skyguard.console.tickets import TicketBook
    from skyguard.errors import BadInput
    from skyguard.policy.values import NAME_RE

    for what, value in (("operator", operator), ("target", target), *(("group", g) for g in groups)):
        if not NAME_RE.match(value):
            raise BadInput(f"{what} {value!r} is not a name from the policy (lower-case letters, digits, '-')")
    ticket = TicketBook(_state(state_dir) / "console" / "tickets").issue(operator, target, tuple(groups), web=web)
    click.echo(ticket.password)
    if web:
        click.echo(f"one-time web console ticket for {operator} -> {target}, valid 2 minutes: open "
                   f"http://HOST:PORT/console/#ticket={ticket.password} (admin.console.web)", err=True)
    else:
        click.echo(f"one-time VNC password for {operator} -> {target}, valid 2 minutes", err=True)


@admin.command("sessions")
@json_option
@state_dir_option
def sessions_command(as_json, state_dir):
    """List recorded SSH and VNC console sessions, oldest first."""
    sessions = _archive(state_dir).list()
    if as_json:
        emit_json(sessions)
        return
    if not sessions:
        click.echo("no recorded sessions", err=True)
        return
    click.echo(f"{'ID':<26} {'OPERATOR':<12} {'WORKLOAD':<12} {'KIND':<9} {'START':<20} {'RESULT':<20} EXIT")
    for s in sessions:
        exit_status = s.get("exit_signal") or ("" if s.get("exit_status") is None else s["exit_status"])
        workload = s.get("workload", "?")
        if s.get("console"):  # a VNC session: its console target is what the operator opened
            workload = f"{workload}/{s['console'].get('target')}"
        click.echo(f"{s['id']:<26} {s.get('operator', '?'):<12} {workload:<12} "
                   f"{s.get('kind') or '?':<9} {(s.get('start') or '')[:19]:<20} "
                   f"{s.get('result', '?'):<20} {exit_status}")


@admin.command("replay")
@click.argument("session_id")
@click.option("--speed", type=float, default=1.0, show_default=True, help="Playback speed factor.")
@click.option("--idle-limit", type=float, default=2.0, show_default=True,
              help="Cap pauses at this many seconds.")
@click.option("--log", "log_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A JSON-lines decision log to check the transcript's hash against "
                   "(default: the daemon's signed log in the state directory, else the proxy's "
                   "fallback log, if present).")
@click.option("--no-verify", is_flag=True, help="Play even if the transcript fails its hash check.")
@click.option("--text", "text_only", is_flag=True,
              help="An SSH session: print all its text at once with every control character shown "
                   "(^[ for ESC), none acted on: what was erased, overwritten or hidden on screen shows too.")
@click.option("--frames", "frames_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A VNC session: write the screen after each update as DIR/frame-NNNNN.png.")
@click.option("--max-frames", type=click.IntRange(min=1), default=None, help="Stop after this many frames.")
@state_dir_option
def replay_command(session_id, speed, idle_limit, log_file, no_verify, text_only, frames_dir, max_frames,
                   state_dir):
    """Play a recorded SSH session back in the terminal, with its timing, or render a recorded
    VNC session's frames to PNG (--frames DIR).

    The recording draws the screen as the operator saw it and nothing more: sequences that would
    act on your terminal otherwise (clipboard, title, queries it would answer, concealed text) are
    shown as ^[... instead. --text prints the text with no sequence acted on.

    The transcript's SHA-256 is checked first against the session record and the decision log;
    a modified transcript is refused (exit 1) unless --no-verify.

    \b
    Examples:
      skyguard admin replay 20261130T031500Z-1a2b3c4d
      skyguard admin replay 20261130T031500Z-1a2b3c4d --speed 4 --idle-limit 0.5
      skyguard admin replay 20261130T031500Z-1a2b3c4d --text | less
      skyguard admin replay 20261130T031500Z-5e6f7a8b --frames /tmp/frames
    """
    from skyguard.admin.decisionlog import JsonLinesDecisionLog, fallback_log_path
    from skyguard.admin.recording import replay
    from skyguard.errors import BadInput

    if speed <= 0:
        raise BadInput("--speed must be greater than 0")
    archive = _archive(state_dir)
    if not no_verify:
        logged: list[dict] | None
        signed = _state(state_dir) / "log"
        if log_file is None and signed.exists():  # the daemon's signed log
            from skyguard.tlog import LogReader
            from skyguard.tlog.entries import decode

            log_path = signed
            logged = [e for e in map(decode, (p for _, p in LogReader(signed).entries()))
                      if str(e.get("type", "")).startswith("admin_session")]
        else:
            log_path = log_file or fallback_log_path(_state(state_dir))
            logged = list(JsonLinesDecisionLog(log_path).entries()) if log_path.exists() else None
        digest = archive.verify(session_id, logged)
        click.echo(f"transcript sha256 {digest} matches the session record"
                   + (f" and {log_path}" if logged is not None else ""), err=True)
    path = archive.transcript_path(session_id)
    if path.suffix == ".vnc":
        from skyguard.console.recording import render_frames

        if frames_dir is None:
            raise BadInput(f"session {session_id} is a VNC session: render it with --frames DIR")
        count = render_frames(path, frames_dir, max_frames)
        click.echo(f"{count} frames written to {frames_dir}", err=True)
        return
    if frames_dir is not None:
        raise BadInput(f"session {session_id} is an SSH session: --frames is for VNC sessions")
    replay(path, sys.stdout, speed=speed, idle_limit=idle_limit, text_only=text_only)
