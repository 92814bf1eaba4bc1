"""Name normalisation and the one place where the DNS proxy asks "does this pattern match".

SPEC.md section 3: `name.example` exact, `*.example` exactly one label, `**.example` one or more
labels; case-insensitive; a trailing dot is ignored. The policy part owns the canonical
implementation (skyguard.policy.fqdn.pattern_matches); until it is merged this module carries a
small equivalent. TODO(lead): replace the body of `pattern_matches` with
`from skyguard.policy.fqdn import pattern_matches` and keep this module as the DNS-side seam.
"""

from __future__ import annotations


def normalise(name: str) -> str:
    return name.rstrip(".").lower()


def pattern_matches(pattern: str, name: str) -> bool:
    # replace with skyguard.policy.fqdn.pattern_matches once merged (same semantics)
    pattern, name = normalise(pattern), normalise(name)
    if pattern.startswith("**."):
        suffix = pattern[2:]  # ".example"
        return name.endswith(suffix) and len(name) > len(suffix)
    if pattern.startswith("*."):
        suffix = pattern[1:]
        if not name.endswith(suffix):
            return False
        head = name[: -len(suffix)]
        return bool(head) and "." not in head
    return pattern == name


def base_domain(name: str) -> str:
    """The last two labels: the unit tunnelling detection counts subdomains under. Without a
    public-suffix list this over-groups under e.g. co.uk, which errs towards detection."""
    labels = normalise(name).split(".")
    return ".".join(labels[-2:])
