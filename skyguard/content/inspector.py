"""The content decision for one file: an Inspector is fed the bytes as they arrive and says block
or allow, with the rule and the reason. ContentEngine holds what a policy's `content:` section
needs at run time (compiled YARA rules and patterns) and makes inspectors for a zone, a direction
and a protocol.

How one file is judged, for the rules that apply to it:
- size: as bytes arrive; past a rule's max_size the verdict is known at once (block), and no
  more bytes are kept;
- clamav: the bytes are streamed to clamd as they arrive (clamd.py), the verdict read at the end;
  zip and gzip files (a zip anywhere in the file, as clamd finds them) are first held to bounds
  (expanded size, depth, entries: engines.py), which clamd itself skips past rather than flagging;
- mime_types, yara, patterns: over the whole file, buffered up to content.max_inspect_bytes.

Fail closed, always: a file larger than the inspection buffer, or than what clamd scans whole
(content.clamd_max_file_bytes: past its limits clamd answers clean) when clamav applies, clamd down or slow, YARA rules that
no longer compile, libmagic failing: each is a block whose reason says which, never a pass.
Verdicts carry the SHA-256 and size of the content, never the content.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from skyguard.content import engines
from skyguard.content.clamd import ClamdCheck, ClamdMisconfigured, ClamdStream, ClamdUnavailable
from skyguard.content.errors import ContentError
from skyguard.policy.content import ContentPolicy, ContentRule

# Engine names, as they appear in verdicts, log entries and the `engine` metric label.
SIZE, MIME, PATTERN, YARA, CLAMAV, ARCHIVE = "size", "mime", "pattern", "yara", "clamav", "archive"
UNINSPECTABLE = "uninspectable"
HASH_OFF_LOOP_BYTES = 1 << 20  # larger pieces are hashed in a worker thread, not on the event loop


@dataclass(frozen=True)
class ContentVerdict:
    blocked: bool
    rule: str | None  # the rule that blocked (None when allowed)
    engine: str | None  # which check blocked (SIZE, MIME, ...)
    reason: str  # for the client and the log; never content
    size: int  # bytes seen
    sha256: str  # hex digest of the bytes seen ("" when the inspection stopped early)
    mime: str | None = None


@dataclass(frozen=True)
class _CompiledRule:
    rule: ContentRule
    patterns: tuple[re.Pattern, ...]
    folded: tuple[re.Pattern, ...]  # the same, ignoring case: for header names, which arrive lower-cased
    yara: object | None  # yara.Rules
    broken: str | None  # why the rule's engines cannot run (then it blocks everything it covers)


class ContentEngine:
    """A policy's content rules, compiled. Read-only after construction: shared by every
    inspector of that policy, in any thread. Construct off the event loop (YARA compiles)."""

    def __init__(self, content: ContentPolicy):
        self.content = content
        compiled = []
        for rule in content.rules:
            broken, yara_rules = None, None
            if rule.block.yara:
                try:
                    yara_rules = engines.compile_yara(rule.block.yara)
                except ContentError as error:
                    broken = str(error)
            patterns = tuple(re.compile(p.encode()) for p in rule.block.patterns)
            folded = tuple(re.compile(p.encode(), re.IGNORECASE) for p in rule.block.patterns)
            compiled.append(_CompiledRule(rule, patterns, folded, yara_rules, broken))
        self.rules = tuple(compiled)
        # clamd is vouched for (AlertExceedsMax) before its first verdict counts: clamd.py
        self.clamd = ClamdCheck(content.clamd_socket, content.scan_timeout) \
            if any(r.block.clamav for r in content.rules) else None

    async def clamd_problem(self) -> str | None:
        """Why files under clamav rules are refused unscanned now (clamd down, or not flagging
        what it skips: ClamdCheck), or None (also when no rule uses clamav). On the event loop:
        the parts ask it as they take a policy, so the problem shows at once in their status."""
        if self.clamd is None:
            return None
        try:
            await self.clamd.ready()
        except ClamdUnavailable as error:
            return str(error)
        return None

    def __repr__(self) -> str:
        return f"ContentEngine(rules={[r.rule.name for r in self.rules]})"

    def pattern_hit(self, zone: str | None, direction: str, protocol: str, parts: Sequence[bytes],
                    names: Sequence[bytes] = ()) -> str | None:
        """The first covering rule whose patterns match one of `parts` (what travels beside a
        file: a request's target and header values) or, ignoring case, one of `names` (header
        names: case-insensitive in HTTP, lower-cased by the proxy, so a key in one still goes out
        whatever its case), or None."""
        for compiled in self.rules:
            if compiled.patterns and compiled.rule.applies(zone, direction, protocol) and (
                    any(p.search(part) for p in compiled.patterns for part in parts) or
                    any(p.search(name) for p in compiled.folded for name in names)):
                return compiled.rule.name
        return None

    def inspector(self, zone: str | None, direction: str, protocol: str) -> Inspector | None:
        """An inspector for one file, or None when no rule covers it (nothing to inspect)."""
        rules = tuple(r for r in self.rules if r.rule.applies(zone, direction, protocol))
        return Inspector(rules, self.content, self.clamd) if rules else None


class Inspector:
    """One file. `await feed(data)` as bytes arrive (returns the verdict once a block is
    certain, so the caller can stop early), then `await finish()`; `close()` abandons it.
    One task at a time."""

    def __init__(self, rules: Sequence[_CompiledRule], content: ContentPolicy, clamd_check: ClamdCheck | None = None):
        self.rules = tuple(rules)
        self.content = content
        self._check = clamd_check or ClamdCheck(content.clamd_socket, content.scan_timeout)
        self.size = 0
        self._hash = hashlib.sha256()
        self._buffer: list[bytes] = []  # the chunks kept, joined once in finish()
        self._clamav = next((r for r in self.rules if r.rule.block.clamav), None)
        # The whole file is kept for the engines that need it (archives: for their bounds).
        self._keep = self._clamav is not None or any(r.patterns or r.yara or r.rule.block.mime_types
                                                      for r in self.rules)
        self._clamd: ClamdStream | None = None
        self.verdict: ContentVerdict | None = None  # set once decided

    def _block(self, rule: str, engine: str, reason: str, digest: str = "", mime: str | None = None) -> ContentVerdict:
        self.close()
        self._buffer = []
        self.verdict = ContentVerdict(True, rule, engine, reason, self.size, digest, mime)
        return self.verdict

    async def feed(self, data: bytes) -> ContentVerdict | None:
        if self.verdict is not None:
            self.size += len(data)
            return self.verdict
        self.size += len(data)
        if len(data) >= HASH_OFF_LOOP_BYTES:  # hashlib lets go of the GIL: 64 MiB is ~40 ms the loop keeps
            await asyncio.to_thread(self._hash.update, data)
        else:
            self._hash.update(data)
        for compiled in self.rules:
            limit = compiled.rule.block.max_size
            if limit is not None and self.size > limit:
                return self._block(compiled.rule.name, SIZE, f"larger than {limit} bytes (rule {compiled.rule.name})")
        if self.size > self.content.max_inspect_bytes:
            return self._block(self.rules[0].rule.name, UNINSPECTABLE,
                               f"larger than the inspection buffer ({self.content.max_inspect_bytes} bytes): "
                               "refused unscanned")
        clamd_limit = self.content.clamd_max_file_bytes
        if self._clamav is not None and self.size > clamd_limit:
            return self._block(self._clamav.rule.name, UNINSPECTABLE,
                               f"larger than clamd scans ({clamd_limit} bytes, content.clamd.max_file_bytes): "
                               "refused unscanned")
        if self._keep:
            self._buffer.append(bytes(data))  # no copy of bytes; a caller's bytearray may change later
        if self._clamav is not None:
            try:
                await (await self._open_clamd()).send(data)
            except ClamdUnavailable as error:
                return self._clamd_failed(self._clamav.rule.name, error)
        return None

    async def finish(self) -> ContentVerdict:
        if self.verdict is not None:
            return self.verdict
        digest = self.digest()
        data = b"".join(self._buffer)  # one chunk (a file fed whole) comes back as is, not copied
        mime = None
        try:
            if any(r.rule.block.mime_types for r in self.rules):
                mime = await asyncio.to_thread(engines.mime_of, data)
            for compiled in self.rules:
                block = compiled.rule.block
                name = compiled.rule.name
                if compiled.broken:
                    return self._block(name, UNINSPECTABLE, f"rule {name} cannot run: {compiled.broken}", digest, mime)
                matched = block.mime_blocked(mime) if mime else None
                if matched:
                    return self._block(name, MIME, f"file type {mime} is blocked (rule {name})", digest, mime)
                pattern_hit = bool(compiled.patterns) and await asyncio.to_thread(_any_match, compiled.patterns, data)
                if pattern_hit:
                    return self._block(name, PATTERN, f"content matches a blocked pattern (rule {name})", digest, mime)
                if compiled.yara is not None:
                    hit = await asyncio.to_thread(engines.yara_match, compiled.yara, data)
                    if hit:
                        return self._block(name, YARA, f"YARA rule {hit} matched (rule {name})", digest, mime)
        except ContentError as error:
            return self._block(self.rules[0].rule.name, UNINSPECTABLE, f"refused unscanned: {error}", digest, mime)
        if self._clamav is not None:
            name = self._clamav.rule.name
            # expanded entries past clamd's limit would be skipped by clamd as clean: bound them here
            bound = min(self.content.max_inspect_bytes, self.content.clamd_max_file_bytes)
            problem = await asyncio.to_thread(engines.archive_problem, data, bound)
            if problem:
                return self._block(name, ARCHIVE, f"refused: {problem} (rule {name})", digest, mime)
            try:
                # Opened here for an empty file: still scanned, so a down clamd still refuses.
                result = await (await self._open_clamd()).finish()
            except ClamdUnavailable as error:
                return self._clamd_failed(name, error, digest, mime)
            finally:
                self._clamd = None
            if result.infected:
                return self._block(name, CLAMAV, f"ClamAV found {result.signature} (rule {name})", digest, mime)
        self._buffer = []
        self.verdict = ContentVerdict(False, None, None, "allowed", self.size, digest, mime)
        return self.verdict

    def digest(self) -> str:
        """Hex SHA-256 of the bytes fed until the verdict (all of them when it came at the end)."""
        return self._hash.hexdigest()

    def _clamd_failed(self, rule: str, error: ClamdUnavailable, digest: str = "", mime: str | None = None) -> ContentVerdict:
        if not isinstance(error, ClamdMisconfigured):
            self._check.forget()  # clamd went away: the one that comes back is checked again
        return self._block(rule, CLAMAV, f"virus scan unavailable, refused unscanned: {error}", digest, mime)

    async def _open_clamd(self) -> ClamdStream:
        if self._clamd is None:
            await self._check.ready()
            self._clamd = ClamdStream(self.content.clamd_socket, self.content.scan_timeout)
            await self._clamd.open()
        return self._clamd

    def close(self) -> None:
        if self._clamd is not None:
            self._clamd.close()
            self._clamd = None


def _any_match(patterns: Sequence[re.Pattern], data: bytes) -> bool:
    return any(p.search(data) for p in patterns)


async def inspect_bytes(engine: ContentEngine, zone: str | None, direction: str, protocol: str,
                        data: bytes) -> ContentVerdict | None:
    """A whole file in memory through one inspector; None when no rule covers it."""
    inspector = engine.inspector(zone, direction, protocol)
    if inspector is None:
        return None
    try:
        verdict = await inspector.feed(data) or await inspector.finish()
    finally:
        inspector.close()
    if not verdict.sha256:  # decided early (size), but in the one feed: the digest covers the whole file
        verdict = dataclasses.replace(verdict, sha256=inspector.digest(), size=len(data))
    return verdict
