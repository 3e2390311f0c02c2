"""The vocabulary of blind ratings, shared by the tally (core.blind) and the rater's files (storage.blind):
names and the error type only, no computation."""

from __future__ import annotations

from core.errors import UserError

INTERPRETABILITY = ("interpretable", "maybe", "uninterpretable")
"""How well one explanation covers a feature's examples: fully, partly, not at all."""
CONTEXT = ("context-free", "context-dependent")
"""Of an interpretable feature: fires on a token whatever surrounds it, or only in some contexts."""
RATING_FIELDS = ("id", "interpretability", "context", "note")
"""Fields of one rating, in the order of the CSV template's columns (after `set`)."""


class BlindError(UserError, ValueError):
    """A blind set that cannot be drawn, or ratings that cannot be tallied, described in one line."""
