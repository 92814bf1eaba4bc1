"""One bridged SSH channel of the access proxy: the operator's side and the VM's side.

ProxySession is what the operator opened (a shell with or without a pty, an exec, a subsystem);
it asks commands.decide() whether it may run, opens the same kind of channel on skyguard's own
connection to the VM (connection.py), records it (recording.py) and relays data, window and exit
status both ways. VmSession is the VM's end of that channel. Each side's reading is paused while
anything holds it (ReadHold): the other side's window, the session opening, an SFTP file request
waiting for its log entry (sftplog.py) or an upload being judged, and the recording: a session
whose transcript's writer falls behind (a slow or stalled disk: transcript.py) reads nothing more
from either side until it catches up, and is ended when it has not within
`recording_stall_timeout` (fail closed: nothing is relayed unrecorded past a bounded backlog), the
operator told at once and the end logged. Errors meant for the operator go to the session's stderr
with a non-zero exit status (1 refused, 255 VM unreachable or session ended by skyguard), so the
OpenSSH client shows them. Not authentication, not forwarding.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any

import asyncssh

from skyguard.admin import access, commands
from skyguard.admin.recording import SessionRecording
from skyguard.admin.sftp import SftpFilterPump, upload_pump, uploads_judged
from skyguard.admin.sftplog import SftpLogGate, log_gate
from skyguard.admin.transcript import RecordingError, RecordingStalled, on_loop
from skyguard.diskwork import Busy
from skyguard.errors import LogError, SkyguardError

if TYPE_CHECKING:
    from skyguard.admin.connection import OperatorConnection

log = logging.getLogger("skyguard.admin")

EXIT_REFUSED = 1
# What an operator is told when a session's start entry cannot be logged (the log's own reason,
# with host paths, goes to the host's log).
LOG_REFUSED_WORDS = ("skyguard: the session cannot start: the signed log refuses entries now (its disk is full "
                     "or stalled); try again later")
EXIT_UNREACHABLE = 255  # what OpenSSH itself returns when it cannot reach a host
LOGGED_COMMAND_CHARS = commands.MAX_COMMAND_CHARS  # a refused command is logged up to this length
# Refusal reasons also counted in skyguard_admin_ssh_refused_requests_total, under this label.
# An SSH exit signal name (RFC 4254 6.10: without "SIG"; local ones as name@domain).
SIGNAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9@._+-]{0,63}")
INVALID_SIGNAL = object()  # what a VM sent as a signal name was not one
REFUSED_REQUEST_LABELS = {"file_transfer_refused": "file_transfer", "command_not_allowed": "command",
                          "shell_not_allowed": "shell", "command_too_long": "command"}


def _runs_sftp_server(command: str | None) -> bool:
    """An exec of sftp-server itself (`sftp -s /usr/lib/openssh/sftp-server`): SFTP by exec, whose
    file names are logged as for the subsystem."""
    words = (command or "").split()
    return bool(words) and words[0].rsplit("/", 1)[-1].lower() == "sftp-server"


class NoEnvironmentChannel(asyncssh.SSHServerChannel):
    """The operator's session channel, refusing `env` requests: the proxy passes no environment
    to the VM (LD_PRELOAD and the like never get there), and asyncssh would otherwise keep every
    one it is sent, unbounded, even on a session that is then refused. asyncssh has no option for
    this: its handler for the request is overridden here (pinned asyncssh version)."""

    def _process_env_request(self, packet) -> bool:
        packet.get_string()
        packet.get_string()
        packet.check_end()
        return False


def session_channel(conn) -> asyncssh.SSHServerChannel:
    """A channel for a new operator session (SSHServer.session_requested returns it with the session)."""
    chan = conn.create_server_channel(encoding=None)
    chan.__class__ = NoEnvironmentChannel
    return chan


class ReadHold:
    """One side's reading of a session, paused while anything holds it. asyncssh's pause_reading
    and resume_reading are one switch: two reasons flipping it directly would let one resume what
    the other paused (the operator's window opening again while the recording is behind)."""

    def __init__(self):
        self.chan: Any = None
        self.reasons: set[str] = set()

    def attach(self, chan) -> None:
        self.chan = chan
        if self.reasons:
            chan.pause_reading()

    def hold(self, reason: str) -> None:
        if not self.reasons and self.chan is not None:
            self.chan.pause_reading()
        self.reasons.add(reason)

    def release(self, reason: str) -> None:
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons and self.chan is not None:
                self.chan.resume_reading()


class VmSession(asyncssh.SSHClientSession):
    """The VM's side of one bridged channel: output goes to the operator and the transcript."""

    def __init__(self, front: ProxySession):
        self.front = front
        self.exit_status = None
        self.exit_signal = None

    def data_received(self, data, datatype):
        self.front.from_vm(data, datatype)

    def eof_received(self):
        self.front.chan.write_eof()
        return True

    def pause_writing(self):
        self.front.operator_reading.hold("vm_window")  # the VM is not keeping up: stop reading the operator

    def resume_writing(self):
        self.front.operator_reading.release("vm_window")

    def exit_status_received(self, status):
        self.exit_status = status

    def exit_signal_received(self, signal, core_dumped, msg, lang):
        # The VM names the signal: any ASCII, control characters included, of any length. Only a
        # signal name goes on to the operator, the session record and the signed log.
        self.exit_signal = signal if SIGNAL_NAME.fullmatch(signal) else INVALID_SIGNAL

    def connection_lost(self, exc):
        self.front.vm_closed(self.exit_status, self.exit_signal)


class ProxySession(asyncssh.SSHServerSession):
    """The operator's side of one channel: what was asked (pty, shell, exec, subsystem)."""

    def __init__(self, owner: OperatorConnection):
        self.owner = owner
        self.proxy = owner.proxy
        self.chan: Any = None  # the operator's channel, from connection_made() on
        self.vm_chan: Any = None  # the VM's channel, once open
        self.term: str | None = None
        self.size = (80, 24, 0, 0)
        self.modes: dict[int, int] = {}
        self.kind: str | None = None  # shell, exec or subsystem: set before session_started()
        self.command: str | None = None
        self.recording: SessionRecording | None = None
        self.sftp_log: SftpLogGate | None = None  # SFTP file requests on record first (sftplog.py)
        self.sftp_filter: SftpFilterPump | None = None  # content rules on SFTP uploads (sftp.py)
        self.decision: commands.Decision | None = None  # set once the session may run
        self.ended = False
        self.active_counted = False
        self.pending: list[bytes] = []
        self.pending_eof = False
        self.operator_reading = ReadHold()  # the operator's channel
        self.vm_reading = ReadHold()  # the VM's channel, once open
        self.paused_at: float | None = None  # loop time the recording's writer fell behind
        self._pause_timer: asyncio.TimerHandle | None = None
        self._pause_told = False

    def connection_made(self, chan):
        self.chan = chan
        self.operator_reading.attach(chan)
        self.owner.sessions.add(self)

    def pty_requested(self, term_type, term_size, term_modes):
        self.term, self.size, self.modes = term_type, term_size, term_modes
        return True

    def shell_requested(self):
        self.kind = "shell"
        return True

    def exec_requested(self, command):
        self.kind, self.command = "exec", command.decode("utf-8", "replace") if isinstance(command, bytes) else command
        return True

    def subsystem_requested(self, subsystem):
        self.kind, self.command = "subsystem", subsystem.decode("utf-8", "replace") if isinstance(subsystem, bytes) else subsystem
        return True

    def session_started(self):
        self.operator_reading.hold("opening")  # nothing reaches the VM before it is authorised and connected
        self._opening = asyncio.get_running_loop().create_task(self._open())  # keep a reference

    async def _open(self):
        owner = self.owner
        operator = owner.operator_name
        try:
            if owner.refusal is not None:
                raise owner.refusal
            if owner.closing:  # revoked or shut down: only the sessions it had may say goodbye
                raise access.AccessRefused("revoked", "skyguard: this connection is being closed; no new session")
            workload = owner.workload
            if workload is None:  # not reached: authorisation set either the workload or the refusal
                raise access.AccessRefused("no_target", "skyguard: no VM selected for this connection")
            if self.kind == "exec" and len(self.command or "") <= commands.MAX_COMMAND_CHARS:
                # Looking through a command decodes what it can: bounded, but up to ~0.1 s for a
                # hostile 32 KiB one, so off the loop (the result is cached for decide()).
                await asyncio.get_running_loop().run_in_executor(None, commands.transfer_programs,
                                                                 self.command or "")
            self.decision = commands.decide(self.proxy.policy, self.kind, self.command)
            if self.decision.transfer and self.kind == "exec" and not _runs_sftp_server(self.command) \
                    and uploads_judged(self.proxy.content_engine, workload.zone):
                # Content rules follow SFTP only: scp -t (the legacy scp protocol), rsync, or
                # sftp-server behind another word would carry files past them.
                raise access.AccessRefused(
                    "file_transfer_refused",
                    f"skyguard: uploads to {workload.name} are judged by content rules, which follow SFTP "
                    "only (sftp, or scp of OpenSSH 9 and later); this transfer command is refused "
                    "(legacy scp: use scp without -O)", transfer_programs=list(self.decision.programs))
            upstream = await owner.upstream()
            if self.ended:  # the operator left while the VM was being reached
                return
        except access.AccessRefused as refused:
            self._refused(refused)
            return
        except Exception:  # noqa: BLE001 - one session's surprise must not take the proxy down
            log.exception("SSH session setup failed")
            self._refused(access.AccessRefused("error", "skyguard: internal error opening the session"))
            return
        width, height = self.size[0] or 80, self.size[1] or 24
        archive = self.proxy.archive
        try:
            # Off the loop, in the archive's own threads (files created and fsynced, the start
            # logged): a stalled disk holds up this session only, and past MAX_RECORD_WORK record
            # operations waiting on it new sessions are refused. Its record is on disk before
            # anything reaches the VM.
            recording = await archive.work.start(
                archive.begin, operator=operator, key_fingerprint=owner.key_fingerprint or "?",
                workload=workload.name, zone=workload.zone, source=owner.source, kind=self.kind or "?",
                command=self.command, width=width, height=height, term=self.term, record_input=not self.term,
                notify=on_loop(asyncio.get_running_loop(), self._recording_moved))
        except Busy as e:
            log.warning("a session of %s on %s is refused: %s", operator, workload.name, e)
            self._refused(access.AccessRefused("recording_busy", f"skyguard: this session cannot be recorded now ({e}); "
                                                                 "try again later"))
            return
        except LogError as e:  # fail closed: no session runs without its start entry
            log.error("a session of %s on %s is refused: its start cannot be logged: %s", operator, workload.name, e)
            self._refused(access.AccessRefused("log_refused", LOG_REFUSED_WORDS))
            return
        except (OSError, SkyguardError) as e:  # fail closed: no session runs unrecorded
            log.error("cannot record a session of %s on %s: %s", operator, workload.name, e)
            self._refused(access.AccessRefused("error", "skyguard: the session cannot be recorded"))
            return
        self.recording = recording
        if self.ended:  # the operator left while the record was written
            self.proxy.records_closing.keep(close_record(recording, "client_disconnected", None, None), recording)
            return
        if self.decision.transfer and (self.kind == "subsystem" or _runs_sftp_server(self.command)):
            self.sftp_log = log_gate(self)
            self.sftp_filter = upload_pump(self, workload)
        self.proxy.metrics.active.inc()
        self.active_counted = True
        try:
            self.vm_chan, _ = await upstream.create_session(
                lambda: VmSession(self), command=self.command if self.kind == "exec" else None,
                subsystem=self.command if self.kind == "subsystem" else None,
                term_type=self.term, term_size=self.size if self.term else None,
                term_modes=self.modes if self.term else None, encoding=None,
                request_pty=bool(self.term))
        except (asyncssh.Error, OSError) as e:
            reason = getattr(e, "reason", None) or type(e).__name__
            self.end_with_message(f"skyguard: {workload.name} refused the session: {reason}\r\n",
                                  EXIT_UNREACHABLE, "vm_refused_session")
            return
        if self.ended:  # the operator went away while the VM was being reached
            self.vm_chan.close()
            return
        self.vm_reading.attach(self.vm_chan)
        pending, self.pending = self.pending, []
        for data in pending:
            self.data_received(data, None)
        if self.pending_eof:
            self.eof_received()
        self.operator_reading.release("opening")

    def _refused(self, refused: access.AccessRefused):
        if self.ended:
            return
        self.ended = True
        operator = self.owner.operator_name
        self.proxy.metrics.sessions.labels(operator, refused.reason).inc()
        if refused.reason in REFUSED_REQUEST_LABELS:
            self.proxy.metrics.refusals.labels(REFUSED_REQUEST_LABELS[refused.reason]).inc()
        command = self.command
        extra = dict(refused.details)
        if command is not None and len(command) > LOGGED_COMMAND_CHARS:
            extra["command_chars"] = len(command)
            command = command[:LOGGED_COMMAND_CHARS]
        self.proxy.record("admin_session_refused", operator=operator,
                          key_fingerprint=self.owner.key_fingerprint, source=self.owner.source,
                          workload=self.owner.login.workload if self.owner.login else None,
                          kind=self.kind, command=command, reason=refused.reason, **extra)
        code = EXIT_UNREACHABLE if refused.reason.startswith("vm_") else EXIT_REFUSED
        try:
            self.chan.write_stderr((str(refused) + "\r\n").encode())
            self.chan.exit(code)
        except (asyncssh.Error, OSError):
            pass  # the operator is already gone

    def recheck(self) -> None:
        """After a policy change: end this session if the new policy would not let it start."""
        if self.ended or self.decision is None:
            return  # ended, or not decided yet (_open decides under the policy in force then)
        zone = self.owner.workload.zone if self.owner.workload else None
        try:
            commands.decide(self.proxy.policy, self.kind, self.command, self.decision.programs)
            if self.sftp_log is not None:  # SFTP: judged under the content rules in force now
                engine = self.proxy.content_engine
                if engine is not None and engine.content.rules_for(zone, "upload", "sftp"):
                    if self.sftp_filter is None:  # began unfiltered: its stream cannot be taken up midway
                        raise access.AccessRefused("content_rules_added",
                                                   "skyguard: uploads to this VM are now judged by content rules; "
                                                   "open a new SFTP session")
                    self.sftp_filter.filter.engine = engine  # files still open are judged at CLOSE by these
        except access.AccessRefused as refused:
            self.proxy.record("admin_access_revoked", operator=self.owner.operator_name,
                              workload=self.owner.workload_name, source=self.owner.source,
                              session=self.recording.id if self.recording else None,
                              reason=refused.reason)
            self.end_with_message(f"\r\nskyguard: this session is no longer allowed by a policy change: "
                                  f"{str(refused).removeprefix('skyguard: ')}\r\n", EXIT_UNREACHABLE, "revoked")

    # operator -> VM
    def data_received(self, data, datatype):
        if self.ended:  # the record is being closed off the loop: nothing more goes in it
            return
        if self.vm_chan is None:
            # Reading is paused until the VM is connected; anything already in flight waits here
            # (bounded by the channel window the client was granted).
            self.pending.append(data)
            return
        if self.recording and not self._record(self.recording.input, data):
            return
        if self.sftp_log is not None:  # a file request goes on once on record, to the filter or the VM
            self.sftp_log.from_operator(data)
            return
        if self.sftp_filter is not None:  # files under content rules are held and judged first
            self.sftp_filter.from_operator(data)
            return
        self.vm_chan.write(data)

    def eof_received(self):
        if self.vm_chan is None:
            self.pending_eof = True
        elif self.sftp_log is not None:
            self.sftp_log.eof()
        elif self.sftp_filter is not None:
            self.sftp_filter.eof()
        else:
            self.vm_chan.write_eof()
        return True

    def terminal_size_changed(self, width, height, pixwidth, pixheight):
        self.size = (width, height, pixwidth, pixheight)
        if self.vm_chan is not None:
            self.vm_chan.change_terminal_size(width, height, pixwidth, pixheight)
        if self.recording and not self.ended:
            self._record(self.recording.resize, width, height)

    def signal_received(self, signal):
        if self.vm_chan is not None:
            self.vm_chan.send_signal(signal)

    def break_received(self, msec):
        if self.vm_chan is not None:
            self.vm_chan.send_break(msec)
            return True
        return False

    def pause_writing(self):
        self.vm_reading.hold("operator_window")  # the operator is not keeping up: stop reading the VM

    def resume_writing(self):
        self.vm_reading.release("operator_window")

    # VM -> operator
    def from_vm(self, data: bytes, datatype):
        if self.ended:
            return
        if self.recording and not self._record(self.recording.output, data):
            return
        if self.sftp_filter is not None and datatype != asyncssh.EXTENDED_DATA_STDERR:
            data = self.sftp_filter.from_vm(data)
        if self.sftp_log is not None and datatype != asyncssh.EXTENDED_DATA_STDERR:
            data = self.sftp_log.from_vm(data)  # with its answers to requests the log refused
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self.chan.write_stderr(data)
        else:
            self.chan.write(data)

    def vm_closed(self, exit_status, exit_signal):
        if self.ended:
            return
        if exit_signal is INVALID_SIGNAL:
            log.warning("%s ended a session with an exit signal that is not a signal name", self.owner.workload_name)
            self.end_with_message("\r\nskyguard: the VM ended the session with an invalid exit signal\r\n",
                                  EXIT_UNREACHABLE, "vm_bad_exit_signal")
        elif exit_signal:
            self._finish("ok", exit_status, exit_signal, then=lambda: self.chan.exit_with_signal(exit_signal))
        elif exit_status is not None:
            self._finish("ok", exit_status, None, then=lambda: self.chan.exit(exit_status))
        else:
            self.end_with_message("\r\nskyguard: the connection to the VM was lost\r\n",
                                  EXIT_UNREACHABLE, "vm_lost")

    def end_with_message(self, message: str, code: int, result: str):
        if self.ended:
            return
        self._record_notice(message)

        def tell():
            self.chan.write_stderr(message.encode())
            self.chan.exit(code)

        self._finish(result, code, None, then=tell)
        if self.vm_chan is not None:
            self.vm_chan.close()

    def _finish(self, result: str, exit_status, exit_signal, then=None):
        """End the session; its record is closed off the loop, and only then is `then` (what the
        operator is told: the exit status) called, so the record is on disk before they hear it."""
        self.ended = True
        self._unpause()
        for sftp in (self.sftp_log, self.sftp_filter):
            if sftp is not None:
                sftp.close()
        if self.active_counted:
            self.proxy.metrics.active.dec()
            self.active_counted = False
        self.proxy.metrics.sessions.labels(self.owner.operator_name, result).inc()
        if self.recording:
            self.proxy.records_closing.keep(close_record(self.recording, result, exit_status, exit_signal, then), self.recording)
        elif then is not None:
            told(then)

    # -- the recording's pace ---------------------------------------------------------------------

    def _record(self, event, *args) -> bool:
        """Record one event (recording.py: written behind by the transcript's thread). False when
        the recording cannot take it: the session is then ended, and the event must not be relayed."""
        try:
            event(*args)
        except RecordingError as e:
            self._end_unrecorded(e)
            return False
        if self.recording.behind and self.paused_at is None and not self.ended:
            loop = asyncio.get_running_loop()
            self.paused_at = loop.time()
            self.proxy.metrics.recording_pauses.inc()
            self.proxy.metrics.recording_paused.inc()
            self.operator_reading.hold("recording")
            self.vm_reading.hold("recording")
            config = self.proxy.config
            self._pause_timer = loop.call_later(min(config.recording_notice_after, config.recording_stall_timeout),
                                                self._still_paused)
        return True

    def _record_notice(self, message: str) -> None:
        """What skyguard itself tells the operator goes in the transcript too, where it still can."""
        if self.recording is not None:
            try:
                self.recording.output(message.encode())
            except RecordingError:
                pass  # being ended for it

    def _still_paused(self) -> None:
        """The recording has not caught up: the operator is told (and the host's log), then, past
        recording_stall_timeout, the session is ended."""
        if self.ended or self.paused_at is None:
            return
        loop = asyncio.get_running_loop()
        limit = self.proxy.config.recording_stall_timeout
        left = limit - (loop.time() - self.paused_at)
        if left <= 0:
            self._end_unrecorded(RecordingStalled(
                f"its recording has not caught up in {limit:g} s ({self.recording.queued} bytes not yet written): "
                "the disk under the session records is not keeping up"))
            return
        if not self._pause_told:
            self._pause_told = True
            log.warning("session %s of %s on %s is paused: its transcript is %d bytes behind (the disk under the "
                        "session records is not keeping up); it ends in %.0f s unless it catches up",
                        self.recording.id, self.owner.operator_name, self.owner.workload_name,
                        self.recording.queued, left)
            self._tell(f"\r\nskyguard: output is paused: this session's recording is not keeping up; the session "
                       f"ends in {left:.0f} s unless it catches up\r\n")
        self._pause_timer = loop.call_later(left, self._still_paused)

    def _recording_moved(self) -> None:
        """On the loop, from the transcript's writer: it caught up, or a write failed."""
        if self.ended or self.recording is None:
            return
        if self.recording.failed:
            self._end_unrecorded(RecordingError("its transcript could not be written"))
        elif self.paused_at is not None and not self.recording.behind:
            if self._pause_told:
                log.info("session %s: its recording caught up; it goes on", self.recording.id)
                self._tell("\r\nskyguard: output resumed\r\n")
            self._unpause()
            self.operator_reading.release("recording")
            self.vm_reading.release("recording")

    def _unpause(self) -> None:
        if self.paused_at is not None:
            self.paused_at = None
            self._pause_told = False
            self.proxy.metrics.recording_paused.dec()
        if self._pause_timer is not None:
            self._pause_timer.cancel()
            self._pause_timer = None

    def _tell(self, message: str) -> None:
        self._record_notice(message)
        told(lambda: self.chan.write_stderr(message.encode()))

    def _end_unrecorded(self, error: RecordingError) -> None:
        """End a session whose recording cannot take more (fail closed). The operator is told at
        once: the record's end cannot be on disk first (it is closed when the disk lets it)."""
        if self.ended:
            return
        operator, workload = self.owner.operator_name, self.owner.workload_name
        log.error("session %s of %s on %s is ended: %s", self.recording.id, operator, workload, error)
        self.proxy.record("admin_session_recording_failed", session=self.recording.id, operator=operator,
                          workload=workload, result=error.result, reason=str(error),
                          queued_bytes=self.recording.queued)
        stalled = "is not keeping up" if isinstance(error, RecordingStalled) else "could not be written"
        message = (f"\r\nskyguard: this session is ended: its recording {stalled} (the disk under the session "
                   "records); open a new one once it is back\r\n")
        self._record_notice(message)

        def tell():
            self.chan.write_stderr(message.encode())
            self.chan.exit(EXIT_UNREACHABLE)

        told(tell)
        self._finish(error.result, EXIT_UNREACHABLE, None)
        if self.vm_chan is not None:
            self.vm_chan.close()

    def connection_lost(self, exc):
        """The operator's channel is gone (client exited or was killed): close the VM side and
        finish the record with what was transferred up to now."""
        if not self.ended:
            self._finish("client_disconnected", None, None)
            if self.vm_chan is not None:
                self.vm_chan.close()
        self.owner.session_closed(self)


async def close_record(recording: SessionRecording, result: str, exit_status, exit_signal, then=None) -> None:
    """Close a session's record off the loop, in the archive's threads (transcript fsynced and
    hashed, end logged, metadata written: a stalled disk holds up this session only), then call
    `then` on the loop."""
    try:
        await recording.archive.work.run(recording.finish, result, exit_status, exit_signal)
    except (OSError, SkyguardError):
        log.exception("could not finish the recording of session %s", recording.id)
    finally:
        if then is not None:
            told(then)


def told(then) -> None:
    try:
        then()
    except (asyncssh.Error, OSError, BrokenPipeError):
        pass  # the operator is already gone
