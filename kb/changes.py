"""The change log: pending batches (coalesced per key), and every status write of a change.

The triggers append the rows (``kb.migrations``); this module is the only code that changes a row's status.

A change is ``pending`` until a version carries it (``applied``, with ``version_id``) or it fails
(``failed``, with ``error``). When the ledger (``kb.ledger``) moves HEAD so that no version on HEAD's chain
carries a change any more, the change is ``held``: not pending, so the daemon does not apply a rolled-back edit
again on its next tick; moving HEAD back onto a version carrying it makes it ``applied`` again.

The queue is the ``status`` column, not an "id > cursor" position: a change whose id was drawn before another's but
committed after it (concurrent writers on PostgreSQL) is still ``pending`` when it becomes visible, so the next
batch takes it. Two changes of one key cannot commit out of order: both write the key's ``facts`` row, and its
row lock makes the second writer wait for the first to commit.
"""
from __future__ import annotations

import json
from collections.abc import Iterable


from .logger import get_logger
from .db import Database
from .errors import ChangeStateError
from .records import Batch, BatchEntry, Change, Counts, Provenance, probes_from_json


log = get_logger("kbsync.kb")

_CHUNK = 500   # ids per IN (...) list, well under SQLite's variable limit


class ChangeLog:
    """The append-only change log in a ``Database`` (a ``FactStore`` has one: ``store.changes``)."""

    def __init__(self, db: Database):
        self._db = db

    def next_batch(self, limit: int) -> Batch:
        """The next ≤ ``limit`` pending keys in the order they first became pending, each coalesced.

        Every entry holds the key's last pending change and all its pending change ids. Cost grows with the
        batch, not with the backlog: it reads pending ids in order only until ``limit`` keys are found.
        """
        if limit < 1:
            raise ValueError(f"a batch holds at least one change, not {limit}")
        page = max(4 * limit, 256)
        with self._db.snapshot() as conn:
            keys: dict[tuple[str, str], None] = {}
            after = 0
            while len(keys) < limit:
                rows = conn.execute("SELECT id, subject, template FROM changes WHERE status = 'pending' AND id > ? "
                                    "ORDER BY id LIMIT ?", (after, page)).fetchall()
                for _, subject, template in rows:
                    keys.setdefault((subject, template))
                    if len(keys) >= limit:
                        break
                if len(rows) < page:
                    break
                after = rows[-1][0]
            if not keys:
                return Batch(())
            ids = {(subject, template): [i for (i,) in conn.execute(
                "SELECT id FROM changes WHERE status = 'pending' AND subject = ? AND template = ? ORDER BY id",
                (subject, template))] for subject, template in keys}
            last: dict[int, Change] = {}
            for chunk in _chunks([max(v) for v in ids.values()]):
                last.update((c.id, c) for c in change_from_cursor(conn.execute(
                    f"SELECT * FROM changes WHERE id IN ({', '.join('?' * len(chunk))})", chunk)))
            entries = [BatchEntry(last[v[-1]], tuple(v)) for v in ids.values()]
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
        with self._db.transaction() as conn:
            if change_ids is None:
                return conn.execute("UPDATE changes SET status = 'pending', error = NULL "
                                    "WHERE status = 'failed'").rowcount
            n = 0
            for chunk in _chunks(sorted(set(change_ids))):
                n += conn.execute(f"UPDATE changes SET status = 'pending', error = NULL WHERE status = 'failed' "
                                  f"AND id IN ({','.join('?' * len(chunk))})", chunk).rowcount
            return n

    def counts(self) -> Counts:
        with self._db.snapshot() as conn:
            facts = conn.execute("SELECT count(*) FROM facts").fetchone()[0]
            keys = conn.execute("SELECT count(*) FROM (SELECT 1 FROM changes WHERE status = 'pending' "
                                "GROUP BY subject, template) AS pending_keys").fetchone()[0]
            total, pending, failed, held = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = "
                "'failed'), count(*) FILTER (WHERE status = 'held') FROM changes").fetchone()
        return Counts(facts, pending, keys, failed, total - pending - failed - held, held)

    def list(self, status: str | None = None, *, limit: int | None = None) -> list[Change]:
        """Changes in log order, optionally only those with ``status`` (pending, applied, failed, held)."""
        sql = "SELECT * FROM changes" + (" WHERE status = ?" if status else "") + " ORDER BY id"
        args: list = [status] if status else []
        if limit is not None:
            sql, args = sql + " LIMIT ?", args + [limit]
        with self._db.snapshot() as conn:
            return change_from_cursor(conn.execute(sql, args))

    # -- the ledger's side (inside its transaction): the log owns every status write ---------------------------

    def carry(self, conn, change_ids: list[int], version_id: int) -> None:
        """Inside a transaction: a new version carries these changes (checked by the ledger), so they are applied."""
        for chunk in _chunks(change_ids):
            conn.execute(f"UPDATE changes SET status = 'applied', version_id = ?, error = NULL "
                         f"WHERE id IN ({','.join('?' * len(chunk))})", [version_id, *chunk])

    def follow_chain(self, conn, chain: set[int]) -> None:
        """Inside a transaction, after HEAD moved: every applied or held change becomes applied (version: its
        latest carrier on ``chain``, HEAD's versions) or held (version: its latest carrier)."""
        updates = []
        for change_id, status, current, carriers in conn.execute(
                f"SELECT vc.change_id, c.status, c.version_id, {self._db.group_concat('vc.version_id')} "
                "FROM version_changes vc JOIN changes c ON c.id = vc.change_id WHERE c.status IN ('applied', 'held') "
                "GROUP BY vc.change_id, c.status, c.version_id"):
            versions = [int(v) for v in carriers.split(",")]
            on_chain = [v for v in versions if v in chain]
            want = ("applied", max(on_chain)) if on_chain else ("held", max(versions))
            if (status, current) != want:
                updates.append((*want, change_id))
        conn.executemany("UPDATE changes SET status = ?, version_id = ? WHERE id = ?", updates)

    def _settle(self, change_ids: Iterable[int], status: str, *, version_id: int | None, error: str | None) -> int:
        ids = sorted(set(change_ids))
        with self._db.transaction() as conn:
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


def change_from_cursor(cur) -> list[Change]:
    """The ``Change`` of every row a ``SELECT * FROM changes ...`` cursor returns."""
    cols = [d[0] for d in cur.description]
    return [change_from_row(dict(zip(cols, row))) for row in cur.fetchall()]


def change_from_row(r: dict) -> Change:
    return Change(r["id"], r["op"], r["subject"], r["template"], r["target"],
                  tuple(json.loads(r["paraphrases"])) if r["paraphrases"] else (), probes_from_json(r["locality"]),
                  Provenance(r["source"], r["source_sha256"], r["source_record"], r["at"]), r["at"], r["status"],
                  r["version_id"], r["error"])


def _chunks(ids: list[int]) -> Iterable[list[int]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i:i + _CHUNK]
