"""What only PostgreSQL has: concurrent writers, NOTIFY wake-ups, lost connections, the editor lock, the schema.

The rest of ``tests/kb`` runs on both backends already (``kb_url`` is parametrized); these need a real server.
"""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kb import FactStore, MigrationError
from kb.listen import ChangeListener
from kb.migrations import Migration
from kb.migrations_pg import MIGRATIONS, migrate, uninstall_sql
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def url(postgres_cluster):
    return postgres_cluster.create_database()


@pytest.fixture
def pg(url):
    """A plain psycopg connection (autocommit), as another program of the team would hold one."""
    import psycopg
    with psycopg.connect(url, autocommit=True, options="-c search_path=kbsync") as conn:
        yield conn


def insert(conn, subject: str, target: str = "x") -> None:
    conn.execute("INSERT INTO facts (subject, template, target) VALUES (%s, '{} is', %s) "
                 "ON CONFLICT (subject, template) DO UPDATE SET target = excluded.target", (subject, target))


def test_a_change_committed_after_a_later_id_is_not_skipped(url, pg):
    """Writer A draws the lower change id but commits last; a batch taken in between must not lose it."""
    import psycopg
    with FactStore(url) as store, psycopg.connect(url, options="-c search_path=kbsync") as a:
        insert(a, "A")                                     # A's transaction: change id 1, not committed
        insert(pg, "B")                                    # B commits change id 2 first
        first = store.next_batch(10)
        assert [(e.change.subject, e.change.id) for e in first] == [("B", 2)]
        store.mark_applied(first.change_ids, 1)
        a.commit()                                         # now id 1 becomes visible, below the last id seen
        second = store.next_batch(10)
        assert [(e.change.subject, e.change.id) for e in second] == [("A", 1)]


def test_writes_to_one_key_commit_in_id_order(url, pg):
    """The second writer of a key waits on the first's row lock, so the key's last change is the last commit."""
    import psycopg
    with FactStore(url) as store, psycopg.connect(url, options="-c search_path=kbsync") as a:
        store.add("K", "K is", "first")
        insert(a, "K", "from A")                           # holds K's row lock
        t = threading.Thread(target=insert, args=(pg, "K", "from B"))
        t.start()
        wait_for(lambda: _waiting(url), 30, "B to wait on A's row lock")
        a.commit()
        t.join(30)
        (entry,) = store.next_batch(5)
        assert entry.change.target == "from B" and len(entry.change_ids) == 3


def _waiting(url) -> bool:
    import psycopg
    with psycopg.connect(url, autocommit=True) as c:
        return c.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()[0] > 0


WRITER = """
import sys, psycopg
url, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with psycopg.connect(url, options="-c search_path=kbsync") as conn:
    for i in range(n):
        conn.execute("INSERT INTO facts (subject, template, target) VALUES (%s, '{} is', 'x')", (f"{name}-{i}",))
        if i % 7 == 6:
            conn.execute("UPDATE facts SET target = 'y' WHERE subject = %s", (f"{name}-{i - 3}",))
        if i % 25 == 24:
            conn.commit()
"""


def test_concurrent_writer_processes_every_change_seen_exactly_once(url):
    writers, per = 4, 400
    with FactStore(url) as store:
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, f"w{k}", str(per)]) for k in range(writers)]
        seen: list[int] = []
        version = 0
        while True:
            running = any(p.poll() is None for p in procs)
            batch = store.next_batch(30)
            if len(batch):
                version += 1
                store.mark_applied(batch.change_ids, version)    # refuses any id that is not pending
                seen += batch.change_ids
            elif not running:
                break
        assert all(p.wait(60) == 0 for p in procs)
        expected = writers * (per + per // 7)
        ids = [c.id for c in store.changes.list()]
        assert len(ids) == expected and sorted(seen) == sorted(ids) and len(set(seen)) == len(seen)
        assert store.counts().pending == 0 and store.count() == writers * per


def test_listener_wakes_on_another_clients_commit_and_after_losing_its_connection(url, pg):
    with FactStore(url) as store:
        woken = threading.Event()
        listener = ChangeListener.for_store(store, on_change=woken.set)
        listener.start()
        try:
            wait_for(listener.listening.is_set, 30, "LISTEN")
            insert(pg, "A")
            assert woken.wait(30)
            woken.clear()
            pg.execute("BEGIN")
            insert(pg, "B")
            assert not woken.wait(0.2)                    # nothing before the commit (a short negative check)
            pg.execute("COMMIT")
            assert woken.wait(30)
            woken.clear()
            pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'")
            assert woken.wait(30)                         # reconnected: one wake-up for what it may have missed
            wait_for(listener.listening.is_set, 30, "LISTEN again")
            woken.clear()
            insert(pg, "C")
            assert woken.wait(30)
        finally:
            listener.stop()


def test_sqlite_has_no_listener(tmp_path):
    with FactStore(tmp_path / "kb.sqlite") as store:
        assert ChangeListener.for_store(store, on_change=lambda: None) is None


def test_store_reconnects_after_the_server_drops_its_connection(url, pg):
    with FactStore(url) as store:
        store.add("A", "A is", "x")
        pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                   "AND pid <> pg_backend_pid() AND query NOT LIKE 'LISTEN%'")
        store.add("B", "B is", "y")                       # the next transaction reconnects
        assert [f.subject for f in store.facts()] == ["A", "B"]


