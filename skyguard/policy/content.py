"""The policy's `content:` section: what a zone may upload (and optionally download), judged by
what the bytes are. The dataclasses, and the checker's part for the section (a mixin of the
parser's checker, like access.py). Enforcement lives in skyguard/content/.

    content:
      clamd: {socket: /run/clamav/clamd.ctl, timeout: 10, max_file_bytes: 25MiB}   # optional; the defaults
      max_inspect_bytes: 64MiB                              # optional: larger bodies are refused
      rules:
        - name: no-executables
          zones: [web]                   # or ["*"]
          direction: upload              # upload (default), download, or [upload, download]
          protocols: [http, sftp]        # default: both
          block:                         # at least one of:
            mime_types: [application/x-executable, "application/x-dosexec", "application/zip"]
            max_size: 10MiB              # bytes, or a number with KB MB GB KiB MiB GiB
            yara: [rules/secrets.yar]    # files, relative to the policy file
            clamav: true
            patterns: ['AKIA[0-9A-Z]{16}']

`clamd.max_file_bytes` is how much of a file that clamd really scans: at most the smallest of its
MaxFileSize, MaxScanSize and StreamMaxLength (the default is what Debian's clamd.conf sets). clamd
reports a file past MaxFileSize as clean unless AlertExceedsMax is on, and skips an archive entry
past it either way, so a file a clamav rule covers is refused unscanned past this size, and
archives may expand to no more than it (skyguard/content/inspector.py).

What each engine sees (skyguard/content/http.py): a body with its Content-Encoding undone (codings
other than gzip and deflate are refused), each multipart part, each escaped form field, a JSON
body's (or JSON form part's) strings unescaped and its base64 strings decoded; an SFTP upload as the whole file. What
passes a rule unseen, by design: yara, patterns and mime_types judge those bytes, not what is
inside an archive (a key zipped or gzipped as the file's own bytes passes a yara or pattern rule:
add the archive types, application/zip, application/gzip, application/x-7z-compressed, ... to
mime_types where that matters; clamav looks into archives, and skyguard refuses an encrypted zip
entry and bounds zip and gzip expansion itself); encodings a VM applies on its own (encryption,
hex, an archive's password, a file cut into several requests each judged alone, as resumable or
multipart-upload APIs take them) are not undone. Encrypted 7z, RAR or PDF content is what clamd
makes of it (AlertEncrypted).

YARA files are compiled here (so `policy validate` refuses exactly what `up` refuses) and stored
as absolute paths; patterns are Python regular expressions over bytes.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the type checker only: at run time checker.py imports model, which imports this
    from skyguard.policy.checker import CheckerBase as _CheckerBase
else:
    _CheckerBase = object

DIRECTIONS = ("upload", "download")
PROTOCOLS = ("http", "sftp")
DEFAULT_CLAMD_SOCKET = "/run/clamav/clamd.ctl"  # Debian's clamav-daemon LocalSocket
DEFAULT_SCAN_TIMEOUT = 10.0
DEFAULT_MAX_INSPECT = 64 << 20
# MaxFileSize and StreamMaxLength in the clamd.conf of Debian's clamav-daemon (MaxScanSize is 100M)
DEFAULT_CLAMD_MAX_FILE = 25 << 20
MAX_PATTERN_CHARS = 1000
_SIZE = re.compile(r"\s*(\d+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*")
_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_MIME = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/([a-z0-9][a-z0-9!#$&^_.+-]*\*?|\*)")  # type/sub, type/x-*, type/*


@dataclass(frozen=True)
class ContentBlock:
    """What blocks under one rule. Every engine named must find nothing for content to pass."""

    mime_types: tuple[str, ...] = ()  # lower-case "type/subtype" or "type/*", matched by content
    max_size: int | None = None  # bytes
    yara: tuple[str, ...] = ()  # absolute paths of YARA rule files
    clamav: bool = False
    patterns: tuple[str, ...] = ()  # regular expressions over bytes

    def mime_blocked(self, mime: str) -> str | None:
        """The listed type that `mime` matches, if any."""
        return next((m for m in self.mime_types if fnmatch.fnmatchcase(mime, m)), None)


@dataclass(frozen=True)
class ContentRule:
    name: str
    zones: tuple[str, ...]  # "*" already expanded
    directions: tuple[str, ...]  # subset of DIRECTIONS
    protocols: tuple[str, ...]  # subset of PROTOCOLS
    block: ContentBlock
    line: int = 0

    def applies(self, zone: str | None, direction: str, protocol: str) -> bool:
        return zone in self.zones and direction in self.directions and protocol in self.protocols


@dataclass(frozen=True)
class ContentPolicy:
    rules: tuple[ContentRule, ...] = ()
    clamd_socket: str = DEFAULT_CLAMD_SOCKET
    scan_timeout: float = DEFAULT_SCAN_TIMEOUT  # seconds for one clamd scan, from connect to verdict
    max_inspect_bytes: int = DEFAULT_MAX_INSPECT  # a file larger than this is refused, unscanned
    # What clamd scans whole (its smallest of MaxFileSize, MaxScanSize, StreamMaxLength): a file
    # a clamav rule covers is refused unscanned past it, as clamd would call it clean.
    clamd_max_file_bytes: int = DEFAULT_CLAMD_MAX_FILE

    def rules_for(self, zone: str | None, direction: str, protocol: str) -> tuple[ContentRule, ...]:
        return tuple(r for r in self.rules if r.applies(zone, direction, protocol))

    def zones_for(self, protocol: str) -> set[str]:
        """Zones some rule inspects over `protocol` (either direction)."""
        return {z for r in self.rules if protocol in r.protocols for z in r.zones}


def parse_size(value) -> int | None:
    """Bytes from an integer or "10MiB"-style text; None when neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match:
            return int(match.group(1)) * _UNITS[match.group(2)]
    return None


