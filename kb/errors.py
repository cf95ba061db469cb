"""The knowledge base's exceptions: each names what went wrong and what to do about it."""
from __future__ import annotations

from collections.abc import Sequence

from .records import BadRecord

#: How many problems an exception message lists before it says "and N more".
SHOWN_PROBLEMS = 20


class KBError(Exception):
    """Base class of every error raised by ``kb``."""


class InvalidFactsError(KBError):
    """A fact file (or a single fact) failed validation; nothing was written.

    ``problems`` names every bad record: its record number, line, field and the reason.
    """

    def __init__(self, source: str, problems: Sequence[BadRecord]):
        self.source = source
        self.problems = tuple(problems)
        lines = [f"{source}: {len(self.problems)} problem(s); nothing was imported. Fix them and try again:"]
        lines += [f"  - {p.describe()}" for p in self.problems[:SHOWN_PROBLEMS]]
        if len(self.problems) > SHOWN_PROBLEMS:
            lines.append(f"  ... and {len(self.problems) - SHOWN_PROBLEMS} more")
        super().__init__("\n".join(lines))


class FactNotFoundError(KBError):
    """The fact to remove (or show) is not in the store."""


class ChangeStateError(KBError):
    """Change ids handed to ``mark_applied`` / ``mark_failed`` were unknown or no longer pending."""


class MigrationError(KBError):
    """The database schema could not be brought up to date (or is newer than this kbsync)."""
