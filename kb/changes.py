"""The change log's reading side: pending batches (coalesced per key) and their outcomes.

A change is ``pending`` until a version carries it (``applied``, with ``version_id``) or it fails
(``failed``, with ``error``). When the ledger (``kb.ledger``) moves HEAD so that no version on HEAD's chain
carries a change any more, the change is ``held``: not pending, so the daemon does not apply a rolled-back edit
again on its next tick; moving HEAD back onto a version carrying it makes it ``applied`` again.
``reopen`` (put a version's changes back in the queue) predates the ledger; with it, prefer ``Ledger.move_head``.
"""
from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import TYPE_CHECKING

import structlog

from .errors import ChangeStateError
from .records import Batch, BatchEntry, Change, Counts, Provenance, probes_from_json

if TYPE_CHECKING:
    from .facts import FactStore

log = structlog.get_logger("kbsync.kb")

_CHUNK = 500   # ids per IN (...) list, well under SQLite's variable limit


class ChangeLog:
    """The append-only change log of a ``FactStore`` (use ``store.changes``)."""

    def __init__(self, store: FactStore):
        self._store = store

    def next_batch(self, limit: int) -> Batch:
        """The next ≤ ``limit`` pending keys in the order they first became pending, each coalesced.

        Every entry holds the key's last pending change and all its pending change ids. Cost grows with the
        batch, not with the backlog: it reads pending ids in order only until ``limit`` keys are found.
        """
        if limit < 1:
            raise ValueError(f"a batch holds at least one change, not {limit}")
        with self._store.snapshot() as conn:
            keys: dict[tuple[str, str], None] = {}
            for subject, template in conn.execute(
                    "SELECT subject, template FROM changes WHERE status = 'pending' ORDER BY id"):
                keys.setdefault((subject, template))
                if len(keys) >= limit:
                    break
            cols = _columns(conn)
            entries = []
            for subject, template in keys:
                rows = conn.execute("SELECT * FROM changes WHERE status = 'pending' AND subject = ? AND "
                                    "template = ? ORDER BY id", (subject, template)).fetchall()
                entries.append(BatchEntry(change_from_row(rows[-1], cols), tuple(r[0] for r in rows)))
        return Batch(tuple(entries))

    def mark_applied(self, change_ids: Iterable[int], version_id: int) -> int:
        """In one transaction: these pending changes are carried by ``version_id``. Returns how many.

        Raises ``ChangeStateError`` (and changes nothing) if any id is unknown or not pending.
        """
        return self._settle(change_ids, "applied", version_id=version_id, error=None)

    def mark_failed(self, change_ids: Iterable[int], reason: str) -> int:
        """In one transaction: these pending changes failed, for ``reason``. Returns how many."""
        if not reason:
            raise ValueError("say why the changes failed")
        return self._settle(change_ids, "failed", version_id=None, error=reason)

    def retry_failed(self, change_ids: Iterable[int] | None = None) -> int:
        """Make failed changes (all, or these) pending again. Returns how many."""
        with self._store.transaction() as conn:
            if change_ids is None:
                return conn.execute("UPDATE changes SET status = 'pending', error = NULL "
                                    "WHERE status = 'failed'").rowcount
            n = 0
            for chunk in _chunks(sorted(set(change_ids))):
                n += conn.execute(f"UPDATE changes SET status = 'pending', error = NULL WHERE status = 'failed' "
                                  f"AND id IN ({','.join('?' * len(chunk))})", chunk).rowcount
            return n

    def reopen(self, version_ids: Iterable[int]) -> int:
        """Make the changes these versions carried pending again (HEAD moved back past them)."""
        with self._store.transaction() as conn:
            n = 0
            for chunk in _chunks(sorted(set(version_ids))):
                n += conn.execute(f"UPDATE changes SET status = 'pending', version_id = NULL WHERE status = "
                                  f"'applied' AND version_id IN ({','.join('?' * len(chunk))})", chunk).rowcount
            return n

    def counts(self) -> Counts:
        with self._store.snapshot() as conn:
            facts = conn.execute("SELECT count(*) FROM facts").fetchone()[0]
            pending = conn.execute("SELECT count(*) FROM changes WHERE status = 'pending'").fetchone()[0]
            keys = conn.execute("SELECT count(*) FROM (SELECT 1 FROM changes WHERE status = 'pending' "
                                "GROUP BY subject, template)").fetchone()[0]
            failed = conn.execute("SELECT count(*) FROM changes WHERE status = 'failed'").fetchone()[0]
            held = conn.execute("SELECT count(*) FROM changes WHERE status = 'held'").fetchone()[0]
            total = conn.execute("SELECT count(*) FROM changes").fetchone()[0]
        return Counts(facts, pending, keys, failed, total - pending - failed - held, held)

    def list(self, status: str | None = None, *, limit: int | None = None) -> list[Change]:
        """Changes in log order, optionally only those with ``status`` (pending, applied, failed, held)."""
        sql = "SELECT * FROM changes" + (" WHERE status = ?" if status else "") + " ORDER BY id"
        args: list = [status] if status else []
        if limit is not None:
            sql, args = sql + " LIMIT ?", args + [limit]
        with self._store.snapshot() as conn:
            cols = _columns(conn)
            return [change_from_row(r, cols) for r in conn.execute(sql, args)]

    def _settle(self, change_ids: Iterable[int], status: str, *, version_id: int | None, error: str | None) -> int:
        ids = sorted(set(change_ids))
        with self._store.transaction() as conn:
            bad = []
            for chunk in _chunks(ids):
                pending = {i for (i,) in conn.execute(f"SELECT id FROM changes WHERE status = 'pending' AND id IN "
                                                      f"({','.join('?' * len(chunk))})", chunk)}
                bad += [i for i in chunk if i not in pending]
            if bad:
                raise ChangeStateError(f"cannot mark {len(bad)} change(s) {status}: {bad[:10]} are unknown or no "
                                       "longer pending; nothing was marked. Take a fresh batch with next_batch().")
            for chunk in _chunks(ids):
                conn.execute(f"UPDATE changes SET status = ?, version_id = ?, error = ? "
                             f"WHERE id IN ({','.join('?' * len(chunk))})", [status, version_id, error, *chunk])
        log.info("kb.changes_settled", status=status, changes=len(ids), version_id=version_id, error=error)
        return len(ids)


def change_from_row(row: tuple, cols: list[str]) -> Change:
    r = dict(zip(cols, row))
    return Change(r["id"], r["op"], r["subject"], r["template"], r["target"],
                  tuple(json.loads(r["paraphrases"])) if r["paraphrases"] else (), probes_from_json(r["locality"]),
                  Provenance(r["source"], r["source_sha256"], r["source_record"], r["at"]), r["at"], r["status"],
                  r["version_id"], r["error"])


def _columns(conn: sqlite3.Connection) -> list[str]:
    return [r[1] for r in conn.execute("PRAGMA table_info(changes)")]


def _chunks(ids: list[int]) -> Iterable[list[int]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i:i + _CHUNK]
