"""Errors of the signed log, refined from skyguard.errors so callers can tell cases apart.

Not a second error root: every class here is a LogError (exit 1, the log failed a check or could
not be read) or a BadInput (exit 2, the user handed us something malformed).
"""

from __future__ import annotations

from skyguard.errors import BadInput, LogError


class VerificationError(LogError):
    """A proof, a signature or the log itself did not verify."""


class BadLogInput(BadInput):
    """A malformed argument: a note that does not parse, an index outside the tree, a bad key."""
