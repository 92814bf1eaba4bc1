"""The content filter's error root (a SkyguardError), in its own module so every engine module
can raise it without importing the others."""

from __future__ import annotations

from skyguard.errors import SkyguardError


class ContentError(SkyguardError):
    """Content inspection could not run (an engine down, rules unusable). Callers block."""
