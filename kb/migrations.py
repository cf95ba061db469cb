"""Schema migrations of the knowledge-base database, each applied in the same transaction as its record.

Migrations are append-only: never edit one that has shipped; add the next number. A later issue's ledger
adds its ``versions`` table here; ``changes.version_id`` is the column it will reference.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import structlog

from .errors import MigrationError

log = structlog.get_logger("kbsync.kb")

_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
_CHANGE_COLS = "op, fact_id, subject, template, target, paraphrases, locality, source, source_sha256, source_record"


@dataclass(frozen=True)
class Migration:
    id: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "facts, change log, ingested files", f"""
CREATE TABLE facts (
    id            INTEGER PRIMARY KEY,
    subject       TEXT NOT NULL CHECK (length(trim(subject)) > 0),
    template      TEXT NOT NULL CHECK (instr(template, '{{}}') > 0),
    target        TEXT NOT NULL CHECK (length(trim(target)) > 0),
    paraphrases   TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(paraphrases) AND json_type(paraphrases) = 'array'),
    locality      TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(locality) AND json_type(locality) = 'array'),
    source        TEXT NOT NULL DEFAULT 'sql',
    source_sha256 TEXT,
    source_record INTEGER,
    added_at      TEXT NOT NULL DEFAULT ({_NOW}),
    updated_at    TEXT NOT NULL DEFAULT ({_NOW}),
    deleted_by    TEXT,
    UNIQUE (subject, template)
);

CREATE TABLE changes (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    op            TEXT NOT NULL CHECK (op IN ('upsert', 'delete')),
    fact_id       INTEGER,
    subject       TEXT NOT NULL,
    template      TEXT NOT NULL,
    target        TEXT,
    paraphrases   TEXT,
    locality      TEXT,
    source        TEXT NOT NULL,
    source_sha256 TEXT,
    source_record INTEGER,
    at            TEXT NOT NULL DEFAULT ({_NOW}),
    status        TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'applied', 'failed')),
    version_id    INTEGER,
    error         TEXT
);
CREATE INDEX changes_pending ON changes (id) WHERE status = 'pending';
CREATE INDEX changes_pending_key ON changes (subject, template, id) WHERE status = 'pending';
CREATE INDEX changes_failed ON changes (id) WHERE status = 'failed';
CREATE INDEX changes_version ON changes (version_id) WHERE version_id IS NOT NULL;

CREATE TABLE ingested_files (
    sha256  TEXT PRIMARY KEY,
    source  TEXT NOT NULL,
    records INTEGER NOT NULL,
    facts   INTEGER NOT NULL,
    changes INTEGER NOT NULL,
    at      TEXT NOT NULL DEFAULT ({_NOW})
);

-- Every write to facts, by kbsync or by any other program's plain SQL, lands in the change log.
CREATE TRIGGER facts_insert AFTER INSERT ON facts BEGIN
    INSERT INTO changes ({_CHANGE_COLS}) VALUES ('upsert', NEW.id, NEW.subject, NEW.template, NEW.target,
        NEW.paraphrases, NEW.locality, NEW.source, NEW.source_sha256, NEW.source_record);
END;

CREATE TRIGGER facts_update AFTER UPDATE ON facts
WHEN OLD.subject IS NEW.subject AND OLD.template IS NEW.template
 AND (OLD.target IS NOT NEW.target OR OLD.paraphrases IS NOT NEW.paraphrases OR OLD.locality IS NOT NEW.locality)
BEGIN
    INSERT INTO changes ({_CHANGE_COLS}) VALUES ('upsert', NEW.id, NEW.subject, NEW.template, NEW.target,
        NEW.paraphrases, NEW.locality, NEW.source, NEW.source_sha256, NEW.source_record);
END;

CREATE TRIGGER facts_rekey AFTER UPDATE ON facts
WHEN OLD.subject IS NOT NEW.subject OR OLD.template IS NOT NEW.template
BEGIN
    INSERT INTO changes ({_CHANGE_COLS}) VALUES ('delete', OLD.id, OLD.subject, OLD.template, NULL, NULL, NULL,
        NEW.source, NEW.source_sha256, NEW.source_record);
    INSERT INTO changes ({_CHANGE_COLS}) VALUES ('upsert', NEW.id, NEW.subject, NEW.template, NEW.target,
        NEW.paraphrases, NEW.locality, NEW.source, NEW.source_sha256, NEW.source_record);
END;

CREATE TRIGGER facts_delete AFTER DELETE ON facts BEGIN
    INSERT INTO changes ({_CHANGE_COLS}) VALUES ('delete', OLD.id, OLD.subject, OLD.template, NULL, NULL, NULL,
        coalesce(OLD.deleted_by, 'sql'), NULL, NULL);
END;

-- The change log is append-only: only status, version_id and error may change after a row is written.
CREATE TRIGGER changes_no_delete BEFORE DELETE ON changes BEGIN
    SELECT RAISE(ABORT, 'the kbsync change log is append-only: rows cannot be deleted');
END;

CREATE TRIGGER changes_no_rewrite
BEFORE UPDATE OF id, op, fact_id, subject, template, target, paraphrases, locality, source, source_sha256,
                 source_record, at ON changes
BEGIN
    SELECT RAISE(ABORT, 'the kbsync change log is append-only: only status, version_id and error may change');
END;
"""),
)


def migrate(conn: sqlite3.Connection, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Apply every migration not yet recorded; returns the ids applied. Safe against concurrent openers."""
    conn.execute("CREATE TABLE IF NOT EXISTS kb_migrations (id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                 f"applied_at TEXT NOT NULL DEFAULT ({_NOW}))")
    known = {m.id for m in migrations}
    newer = [i for (i,) in conn.execute("SELECT id FROM kb_migrations") if i not in known]
    if newer:
        raise MigrationError(f"the knowledge base has schema migrations {newer} that this kbsync does not know: "
                             "upgrade kbsync (or use the kbsync that wrote this database)")
    applied = []
    for m in migrations:
        if conn.execute("SELECT 1 FROM kb_migrations WHERE id = ?", (m.id,)).fetchone():
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            if not conn.execute("SELECT 1 FROM kb_migrations WHERE id = ?", (m.id,)).fetchone():
                for statement in _statements(m.sql):
                    conn.execute(statement)
                conn.execute("INSERT INTO kb_migrations (id, name) VALUES (?, ?)", (m.id, m.name))
                applied.append(m.id)
        except sqlite3.Error as e:
            conn.execute("ROLLBACK")
            raise MigrationError(f"schema migration {m.id} ({m.name}) failed and was rolled back: {e}") from e
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        log.info("kb.migrated", migration=m.id, name=m.name)
    return applied


def _statements(script: str) -> list[str]:
    """Split a script into statements (triggers included) without ``executescript``'s implicit COMMIT."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        if line.lstrip().startswith("--") and not buf.strip():
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        raise MigrationError(f"incomplete SQL statement in a migration: {buf.strip()[:80]}")
    return out
