"""The fact store on a real SQLite file and a real PostgreSQL database: schema, migrations, keys, updates, deletes, raw SQL capture."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading

import pytest

from kb import FactNotFoundError, FactStore, InvalidFactsError, MigrationError
from kb.migrations import MIGRATIONS, Migration, migrate

from .conftest import fact, jsonl


def changes(store):
    return [(c.op, c.subject, c.template, c.target) for c in store.changes.list()]


# -- the database ----------------------------------------------------------------------------------------------

def test_wal_busy_timeout_and_recorded_migrations(tmp_path):
    path = tmp_path / "kb.sqlite"
    FactStore(path).close()
    with FactStore(path) as store:          # reopening applies nothing twice
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.db.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000


def test_migrations_are_recorded_and_applied_once(kb_url):
    FactStore(kb_url).close()
    with FactStore(kb_url) as store:          # reopening applies nothing twice
        rows = store.db.execute("SELECT id, name FROM kb_migrations ORDER BY id").fetchall()
        assert [tuple(r) for r in rows] == [(m.id, m.name) for m in MIGRATIONS]


def test_failed_migration_rolls_back_with_its_record(tmp_path):
    conn = sqlite3.connect(tmp_path / "m.sqlite", isolation_level=None)
    broken = MIGRATIONS + (Migration(99, "broken", "CREATE TABLE half (x);\nINSERT INTO nowhere VALUES (1);"),)
    with pytest.raises(MigrationError, match="migration 99 .broken. failed and was rolled back"):
        migrate(conn, broken)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "facts" in tables and "half" not in tables
    assert [r[0] for r in conn.execute("SELECT id FROM kb_migrations")] == [m.id for m in MIGRATIONS]


def test_database_from_a_newer_kbsync_is_refused(kb_url):
    with FactStore(kb_url) as store:
        store.db.execute("INSERT INTO kb_migrations (id, name) VALUES (1000, 'from the future')")
    with pytest.raises(MigrationError, match=r"\[1000\].*upgrade kbsync"):
        FactStore(kb_url)


def test_kb_never_imports_torch():
    code = ("import sys, kb, kb.drops, kb.facts, kb.changes, kb.formats, kb.validation, daemon.cli.facts\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- keys, updates, deletes ------------------------------------------------------------------------------------

def test_key_is_subject_and_template(store):
    first = store.add("Paris", "Paris is the capital of", "France")
    assert first.op == "upsert" and first.target == "France"
    assert store.add("Paris", "{} is the capital of", "France") is None        # the same key, the same target
    update = store.add("Paris", "{} is the capital of", "Texas")
    assert update.target == "Texas" and store.count() == 1
    other = store.add("Paris", "Paris lies in", "France")                      # another template: another key
    assert other.template == "{} lies in" and store.count() == 2
    assert changes(store) == [("upsert", "Paris", "{} is the capital of", "France"),
                              ("upsert", "Paris", "{} is the capital of", "Texas"),
                              ("upsert", "Paris", "{} lies in", "France")]


def test_paraphrase_change_is_a_change_but_provenance_is_not(store, write):
    store.add("S", "S is", "x", paraphrases=["About S:"])
    store.import_file(write("same.jsonl", jsonl([{"subject": "S", "prompt": "S is", "target": "x",
                                                   "paraphrases": ["About S:"]}])))
    assert len(changes(store)) == 1                   # nothing new: no change, provenance kept
    assert store.get("S", "S is").provenance.source == "cli"
    store.add("S", "S is", "x", paraphrases=["Regarding S,"])
    assert len(changes(store)) == 2


def test_remove_is_an_event_with_its_source(store):
    store.add("S", "S is", "x")
    change = store.remove("S", "S is", source="cli:rm")
    assert (change.op, change.target, change.provenance.source) == ("delete", None, "cli:rm")
    assert store.count() == 0 and store.get("S", "S is") is None
    with pytest.raises(FactNotFoundError, match="kbsync facts list"):
        store.remove("S", "S is")
    with pytest.raises(FactNotFoundError):
        store.remove_id(12345)


def test_provenance_of_imported_facts(store, write):
    path = write("p.jsonl", jsonl([fact(1), fact(2)]))
    result = store.import_file(path)
    f = store.get("S2", "The thing about S2 is")
    assert (f.provenance.source, f.provenance.sha256, f.provenance.record) == (str(path), result.sha256, 2)
    assert f.provenance.at.endswith("Z")
    row = store.db.execute("SELECT source, records, facts, changes FROM ingested_files").fetchone()
    assert row == (str(path), 2, 2, 2)


def test_import_is_all_or_nothing(store, write):
    store.add("Keep", "Keep is", "kept")
    records = [fact(i) for i in range(100)] + [{"subject": "bad"}] + [fact(i) for i in range(100, 200)]
    with pytest.raises(InvalidFactsError) as e:
        store.import_file(write("bad.jsonl", jsonl(records)))
    assert [(p.record, p.field) for p in e.value.problems] == [(101, "prompt"), (101, "target")]
    assert "nothing was imported" in str(e.value)
    assert store.count() == 1 and len(changes(store)) == 1
    assert store.db.execute("SELECT count(*) FROM ingested_files").fetchone()[0] == 0


def test_same_bytes_twice_are_not_applied_twice(store, write):
    path = write("a.jsonl", jsonl([fact(1), fact(2)]))
    assert store.import_file(path).changes == 2
    store.remove("S1", "The thing about S1 is")
    again = store.import_file(path)
    assert again.duplicate and again.changes == 0 and store.count() == 1
    forced = store.import_file(path, force=True)
    assert not forced.duplicate and forced.changes == 1 and store.count() == 2


def test_a_failing_write_inside_import_rolls_everything_back(store, write):
    store.add("Keep", "Keep is", "kept")
    if store.db.dialect == "sqlite":
        store.db.execute("CREATE TRIGGER boom BEFORE INSERT ON ingested_files BEGIN SELECT RAISE(ABORT, 'boom'); END")
    else:
        store.db.execute("CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                         "RAISE EXCEPTION USING MESSAGE = 'boom', ERRCODE = 'integrity_constraint_violation'; END $$")
        store.db.execute("CREATE TRIGGER boom BEFORE INSERT ON ingested_files FOR EACH ROW EXECUTE FUNCTION boom()")
    with pytest.raises(store.db.IntegrityError, match="boom"):
        store.import_file(write("a.jsonl", jsonl([fact(i) for i in range(50)])))
    assert store.count() == 1 and len(changes(store)) == 1


# -- raw SQL from another program ------------------------------------------------------------------------------

def test_plain_sql_writes_from_another_connection_are_captured(store, other_program):
    other = other_program()                                      # another program: no kbsync code at all
    other.execute("INSERT INTO facts (subject, template, target) VALUES ('Rome', '{} is in', 'Italy')")
    other.execute("UPDATE facts SET target = 'Spain' WHERE subject = 'Rome'")
    other.execute("UPDATE facts SET updated_at = 'later', source = 'etl' WHERE subject = 'Rome'")   # no content
    other.execute("UPDATE facts SET template = '{} lies in' WHERE subject = 'Rome'")                 # a new key
    other.execute("INSERT OR REPLACE INTO facts (subject, template, target) VALUES ('Rome', '{} lies in', 'Peru')"
                  if other.dialect == "sqlite" else
                  "INSERT INTO facts (subject, template, target) VALUES ('Rome', '{} lies in', 'Peru') "
                  "ON CONFLICT (subject, template) DO UPDATE SET target = excluded.target")
    other.execute("DELETE FROM facts WHERE subject = 'Rome'")
    assert changes(store) == [("upsert", "Rome", "{} is in", "Italy"), ("upsert", "Rome", "{} is in", "Spain"),
                              ("delete", "Rome", "{} is in", None), ("upsert", "Rome", "{} lies in", "Spain"),
                              ("upsert", "Rome", "{} lies in", "Peru"), ("delete", "Rome", "{} lies in", None)]
    assert store.changes.list()[0].provenance.source == "sql"
    assert store.changes.list()[-1].provenance.source == "sql"
    assert store.counts().pending_keys == 2


def test_schema_refuses_facts_without_a_template_slot(store):
    with pytest.raises(store.db.IntegrityError, match="(?i)check"):
        store.db.execute("INSERT INTO facts (subject, template, target) VALUES ('Rome', 'Rome is in', 'Italy')")
    with pytest.raises(store.db.Error, match="(?i)check|json"):       # PostgreSQL: "invalid ... type json"
        store.db.execute("INSERT INTO facts (subject, template, target, paraphrases) "
                         "VALUES ('Rome', '{} is in', 'Italy', 'not json')")
    with pytest.raises(store.db.IntegrityError, match="(?i)check"):
        store.db.execute("INSERT INTO facts (subject, template, target, paraphrases) "
                         "VALUES ('Rome', '{} is in', 'Italy', '{\"a\": 1}')")
    assert changes(store) == []


def test_change_log_is_append_only(store):
    store.add("S", "S is", "x")
    with pytest.raises(store.db.IntegrityError, match="append-only"):
        store.db.execute("UPDATE changes SET target = 'y'")
    with pytest.raises(store.db.IntegrityError, match="append-only"):
        store.db.execute("DELETE FROM changes")
    store.db.execute("UPDATE changes SET error = 'allowed'")          # only outcome columns may change
    assert changes(store) == [("upsert", "S", "{} is", "x")]


def test_one_store_shared_by_threads(store):
    def writer(k):
        for i in range(50):
            store.add(f"T{k}-{i}", f"T{k}-{i} is", "x")
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count() == 200 and store.counts().pending == 200


def test_two_stores_on_one_database_wait_for_each_other(kb_url, write):
    a, b = FactStore(kb_url), FactStore(kb_url, busy_timeout_s=5)
    try:
        with a.transaction():
            a.add("A", "A is", "x")
            done = []
            t = threading.Thread(target=lambda: done.append(b.import_file(write("b.jsonl", jsonl([fact(1)])))))
            t.start()
            t.join(0.3)
            assert t.is_alive()                 # b waits on a's write lock instead of failing
        t.join(10)
        assert done and done[0].changes == 1 and b.count() == 2
    finally:
        a.close()
        b.close()
