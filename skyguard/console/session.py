"""One VNC console session: admit the operator with a one-time ticket, log into the VM's VNC server
with the stored password, then relay RFB both ways, enforcing the clipboard rule, keeping the
protocol to what the recorder decodes, counting keystrokes and recording the screen.

The two legs are separate RFB connections: the operator's client sees skyguard's challenge, never
the VM's, and the VM's password is used only here, on the skyguard -> VM leg. Whatever goes wrong
in a session (a malformed message from either side, a VM that refuses the password, a revoked
operator) ends that session only, with a reason in the log and the metrics.

The recording never waits on the disk on the loop every session shares: it is created and closed
in the session archive's own threads (a bounded number in flight: past it a new session is
refused, skyguard/diskwork.py) and written behind by its own thread (admin/transcript.py). While
its writer is behind (a slow or stalled disk) the session relays nothing more from the VM; past
`recording_stall_timeout` it is ended (fail closed), result recording_stalled, and logged. The
operator's connection is closed once the record is (its end is on disk first), except when the
recording itself is what failed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import struct

from skyguard.admin.access import AccessRefused, workload_address
from skyguard.admin.transcript import RecordingError, RecordingStalled, on_loop
from skyguard.console import access, rfb
from skyguard.console.rdp import RdpDesktop
from skyguard.console.recording import VncRecording
from skyguard.console.tickets import Ticket, match_vnc
from skyguard.diskwork import Busy
from skyguard.errors import AdminError, LogError, SkyguardError
from skyguard.parts import entries_durable, log_refusal
from skyguard.policy.console import ConsoleTarget
from skyguard.timeouts import within

log = logging.getLogger("skyguard.console")

HANDSHAKE_TIMEOUT = 20.0  # seconds an unauthenticated client (or a VM's VNC server) may take to log in
# What an operator is told while the signed log refuses entries (its own reason, with host paths,
# goes to the host's log).
LOG_REFUSED_WORDS = ("skyguard: the session cannot start: the signed log refuses entries now (its disk is full or "
                     "stalled); try again later")


class ConsoleSession:
    def __init__(self, proxy, reader, writer, ticket: Ticket | None = None, signed_in=None):
        """`reader`/`writer`: an asyncio stream pair, or web.py's WebSocket adapters. `ticket`:
        already redeemed (the web console redeems it when the WebSocket opens); None: the client
        proves one with VNC authentication. `signed_in()`: for the web console behind sign-in,
        who the browser's sign-in session says is signed in now (None: signed out, expired,
        logged out): the session lasts only while it is the ticket's operator, under their groups
        of now."""
        self.proxy = proxy
        self.signed_in = signed_in
        self.client_r, self.client_w = reader, writer
        peer = writer.get_extra_info("peername") or ("?", 0)
        self.source_host = peer[0]  # what the failed-login limiter counts (against its source: its /64)
        self.source = f"{peer[0]}:{peer[1]}"
        self.web = ticket is not None
        self.ticket: Ticket | None = ticket
        self.target: ConsoleTarget | None = None
        self.zone: str | None = None
        self.recording: VncRecording | None = None
        self.vm_w: asyncio.StreamWriter | None = None
        self.rdp: RdpDesktop | None = None  # an RDP target's private Xvnc + xfreerdp (rdp.py)
        self._ended: str | None = None
        self.admitted = False  # authorized under the policy in force after the VM login (revocable from then)
        self._tasks: list[asyncio.Task] = []
        self._recording_moved = asyncio.Event()  # the recording's writer caught up or failed

    # -- admission --------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            try:
                vm = await within(self._admit(), HANDSHAKE_TIMEOUT)
            except TimeoutError:
                raise rfb.RfbError("the VNC login took too long") from None
            if vm is None:
                return
            await self._relay(*vm)
        except (asyncio.IncompleteReadError, ConnectionError):
            self._end("disconnected")
        except RecordingError as e:
            self._recording_lost(e)
        except rfb.RfbError as e:
            self._end("protocol_error", str(e))
        except SkyguardError as e:
            self._end("error", str(e))
        finally:
            self._end("disconnected")  # (ended already, but for a refused login)

    async def _send(self, data: bytes) -> None:
        self.client_w.write(data)
        await self.client_w.drain()

    async def _admit(self):
        if self.proxy.limiter.is_blocked(self.source_host):
            self.proxy.metrics.auth_failures.labels("rate_limited").inc()
            return None
        await self._send(rfb.VERSION_3_8)
        if rfb.parse_version(await self.client_r.readexactly(12)) < (3, 8):
            raise rfb.RfbError("the VNC client speaks an RFB version before 3.8")
        # The web console's ticket came with the WebSocket: the browser then needs no password.
        security = rfb.SECURITY_NONE if self.web else rfb.SECURITY_VNC
        await self._send(bytes([1, security]))
        if (await self.client_r.readexactly(1))[0] != security:
            raise rfb.RfbError("the client did not choose the security type offered")
        if not self.web:
            challenge = os.urandom(16)
            await self._send(challenge)
            response = await self.client_r.readexactly(16)
        if (refusal := log_refusal(self.proxy.decision_log)) is not None:
            # Nothing is judged that could not be put on record (a ticket guess, a VM login): the
            # ticket is not looked at, nor used up; the operator is told why.
            log.error("a console login from %s is refused: %s", self.source, refusal)
            self.proxy.metrics.auth_failures.labels("log_refused").inc()
            await self._send(rfb.security_failure(LOG_REFUSED_WORDS))
            return None
        if not self.web:
            try:  # read off the loop: the tickets' disk may stall
                tickets = await self.proxy.ticket_work.start(self.proxy.tickets.load)
            except Busy as e:
                log.warning("a console login from %s is refused: %s", self.source, e)
                return await self._refuse("tickets_busy", "skyguard: console tickets cannot be checked now (the disk "
                                                          "under skyguard's state is not keeping up); try again later")
            # Again: a guesser opens many connections at once, each past the check above before
            # any guess failed. From here to the failure counted in _refuse nothing awaits.
            if self.proxy.limiter.is_blocked(self.source_host):
                self.proxy.metrics.auth_failures.labels("rate_limited").inc()
                return None
            ticket = match_vnc(tickets, challenge, response)
            if ticket is not None and not await self.proxy.ticket_work.run(self.proxy.tickets.consume, ticket):
                ticket = None  # another connection redeemed it first (a right password: no guess to count)
            self.ticket = ticket
        if self.ticket is None:
            return await self._refuse("bad_ticket", "skyguard: unknown, used or expired console ticket; "
                                                    "ask for a new one")
        try:
            self.target, workload = access.authorize(self.proxy.policy, self.ticket.operator,
                                                     self.ticket.groups, self.ticket.target)
            address = workload_address(workload)
        except AccessRefused as e:
            return await self._refuse(e.reason, str(e))
        self.zone = workload.zone
        try:
            vm = await self._vm_login(address, self.target)
        except (OSError, asyncio.IncompleteReadError, rfb.RfbError, SkyguardError) as e:
            # The operator learns that the VM side failed, not how (the log has the detail).
            self.proxy.record("console_vm_login_failed", operator=self.ticket.operator, target=self.target.name,
                              source=self.source, error=_safe_error(e))
            return await self._refuse("vm_login_failed",
                                      f"skyguard: could not open the console of {self.target.name} (VM side)")
        try:  # a swap while skyguard logged into the VM (it may wait on another session's login)
            self.recheck()
        except AccessRefused as e:
            return await self._refuse(e.reason, str(e))
        if self.proxy.archive.work.full:  # told while the client can still be (the record is made below)
            log.warning("a console session of %s on %s is refused: %s session record operations are under way, "
                        "the most at once (the disk under the session records is not keeping up)",
                        self.ticket.operator, self.target.name, self.proxy.archive.work.in_flight)
            return await self._refuse("recording_busy", "skyguard: this session cannot be recorded now (the disk "
                                                        "under the session records is not keeping up); try again later")
        self.admitted = True  # from here a swap that refuses it ends it (proxy._end_revoked)
        await self._send(struct.pack(">I", 0))  # SecurityResult OK
        shared = await self.client_r.readexactly(1)  # ClientInit
        vm_r, vm_w = vm
        vm_w.write(shared)
        init = await rfb.read_server_init(vm_r)
        if self._ended is not None:  # revoked by a swap while the client and the VM said hello
            return None
        archive = self.proxy.archive
        try:
            # Off the loop, in the archive's own threads (files created and fsynced, the start
            # logged): a stalled disk holds up this session only (Busy past MAX_RECORD_WORK
            # record operations waiting on it). Its record is on disk before the operator sees the screen.
            recording = await archive.work.start(
                VncRecording, archive, operator=self.ticket.operator, groups=self.ticket.groups,
                target=self.target, zone=self.zone, source=self.source, auth="web" if self.web else "ticket",
                init=init, notify=on_loop(asyncio.get_running_loop(), self._recording_moved.set))
        except Busy as e:  # full since the check at admission
            raise AdminError(f"the session cannot be recorded now: {e}") from None
        except OSError as e:  # fail closed: no session runs unrecorded
            raise AdminError(f"the session cannot be recorded: {e.strerror or e}") from None
        except LogError as e:  # fail closed: no session runs without its start entry
            log.error("a console session of %s on %s is refused: its start cannot be logged: %s",
                      self.ticket.operator, self.target.name, e)
            raise AdminError(LOG_REFUSED_WORDS.removeprefix("skyguard: ")) from None
        if self._ended is not None:  # revoked, or shut down, while its record was written
            self.recording = recording
            self.proxy.records_closing.keep(self._close_record(self._ended), recording)
            return None
        self.recording = recording
        await self._send(init.raw)
        self.proxy.metrics.active.inc()
        log.info("console session %s: %s opened %s from %s", self.recording.id, self.ticket.operator,
                 self.target.name, self.source)
        return vm_r, vm_w, init

    def recheck(self) -> None:
        """AccessRefused unless the policy in force still lets this ticket's operator open this
        target, as the session opened it: a target the policy changed (its clipboard rule, its
        workload, port, credential or recording) ends the session, which enforces the old one."""
        groups = self.ticket.groups
        if self.signed_in is not None:
            who = self.signed_in()
            if who is None or who.user != self.ticket.operator:
                raise AccessRefused("signed_out", "skyguard: you are no longer signed in; sign in and open the "
                                                  "console again")
            groups = tuple(who.groups)
        target, _ = access.authorize(self.proxy.policy, self.ticket.operator, groups, self.target.name)
        if target != self.target:
            raise AccessRefused("target_changed", f"skyguard: the console target {target.name} was changed by a "
                                                  "new policy; open it again")

    async def _refuse(self, reason: str, message: str):
        if reason == "bad_ticket":  # a guessed password; a refused operator has a valid ticket
            self.proxy.limiter.failure(self.source_host)  # before any await (see _admit)
        await self._send(rfb.security_failure(message))
        self.proxy.refused(reason, self.source_host, operator=self.ticket.operator if self.ticket else None,
                           source=self.source, target=self.ticket.target if self.ticket else None)
        return None

    async def _vm_login(self, address: str, target):
        # One login at a time per VM server: every session comes from skyguard's one address, and
        # a VNC server counts unfinished logins per address (TigerVNC blacklists it after 5, and
        # then refuses everyone: "Too many security failures").
        async with self.proxy.vm_login_lock(address, target.port):
            return await self._vm_login_alone(address, target)

    async def _vm_login_alone(self, address: str, target):
        # A Secret: never printed. Read in a worker thread: the sealed store may wait on a slow
        # disk or a TPM unsealing its key, and the loop serves every other session and part.
        credential = await asyncio.to_thread(self.proxy.store.get, target.credential)
        if target.protocol == "rdp":
            # FreeRDP draws the VM's RDP desktop into a private Xvnc (rdp.py); from here on that
            # Xvnc is the VNC server this session logs into, with the password only skyguard knows.
            self.rdp = RdpDesktop(self.proxy.state_dir / "console" / "rdp" / secrets.token_hex(8), address,
                                  target.port, credential, target.clipboard != "none")
            password = self.rdp.vnc_password.encode()
            r, w = await self.rdp.start()
        else:
            password = credential
            r, w = await within(asyncio.open_connection(address, target.port), self.proxy.config.connect_timeout)
        self.vm_w = w
        if rfb.parse_version(await r.readexactly(12)) < (3, 8):
            # Also how a VNC server refuses a connection at once (RFB 3.3: type 0 and a reason).
            head = await r.readexactly(4)
            reason = b""
            if head == bytes(4):
                (length,) = struct.unpack(">I", await r.readexactly(4))
                reason = await r.readexactly(min(length, 512))
            raise rfb.RfbError("the VM's VNC server speaks an RFB version before 3.8"
                               + (f" or refused: {reason.decode(errors='replace')}" if reason else ""))
        w.write(rfb.VERSION_3_8)
        count = (await r.readexactly(1))[0]
        if count == 0:
            (length,) = struct.unpack(">I", await r.readexactly(4))
            raise rfb.RfbError("the VM's VNC server refused: " + (await r.readexactly(min(length, 512))).decode(errors="replace"))
        types = await r.readexactly(count)
        if rfb.SECURITY_VNC not in types:
            raise rfb.RfbError(f"the VM's VNC server offers no VNC authentication (offers {list(types)})")
        w.write(bytes([rfb.SECURITY_VNC]))
        w.write(rfb.vnc_auth_response(bytes(password), await r.readexactly(16)))
        (result,) = struct.unpack(">I", await r.readexactly(4))
        if result != 0:
            raise rfb.RfbError("the VM's VNC server refused the stored password")
        return r, w

    # -- relay ------------------------------------------------------------------------------------

    async def _relay(self, vm_r, vm_w, init: rfb.ServerInit) -> None:
        self.pixel_format, self.size = init.pixel_format, (init.width, init.height)
        self.updates_asked = False
        self._tasks = [asyncio.create_task(self._client_to_vm(vm_w)),
                       asyncio.create_task(self._vm_to_client(vm_r))]
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in self._tasks:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()
        self._end("closed")

    async def _client_to_vm(self, vm_w) -> None:
        while True:
            message = await rfb.read_client_message(self.client_r)
            self.recording.client(message)
            out = message.raw
            if message.type == rfb.SET_PIXEL_FORMAT:
                # Updates are only sent on request, so before the first request no update in the
                # old format can be under way; afterwards a change would race one.
                if self.updates_asked:
                    raise rfb.RfbError("the client changed the pixel format after updates began")
                self.pixel_format = message.pixel_format
                self.recording.pixel_format(message.pixel_format)
            elif message.type == rfb.SET_ENCODINGS:
                out = rfb.set_encodings(rfb.allowed_encodings(message.encodings))
            elif message.type == rfb.FB_UPDATE_REQUEST:
                self.updates_asked = True
            elif message.type == rfb.CLIENT_CUT_TEXT:
                if not await self._clipboard("to_vm", message.text_length, self.target.clipboard_to_vm):
                    continue
            vm_w.write(out)
            await vm_w.drain()

    async def _vm_to_client(self, vm_r) -> None:
        while True:
            # The format and the "updates asked" flag as of this message's first byte, not of the
            # wait before it: the client may change its format while the proxy waits here, and
            # an update read in another format than the client's would frame the stream apart
            # (pixels to one, a clipboard message or an unvetted encoding to the other).
            kind = (await vm_r.readexactly(1))[0]
            asked = self.updates_asked
            message = await rfb.read_server_message(vm_r, self.pixel_format, self.size, kind)
            if kind == rfb.FB_UPDATE and not asked:  # (read first: a malformed one says what is wrong)
                raise rfb.RfbError("the VM sent a framebuffer update before the client asked for one")
            if message.new_size:
                self.size = message.new_size
            if message.type == rfb.SERVER_CUT_TEXT:
                if not await self._clipboard("from_vm", message.text_length, self.target.clipboard_from_vm):
                    continue
            self.recording.server(message)
            if self.recording.behind:
                await self._recording_caught_up()
            self.client_w.write(message.raw)
            await self.client_w.drain()

    async def _clipboard(self, direction: str, length: int, allowed: bool) -> bool:
        """Whether a clipboard transfer the target's rule `allowed` is relayed: only once its
        `console_clipboard` entry is durable (fail closed). One the signed log refuses (its disk full
        or stalled) is dropped, counted under verdict log_refused; a dropped one's entry is best effort."""
        fields = dict(session=self.recording.id, direction=direction, bytes=length, operator=self.ticket.operator,
                      target=self.target.name)
        verdict = "allowed" if allowed else "dropped"
        if allowed:
            try:
                await entries_durable([self.proxy.decision_log.record("console_clipboard", **fields)], self.proxy.decision_log)
            except (LogError, OSError) as e:  # the signed log refuses (or the fallback log cannot write)
                log.error("a clipboard transfer (%s, %d bytes) of console session %s is dropped: its entry cannot be "
                          "logged: %s", direction, length, self.recording.id, e)
                allowed, verdict = False, "log_refused"
        else:
            self.proxy.record("console_clipboard_dropped", **fields)
        self.recording.clipboard(direction, length, allowed)
        self.proxy.metrics.clipboard.labels(direction, verdict).inc()
        return allowed

    async def _recording_caught_up(self) -> None:
        """Wait while the recording's writer is behind (nothing more is read from the VM). The
        host's log hears of a wait past recording_notice_after; RecordingStalled past
        recording_stall_timeout, RecordingError when its writing failed."""
        loop = asyncio.get_running_loop()
        config, metrics = self.proxy.config, self.proxy.metrics
        start, told = loop.time(), False
        metrics.recording_pauses.inc()
        metrics.recording_paused.inc()
        try:
            while self.recording.behind and not self.recording.failed:
                self._recording_moved.clear()
                if not self.recording.behind:  # caught up since the check above
                    break
                waited = loop.time() - start
                if waited >= config.recording_stall_timeout:
                    raise RecordingStalled(f"its recording has not caught up in {config.recording_stall_timeout:g} s "
                                           f"({self.recording.queued} bytes not yet written): the disk under "
                                           "the session records is not keeping up")
                if waited >= config.recording_notice_after and not told:
                    told = True
                    log.warning("console session %s of %s is paused: its recording is %d bytes behind (the disk "
                                "under the session records is not keeping up)", self.recording.id,
                                self.ticket.operator, self.recording.queued)
                next_check = config.recording_stall_timeout if told else \
                    min(config.recording_notice_after, config.recording_stall_timeout)
                try:
                    await within(self._recording_moved.wait(), max(next_check - waited, 0.001))
                except TimeoutError:
                    pass
        finally:
            metrics.recording_paused.dec()
        if self.recording.failed:
            raise RecordingError("its recording could not be written")

    # -- ending -----------------------------------------------------------------------------------

    def end(self, result: str, reason: str = "") -> None:
        """End the session from outside (revocation, shutdown)."""
        self._end(result, reason)
        for task in self._tasks:
            task.cancel()

    def _recording_lost(self, error: RecordingError) -> None:
        """End a session whose recording cannot take more (fail closed)."""
        log.error("console session %s of %s is ended: %s", self.recording.id, self.ticket.operator, error)
        self.proxy.record("admin_session_recording_failed", session=self.recording.id, operator=self.ticket.operator,
                          workload=self.target.workload, result=error.result, reason=str(error),
                          queued_bytes=self.recording.queued)
        self._end(error.result, str(error))

    def _end(self, result: str, reason: str = "") -> None:
        """Stop relaying; the record is closed off the loop, and the operator's connection only
        after it (the end is on disk first), unless the recording is what failed."""
        if self._ended is not None:
            return
        self._ended = result
        self._close_vm()
        if self.recording is None:
            if reason:
                log.info("console connection from %s ended before a session began: %s", self.source, reason)
            self._close_client()
            return
        self.proxy.metrics.active.dec()
        self.proxy.metrics.sessions.labels(self.ticket.operator, result).inc()
        log.info("console session %s ended: %s%s", self.recording.id, result, f" ({reason})" if reason else "")
        if reason:
            self.proxy.record("console_session_error", session=self.recording.id, result=result, reason=reason)
        if result in (RecordingError.result, RecordingStalled.result):
            self._close_client()  # not kept waiting on a disk that does not answer
        self.proxy.records_closing.keep(self._close_record(result), self.recording)

    async def _close_record(self, result: str) -> None:
        try:
            await self.recording.archive.work.run(self.recording.finish, result)
        except (OSError, SkyguardError):
            log.exception("could not finish the recording of console session %s", self.recording.id)
        finally:
            self._close_client()

    def _close_vm(self) -> None:
        if self.vm_w is not None and not self.vm_w.is_closing():
            self.vm_w.close()
        if self.rdp is not None:
            self.rdp.stop()

    def _close_client(self) -> None:
        if not self.client_w.is_closing():
            self.client_w.close()


def _safe_error(e: BaseException) -> str:
    """An error for the log: its type and message (no exception here carries the password)."""
    return f"{type(e).__name__}: {e}"[:300]
