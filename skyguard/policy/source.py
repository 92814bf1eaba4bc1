"""Policy YAML text to a tree of ruamel values that remember their lines, and the Problem type
every policy error is made of.

The YAML library is the boundary where hostile text meets code we do not own: whatever it raises
on bad input becomes a PolicyError here (with a line where one can be found), never a traceback.
Aliases that would inflate mapping keys are refused before construction. Not here: what the
values mean (parse.py and its section modules check that).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from ruamel.yaml import YAML
from ruamel.yaml.constructor import RoundTripConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from skyguard.errors import PolicyError


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a policy file: where (file, 1-based line, key path) and what."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "key": self.key, "message": self.message}


class _CheckedConstructor(RoundTripConstructor):
    """ruamel's round-trip constructor, refusing complex keys in each composed document before
    it builds anything from it (one parse of the text does both)."""

    source = ""

    def construct_document(self, node):
        _refuse_complex_keys([node], self.source)
        return super().construct_document(node)


def load_yaml(text: str, source: str):
    yaml = YAML(typ="rt")  # round-trip mode keeps line numbers for every key and item
    yaml.allow_duplicate_keys = False
    yaml.Constructor = _CheckedConstructor
    yaml.constructor.source = source  # made once per YAML object, on first use
    try:
        with warnings.catch_warnings():  # e.g. a reused anchor: valid YAML, not our user's problem
            warnings.simplefilter("ignore")
            documents = list(yaml.load_all(text))
    except TypeError:
        # ruamel cannot hash a list or mapping used as a key inside another key.
        raise PolicyError([Problem(source, None, "", "a mapping key is a list or mapping; keys are "
                                   "plain names")]) from None
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        duplicate = re.match(r'found duplicate key "(.*?)" with value', e.problem or "")
        if duplicate:
            # ruamel's own message quotes both values; we name only the key.
            raise PolicyError([Problem(source, line, duplicate.group(1), "is given twice in the same "
                                       "mapping; keep one (YAML would silently drop the first)")]) from None
        message = " ".join(x for x in (e.context, e.problem) if x)
        raise PolicyError([Problem(source, line, "", f"not valid YAML: {message}")]) from None
    except YAMLError as e:
        raise PolicyError([Problem(source, _line_in(e), "", f"not valid YAML: {e}")]) from None
    except PolicyError:
        raise
    except Exception as e:  # noqa: BLE001 - the library's own failures on hostile text (ruamel
        # 0.18 raises NotImplementedError "overlap in comment" for `#\n&a #\na`, RecursionError
        # on deep nesting): bad input all the same, never a traceback. Its message may quote the
        # file at length, so only the kind is shown.
        kind = type(e).__name__
        hint = _GAVE_UP_HINTS.get(kind, "simplify the YAML there")
        raise PolicyError([Problem(source, _line_in(e), "", f"not valid YAML: the YAML reader "
                                   f"gave up ({kind}); {hint}")]) from None
    documents = [d for d in documents if d is not None]
    if len(documents) != 1:
        found = "is empty" if not documents else f"holds {len(documents)} YAML documents"
        raise PolicyError([Problem(source, 1 if documents else None, "",
                                   f"{found}; a policy file holds exactly one")])
    return documents[0]


_GAVE_UP_HINTS = {
    "NotImplementedError": "a comment sits where the reader cannot keep it (e.g. between an "
                           "anchor or tag and its value); move the comment",
    "RecursionError": "lists or mappings are nested too deep; a policy needs a few levels",
}


def _line_in(error: Exception) -> int | None:
    """The 1-based line an exception from the YAML library points at, if it says: a mark, or
    the last `line: N` (0-based) of a token quoted in its message."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is not None and getattr(mark, "line", None) is not None:
        return mark.line + 1
    found = re.findall(r"\bline: (\d+)", str(error)[:10_000])
    return int(found[-1]) + 1 if found else None


def _refuse_complex_keys(documents, source: str) -> None:
    """Refuse mapping keys that are lists or mappings (`? [a, b]: x`) before ruamel constructs
    them: it turns such keys into nested tuples, which an alias chain inflates to billions of
    items. The walk is over the composed node graph, where an alias is one shared node."""
    from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode

    seen: set[int] = set()
    stack = [d for d in documents if d is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, MappingNode):
            for key, value in node.value:
                if not isinstance(key, ScalarNode):
                    raise PolicyError([Problem(source, key.start_mark.line + 1, "",
                                               "a mapping key is a list or mapping; keys are plain "
                                               "names")])
                stack.append(value)
