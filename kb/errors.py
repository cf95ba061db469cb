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


class VersionNotFoundError(KBError):
    """No version with this id in the ledger."""

    def __init__(self, version_id: object):
        self.version_id = version_id
        super().__init__(f"no version {version_id} in the ledger; see `kbsync log` for the versions there are")


class BlobError(KBError):
    """A version's delta blob is missing, truncated, corrupted or unreadable; ``version_id`` names the version.

    The ledger itself stays usable: other versions still load, and HEAD can be moved to one of them.
    """

    def __init__(self, version_id: int, problem: str, path: object = None):
        self.version_id, self.problem, self.path = version_id, problem, path
        way_out = "roll back to an earlier version with `kbsync rollback N` (see `kbsync log`)"
        if path is not None:
            way_out += f", or restore the file {path} from a backup"
        super().__init__(f"version {version_id}: {problem}; {way_out}")


class VersionPrunedError(BlobError):
    """The version's delta blob was deleted by ``kbsync prune``: its history row stays, its weights are gone."""

    def __init__(self, version_id: int, at: str):
        self.at = at
        super().__init__(version_id, f"its weights were pruned at {at} (`kbsync prune`), so it cannot be served "
                                     "or built on again; its facts are still in the knowledge base")


class ModelMismatchError(BlobError):
    """A version's blob was computed for another model than the one it is loaded for (fingerprints differ)."""

    def __init__(self, version_id: int, found: str, expected: str, path: object = None):
        self.found, self.expected = found, expected
        super().__init__(version_id, f"its delta blob was made for model {found!r}, not for {expected!r} "
                                     "(configure the model it was made for, or use a version made for this one)",
                         path)
