"""Session recording: each SSH session's metadata and terminal transcript, and their proof.

For session ID there are two files under `<state>/admin/sessions/`:
- `ID.cast`: the transcript in asciicast v2 (a JSON header line, then one `[time, "o", text]`
  line per piece of output, `[time, "i", text]` per piece of input when it is recorded (below),
  and `[time, "r", "WxH"]` per resize). Each event is written through to the file as it happens,
  by the transcript's own thread (transcript.py: never on the event loop, in order, bounded), so
  a session killed mid-way leaves a transcript complete up to then. In a session with a
  terminal (pty), what the operator types is recorded as the terminal echoes it, not as raw
  keystrokes, so a password typed at a no-echo prompt is not stored. A session without one
  (`ssh host sh`, `ssh -T host`, SFTP) echoes nothing: there everything the operator sends is
  recorded as input, or commands fed to a shell on stdin would reach the VM unrecorded.
- `ID.json`: operator, key fingerprint, workload, source, kind, command, start, end, exit status,
  bytes each way, result, and the transcript's SHA-256 once the session ends.
A start entry and an end entry (with the SHA-256) go to the DecisionLog, so `verify()` can prove
a transcript untouched against the log. `recover_interrupted()` closes the records of sessions
whose proxy died, hashing what was written. Creating and closing records (and recovery) block on
the disk: the archive's `work` runs them, in threads of its own (skyguard/diskwork.py), never on
the event loop nor in its default executor. Not the SSH server, not the signed log itself.
"""

from __future__ import annotations

import builtins  # `list` in SessionArchive's annotations is its method
import codecs
import fcntl
import hashlib
import json
import logging
import re
import secrets
import sys
import threading
import time
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path

from skyguard import fsutil
from skyguard.admin.decisionlog import DecisionLog
from skyguard.admin.transcript import RecordingError, Transcript
from skyguard.diskwork import DiskWork
from skyguard.errors import AdminError, BadInput, LogError
from skyguard.parts import wait_durable

log = logging.getLogger("skyguard.admin")
_SESSION_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")
# An archive's threads for creating and closing records (SessionArchive.work), and the record
# operations in flight (running or waiting) at which a new session is refused. A record's start
# or end takes milliseconds on a healthy disk (a closing transcript's fsync longer); on a stalled
# one each waits until the disk answers, and sessions past the bound are refused at once rather
# than queued behind them. Higher: more sessions may wait on a disk hiccup instead of being refused.
RECORD_WORKERS = 4
MAX_RECORD_WORK = 8


def abandon(transcript: Transcript, *paths: Path) -> None:
    """A record whose start the signed log refused: its transcript closed, its files removed
    (the session never started). Blocks on the disk."""
    try:
        transcript.close()
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