def test_editor_lock_is_held_by_one_process_at_a_time(url):
    a, b = FactStore(url), FactStore(url)
    try:
        assert a.db.try_editor_lock() and a.db.try_editor_lock()     # re-entrant for its holder
        assert not b.db.try_editor_lock()
        a.close()
        assert wait_for(b.db.try_editor_lock, 30, "the lock to pass on when its holder closes")
    finally:
        a.close()
        b.close()


def test_failed_migration_rolls_back_with_its_record(url):
    with FactStore(url) as store:
        conn = store.db._connection()
        broken = MIGRATIONS + (Migration(99, "broken", "CREATE TABLE half (x int);\nINSERT INTO nowhere VALUES (1);"),)
        with pytest.raises(MigrationError, match="migration 99 .broken. failed and was rolled back"):
            migrate(conn, broken)
        tables = {r[0] for r in store.db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'kbsync'")}
        assert "facts" in tables and "half" not in tables
        assert [r[0] for r in store.db.execute("SELECT id FROM kb_migrations ORDER BY id")] == [m.id for m in MIGRATIONS]


def test_kbsync_keeps_to_its_schema_and_uninstalls_cleanly(url):
    import psycopg
    with psycopg.connect(url, autocommit=True) as team:            # the team's own facts table, in public
        team.execute("CREATE TABLE public.facts (id serial PRIMARY KEY, subject text, target text)")
        team.execute("INSERT INTO public.facts (subject, target) VALUES ('theirs', 'kept')")
        with FactStore(url) as store:
            store.add("Ours", "Ours is", "x")
        team.execute("INSERT INTO kbsync.facts (subject, template, target) VALUES ('SQL', '{} is', 'y')")
        assert team.execute("SELECT count(*) FROM kbsync.changes").fetchone()[0] == 2
        team.execute(uninstall_sql())
        assert team.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'kbsync'").fetchone()[0] == 0
        assert team.execute("SELECT subject, target FROM public.facts").fetchall() == [("theirs", "kept")]
        assert team.execute("SELECT count(*) FROM pg_proc WHERE proname LIKE 'kb\\_%'").fetchone()[0] == 0


def test_a_bad_url_names_the_fix(tmp_path):
    from kb import KBError
    with pytest.raises(KBError, match="cannot connect to the PostgreSQL fact store.*Check that the server runs and that the .kb. url"):
        FactStore(f"postgresql://postgres@/nope?host={tmp_path}&connect_timeout=2")
    with pytest.raises(KBError, match="sqlite:/// or postgresql://"):
        FactStore("mysql://db/kb")


def test_facts_cli_on_postgresql(url, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from daemon.cli import cli
    monkeypatch.setenv("KBSYNC_KB_URL", url)
    runner = CliRunner()
    out = runner.invoke(cli, ["--state-dir", str(tmp_path / "state"), "facts", "add", "--subject", "Rome",
                                  "--prompt", "Rome is in", "--target", "Peru"])
    assert out.exit_code == 0, out.output
    with FactStore(url) as store:
        assert [(f.subject, f.target) for f in store.facts()] == [("Rome", "Peru")]
    assert not (tmp_path / "state" / "kb.sqlite").exists()
