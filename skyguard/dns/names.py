"""Name normalisation and the one place where the DNS proxy asks "does this pattern match".

SPEC.md section 3: `name.example` exact, `*.example` exactly one label, `**.example` one or more
labels; case-insensitive; a trailing dot is ignored. The policy part owns the implementation
(skyguard.policy.fqdn.pattern_matches); this module is the DNS-side seam that re-exports it.
"""

from __future__ import annotations


def normalise(name: str) -> str:
    return name.rstrip(".").lower()


from skyguard.policy.fqdn import pattern_matches  # noqa: E402,F401 - the one implementation


def base_domain(name: str) -> str:
    """The last two labels: the unit tunnelling detection counts subdomains under. Without a
    public-suffix list this over-groups under e.g. co.uk, which errs towards detection."""
    labels = normalise(name).split(".")
    return ".".join(labels[-2:])
