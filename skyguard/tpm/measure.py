"""Measured launch: what skyguard extends into its PCR, each extend also a line of the event log.

    measurements = Measurements(tpm, state_dir, pcr, record=daemon.record)
    measurements.open()                                  # replay the log to the PCR (see eventlog.py)
    measurements.extend("policy", policy.sha256, {"name": policy.name})

What the daemon measures (kinds a reference names, skyguard/tpm/quote.py):

    package     SHA-256 over skyguard's package files (path and SHA-256 of each, sorted; every file,
                and a cached .pyc that is not its source's code)
    bpf_object  SHA-256 of the C text bcc compiles (bpf/ with its includes inlined)
    program     SHA-256 of each loaded program's 8-byte kernel tag; detail: name, tag
    policy      the policy's sha256; detail: name
    log_key     SHA-256 of the signed log's verifier key (its text); detail: the key
    attach      SHA-256 of the programs attached to an interface; detail: interface, tags

After `package`, a module of skyguard imported later is imported only as the launch read it
(imports.py): changed or new files are refused, so no code runs that the PCR does not vouch for.

Order of one extend, under the TPM lock: the line is written and fsynced, then extended. A crash
between the two leaves one line the PCR lacks; open() finds that and drops it. A TPM that fails
the extend gets its line dropped too. So the log never lacks a line the PCR holds.

A failed extend (or a TPM that fails at the daemon's start) also leaves the marker
<state dir>/tpm/measurement-stopped: the daemon measures nothing more, so the PCR and its log
would go on showing the state of before while the daemon enforces what comes after (the next
policy load). quote.make refuses to quote while the marker is there; the next open() (a daemon
start with a working TPM, which measures everything again) removes it. A measurement that only
waited too long for the TPM lock (another process held it; nothing was sent to the TPM) leaves
the same marker with text starting PENDING while the daemon retries it (skyguard/tpm/hook.py):
quotes fail closed the same way until it is in, and the daemon removes the marker then. So does
an open() at the daemon's start that found the lock held: it is retried first, the launch's
measurements queued behind it.

Not here: quoting (quote.py), the TPM commands (device.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

from skyguard import fsutil
from skyguard.tpm import imports
from skyguard.tpm.device import Tpm, TpmError, check_pcr
from skyguard.tpm.eventlog import ZERO, EventLog, EventLogError, line_digest, make_base_line, make_line, replay

log = logging.getLogger("skyguard.tpm")

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # skyguard/
KINDS = ("package", "bpf_object", "program", "policy", "log_key", "attach")
STOPPED_FILE = "measurement-stopped"
PENDING = "measurement pending: "  # the marker's text while a measurement waits for the lock


def mark_stopped(state_dir: Path, why: str) -> None:
    """Leave the marker that measurement stopped (see the module text). Best effort, and made to
    work on a full disk too: an empty marker says it as well as one holding the reason."""
    path = Path(state_dir) / "tpm" / STOPPED_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, why.encode("utf-8", "replace")[:4000])
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if not path.exists():
            log.error("cannot leave the marker %s (%s): quotes made now show the state measured before", path, e)


def clear_stopped(state_dir: Path) -> None:
    """Measuring again (open(), or a pending measurement is in): quotes show the enforced state."""
    (Path(state_dir) / "tpm" / STOPPED_FILE).unlink(missing_ok=True)


def stopped(state_dir: Path) -> str | None:
    """Why measurement stopped (the marker's text, or a generic reason), None while it works."""
    path = Path(state_dir) / "tpm" / STOPPED_FILE
    try:
        text = fsutil.read_regular_file(path).decode("utf-8", errors="replace")  # a FIFO: refused, not waited on
        return text.strip() or "a TPM measurement failed"
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"the marker {path} cannot be read: {e.strerror or e}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def package_digest(root: Path = PACKAGE_DIR) -> tuple[str, int]:
    """(SHA-256 over every file of the package, as `<sha256>  <relative path>` lines sorted by path,
    the format of sha256sum; number of files). Every file, not only the .py: the console's page and
    script are served from here, and Python itself imports a `.so` or `.pyc` dropped beside a
    module. The caches (__pycache__) are measured only where they differ from their source: a
    .pyc Python would run instead of compiling the .py (its header matches the source) whose code
    is not the source's own is measured too, so code run from a doctored cache is not measured as
    the package. A lab's node_modules is not code skyguard ships."""
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if "__pycache__" in path.parts or "node_modules" in path.parts:
            continue
        data = path.read_bytes()
        lines.append(f"{sha256_hex(data)}  {path.relative_to(root.parent).as_posix()}\n")
        if path.suffix == ".py":
            cached = _foreign_bytecode(path, data)
            if cached is not None:
                lines.append(f"{sha256_hex(cached.read_bytes())}  {cached.relative_to(root.parent).as_posix()}\n")
    return sha256_hex("".join(lines).encode()), len(lines)


def _foreign_bytecode(source: Path, data: bytes) -> Path | None:
    """The cached .pyc of `source` when Python's import would run it (importlib's own header
    checks) and its code is not what `source` compiles to; else None."""
    import _imp
    import importlib.util
    import marshal

    try:
        cached = Path(importlib.util.cache_from_source(str(source)))
        pyc = cached.read_bytes()
    except (OSError, NotImplementedError, ValueError):
        return None
    if len(pyc) < 16 or pyc[:4] != importlib.util.MAGIC_NUMBER:
        return None  # another Python's, or damaged: import compiles the source
    flags = int.from_bytes(pyc[4:8], "little")
    if flags == 0:  # timestamp-based: used when the source's mtime and size match
        st = source.stat()
        if pyc[8:12] != (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") or \
                pyc[12:16] != (st.st_size & 0xFFFFFFFF).to_bytes(4, "little"):
            return None
    elif flags & ~0b11:
        return None  # invalid flags: import refuses the .pyc
    else:  # hash-based: checked against the source unless unchecked (and not forced)
        mode = _imp.check_hash_based_pycs
        if (mode == "always" or (flags & 0b10 and mode != "never")) and \
                pyc[8:16] != importlib.util.source_hash(data):
            return None
    try:
        same = marshal.loads(pyc[16:]) == compile(data, str(source), "exec", dont_inherit=True)
    except Exception:  # noqa: BLE001 - unreadable bytecode or source: measure the .pyc, to be safe
        same = False
    return None if same else cached


def bpf_object_digest() -> str:
    from skyguard.datapath.source import c_source  # the very text the loader compiles

    return sha256_hex(c_source().encode())


def program_digest(tag: str) -> str:
    return sha256_hex(bytes.fromhex(tag))


def attach_digest(programs: dict[str, str]) -> str:
    """programs: hook -> tag of what is attached to one interface."""
    return sha256_hex("".join(f"{hook}={tag}\n" for hook, tag in sorted(programs.items())).encode())


def log_key_digest(vkey: str) -> str:
    return sha256_hex(vkey.encode())


class Measurements:
    """skyguard's PCR and its event log, kept in step. Thread-safe through the TPM lock file
    (which also serialises with `skyguard attest --quote` in another process)."""

    def __init__(self, tpm: Tpm, state_dir: Path, pcr: int, record=None):
        self.tpm = tpm
        self.state_dir = Path(state_dir)
        self.pcr = check_pcr(pcr)
        self.log = EventLog(Path(state_dir) / "tpm")
        self.record = record or (lambda kind, **fields: None)
        self.base = ZERO
        self.value = ZERO
        self.count = 0  # lines in the current log
        self.extends = 0  # extends made by this process
        self.started = ""  # how open() found the PCR: "fresh", "continued", "foreign"

    def open(self, lock_wait_s: float | None = None, still_pending: str = "") -> str:
        """Bring the event log in line with the PCR (see eventlog.py). Returns how: "fresh" (the
        PCR was zero: a new log), "continued" (the log replays to the PCR) or "foreign" (it does
        not: a new log starts from a base line, and verifiers will say so). The TPM lock is waited
        for `lock_wait_s` (Tpm.locked); the marker is removed, or with `still_pending` (the
        daemon's measurements wait in its queue, skyguard/tpm/hook.py) left saying so."""
        with self.tpm.locked(lock_wait_s):
            current = self.tpm.pcr_read([self.pcr])[self.pcr]
            lines = self.log.lines()
            replayed, without_last = self._replay(lines), self._replay(lines[:-1]) if lines else None
            if lines and replayed != current and without_last == current:
                self.log.truncate_to(len(lines) - 1)  # written, then the extend never happened
                lines, replayed = lines[:-1], without_last
            if current == ZERO:
                if lines:
                    self.log.archive()
                lines, self.started = [], "fresh"
            elif replayed == current:
                self.started = "continued"
            else:
                self.log.archive()
                why = (f"PCR {self.pcr} held a value skyguard's event log does not replay to: something "
                       f"else extended it, or skyguard's event log was lost")
                line = make_base_line(0, self.pcr, current, why, time.time_ns())
                self.log.append(line)
                lines, self.started = [line], "foreign"
                log.error("%s; a new event log starts from that value", why)
                self.record("tpm_pcr_foreign", pcr=self.pcr, value=current.hex())
            self.base, self.value, _ = replay(lines, self.pcr)
            self.count = len(lines)
            if still_pending:  # under the lock: no quote of another process sees the PCR without them
                mark_stopped(self.state_dir, still_pending)
            else:
                clear_stopped(self.state_dir)  # measuring again, from the launch
            return self.started

    def _replay(self, lines: list[str]) -> bytes | None:
        try:
            return replay(lines, self.pcr)[1]
        except EventLogError:  # a damaged log: open() starts a new one and says why
            return None

    def extend(self, kind: str, digest: str, detail: dict | None = None) -> str:
        """Extend skyguard's PCR with one measurement and log it. Returns the line. Raises TpmError
        (the line is then not in the log)."""
        if len(digest) != 64:
            raise ValueError("a measurement is a sha256 hex digest")
        with self.tpm.locked():
            lines = self.log.lines()
            line = make_line(len(lines), self.pcr, kind, digest, dict(detail or {}), time.time_ns())
            self.log.append(line)
            try:
                self.tpm.pcr_extend(self.pcr, line_digest(line))
            except TpmError as e:
                mark_stopped(self.state_dir, f"a TPM extend failed: {e}")  # before the lock is let go
                self.log.truncate_to(len(lines))
                raise
            self.value = hashlib.sha256(self.value + line_digest(line)).digest()
            self.count = len(lines) + 1
            self.extends += 1
        self.record("tpm_extend", pcr=self.pcr, seq=len(lines), measured=kind, digest=digest,
                    event=line_digest(line).hex(), **({"detail": detail} if detail else {}))
        return line


# Each measurement as the arguments of one Measurements.extend: (kind, digest, detail). The daemon
# queues them one by one when the TPM lock is busy (skyguard/tpm/hook.py).
Item = tuple[str, str, dict]


def launch_items(verifier_key: str) -> list[Item]:
    manifest = imports.source_manifest(PACKAGE_DIR)
    digest, files = package_digest()
    # What is imported from here on must be what was just read (skyguard/tpm/imports.py).
    imports.guard(PACKAGE_DIR.name, PACKAGE_DIR, manifest)
    return [("package", digest, {"files": files}),
            ("bpf_object", bpf_object_digest(), {"source": "bpf/sg_datapath.c"}),
            ("log_key", log_key_digest(verifier_key), {"key": verifier_key})]


def program_items(infos: dict) -> list[Item]:
    """infos: name -> object with .tag (skyguard.datapath.libbpf.ProgramInfo) or a tag string."""
    items = []
    for name, info in sorted(infos.items()):
        tag = getattr(info, "tag", info)
        items.append(("program", program_digest(tag), {"name": name, "tag": tag}))
    return items


def policy_item(name: str, sha256: str) -> Item:
    return ("policy", sha256, {"name": name})


def attach_item(interface: str, programs: dict[str, str]) -> Item:
    return ("attach", attach_digest(programs), {"interface": interface, "programs": dict(programs)})
