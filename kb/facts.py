"""The fact store: a SQLite database (via sqlite-utils) of facts, their change log and ingested files.

Writes go to the ``facts`` table with plain SQL; triggers put every effective change into the append-only
``changes`` table, so another program writing SQL straight into ``facts`` is captured the same way.
One ``FactStore`` may be shared between threads: a lock serialises its connection.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils
import structlog

from .changes import ChangeLog, change_from_row
from .errors import FactNotFoundError
from .migrations import migrate
from .records import (SLOT, Batch, Change, Counts, Fact, ImportResult, LocalityProbe, Provenance,
                      probes_from_json, probes_to_json)
from .validation import ParsedFile, now_iso, parse_fact_file, validate_fact

log = structlog.get_logger("kbsync.kb")

_UPSERT = """
INSERT INTO facts (subject, template, target, paraphrases, locality, source, source_sha256, source_record,
                   added_at, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (subject, template) DO UPDATE SET
    target = excluded.target, paraphrases = excluded.paraphrases, locality = excluded.locality,
    source = excluded.source, source_sha256 = excluded.source_sha256, source_record = excluded.source_record,
    updated_at = excluded.updated_at
WHERE facts.target IS NOT excluded.target OR facts.paraphrases IS NOT excluded.paraphrases
   OR facts.locality IS NOT excluded.locality
"""


class FactStore:
    """The knowledge base at ``path`` (created, and migrated to the current schema, on open).

    Example::

        with FactStore(state_dir / "kb.sqlite") as store:
            store.import_file(Path("facts.jsonl"))
            batch = store.next_batch(30)
            ...
            store.mark_applied(batch.change_ids, version_id=7)
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None,
                               check_same_thread=False)
        self._lock = threading.RLock()
        self._depth = 0
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self.db = sqlite_utils.Database(conn)
            self.db.enable_wal()
            conn.execute("PRAGMA synchronous = FULL")   # a committed import survives power loss before its move
            migrate(conn)
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        self.changes = ChangeLog(self)

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def __enter__(self) -> FactStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``); nested use becomes a savepoint. Rolls back on error."""
        with self._lock:
            conn, name = self.conn, f"kb_sp{self._depth}"
            begin, commit, rollback = (("BEGIN IMMEDIATE", "COMMIT", "ROLLBACK") if not conn.in_transaction else
                                       (f"SAVEPOINT {name}", f"RELEASE {name}", f"ROLLBACK TO {name}"))
            conn.execute(begin)
            self._depth += 1
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:           # SQLite may already have rolled back (e.g. disk full)
                    conn.execute(rollback)
                    if rollback.startswith("ROLLBACK TO"):
                        conn.execute(commit)
                raise
            else:
                conn.execute(commit)
            finally:
                self._depth -= 1

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A consistent read (one read transaction), or the current transaction when inside one."""
        with self._lock:
            if self.conn.in_transaction:
                yield self.conn
                return
            self.conn.execute("BEGIN")
            try:
                yield self.conn
            finally:
                self.conn.execute("COMMIT")

    # -- writing facts ------------------------------------------------------------------------------------------

    def add(self, subject: str, prompt: str, target: str, *, paraphrases: Sequence[str] = (),
            locality: Sequence[str | dict | LocalityProbe] = (), source: str = "cli") -> Change | None:
        """Add or update one fact; returns the change written, or None when the store already had it.

        Raises ``InvalidFactsError`` naming each bad field.
        """
        probes = [p.to_json() if isinstance(p, LocalityProbe) else p for p in locality]
        fact = validate_fact({"subject": subject, "prompt": prompt, "target": target,
                              "paraphrases": list(paraphrases), "locality": probes},
                             Provenance(source, None, None, now_iso()))
        with self.transaction() as conn:
            before = _last_change_id(conn)
            self._put(conn, [fact])
            row = conn.execute("SELECT * FROM changes WHERE id > ? ORDER BY id DESC LIMIT 1", (before,)).fetchone()
            change = change_from_row(row, _columns(conn, "changes")) if row else None
        log.info("kb.fact_added", subject=fact.subject, template=fact.template, changed=change is not None)
        return change

    def remove(self, subject: str, prompt: str, *, source: str = "cli") -> Change:
        """Delete the fact with this key (``prompt`` may be the full prompt or the ``{}`` template)."""
        template = prompt if SLOT in prompt else prompt.replace(subject, SLOT, 1)
        with self.transaction() as conn:
            row = conn.execute("SELECT id FROM facts WHERE subject = ? AND template = ?",
                               (subject, template)).fetchone()
            if row is None:
                raise FactNotFoundError(f"no fact with subject {subject!r} and prompt {prompt!r}; "
                                        "see `kbsync facts list` for the facts in the store")
            return self._delete(conn, row[0], source)

    def remove_id(self, fact_id: int, *, source: str = "cli") -> Change:
        """Delete the fact with this id (as shown by ``kbsync facts list``)."""
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM facts WHERE id = ?", (fact_id,)).fetchone() is None:
                raise FactNotFoundError(f"no fact with id {fact_id}; see `kbsync facts list` for the facts")
            return self._delete(conn, fact_id, source)

    def import_file(self, path: str | Path, *, fmt: str | None = None, dialect: str | None = None,
                    force: bool = False) -> ImportResult:
        """Import a whole fact file in one transaction, or nothing (``InvalidFactsError`` names every problem).

        Bytes imported before (same sha256) are not applied again unless ``force``.
        """
        path = Path(path)
        return self.import_bytes(path.read_bytes(), str(path), name=path.name, fmt=fmt, dialect=dialect,
                                 force=force)

    def import_bytes(self, data: bytes, source: str, *, name: str | None = None, fmt: str | None = None,
                     dialect: str | None = None, force: bool = False) -> ImportResult:
        """As ``import_file``, for bytes already read; ``name`` picks the format by extension."""
        parsed = parse_fact_file(data, source, name=name, fmt=fmt, dialect=dialect)
        return self.import_parsed(parsed, source, force=force)

    def import_parsed(self, parsed: ParsedFile, source: str, *, force: bool = False) -> ImportResult:
        """Write a validated file's facts and record its sha256, in one transaction."""
        with self.transaction() as conn:
            seen = conn.execute("SELECT 1 FROM ingested_files WHERE sha256 = ?", (parsed.sha256,)).fetchone()
            if seen and not force:
                log.info("kb.import_duplicate", source=source, sha256=parsed.sha256)
                return ImportResult(source, parsed.sha256, parsed.records, len(parsed.facts), 0, duplicate=True)
            before = _last_change_id(conn)
            self._put(conn, parsed.facts)
            written = _last_change_id(conn) - before
            conn.execute("INSERT OR REPLACE INTO ingested_files (sha256, source, records, facts, changes) "
                         "VALUES (?, ?, ?, ?, ?)", (parsed.sha256, source, parsed.records, len(parsed.facts), written))
        log.info("kb.imported", source=source, sha256=parsed.sha256, facts=len(parsed.facts), changes=written)
        return ImportResult(source, parsed.sha256, parsed.records, len(parsed.facts), written)

    def is_ingested(self, sha256: str) -> bool:
        with self._lock:
            return self.conn.execute("SELECT 1 FROM ingested_files WHERE sha256 = ?", (sha256,)).fetchone() is not None

    # -- reading ------------------------------------------------------------------------------------------------

    def facts(self, *, subject: str | None = None, limit: int | None = None) -> list[Fact]:
        """Facts in the store, oldest first; optionally one subject's, at most ``limit``."""
        where, args = ("WHERE subject = ?", [subject]) if subject is not None else ("", [])
        sql = f"SELECT * FROM facts {where} ORDER BY id" + (" LIMIT ?" if limit is not None else "")
        with self.snapshot() as conn:
            cur = conn.execute(sql, args + ([limit] if limit is not None else []))
            cols = [d[0] for d in cur.description]
            return [_fact_from_row(dict(zip(cols, r))) for r in cur]

    def get(self, subject: str, prompt: str) -> Fact | None:
        """The fact with this key, or None (``prompt`` may be the full prompt or the template)."""
        template = prompt if SLOT in prompt else prompt.replace(subject, SLOT, 1)
        with self.snapshot() as conn:
            cur = conn.execute("SELECT * FROM facts WHERE subject = ? AND template = ?", (subject, template))
            row = cur.fetchone()
            return _fact_from_row(dict(zip([d[0] for d in cur.description], row))) if row else None

    def count(self) -> int:
        with self._lock:
            return self.conn.execute("SELECT count(*) FROM facts").fetchone()[0]

    # -- the daemon's side: the change log ---------------------------------------------------------------------

    def counts(self) -> Counts:
        """Facts in the store, pending changes (and their distinct keys), failed and applied changes."""
        return self.changes.counts()

    def next_batch(self, limit: int) -> Batch:
        """The next ≤ ``limit`` pending keys, each coalesced to its last change, oldest first."""
        return self.changes.next_batch(limit)

    def mark_applied(self, change_ids: Iterable[int], version_id: int) -> int:
        """Record, in one transaction, that version ``version_id`` carried these pending changes."""
        return self.changes.mark_applied(change_ids, version_id)

    def mark_failed(self, change_ids: Iterable[int], reason: str) -> int:
        """Record, in one transaction, that these pending changes failed and why."""
        return self.changes.mark_failed(change_ids, reason)

    # -- helpers ------------------------------------------------------------------------------------------------

    def _put(self, conn: sqlite3.Connection, facts: Iterable[Fact]) -> None:
        conn.executemany(_UPSERT, (
            (f.subject, f.template, f.target, json.dumps(list(f.paraphrases), ensure_ascii=False),
             probes_to_json(f.locality), f.provenance.source if f.provenance else "api",
             f.provenance.sha256 if f.provenance else None, f.provenance.record if f.provenance else None,
             (f.provenance.at if f.provenance else None) or now_iso(),
             (f.provenance.at if f.provenance else None) or now_iso())
            for f in facts))

    def _delete(self, conn: sqlite3.Connection, fact_id: int, source: str) -> Change:
        conn.execute("UPDATE facts SET deleted_by = ? WHERE id = ?", (source, fact_id))
        conn.execute("DELETE FROM facts WHERE id = ?", (fact_id,))
        row = conn.execute("SELECT * FROM changes WHERE id = ?", (_last_change_id(conn),)).fetchone()
        change = change_from_row(row, _columns(conn, "changes"))
        log.info("kb.fact_removed", subject=change.subject, template=change.template, source=source)
        return change


def _last_change_id(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT coalesce(max(id), 0) FROM changes").fetchone()[0]


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def _fact_from_row(r: dict) -> Fact:
    return Fact(r["subject"], r["template"], r["target"], tuple(json.loads(r["paraphrases"] or "[]")),
                probes_from_json(r["locality"]),
                Provenance(r["source"], r["source_sha256"], r["source_record"], r["updated_at"]), r["id"])
