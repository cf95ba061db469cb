"""The knowledge base's database: one connection, its lock, transactions and migrations, on SQLite or PostgreSQL.

``FactStore``, ``ChangeLog`` and ``Ledger`` share one ``Database``; it is the only place that opens a
connection, starts or ends a transaction, or knows which dialect it talks to. The rest of ``kb`` writes portable
SQL with ``?`` placeholders; where the dialects differ (upsert comparison, string aggregation) it asks the
``Database`` for the fragment.

Open one with ``open_database(url)``:

- ``sqlite:///relative/path.sqlite``, ``sqlite:////absolute/path.sqlite`` or a plain path: a SQLite file in WAL
  mode (the embedded default).
- ``postgresql://user@host/dbname`` (any libpq URL, e.g. ``postgresql:///kb?host=/run/postgresql``): a
  PostgreSQL 13+ database, through psycopg 3 (``pip install 'kbsync[postgresql]'``).

Write transactions are serialised between kbsync processes on both backends: SQLite's ``BEGIN IMMEDIATE`` takes
the database's write lock, and on PostgreSQL every kbsync write transaction takes one transaction-level advisory
lock. Plain SQL from other programs is not serialised: the triggers and row locks make it safe (docs/facts.md).
"""
from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit


from .logger import get_logger
from .errors import KBError

log = get_logger("kbsync.kb")

#: The advisory lock every kbsync write transaction holds on PostgreSQL (``pg_advisory_xact_lock``).
WRITE_LOCK_KEY = 0x6B6273796E63          # "kbsync"
#: The session-level advisory lock of the one process that edits (``Database.try_editor_lock``).
EDITOR_LOCK_KEY = WRITE_LOCK_KEY + 1
#: The channel the PostgreSQL triggers NOTIFY when the change log grows (``ChangeListener``).
CHANGES_CHANNEL = "kbsync_changes"
#: The channel the PostgreSQL triggers NOTIFY when HEAD moves (payload: the version id, or "base").
HEAD_CHANNEL = "kbsync_head"
#: The PostgreSQL schema holding kbsync's tables and trigger functions.
SCHEMA = "kbsync"


class DatabaseURLError(KBError, ValueError):
    """The ``[kb] url`` (or a path given for it) is not a database kbsync can open."""


