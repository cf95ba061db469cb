"""The fact store: facts, their change log and ingested files, in SQLite (the default) or PostgreSQL.

Writes go to the ``facts`` table with plain SQL; triggers put every effective change into the append-only
``changes`` table, so another program writing SQL straight into ``facts`` is captured the same way.
One ``FactStore`` may be shared between threads: its ``Database`` (``kb.db``) serialises the connection.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path


from .logger import get_logger
from .changes import ChangeLog, change_from_cursor
from .db import Database, open_database
from .errors import FactNotFoundError
from .records import (SLOT, Batch, Change, Counts, Fact, ImportResult, LocalityProbe, Provenance,
                      probes_from_json, probes_to_json)
from .validation import ParsedFile, now_iso, parse_fact_file, validate_fact

log = get_logger("kbsync.kb")

_FACT_COLS = ("subject", "template", "target", "paraphrases", "locality", "source", "source_sha256", "source_record",
              "added_at", "updated_at")


def _on_conflict(differ: str) -> str:
    """The upsert's conflict clause: update a fact by its key only when its content changed (one change each)."""
    return f"""
ON CONFLICT (subject, template) DO UPDATE SET
    target = excluded.target, paraphrases = excluded.paraphrases, locality = excluded.locality,
    source = excluded.source, source_sha256 = excluded.source_sha256, source_record = excluded.source_record,
    updated_at = excluded.updated_at
WHERE facts.target {differ} excluded.target OR facts.paraphrases {differ} excluded.paraphrases
   OR facts.locality {differ} excluded.locality"""


def _upsert(db: Database) -> str:
    """Insert or update one fact by its key; a row counts only when the content changed (one change each)."""
    return (f"INSERT INTO facts ({', '.join(_FACT_COLS)}) VALUES ({', '.join('?' * len(_FACT_COLS))})"
            + _on_conflict(db.differ))


class FactStore:
    """The knowledge base at ``path`` (created, and migrated to the current schema, on open).

    Example::

        with FactStore(state_dir / "kb.sqlite") as store:
            store.import_file(Path("facts.jsonl"))
            batch = store.next_batch(30)
            ...
            store.mark_applied(batch.change_ids, version_id=7)
    """

    def __init__(self, url: str | Path, *, busy_timeout_s: float = 30.0):
        self.db = open_database(url, busy_timeout_s=busy_timeout_s)
        #: The SQLite file (None on PostgreSQL).
        self.path: Path | None = getattr(self.db, "path", None)
        self._upsert_sql = _upsert(self.db)
        self.changes = ChangeLog(self.db)

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> FactStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def url(self) -> str:
        return self.db.url

    def transaction(self):
        """A write transaction, serialised with other kbsync writers; nested use becomes a savepoint."""
        return self.db.transaction()

    def snapshot(self):
        """A consistent read (one read transaction), or the current transaction when inside one."""
        return self.db.snapshot()

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
            changed = self._put(conn, [fact])
            change = _last_change(conn, fact.subject, fact.template) if changed else None
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
            written = self._put(conn, parsed.facts)
            conn.execute("INSERT INTO ingested_files (sha256, source, records, facts, changes) VALUES (?, ?, ?, ?, ?) "
                         "ON CONFLICT (sha256) DO UPDATE SET source = excluded.source, records = excluded.records, "
                         "facts = excluded.facts, changes = excluded.changes, at = excluded.at",
                         (parsed.sha256, source, parsed.records, len(parsed.facts), written))
        log.info("kb.imported", source=source, sha256=parsed.sha256, facts=len(parsed.facts), changes=written)
        return ImportResult(source, parsed.sha256, parsed.records, len(parsed.facts), written)

    def is_ingested(self, sha256: str) -> bool:
        with self.snapshot() as conn:
            return conn.execute("SELECT 1 FROM ingested_files WHERE sha256 = ?", (sha256,)).fetchone() is not None

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
        with self.snapshot() as conn:
            return conn.execute("SELECT count(*) FROM facts").fetchone()[0]

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

    def _put(self, conn, facts: Iterable[Fact]) -> int:
        """Upsert facts; returns how many changed (each wrote exactly one change row through the triggers).

        A key given twice counts once, with its last record (a file may repeat a fact; the last one wins)."""
        last: dict[tuple[str, str], Fact] = {}
        for f in facts:
            last.pop((f.subject, f.template), None)
            last[(f.subject, f.template)] = f
        rows = [_fact_row(f) for f in last.values()]
        if self.db.dialect == "postgresql" and len(rows) > _COPY_FROM:
            return _copy_upsert(conn, rows, self.db.differ)
        return max(conn.executemany(self._upsert_sql, rows).rowcount, 0)

    def _delete(self, conn, fact_id: int, source: str) -> Change:
        conn.execute("UPDATE facts SET deleted_by = ? WHERE id = ?", (source, fact_id))
        subject, template = conn.execute("DELETE FROM facts WHERE id = ? RETURNING subject, template",
                                         (fact_id,)).fetchone()
        change = _last_change(conn, subject, template)
        log.info("kb.fact_removed", subject=change.subject, template=change.template, source=source)
        return change


