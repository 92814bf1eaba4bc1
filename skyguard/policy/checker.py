"""The checker's machinery, shared by every policy section: recording problems with their lines,
and checking the shape of a YAML node (mapping with known keys, list, name, scalar, number, zone
references). Sections (parse.py, access.py) build on CheckerBase; nothing here knows a section.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from skyguard.policy.model import ALL_ZONES
from skyguard.policy.source import Problem
from skyguard.policy.values import NAME_RE


def quoted(value: Any) -> str:
    # Never str() a container: through YAML aliases it may stand for a tree of billions of nodes.
    if is_map(value):
        return "'{...}'"
    if isinstance(value, (list, tuple)):
        return "'[...]'"
    text = str(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"'{text}'"


def is_map(node) -> bool:
    return isinstance(node, dict)


def is_seq(node) -> bool:
    return isinstance(node, list)


def is_int(node) -> bool:
    return isinstance(node, int) and not isinstance(node, bool)


def type_name(node) -> str:
    if node is None:
        return "empty"
    if is_map(node):
        return "a mapping"
    if is_seq(node):
        return "a list"
    if isinstance(node, bool):
        return "a boolean"
    if isinstance(node, (int, float)):
        return "a number"
    if isinstance(node, str):
        return "a string"
    if type(node).__name__ == "TaggedScalar":
        return "a value with a YAML tag (remove the '!tag')"
    return f"a {type(node).__name__} value"


def join_path(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def did_you_mean(value: Any, known) -> str:
    known = list(known)
    close = difflib.get_close_matches(str(value), known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; known: {', '.join(known)}" if known else ""


def plain(node, budget: list[int]):
    """ruamel's commented containers to plain dicts and lists (for Policy.extra). YAML aliases
    share nodes, so a small file can describe a huge tree ("billion laughs"): the budget counts
    every value copied and raises ValueError when it runs out."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError("extension too large")
    if is_map(node):
        return {str(k): plain(v, budget) for k, v in node.items()}
    if is_seq(node):
        return [plain(v, budget) for v in node]
    return node


class CheckerBase:
    """Walks the YAML tree, builds model values, and records problems instead of raising.

    Each section method returns its values built from what was valid, so that later checks
    (e.g. rules naming zones) still run and report; the caller discards everything if any
    problem was recorded.
    """

    def __init__(self, source: str):
        self.source = source
        self.problems: list[Problem] = []

    # The checker in parse.py defines it (a name checked and unique among those seen); the
    # sections (access.py, console.py...) call it. Declared so that they type-check on their own.
    unique_name: Callable[..., str | None]

    # -- reporting ----------------------------------------------------------------------------

    def problem(self, line: int | None, key: str, message: str) -> None:
        self.problems.append(Problem(self.source, line, key, message))

    @staticmethod
    def line_of(container, key=None) -> int | None:
        """1-based line of container[key] (a value or list item), or of the container itself."""
        try:
            if key is None:
                return container.lc.line + 1
            if is_seq(container):
                return container.lc.item(key)[0] + 1
            value = container.get(key)
            # An empty value's mark points past the key; the key's own line reads better.
            if value is None or is_map(value) or is_seq(value):
                return container.lc.key(key)[0] + 1
            return container.lc.value(key)[0] + 1
        except (AttributeError, KeyError, IndexError, TypeError):
            return getattr(getattr(container, "lc", None), "line", -1) + 1 or None

    @staticmethod
    def key_line(container, key) -> int | None:
        try:
            return container.lc.key(key)[0] + 1
        except (AttributeError, KeyError, TypeError):
            return None

    # -- shape helpers ------------------------------------------------------------------------

    def mapping(self, node, path: str, line: int | None, allowed: tuple[str, ...],
                required: tuple[str, ...] = ()) -> bool:
        """Check that node is a mapping with only `allowed` keys and every `required` one."""
        if not is_map(node):
            self.problem(line, path, f"must be a mapping (key: value), not {type_name(node)}")
            return False
        for key in node:
            if not isinstance(key, str):
                self.problem(self.key_line(node, key), path, f"key {quoted(key)} is not a string")
                continue
            if key not in allowed and not (path == "" and key.startswith("x-")):
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(allowed)}"
                self.problem(self.key_line(node, key), join_path(path, key), f"unknown key{hint}")
        for key in required:
            if key not in node:
                self.problem(self.line_of(node) or line, join_path(path, key), "is required but missing")
        return True

    def seq(self, node, path: str, line: int | None, *, non_empty: bool = False) -> bool:
        if not is_seq(node):
            self.problem(line, path, f"must be a list, not {type_name(node)}")
            return False
        if non_empty and not node:
            self.problem(line, path, "must not be empty")
            return False
        return True

    def name(self, node, path: str, line: int | None, what: str, *, max_length: int = 63) -> str | None:
        if not isinstance(node, str) or not node:
            self.problem(line, path, f"{what} must be a non-empty string, not {type_name(node)}")
            return None
        if len(node) > max_length:
            self.problem(line, path, f"{quoted(node)} is {len(node)} characters; a {what} has at "
                                     f"most {max_length}")
            return None
        if not NAME_RE.match(node):
            self.problem(line, path, f"{quoted(node)} is not a valid {what} (lower-case letters, "
                                     f"digits and '-', not starting or ending with '-')")
            return None
        return node

    def scalar(self, node, parse: Callable[[Any], Any], path: str, line: int | None, *,
               quote: bool = True):
        try:
            return parse(node)
        except ValueError as e:
            shown = quoted(node) if quote else "the value"
            self.problem(line, path, f"{shown} {e}")
            return None

    def string(self, node, path: str, line: int | None, what: str) -> str | None:
        if not isinstance(node, str) or not node.strip():
            self.problem(line, path, f"{what} must be a non-empty string, not {type_name(node)}")
            return None
        return node

    def boolean(self, node, path: str, line: int | None) -> bool | None:
        if not isinstance(node, bool):
            self.problem(line, path, f"must be true or false, not {type_name(node)} {quoted(node)}")
            return None
        return node

    def integer(self, node, path: str, line: int | None, lo: int, hi: int) -> int | None:
        if not is_int(node):
            self.problem(line, path, f"must be a whole number, not {type_name(node)} {quoted(node)}")
            return None
        if not lo <= node <= hi:
            self.problem(line, path, f"{node} is out of range ({lo}-{hi})")
            return None
        return int(node)

    def zone_refs(self, node, path: str, line: int | None, zones: dict, *, allow_all: bool) -> tuple[str, ...]:
        """A list of zone names (or, where allowed, "*" alone or a single name) -> zone names."""
        items = node
        if isinstance(node, str) and allow_all:
            items = [node]
        elif not self.seq(node, path, line, non_empty=True):
            return ()
        names: list[str] = []
        for index, item in enumerate(items):
            item_path = f"{path}[{index}]" if items is node else path
            item_line = self.line_of(node, index) if items is node else line
            if item == ALL_ZONES and allow_all:
                if len(items) > 1:
                    self.problem(item_line, item_path, "'*' means every zone; list it alone")
                names.extend(zones)
                continue
            if not isinstance(item, str):
                self.problem(item_line, item_path, f"must be a zone name, not {type_name(item)}")
                continue
            if item not in zones:
                self.problem(item_line, item_path, f"unknown zone {quoted(item)}{did_you_mean(item, zones)}")
                continue
            names.append(item)
        return tuple(dict.fromkeys(names))
