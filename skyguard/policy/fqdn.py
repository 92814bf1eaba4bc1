"""Domain names and FQDN patterns: validation, normalisation and matching, as the policy means them.

Patterns are `name.example` (exactly that name), `*.example` (exactly one more label) and
`**.example` (one or more more labels). Matching ignores ASCII case and one trailing dot. This
module is pure: it never resolves anything. The DNS proxy asks `FqdnMatcher` which rules a query
falls under; learning the answers into the datapath is the DNS part's job, not this one's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from skyguard.policy.model import Policy, PortRange

MAX_NAME_LENGTH = 253  # RFC 1035 limit on a name in text form without the trailing dot
MAX_LABEL_LENGTH = 63

# Letters, digits, hyphen (RFC 1123 host names) plus underscore, which service names such as
# _ldap._tcp use. No label starts or ends with a hyphen.
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")

# DNS compares names case-insensitively in ASCII only (RFC 4343); str.lower() would also fold
# non-ASCII letters, which would make two different names compare equal.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def normalize_name(name: str) -> str:
    """Lower-case (ASCII) `name` and remove one trailing dot. Does not validate."""
    name = name.translate(_ASCII_LOWER)
    return name[:-1] if name.endswith(".") else name


def _labels(name: str) -> list[str] | None:
    """The labels of a normalised name, or None when it has an empty label (never a real qname)."""
    if not name:
        return None
    labels = name.split(".")
    return None if any(label == "" for label in labels) else labels


def pattern_matches(pattern: str, name: str) -> bool:
    """True when `name` falls under `pattern` (see the module docstring for the semantics).

    Both sides are normalised here, so callers may pass what the wire or the YAML gave them. A
    name with an empty label (`a..b`) or an empty name matches nothing: fail closed.
    """
    pattern_labels = _labels(normalize_name(pattern))
    name_labels = _labels(normalize_name(name))
    if pattern_labels is None or name_labels is None:
        return False
    head, suffix = pattern_labels[0], pattern_labels[1:]
    if head == "*":
        return len(name_labels) == len(suffix) + 1 and name_labels[1:] == suffix
    if head == "**":
        return len(name_labels) > len(suffix) and name_labels[len(name_labels) - len(suffix):] == suffix
    return name_labels == pattern_labels


def check_pattern(text: str, *, allow_wildcards: bool = True) -> str:
    """Validate one FQDN pattern (or, with allow_wildcards=False, one host name) and return its
    normal form. Raises ValueError with a message that says how to fix it."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("is empty; write a domain name such as 'api.example.com'")
    if text != text.strip():
        raise ValueError("has leading or trailing spaces")
    if not text.isascii():
        try:
            hint = text.encode("idna").decode("ascii")
            raise ValueError(f"is not ASCII; write its IDNA form '{hint}'")
        except UnicodeError:
            raise ValueError("is not ASCII and has no IDNA form; write it as xn-- labels") from None
    name = normalize_name(text)
    if not name:
        raise ValueError("is the root name; write a domain name such as 'api.example.com'")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"is {len(name)} characters long; a domain name has at most {MAX_NAME_LENGTH}")
    labels = name.split(".")
    wildcard = labels[0] in ("*", "**")
    if wildcard and not allow_wildcards:
        raise ValueError("is a pattern; a host name is needed here (no '*')")
    if wildcard and len(labels) == 1:
        raise ValueError(f"matches every name; write a suffix after it, e.g. '{labels[0]}.example.com'")
    for position, label in enumerate(labels):
        if position == 0 and wildcard:
            continue
        if label == "":
            raise ValueError("has an empty label ('..' or a leading dot)")
        if "*" in label:
            hint = "'*.' (one label) or '**.' (one or more labels)" if allow_wildcards else "none"
            raise ValueError(f"has '*' in label '{label}'; a wildcard is only allowed as the whole "
                             f"leftmost label: {hint}")
        if len(label) > MAX_LABEL_LENGTH:
            raise ValueError(f"has a label of {len(label)} characters; a label has at most {MAX_LABEL_LENGTH}")
        if not _LABEL.match(label):
            raise ValueError(f"has an invalid label '{label}' (letters, digits, '-' and '_' only, "
                             f"not starting or ending with '-')")
    return name


@dataclass(frozen=True)
class FqdnGrant:
    """One allow rule that covers a name for a zone, and the ports it opens toward its IPs."""

    rule: str
    ports: tuple[PortRange, ...]  # empty means every protocol and port, as in Rule.ports


@dataclass(frozen=True)
class FqdnAnswer:
    grants: tuple[FqdnGrant, ...]  # allow rules, in policy order
    denied_by: tuple[str, ...]  # deny rules naming it; deny beats allow

    @property
    def allowed(self) -> bool:
        return bool(self.grants) and not self.denied_by


class FqdnMatcher:
    """Answers, for (zone, qname), which rules allow the name and which deny rules name it.

    Built once per policy (immutable afterwards, so safe to share between threads). A lookup costs
    one dict probe per label of the name, whatever the number of patterns.
    """

    def __init__(self, policy: Policy):
        # pattern suffix (labels tuple) -> [(rule order, rule)]
        self._exact: dict[tuple[str, ...], list] = {}
        self._one_label: dict[tuple[str, ...], list] = {}
        self._many_labels: dict[tuple[str, ...], list] = {}
        for order, rule in enumerate(policy.rules):
            for pattern in dict.fromkeys(rule.to.fqdns):  # a rule listed once per name
                labels = tuple(normalize_name(pattern).split("."))
                if labels[0] == "*":
                    self._one_label.setdefault(labels[1:], []).append((order, rule))
                elif labels[0] == "**":
                    self._many_labels.setdefault(labels[1:], []).append((order, rule))
                else:
                    self._exact.setdefault(labels, []).append((order, rule))

    def match(self, zone: str, qname: str) -> FqdnAnswer:
        labels = _labels(normalize_name(qname))
        if labels is None:
            return FqdnAnswer((), ())
        key = tuple(labels)
        hits = list(self._exact.get(key, ()))
        hits += self._one_label.get(key[1:], ())
        for start in range(1, len(key)):
            hits += self._many_labels.get(key[start:], ())
        seen: set[int] = set()
        grants: list[FqdnGrant] = []
        denied: list[str] = []
        for order, rule in sorted(hits, key=lambda hit: hit[0]):
            if order in seen or zone not in rule.from_zones:
                continue
            seen.add(order)
            if rule.action == "deny":
                denied.append(rule.name)
            else:
                grants.append(FqdnGrant(rule.name, rule.ports))
        return FqdnAnswer(tuple(grants), tuple(denied))
