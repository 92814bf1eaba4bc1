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


class LogSpaceLow(LogError):
    """The log's filesystem is below the writer's reserve: the entry was refused before anything
    was written (nothing to distrust); the writer accepts entries again once space is back."""


class LogStalled(LogError):
    """The log's writer is behind: it has waited on its disk too long (a hung or frozen disk), or
    too many entries wait for it. New entries are refused, and a wait for durability ends, with
    this; what was queued is written when the disk answers (tlog/intake.py)."""


def anew(error: LogError) -> LogError:
    """A fresh copy (same class, same words) of a refusal or failure the writer keeps and raises
    again and again: raising one instance each time chains every raise's frames onto its one
    traceback, keeping alive whatever each refused caller held (a request with a secret swapped
    in) for as long as the log refuses, and every logged traceback longer than the last."""
    return type(error)(*error.args)
