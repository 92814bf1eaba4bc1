"""skyguard's own event log: one line per extend of skyguard's PCR, so a verifier can replay the PCR.

Each line is canonical JSON (sorted keys, no spaces, no floats):

    {"detail":{...},"digest":"<sha256 hex of what was measured>","kind":"policy","pcr":13,"seq":4,"time":...}

and what is extended into the PCR is SHA-256 of the line's bytes, so every field of a line (kind,
detail, time, its place in the sequence) is bound to the PCR: an edited, dropped, added or
reordered line makes the replay differ from the quoted PCR value.

A log starts when skyguard first finds its PCR at zero (a boot, or a new TPM). When skyguard finds
the PCR at a value the log does not replay to (something else extended it, or the log was lost),
it starts a new log whose first line is a `base` line holding that value, not extended: the log
then replays again, and a verifier says the base is not zero. Earlier logs are kept beside
(eventlog.jsonl.1, .2, ...). Kept in <state dir>/tpm/eventlog.jsonl.

Not here: what is measured (measure.py) or the TPM commands (device.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from skyguard import fsutil
from skyguard.errors import BadInput

ZERO = bytes(32)
FILE_NAME = "eventlog.jsonl"
MAX_LINE = 64 * 1024  # a measurement is a digest and a short detail, never a blob
MAX_LINES = 1_000_000


class EventLogError(BadInput):
    """A line of an event log is not what skyguard writes."""


def canonical(value: dict) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def make_line(seq: int, pcr: int, kind: str, digest: str, detail: dict, time_ns: int) -> str:
    return canonical({"seq": seq, "pcr": pcr, "kind": kind, "digest": digest, "detail": detail, "time": time_ns})


def make_base_line(seq: int, pcr: int, value: bytes, why: str, time_ns: int) -> str:
    return canonical({"seq": seq, "pcr": pcr, "kind": "base", "value": value.hex(), "why": why, "time": time_ns})


def line_digest(line: str) -> bytes:
    """What skyguard extends into its PCR for this line."""
    return hashlib.sha256(line.encode("ascii")).digest()


def parse_line(line: str, number: int) -> dict:
    """One line as a dict; EventLogError (naming the line) when it is not a canonical event."""
    if len(line) > MAX_LINE:
        raise EventLogError(f"event log line {number} is longer than {MAX_LINE} characters")
    try:
        event = json.loads(line)
    except ValueError:
        raise EventLogError(f"event log line {number} is not JSON") from None
    if not isinstance(event, dict) or canonical(event) != line:
        raise EventLogError(f"event log line {number} is not canonical JSON (edited by hand?)")
    if not isinstance(event.get("seq"), int) or not isinstance(event.get("kind"), str) \
            or not isinstance(event.get("pcr"), int):
        raise EventLogError(f"event log line {number} lacks seq, kind or pcr")
    if event["kind"] == "base":
        value = event.get("value")
        if not isinstance(value, str) or len(value) != 64:
            raise EventLogError(f"event log line {number}: a base line holds a 64-hex-digit value")
    elif not isinstance(event.get("digest"), str) or not isinstance(event.get("detail"), dict):
        raise EventLogError(f"event log line {number} lacks digest or detail")
    return event


def replay(lines: list[str], pcr: int) -> tuple[bytes, bytes, list[dict]]:
    """(base value, PCR value after every line, parsed events). A base line may only come first;
    lines must be in sequence and all for `pcr`: anything else raises EventLogError."""
    if len(lines) > MAX_LINES:
        raise EventLogError(f"the event log has more than {MAX_LINES} lines")
    base, value, events = ZERO, ZERO, []
    for number, line in enumerate(lines, start=1):
        event = parse_line(line, number)
        if event["pcr"] != pcr:
            raise EventLogError(f"event log line {number} is for PCR {event['pcr']}, not skyguard's PCR {pcr}")
        if event["seq"] != number - 1:
            raise EventLogError(f"event log line {number} has seq {event['seq']}, expected {number - 1}: "
                                f"lines were reordered, dropped or added")
        if event["kind"] == "base":
            if number != 1:
                raise EventLogError(f"event log line {number}: a base line may only be the first")
            base = value = bytes.fromhex(event["value"])
        else:
            value = hashlib.sha256(value + line_digest(line)).digest()
        events.append(event)
    return base, value, events


class EventLog:
    """The file. Callers hold the TPM lock (device.Tpm.locked) around read-extend-append."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / FILE_NAME

    def lines(self) -> list[str]:
        try:
            text = fsutil.read_regular_file(self.path).decode("ascii")  # a FIFO is refused, never waited on
        except FileNotFoundError:
            return []
        except OSError as e:
            raise EventLogError(f"cannot read the event log {self.path}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise EventLogError(f"cannot read the event log {self.path}: {e}") from None
        # A crash inside an append can leave a last line without its newline: it was never
        # extended (the extend follows the write), so it is not part of the log.
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
        return text.splitlines()

    def append(self, line: str) -> None:
        """Write one line durably (fsync) before the caller extends the PCR with it."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    def truncate_to(self, count: int) -> None:
        """Drop lines after the first `count` (a line whose extend did not happen)."""
        kept = self.lines()[:count]
        fsutil.write_private(self.path, "".join(line + "\n" for line in kept).encode("ascii"))

    def archive(self) -> Path | None:
        """Move the current log aside (eventlog.jsonl.N, N one more than the last); None if empty."""
        if not self.path.exists():
            return None
        n = 1
        while (self.directory / f"{FILE_NAME}.{n}").exists():
            n += 1
        target = self.directory / f"{FILE_NAME}.{n}"
        os.replace(self.path, target)
        fsutil.fsync_directory(self.directory)
        return target