def open_database(url: str | Path, *, busy_timeout_s: float = 30.0) -> Database:
    """The database at ``url`` (see the module docstring), created and migrated to the current schema."""
    text = str(url)
    scheme = text.split(":", 1)[0].lower() if "://" in text else ""
    if scheme in ("", "file"):
        return SqliteDatabase(Path(text[len("file://"):] if scheme else text), busy_timeout_s=busy_timeout_s)
    if scheme == "sqlite":
        path = unquote(urlsplit(text).path)
        if not path.startswith("/") or path == "/":
            raise DatabaseURLError(f"bad SQLite URL {text!r}: give a file, e.g. sqlite:///state/kb.sqlite "
                                   "(relative) or sqlite:////var/lib/kbsync/kb.sqlite (absolute)")
        return SqliteDatabase(Path(path[1:]), busy_timeout_s=busy_timeout_s)
    if scheme in ("postgresql", "postgres"):
        return PostgresDatabase(text, busy_timeout_s=busy_timeout_s)
    raise DatabaseURLError(f"kbsync cannot open {text!r}: the [kb] url must start with sqlite:/// or "
                           "postgresql:// (or be a path to a SQLite file)")


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and status)."""
    return re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", url)


class Database:
    """What ``kb`` needs of a database; ``SqliteDatabase`` and ``PostgresDatabase`` implement it."""

    dialect: str = ""
    url: str = ""
    #: The fragment comparing two nullable values for "differ" (SQLite ``IS NOT``, PostgreSQL ``IS DISTINCT FROM``).
    differ: str = "IS NOT"
    #: The exception classes of this backend's driver: any database error, and a constraint violation.
    Error: type[Exception] = sqlite3.Error
    IntegrityError: type[Exception] = sqlite3.IntegrityError

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._depth = 0

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transactions -------------------------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator:
        """A write transaction, serialised with other kbsync writers; nested use is a savepoint.

        Commits when the block ends, rolls back (only the savepoint, when nested) when it raises.
        """
        with self.lock:
            conn = self._connection()
            name = f"kb_sp{self._depth}"
            nested = self._in_transaction()
            if nested:
                conn.execute(f"SAVEPOINT {name}")
            else:
                conn = self._begin(conn, self._begin_write)
            self._depth += 1
            try:
                yield conn
            except BaseException:
                self._rollback(conn, name if nested else None)
                raise
            else:
                conn.execute(f"RELEASE {name}" if nested else "COMMIT")
            finally:
                self._depth -= 1

    @contextmanager
    def snapshot(self) -> Iterator:
        """A consistent read (one read transaction), or the current transaction when inside one."""
        with self.lock:
            conn = self._connection()
            if self._in_transaction():
                yield conn
                return
            conn = self._begin(conn, self._begin_read)
            try:
                yield conn
            finally:
                if self._in_transaction():
                    conn.execute("COMMIT")

    def _begin(self, conn, begin):
        """Start a transaction; if the connection turns out dead (server restart, idle kill), reconnect once.

        Safe to retry: nothing of the transaction has run yet."""
        try:
            begin(conn)
            return conn
        except self.Error:
            if not self._lost():
                raise
            conn = self._connection()
            begin(conn)
            return conn

    def _lost(self) -> bool:
        """Whether the connection broke (then ``_connection`` makes a new one)."""
        return False

    def execute(self, sql: str, params: Sequence = ()):
        """Run one statement on its own (autocommit; inside an open transaction, as part of it).

        For plain SQL outside the store's API, e.g. an operator's fix or a test acting as another program.
        """
        with self.lock:
            return self._connection().execute(sql, params)

    # -- dialect fragments --------------------------------------------------------------------------------------

    def group_concat(self, expr: str) -> str:
        """An aggregate joining ``expr`` (an integer column) with commas."""
        return f"group_concat({expr})"

    # -- backend ------------------------------------------------------------------------------------------------

    def try_editor_lock(self) -> bool:
        """Become the one process that edits (held until ``close``); False when another process holds it."""
        raise NotImplementedError

    def _connection(self):
        raise NotImplementedError

    def _in_transaction(self) -> bool:
        raise NotImplementedError

    def _begin_write(self, conn) -> None:
        raise NotImplementedError

    def _begin_read(self, conn) -> None:
        conn.execute("BEGIN")

    def _rollback(self, conn, savepoint: str | None) -> None:
        if not self._in_transaction():          # the database may already have rolled back (e.g. disk full)
            return
        if savepoint is None:
            conn.execute("ROLLBACK")
        else:
            conn.execute(f"ROLLBACK TO {savepoint}")
            conn.execute(f"RELEASE {savepoint}")


class SqliteDatabase(Database):
    """A SQLite file in WAL mode with ``synchronous = FULL``: the embedded default."""

    dialect = "sqlite"

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0):
        super().__init__()
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":   # persistent: set once per file
                import sqlite_utils                                         # (its import costs ~0.25 s)
                sqlite_utils.Database(conn).enable_wal()
            conn.execute("PRAGMA synchronous = FULL")   # a committed import survives power loss before its move
            from .migrations import migrate
            migrate(conn)
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        self._editor_lock_file = None

    def close(self) -> None:
        with self.lock:
            self.conn.close()
            if self._editor_lock_file is not None:
                self._editor_lock_file.close()
                self._editor_lock_file = None

    def try_editor_lock(self) -> bool:
        import fcntl
        with self.lock:
            if self._editor_lock_file is not None:
                return True
            f = open(self.path.with_name(self.path.name + ".editor.lock"), "a+b")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                return False
            self._editor_lock_file = f
            return True

    def _connection(self):
        return self.conn

    def _in_transaction(self) -> bool:
        return self.conn.in_transaction

    def _begin_write(self, conn) -> None:
        conn.execute("BEGIN IMMEDIATE")


class PostgresDatabase(Database):
    """A PostgreSQL database through psycopg 3; reconnects on the next transaction when the connection broke."""

    dialect = "postgresql"
    differ = "IS DISTINCT FROM"

    def __init__(self, url: str, *, busy_timeout_s: float = 30.0):
        super().__init__()
        psycopg = _psycopg()
        self.url = url
        self.Error, self.IntegrityError = psycopg.Error, psycopg.IntegrityError
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._conn = None
        self._editor_conn = None
        conn = self._connection()
        from .migrations_pg import migrate
        migrate(conn)

    def close(self) -> None:
        with self.lock:
            for c in (self._conn, self._editor_conn):
                if c is not None:
                    c.close()
            self._conn = self._editor_conn = None

    def connect(self, **kwargs):
        """A new psycopg connection to this database (autocommit), e.g. for LISTEN."""
        psycopg = _psycopg()
        try:
            return psycopg.connect(self.url, autocommit=True, **kwargs)
        except psycopg.OperationalError as e:
            why = " ".join(str(e).split()).rstrip(".")
            raise KBError(f"cannot connect to the PostgreSQL fact store {redact(self.url)}: {why}. Check that the "
                          "server runs and that the [kb] url (or env KBSYNC_KB_URL) names it") from e

    def try_editor_lock(self) -> bool:
        with self.lock:
            if self._editor_conn is not None and not self._editor_conn.closed:
                return True
            conn = self.connect()
            if conn.execute("SELECT pg_try_advisory_lock(%s)", (EDITOR_LOCK_KEY,)).fetchone()[0]:
                self._editor_conn = conn
                return True
            conn.close()
            return False

    def group_concat(self, expr: str) -> str:
        return f"string_agg(({expr})::text, ',')"

    def _connection(self):
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                log.warning("kb.reconnecting", url=redact(self.url))
                self._depth = 0
            self._conn = _PgConnection(self.connect())
            self._conn.execute(f"SET lock_timeout = {self._busy_timeout_ms}")
            self._conn.execute(f"SET search_path = {SCHEMA}")
        return self._conn

    def _in_transaction(self) -> bool:
        return self._conn is not None and not self._conn.broken and self._conn.in_transaction

    def _lost(self) -> bool:
        return self._conn is None or self._conn.closed or self._conn.broken

    def _begin_write(self, conn) -> None:
        conn.execute("BEGIN")
        conn.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK_KEY,))

    def _begin_read(self, conn) -> None:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")


class _PgConnection:
    """A psycopg connection that takes kb's ``?`` placeholders (as sqlite3 does) and reports its transaction."""

    def __init__(self, conn):
        self.raw = conn

    def execute(self, sql: str, params: Sequence = ()):
        return self.raw.execute(_pg_sql(sql) if params else sql, tuple(params) if params else None)

    def executemany(self, sql: str, rows):
        cur = self.raw.cursor()
        cur.executemany(_pg_sql(sql), rows)
        return cur

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus
        return self.raw.info.transaction_status != TransactionStatus.IDLE

    @property
    def closed(self) -> bool:
        return self.raw.closed

    @property
    def broken(self) -> bool:
        return self.raw.broken

    def close(self) -> None:
        self.raw.close()


_QUOTED = re.compile(r"('[^']*')")


def _pg_sql(sql: str) -> str:
    """``?`` placeholders to psycopg's ``%s`` (and a literal ``%`` to ``%%``), leaving quoted strings alone."""
    parts = _QUOTED.split(sql)
    return "".join(p.replace("%", "%%") if i % 2 else p.replace("%", "%%").replace("?", "%s")
                   for i, p in enumerate(parts))


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise KBError("the PostgreSQL fact store needs psycopg 3: pip install 'kbsync[postgresql]' "
                      "(or 'psycopg[binary]>=3.2')") from None
    return psycopg