class ContentSection(_CheckerBase):
    """The checker's `content:` part. A mixin of parse._Checker: it uses CheckerBase's methods
    (problem, mapping, seq, line_of, zone_refs, ...) through self and imports nothing from
    checker.py at module level (checker imports model, which imports this module)."""

    def content(self, node, line, zones) -> ContentPolicy:
        from skyguard.policy.checker import type_name

        if node is None:
            return ContentPolicy()
        keys = ("clamd", "max_inspect_bytes", "rules")
        if not self.mapping(node, "content", line, keys, required=("rules",)):
            return ContentPolicy()
        socket, timeout, clamd_max = DEFAULT_CLAMD_SOCKET, DEFAULT_SCAN_TIMEOUT, DEFAULT_CLAMD_MAX_FILE
        if "clamd" in node:
            c_node, c_line = node["clamd"], self.line_of(node, "clamd")
            if self.mapping(c_node, "content.clamd", c_line, ("socket", "timeout", "max_file_bytes")):
                if "socket" in c_node:
                    socket = c_node["socket"]
                    if not isinstance(socket, str) or not socket.startswith("/"):
                        self.problem(self.line_of(c_node, "socket"), "content.clamd.socket",
                                     f"must be the absolute path of clamd's Unix socket, not {type_name(socket)}")
                if "timeout" in c_node:
                    timeout = self.integer(c_node["timeout"], "content.clamd.timeout",
                                           self.line_of(c_node, "timeout"), 1, 600) or DEFAULT_SCAN_TIMEOUT
                if "max_file_bytes" in c_node:
                    clamd_max = self._size(c_node["max_file_bytes"], "content.clamd.max_file_bytes",
                                           self.line_of(c_node, "max_file_bytes")) or DEFAULT_CLAMD_MAX_FILE
        max_inspect = DEFAULT_MAX_INSPECT
        if "max_inspect_bytes" in node:
            max_inspect = self._size(node["max_inspect_bytes"], "content.max_inspect_bytes",
                                     self.line_of(node, "max_inspect_bytes")) or DEFAULT_MAX_INSPECT
        rules: list[ContentRule] = []
        r_node, r_line = node.get("rules"), self.line_of(node, "rules")
        if "rules" in node and self.seq(r_node, "content.rules", r_line, non_empty=True):
            seen: dict[str, str] = {}
            for index, item in enumerate(r_node):
                rule = self._content_rule(item, f"content.rules[{index}]", self.line_of(r_node, index), zones, seen)
                if rule:
                    rules.append(rule)
        return ContentPolicy(tuple(rules), socket if isinstance(socket, str) else DEFAULT_CLAMD_SOCKET,
                             float(timeout), max_inspect, clamd_max)

    def _content_rule(self, node, path, line, zones, seen) -> ContentRule | None:
        keys = ("name", "description", "zones", "direction", "protocols", "block")
        if not self.mapping(node, path, line, keys, required=("name", "zones", "block")):
            return None
        name = None
        if "name" in node:
            name = self.name(node["name"], f"{path}.name", self.line_of(node, "name"), "content rule name")
            if name in seen:
                self.problem(self.line_of(node, "name"), f"{path}.name",
                             f"content rule '{name}' is already defined at {seen[name]}; rule names are unique")
                name = None
            elif name:
                seen[name] = path
        if "description" in node:
            self.string(node["description"], f"{path}.description", self.line_of(node, "description"),
                        "a description")
        rule_zones: tuple[str, ...] = ()
        if "zones" in node:
            rule_zones = self.zone_refs(node["zones"], f"{path}.zones", self.line_of(node, "zones"), zones,
                                        allow_all=True)
        directions = self._choices(node, "direction", path, DIRECTIONS, ("upload",))
        protocols = self._choices(node, "protocols", path, PROTOCOLS, PROTOCOLS)
        block = self._content_block(node["block"], f"{path}.block", self.line_of(node, "block")) \
            if "block" in node else None
        if name and rule_zones and directions and protocols and block:
            return ContentRule(name, rule_zones, directions, protocols, block, line or 0)
        return None

    def _choices(self, node, key, path, allowed, default) -> tuple[str, ...] | None:
        """One word of `allowed` or a non-empty list of them."""
        if key not in node:
            return default
        value, where = node[key], self.line_of(node, key)
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) and v in allowed for v in values):
            self.problem(where, f"{path}.{key}", f"must be {' or '.join(allowed)}, or a list of them")
            return None
        return tuple(dict.fromkeys(values))

    def _size(self, node, path, line) -> int | None:
        size = parse_size(node)
        if size is None:
            from skyguard.policy.checker import quoted

            self.problem(line, path, f"{quoted(node)} is not a size; write bytes (10485760) or a number "
                                     "with KB, MB, GB, KiB, MiB or GiB (10MiB)")
        return size

    def _content_block(self, node, path, line) -> ContentBlock | None:
        from skyguard.policy.checker import quoted

        keys = ("mime_types", "max_size", "yara", "clamav", "patterns")
        if not self.mapping(node, path, line, keys):
            return None
        if not any(k in node for k in keys):
            self.problem(line, path, "blocks nothing; give at least one of " + ", ".join(keys))
            return None
        ok = True
        values: dict = {}
        if "mime_types" in node:
            m_node, m_line = node["mime_types"], self.line_of(node, "mime_types")
            mimes = []
            if self.seq(m_node, f"{path}.mime_types", m_line, non_empty=True):
                for i, item in enumerate(m_node):
                    if not isinstance(item, str) or not _MIME.fullmatch(item.lower()):
                        self.problem(self.line_of(m_node, i), f"{path}.mime_types[{i}]",
                                     f"{quoted(item)} is not a MIME type; write type/subtype or type/*")
                        ok = False
                    else:
                        mimes.append(item.lower())
            else:
                ok = False
            values["mime_types"] = tuple(dict.fromkeys(mimes))
        if "max_size" in node:
            values["max_size"] = self._size(node["max_size"], f"{path}.max_size", self.line_of(node, "max_size"))
            ok = ok and values["max_size"] is not None
        if "clamav" in node:
            values["clamav"] = self.boolean(node["clamav"], f"{path}.clamav", self.line_of(node, "clamav"))
            ok = ok and values["clamav"] is not None
        if "yara" in node:
            files = self._yara_files(node["yara"], f"{path}.yara", self.line_of(node, "yara"))
            ok = ok and files is not None
            values["yara"] = files or ()
        if "patterns" in node:
            p_node, p_line = node["patterns"], self.line_of(node, "patterns")
            patterns = []
            if self.seq(p_node, f"{path}.patterns", p_line, non_empty=True):
                for i, item in enumerate(p_node):
                    problem = _pattern_problem(item)
                    if problem:
                        self.problem(self.line_of(p_node, i), f"{path}.patterns[{i}]", problem)
                        ok = False
                    else:
                        patterns.append(item)
            else:
                ok = False
            values["patterns"] = tuple(patterns)
        return ContentBlock(**values) if ok else None

    def _yara_files(self, node, path, line) -> tuple[str, ...] | None:
        if not self.seq(node, path, line, non_empty=True):
            return None
        base = os.path.dirname(os.path.abspath(self.source)) if os.path.isfile(self.source) else os.getcwd()
        files, ok = [], True
        for i, item in enumerate(node):
            item_path, item_line = f"{path}[{i}]", self.line_of(node, i)
            if not isinstance(item, str) or not item:
                self.problem(item_line, item_path, "must be the path of a YARA rules file")
                ok = False
                continue
            full = os.path.normpath(os.path.join(base, item))
            problem = yara_problem(full)
            if problem:
                self.problem(item_line, item_path, problem)
                ok = False
            else:
                files.append(full)
        return tuple(dict.fromkeys(files)) if ok else None


def _pattern_problem(item) -> str | None:
    if not isinstance(item, str) or not item:
        return "must be a regular expression (a non-empty string)"
    if len(item) > MAX_PATTERN_CHARS:
        return f"is {len(item)} characters; a pattern has at most {MAX_PATTERN_CHARS}"
    try:
        re.compile(item.encode())
    except (re.error, UnicodeEncodeError) as error:
        return f"is not a valid regular expression: {error}"
    return None


def yara_problem(path: str) -> str | None:
    """Why the YARA file at `path` cannot be used, or None when it compiles."""
    try:
        import yara
    except ImportError:
        return "needs yara-python (scripts/setup installs it)"
    if not os.path.isfile(path):
        return f"no YARA rules file at {path}"
    try:
        yara.compile(filepath=path)
    except yara.Error as error:
        return f"YARA rules in {path} do not compile: {str(error)[:200]}"
    return None