def _fact_row(f: Fact) -> tuple:
    at = (f.provenance.at if f.provenance else None) or now_iso()
    return (f.subject, f.template, f.target, json.dumps(list(f.paraphrases), ensure_ascii=False),
            probes_to_json(f.locality), f.provenance.source if f.provenance else "api",
            f.provenance.sha256 if f.provenance else None, f.provenance.record if f.provenance else None, at, at)


#: Above this many facts, PostgreSQL imports through COPY into a staging table and one INSERT ... SELECT.
_COPY_FROM = 200
#: After a bulk import of this many facts, PostgreSQL's planner statistics are refreshed in the same transaction.
_ANALYZE_FROM = 10_000


def _copy_upsert(conn, rows: list[tuple], differ: str) -> int:
    """PostgreSQL's bulk path: COPY is ~10x faster than row-by-row statements; the triggers still log each change."""
    raw = conn.raw
    raw.execute("CREATE TEMP TABLE IF NOT EXISTS kb_stage (seq bigint, subject text, template text, target text, "
                "paraphrases text, locality text, source text, source_sha256 text, source_record integer, "
                "added_at text, updated_at text) ON COMMIT DELETE ROWS")
    cols = ", ".join(_FACT_COLS)
    with raw.cursor().copy(f"COPY kb_stage (seq, {cols}) FROM STDIN") as copy:
        for seq, row in enumerate(rows):
            copy.write_row((seq, *row))
    cur = raw.execute(f"INSERT INTO facts ({cols}) SELECT {cols} FROM kb_stage ORDER BY seq" + _on_conflict(differ))
    n = cur.rowcount
    raw.execute("TRUNCATE kb_stage")
    if len(rows) >= _ANALYZE_FROM:     # fresh statistics, or the planner sorts the whole queue for the next batch
        raw.execute("ANALYZE facts")
        raw.execute("ANALYZE changes")
    return max(n, 0)


def _last_change(conn, subject: str, template: str) -> Change:
    """The newest pending change of a key. Called right after this transaction wrote the key's fact row, whose
    row lock keeps other writers of the key waiting until we commit: so it is the change we wrote."""
    cur = conn.execute("SELECT * FROM changes WHERE status = 'pending' AND subject = ? AND template = ? "
                       "ORDER BY id DESC LIMIT 1", (subject, template))
    return change_from_cursor(cur)[0]


def _fact_from_row(r: dict) -> Fact:
    return Fact(r["subject"], r["template"], r["target"], tuple(json.loads(r["paraphrases"] or "[]")),
                probes_from_json(r["locality"]),
                Provenance(r["source"], r["source_sha256"], r["source_record"], r["updated_at"]), r["id"])