def utc_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_session_id(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(4)


def validate_session_id(session_id: str) -> str:
    if not _SESSION_ID.fullmatch(session_id or ""):
        raise BadInput(f"invalid session id {session_id!r}: `skyguard admin sessions` lists them "
                       "(they look like 20261130T031500Z-1a2b3c4d)")
    return session_id


def sha256_file(path: Path, wait_for_writer: bool = False) -> str:
    """`wait_for_writer`: first wait until no other process holds the file as a Transcript being
    written (its lock: an earlier proxy whose last write waits on a stalled disk, see
    recover_interrupted)."""
    digest = hashlib.sha256()
    with fsutil.open_regular(path) as f:  # a FIFO is refused (OSError), never waited on
        if wait_for_writer:
            fcntl.lockf(f, fcntl.LOCK_SH)
        for chunk in iter(lambda: f.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write_json(path: Path, value: dict) -> None:
    fsutil.write_private(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


class SessionRecording:
    """One session being recorded. Create with SessionArchive.begin()."""

    def __init__(self, archive: SessionArchive, meta: dict, width: int, height: int, term: str | None,
                 record_input: bool = False, notify=None):
        self.archive = archive
        self.meta = meta
        self.id = meta["id"]
        self._t0 = time.monotonic()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        # Input is stored only where nothing echoes it (no pty: see the module doc).
        self._input_decoder = codecs.getincrementaldecoder("utf-8")("replace") if record_input else None
        self._finished = False
        self.cast_path = archive.directory / f"{self.id}.cast"
        self.meta_path = archive.directory / f"{self.id}.json"
        header = {"version": 2, "width": width, "height": height, "timestamp": int(meta["start_ts"]),
                  "title": f"{meta['operator']}@{meta['workload']}"}
        if term:
            header["env"] = {"TERM": term}
        self._cast = Transcript(self.cast_path, notify)  # notify: see Transcript
        self._write_line(header)
        _atomic_write_json(self.meta_path, self.meta)

    @property
    def behind(self) -> bool:
        """The transcript's writer is behind (transcript.PAUSE_AT): the session should pause."""
        return self._cast.behind

    @property
    def queued(self) -> int:
        """Bytes recorded, not yet written to the transcript."""
        return self._cast.queued

    @property
    def failed(self) -> bool:
        """A write to the transcript failed: it takes nothing more."""
        return self._cast.error is not None

    def _write_line(self, value) -> None:
        self._cast.write((json.dumps(value, ensure_ascii=False) + "\n").encode("utf-8"))

    def _event(self, code: str, text: str) -> None:
        if not self._finished and text:
            self._write_line([round(time.monotonic() - self._t0, 6), code, text])

    # output, input and resize raise RecordingError when the transcript cannot take the event
    # (transcript.py): the session must then end without relaying it.
    def output(self, data: bytes) -> None:
        self.meta["bytes_out"] += len(data)
        self._event("o", self._decoder.decode(data))

    def input(self, data: bytes) -> None:
        # With a terminal: counted, not stored (keystrokes include what no-echo prompts hide);
        # without one, stored too (see the module doc).
        self.meta["bytes_in"] += len(data)
        if self._input_decoder is not None:
            self._event("i", self._input_decoder.decode(data))

    def resize(self, width: int, height: int) -> None:
        self._event("r", f"{width}x{height}")

    def note(self, key: str, value) -> None:
        self.meta.setdefault(key, []).append(value)

    def finish(self, result: str, exit_status: int | None = None, exit_signal: str | None = None) -> dict:
        """Close the transcript (waiting for its writer), hash it, store the metadata and log the
        end. Blocks on the disk: call off the event loop. Idempotent."""
        if self._finished:
            return self.meta
        try:
            self._event("o", self._decoder.decode(b"", final=True))
            if self._input_decoder is not None:
                self._event("i", self._input_decoder.decode(b"", final=True))
        except RecordingError:
            pass  # the session was ended for it; the hash is of what was written
        self._finished = True
        digest = self._cast.close()
        end = time.time()
        self.meta.update(end=utc_iso(end), end_ts=end, result=result, exit_status=exit_status,
                         exit_signal=exit_signal, transcript_sha256=digest,
                         duration=round(end - self.meta["start_ts"], 3))
        if self._cast.error is not None:  # the transcript stops where its writing failed
            self.meta["transcript_error"] = self._cast.error.strerror or str(self._cast.error)
        # Log first: a crash between the two leaves the record 'active', and recovery then logs
        # the same hash again, rather than a closed record the log never heard of.
        self.archive.log_end(self.meta)
        _atomic_write_json(self.meta_path, self.meta)
        return self.meta


class SessionArchive:
    """The folder of recorded sessions, and the log entries that vouch for them."""

    def __init__(self, directory: Path | str, decision_log: DecisionLog | None = None):
        self.directory = Path(directory)
        self.decision_log = decision_log
        # Tells this proxy's sessions from those of an earlier, dead one (a pid could be reused).
        # The SSH and console proxies of one daemon share one archive, so one instance.
        self.instance = secrets.token_hex(8)
        self._recovered = False
        self._recovering = threading.Lock()  # recover_once() runs in worker threads (it reads every transcript)
        # What blocks on the disk (begin, finish, recover_once), off the loop, on the proxies' loop:
        # `await archive.work.start(archive.begin, ...)` (Busy: refuse the session), `.run(...)`.
        self.work = DiskWork("session record operations", RECORD_WORKERS, MAX_RECORD_WORK)

    def begin(self, *, operator: str, key_fingerprint: str, workload: str, zone: str, source: str,
              kind: str, command: str | None, width: int = 80, height: int = 24,
              term: str | None = None, record_input: bool = False, notify=None) -> SessionRecording:
        """`record_input`: store what the operator sends too (a session without a pty). `notify`:
        called from the transcript's writer thread when it has caught up or failed (Transcript).
        Blocks on the disk (files created, the record fsynced): call off the event loop."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        start = time.time()
        meta = {
            "id": new_session_id(start), "operator": operator, "key_fingerprint": key_fingerprint,
            "workload": workload, "zone": zone, "source": source, "kind": kind, "command": command,
            "start": utc_iso(start), "start_ts": start, "end": None, "exit_status": None,
            "exit_signal": None, "bytes_in": 0, "bytes_out": 0, "result": "active",
            "transcript_sha256": None, "archive_instance": self.instance,
        }
        meta["input_recorded"] = record_input
        recording = SessionRecording(self, meta, width, height, term, record_input, notify)
        try:  # the session opens only once its start is on record (durable)
            wait_durable(self._log("admin_session_start", **_log_fields(meta)), self.decision_log)
        except LogError:  # no session without its start entry: nothing was recorded, nothing is kept
            abandon(recording._cast, recording.cast_path, recording.meta_path)
            raise
        return recording

    def log_end(self, meta: dict) -> None:
        """Best effort: a session that ran is closed (its record written) even when the signed
        log refuses its end entry (a full or stalled disk); the host's log says so."""
        try:
            self._log("admin_session_end", **_log_fields(meta),
                      end=meta["end"], result=meta["result"], exit_status=meta["exit_status"],
                      exit_signal=meta.get("exit_signal"), bytes_in=meta["bytes_in"],
                      bytes_out=meta["bytes_out"], transcript_sha256=meta["transcript_sha256"],
                      files=meta.get("files", []),
                      **({"console": meta["console"]} if "console" in meta else {}))
        except LogError as e:
            log.error("admin_session_end of session %s was not written to the signed log (its record is closed "
                      "without it): %s", meta["id"], e)

    def _log(self, kind: str, /, **fields) -> Future | None:
        """The entry's Future (parts.DecisionLog), for what must wait until it is durable."""
        return self.decision_log.record(kind, **fields) if self.decision_log is not None else None

    def list(self) -> list[dict]:
        out = []
        for path in self.directory.glob("*.json"):
            if _SESSION_ID.fullmatch(path.stem):
                try:
                    out.append(json.loads(fsutil.read_regular_file(path)))  # a FIFO: refused, not waited on
                except (OSError, ValueError):
                    out.append({"id": path.stem, "result": "unreadable"})
        return sorted(out, key=lambda m: (m.get("start") or "", m["id"]))

    def load(self, session_id: str) -> dict:
        validate_session_id(session_id)
        path = self.directory / f"{session_id}.json"
        try:
            return json.loads(fsutil.read_regular_file(path))  # a FIFO is refused, never waited on
        except FileNotFoundError:
            raise BadInput(f"no session {session_id} in {self.directory}; "
                           "`skyguard admin sessions` lists them") from None
        except OSError as e:
            raise AdminError(f"cannot read session metadata {path}: {e.strerror or e}") from None
        except ValueError:
            raise AdminError(f"session metadata {path} is not valid JSON: it was damaged or edited") from None

    def transcript_path(self, session_id: str) -> Path:
        """ID.cast for an SSH session, ID.vnc for a console session (skyguard/console/recording.py)."""
        console = self.directory / f"{validate_session_id(session_id)}.vnc"
        return console if console.exists() else self.directory / f"{session_id}.cast"

    def verify(self, session_id: str, logged: builtins.list[dict] | None = None) -> str:
        """The transcript's SHA-256 if it matches the metadata and every end entry for it in
        `logged` (the decision log's entries); else AdminError naming the mismatch."""
        meta = self.load(session_id)
        expected = meta.get("transcript_sha256")
        if not expected:
            raise AdminError(f"session {session_id} has not ended yet (or its proxy died and "
                             "recovery has not run): no hash to check against")
        actual = sha256_file(self.transcript_path(session_id))
        if actual != expected:
            raise AdminError(f"transcript of session {session_id} was modified: its SHA-256 is {actual}, "
                             f"the session record says {expected}")
        if logged is not None:
            ends = [e for e in logged if e.get("type") == "admin_session_end" and e.get("session") == session_id]
            if not ends:
                raise AdminError(f"session {session_id} has no end entry in the decision log")
            for e in ends:
                if e.get("transcript_sha256") != actual:
                    raise AdminError(f"transcript of session {session_id} was modified: its SHA-256 is "
                                     f"{actual}, the log says {e.get('transcript_sha256')}")
        return actual

    def recover_interrupted(self) -> builtins.list[str]:
        """Close the records of sessions left 'active' by an earlier proxy (one proxy per state
        directory; call at start): the transcript is hashed as it stands once no other process
        writes it (an earlier daemon whose stop gave up on a stalled disk lingers until its last
        write returns: waited for) and an end entry with result 'interrupted' is logged. Sessions
        recorded through this archive object are left."""
        recovered = []
        for meta in self.list():
            if meta.get("result") != "active" or meta.get("archive_instance") == self.instance:
                continue
            cast_path = self.transcript_path(meta["id"])
            try:
                # Once its writer has let go: a proxy that stopped without closing the record (the
                # disk did not answer) may still be in the kernel's hands, its last write pending.
                digest = sha256_file(cast_path, wait_for_writer=True) if cast_path.exists() else None
            except OSError as e:  # not a regular file (a FIFO would have hung the start): no digest
                log.error("session %s: its transcript %s cannot be read (%s); closed without its SHA-256",
                          meta["id"], cast_path, e.strerror or e)
                digest = None
            end = cast_path.stat().st_mtime if cast_path.exists() else time.time()
            meta.update(end=utc_iso(end), end_ts=end, result="interrupted", transcript_sha256=digest)
            self.log_end(meta)
            _atomic_write_json(self.directory / f"{meta['id']}.json", meta)
            recovered.append(meta["id"])
        return recovered

    def recover_once(self) -> builtins.list[str]:
        """recover_interrupted() on this archive's first call only: every part recording into it
        calls this as it starts, and only the first start closes anything (a part started or
        moved later must not touch the records of the parts already running). Blocks (it hashes
        transcripts): call off the event loop; thread-safe."""
        with self._recovering:
            if self._recovered:
                return []
            self.directory.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            recovered = self.recover_interrupted()
            self._recovered = True
            return recovered


def _log_fields(meta: dict) -> dict:
    return {"session": meta["id"], "operator": meta["operator"], "key_fingerprint": meta["key_fingerprint"],
            "workload": meta["workload"], "zone": meta["zone"], "source": meta["source"],
            "kind": meta["kind"], "command": meta["command"], "start": meta["start"]}


def caret(text: str) -> str:
    """`text` with every control character shown, not acted on (as `cat -v`): ESC as ^[, BEL as
    ^G, a C1 control such as 0x9b as M-^[; newline and tab are kept."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in "\n\t" or 0x20 <= code < 0x7f or code > 0x9f:
            out.append(ch)
        elif code < 0x20:
            out.append("^" + chr(code + 0x40))
        elif code == 0x7f:
            out.append("^?")
        else:
            out.append("M-^" + chr(code - 0x80 + 0x40))
    return "".join(out)


# What replay lets a transcript do to the reviewer's terminal: draw the screen as the operator saw
# it (cursor, erase, scroll, colours, modes, charsets), nothing else. Everything else is shown in
# caret notation: control strings (OSC: clipboard, title, palette, hyperlinks; DCS, APC, PM, SOS),
# queries the terminal would answer into the shell the reviewer returns to (device status and
# attributes, window reports, mode requests), C1 controls, shift-in/out, and concealed text (SGR 8).
_CSI = re.compile(r"\x1b\[([0-?]*)([ -/]*)([@-~])")
_CSI_DRAWING = set("ABCDEFGHIJKLMPSTXZ@`abdefghlr")  # and s/u (cursor save/restore) without parameters
_PRIVATE_DRAWING = set("hlrs")  # with a private marker (`CSI ? 1049 h`): DEC modes set, reset, saved
_ESC_DRAWING = re.compile(r"\x1b(?:[78cDEHM=>]|[()*+\-./][0-9A-Za-z<=>]|#[0-9])")
_STRING_INTRODUCERS = "]P_^X"
MAX_HELD = 4096  # characters of an unfinished escape sequence held for the next event


def _sgr_without_conceal(params: str) -> str | None:
    """SGR parameters without 8 (conceal), colour arguments left alone; None if none remain."""
    words = params.split(";")
    kept, i = [], 0
    while i < len(words):
        word = words[i]
        if word in ("38", "48", "58") and i + 1 < len(words):
            width = {"5": 3, "2": 5}.get(words[i + 1], 1)
            kept.extend(words[i:i + width])
            i += width
            continue
        if word.lstrip("0") != "8" or word == "":
            kept.append(word)
        i += 1
    if not kept and params:
        return None
    return ";".join(kept)


class TerminalFilter:
    """Replayed text made safe for the reviewer's terminal (see above). Stateful: an escape
    sequence split across two events is judged whole."""

    def __init__(self):
        self.held = ""

    def feed(self, text: str) -> str:
        text, self.held = self.held + text, ""
        out, i = [], 0
        while i < len(text):
            j = i
            while j < len(text) and text[j] != "\x1b" and not ("\x80" <= text[j] <= "\x9f") and text[j] not in "\x0e\x0f":
                j += 1
            out.append(text[i:j])
            if j == len(text):
                break
            end, shown = self._sequence(text, j)
            if end is None:  # unfinished: wait for the next event, up to MAX_HELD characters
                if len(text) - j < MAX_HELD:
                    self.held = text[j:]
                    break
                end, shown = len(text), caret(text[j:])
            out.append(shown)
            i = end
        return "".join(out)

    def flush(self) -> str:
        held, self.held = self.held, ""
        return caret(held)

    @staticmethod
    def _sequence(text: str, at: int) -> tuple[int | None, str]:
        """The escape sequence or control character at `at`: where it ends (None: not yet
        complete) and what to write for it."""
        ch = text[at]
        if ch != "\x1b":
            return at + 1, caret(ch)  # C1 control, shift-in/out
        if at + 1 == len(text):
            return None, ""
        if text[at + 1] in _STRING_INTRODUCERS:
            k = at + 2
            while k < len(text):
                if text[k] == "\x07" or text[k] == "\x9c":
                    return k + 1, caret(text[at:k + 1])
                if text[k] == "\x1b":
                    if k + 1 == len(text):
                        return None, ""
                    if text[k + 1] == "\\":
                        return k + 2, caret(text[at:k + 2])
                k += 1
            return None, ""
        if text[at + 1] == "[":
            m = _CSI.match(text, at)
            if m is None:
                tail = text[at + 2:]
                return (None, "") if all("\x20" <= c <= "\x3f" for c in tail) else (at + 2, caret(text[at:at + 2]))
            params, middle, final = m.groups()
            whole = m.group(0)
            private = params[:1] in ("<", "=", ">", "?")
            if final == "m" and not middle and not private:
                kept = _sgr_without_conceal(params)
                return m.end(), ("" if kept is None else f"\x1b[{kept}m")
            if not middle and (final in (_PRIVATE_DRAWING if private else _CSI_DRAWING)
                               or (final in "su" and not params)):
                return m.end(), whole
            if middle == " " and final == "q":  # cursor shape
                return m.end(), whole
            return m.end(), caret(whole)
        m = _ESC_DRAWING.match(text, at)
        if m is not None:
            return m.end(), m.group(0)
        if at + 2 >= len(text) and text[at + 1] in "()*+-./#":
            return None, ""
        return at + 2, caret(text[at:at + 2])


def replay(cast_path: Path, out=None, speed: float = 1.0, idle_limit: float | None = 2.0,
           sleep=time.sleep, text_only: bool = False) -> int:
    """Write a transcript's output, and its input where it was recorded (sessions without a
    terminal, which echoes nothing), to `out` with its original timing (divided by speed; pauses
    capped at idle_limit seconds), through TerminalFilter: the screen is drawn as the operator saw
    it, and the recording cannot act on the terminal otherwise. `text_only`: no timing and no
    escape sequence interpreted at all (caret notation), so that text a session drew and then
    erased, moved over or hid is on the screen too. Returns the number of events played."""
    out = out or sys.stdout
    if speed <= 0:
        raise BadInput("--speed must be greater than 0")
    played = 0
    previous = 0.0
    screen = TerminalFilter()
    with open(cast_path, encoding="utf-8") as f:
        header = f.readline()
        try:
            if json.loads(header).get("version") != 2:
                raise ValueError
        except (ValueError, AttributeError):
            raise AdminError(f"{cast_path} is not an asciicast v2 transcript") from None
        for line in f:
            try:
                at, code, text = json.loads(line)
                at = float(at)
                if not isinstance(text, str):
                    raise TypeError
            except (ValueError, TypeError):
                raise AdminError(f"{cast_path}: damaged event line after {played} events") from None
            if not text_only:
                delay = (at - previous) / speed
                if idle_limit is not None:
                    delay = min(delay, idle_limit)
                if delay > 0:
                    sleep(delay)
                previous = at
            if code not in ("o", "i"):
                continue
            out.write(caret(text) if text_only else screen.feed(text))
            out.flush()
            played += 1
    if not text_only:
        out.write(screen.flush())
    out.flush()
    return played
