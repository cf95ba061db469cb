"""Schema migrations of the knowledge-base database, each applied in the same transaction as its record.

Migrations are append-only: never edit one that has shipped; add the next number. Migration 2 adds the
ledger (``versions``, ``version_changes``, ``head``, ``head_log``) and the change status ``held``; migration 3
records pruned versions (``pruned_versions``).
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass


from .logger import get_logger
from .errors import MigrationError

log = get_logger("kbsync.kb")

_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
_CHANGE_COLS = "op, fact_id, subject, template, target, paraphrases, locality, source, source_sha256, source_record"


# Shared by migration 1 and migration 2 (which rebuilds ``changes`` and so re-creates them).
_CHANGES_INDEXES = """\
CREATE INDEX changes_pending ON changes (id) WHERE status = 'pending';
CREATE INDEX changes_pending_key ON changes (subject, template, id) WHERE status = 'pending';
CREATE INDEX changes_failed ON changes (id) WHERE status = 'failed';
CREATE INDEX changes_version ON changes (version_id) WHERE version_id IS NOT NULL;
"""

_FACTS_TRIGGERS = f"""\
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

"""

_CHANGES_TRIGGERS = """\
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
"""


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
{_CHANGES_INDEXES}
CREATE TABLE ingested_files (
    sha256  TEXT PRIMARY KEY,
    source  TEXT NOT NULL,
    records INTEGER NOT NULL,
    facts   INTEGER NOT NULL,
    changes INTEGER NOT NULL,
    at      TEXT NOT NULL DEFAULT ({_NOW})
);

{_FACTS_TRIGGERS}{_CHANGES_TRIGGERS}"""),
    Migration(2, "ledger: versions, HEAD and its log; change status held", f"""
-- SQLite cannot alter a CHECK in place: rebuild changes with 'held' allowed, as its documented 12-step recipe
-- does. The facts triggers name changes, so they are dropped first and re-created with the table's own.
DROP TRIGGER facts_insert;
DROP TRIGGER facts_update;
DROP TRIGGER facts_rekey;
DROP TRIGGER facts_delete;

CREATE TABLE changes_rebuilt (
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
    status        TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'applied', 'failed', 'held')),
    version_id    INTEGER,
    error         TEXT
);
INSERT INTO changes_rebuilt SELECT id, op, fact_id, subject, template, target, paraphrases, locality, source,
    source_sha256, source_record, at, status, version_id, error FROM changes;
CREATE TEMP TABLE kb_changes_seq AS SELECT seq FROM sqlite_sequence WHERE name = 'changes';
DROP TABLE changes;
ALTER TABLE changes_rebuilt RENAME TO changes;
DELETE FROM sqlite_sequence WHERE name IN ('changes', 'changes_rebuilt');
INSERT INTO sqlite_sequence (name, seq) SELECT 'changes', seq FROM kb_changes_seq;
DROP TABLE temp.kb_changes_seq;
{_CHANGES_INDEXES}CREATE INDEX changes_held ON changes (id) WHERE status = 'held';
{_FACTS_TRIGGERS}{_CHANGES_TRIGGERS}
-- One row per applied step: immutable once written; its blob is content-addressed by blob_sha256.
CREATE TABLE versions (
    id                INTEGER PRIMARY KEY,
    parent            INTEGER REFERENCES versions (id),
    created_at        TEXT NOT NULL DEFAULT ({_NOW}),
    config_digest     TEXT NOT NULL,
    model_fingerprint TEXT NOT NULL,
    blob_sha256       TEXT NOT NULL CHECK (length(blob_sha256) = 64),
    blob_bytes        INTEGER NOT NULL CHECK (blob_bytes > 0),
    n_facts           INTEGER NOT NULL,
    metrics           TEXT NOT NULL DEFAULT '{{}}' CHECK (json_valid(metrics) AND json_type(metrics) = 'object'),
    note              TEXT,
    CHECK (parent IS NULL OR parent < id)
);
CREATE INDEX versions_parent ON versions (parent);

-- Which change rows each version carries (a revert carries the same changes again, in a new version).
CREATE TABLE version_changes (
    version_id INTEGER NOT NULL REFERENCES versions (id),
    change_id  INTEGER NOT NULL REFERENCES changes (id),
    PRIMARY KEY (version_id, change_id)
) WITHOUT ROWID;
CREATE INDEX version_changes_change ON version_changes (change_id, version_id);

-- The one HEAD pointer (NULL: the base model) and the append-only log of its moves.
CREATE TABLE head (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    version_id INTEGER REFERENCES versions (id)
);
INSERT INTO head (id, version_id) VALUES (1, NULL);

CREATE TABLE head_log (
    id           INTEGER PRIMARY KEY,
    at           TEXT NOT NULL DEFAULT ({_NOW}),
    actor        TEXT NOT NULL,
    from_version INTEGER REFERENCES versions (id),
    to_version   INTEGER REFERENCES versions (id),
    reason       TEXT NOT NULL
);

CREATE TRIGGER versions_no_update BEFORE UPDATE ON versions BEGIN
    SELECT RAISE(ABORT, 'kbsync versions are immutable: commit a new version instead');
END;
CREATE TRIGGER versions_no_delete BEFORE DELETE ON versions BEGIN
    SELECT RAISE(ABORT, 'kbsync versions are immutable: move HEAD instead of deleting one');
END;
CREATE TRIGGER version_changes_no_update BEFORE UPDATE ON version_changes BEGIN
    SELECT RAISE(ABORT, 'kbsync versions are immutable: the changes a version carries cannot change');
END;
CREATE TRIGGER version_changes_no_delete BEFORE DELETE ON version_changes BEGIN
    SELECT RAISE(ABORT, 'kbsync versions are immutable: the changes a version carries cannot change');
END;
CREATE TRIGGER head_no_delete BEFORE DELETE ON head BEGIN
    SELECT RAISE(ABORT, 'the kbsync HEAD row cannot be deleted: set its version_id (NULL is the base model)');
END;
CREATE TRIGGER head_log_no_update BEFORE UPDATE ON head_log BEGIN
    SELECT RAISE(ABORT, 'the kbsync HEAD log is append-only: rows cannot be changed');
END;
CREATE TRIGGER head_log_no_delete BEFORE DELETE ON head_log BEGIN
    SELECT RAISE(ABORT, 'the kbsync HEAD log is append-only: rows cannot be deleted');
END;
"""),
    Migration(3, "pruned versions", f"""
-- Versions whose delta blob `kbsync prune` deleted: the version row and what it carried stay as history, the
-- weights are gone, so HEAD can no longer move there. Append-only, like the HEAD log.
CREATE TABLE pruned_versions (
    version_id INTEGER PRIMARY KEY REFERENCES versions (id),
    at         TEXT NOT NULL DEFAULT ({_NOW}),
    actor      TEXT NOT NULL,
    reason     TEXT NOT NULL
);
CREATE TRIGGER pruned_versions_no_update BEFORE UPDATE ON pruned_versions BEGIN
    SELECT RAISE(ABORT, 'a pruned version stays pruned: its weights are gone');
END;
CREATE TRIGGER pruned_versions_no_delete BEFORE DELETE ON pruned_versions BEGIN
    SELECT RAISE(ABORT, 'a pruned version stays pruned: its weights are gone');
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
