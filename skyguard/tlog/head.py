"""The head checkpoint: a signed checkpoint of every acknowledged entry, in two alternating slots.

Why it exists: an entry is acknowledged only once a signed checkpoint covering it is durable, so
that after a crash every acknowledged entry is provable and anything beyond the last signature
is, by construction, unacknowledged (store.py states the whole design). Appending a checkpoint
to checkpoints.log per group commit would grow that file by a note per commit; the head is
instead overwritten in place, in one of two 4 KiB slots (page-aligned, so writing one never
rewrites the other's page), alternating by sequence number. A torn write can only break the
slot being written; the other still holds the previous head, which covers every entry that was
acknowledged before the write began.

A slot is one record (records.py framing, the record index is the head's sequence number),
zero-padded. Not here: deciding what a head covers (store.py) or checking it (verify.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from skyguard import fsutil
from skyguard.fsutil import open_regular
from skyguard.tlog import records

HEAD_FILE = "head.bin"
SLOT_SIZE = 4096
SLOTS = 2
MAX_NOTE = SLOT_SIZE - records.HEADER_SIZE


@dataclass
class HeadSlots:
    """What the head file holds: (sequence, note) of each intact slot, and why others are not."""

    notes: list[tuple[int, str]] = field(default_factory=list)   # newest last
    problems: list[str] = field(default_factory=list)

    @property
    def next_sequence(self) -> int:
        return self.notes[-1][0] + 1 if self.notes else 0


def read_head(directory: Path) -> HeadSlots:
    """Read both slots; a slot that is empty, torn or not UTF-8 is reported, not raised."""
    path = Path(directory) / HEAD_FILE
    slots = HeadSlots()
    if not path.exists():
        return slots
    with open_regular(path) as f:   # a FIFO there would block the read forever
        data = f.read(SLOT_SIZE * SLOTS)
    for slot in range(SLOTS):
        chunk = data[slot * SLOT_SIZE:(slot + 1) * SLOT_SIZE]
        if not chunk.strip(b"\x00"):
            continue   # never written
        parsed = records.parse_one(chunk)
        if parsed is None:
            slots.problems.append(f"{HEAD_FILE} slot {slot} is torn or damaged")
            continue
        sequence, payload = parsed
        if sequence % SLOTS != slot:
            slots.problems.append(f"{HEAD_FILE} slot {slot} holds sequence {sequence}, which "
                                  f"belongs in the other slot")
            continue
        try:
            slots.notes.append((sequence, payload.decode("utf-8")))
        except UnicodeDecodeError:
            slots.problems.append(f"{HEAD_FILE} slot {slot} is not UTF-8")
    slots.notes.sort()
    return slots


class HeadWriter:
    """Overwrites the older slot with each new head note, durably. One thread only."""

    def __init__(self, directory: Path, next_sequence: int):
        path = Path(directory) / HEAD_FILE
        existed = path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if not existed:
            fsutil.fsync_directory(path.parent)
        self.sequence = next_sequence

    def write(self, note: str) -> None:
        payload = note.encode("utf-8")
        if len(payload) > MAX_NOTE:
            raise ValueError(f"a head note is at most {MAX_NOTE} bytes")
        slot = self.sequence % SLOTS
        data = records.frame(self.sequence, payload).ljust(SLOT_SIZE, b"\x00")
        view = memoryview(data)
        offset = slot * SLOT_SIZE
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written
        os.fdatasync(self._fd)
        self.sequence += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
