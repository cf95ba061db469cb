"""Fixtures for the knowledge-base tests: a real store (SQLite file or PostgreSQL database), the shared data."""
from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from kb import FactStore

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture
def store(kb_url):
    """A fresh store on each backend (``kb_url`` is parametrized: every test using it runs on both)."""
    with FactStore(kb_url) as s:
        yield s


class OtherProgram:
    """Another program writing plain SQL to the store's database, with no kbsync code: sqlite3 or psycopg.

    On PostgreSQL it finds kbsync's tables through ``search_path = kbsync``, as docs/facts.md tells such
    programs to (or to write ``kbsync.facts``). ``?`` placeholders on both, for brevity."""

    def __init__(self, store: FactStore):
        self.dialect = store.db.dialect
        if self.dialect == "sqlite":
            self.conn = sqlite3.connect(store.path, isolation_level=None)
        else:
            import psycopg
            self.conn = psycopg.connect(store.url, autocommit=True, options="-c search_path=kbsync")

    def execute(self, sql: str, params=()):
        if self.dialect == "sqlite":
            return self.conn.execute(sql, params)
        from kb.db import _pg_sql
        return self.conn.execute(_pg_sql(sql), params) if params else self.conn.execute(sql)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def other_program(store):
    programs: list[OtherProgram] = []

    def connect() -> OtherProgram:
        programs.append(OtherProgram(store))
        return programs[-1]
    yield connect
    for p in programs:
        p.close()


class StoreTemplate:
    """A prepared store that trials copy: a copied SQLite file, or a database created from a template database
    on PostgreSQL (``CREATE DATABASE ... TEMPLATE``). ``fill(store)`` writes its contents once."""

    def __init__(self, root: Path, backend: str, name: str, fill, cluster=None):
        self.root, self.backend, self.name, self.cluster = root, backend, name, cluster
        url = str(root / "template.sqlite") if backend == "sqlite" else cluster.create_database(name)
        with FactStore(url) as store:
            fill(store)

    def copy(self, trial) -> tuple[Path, str]:
        """A fresh state directory for ``trial`` and the URL of its own copy of the store."""
        state = self.root / f"trial{trial}"
        state.mkdir(parents=True)
        if self.backend == "sqlite":
            shutil.copy(self.root / "template.sqlite", state / "kb.sqlite")
            return state, str(state / "kb.sqlite")
        return state, self.cluster.create_database(f"{self.name}_{trial}", template=self.name)

    @staticmethod
    def check_integrity(url: str) -> None:
        """SQLite's own integrity check (PostgreSQL keeps no torn pages: its WAL replays or discards them)."""
        if not url.startswith("postgresql:"):
            conn = sqlite3.connect(url)
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            conn.close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store_template(request, tmp_path_factory):
    """make(name, fill) -> StoreTemplate on each backend (module scope: the trials of one test share it)."""
    cluster = request.getfixturevalue("postgres_cluster") if request.param == "postgresql" else None
    return lambda name, fill: StoreTemplate(tmp_path_factory.mktemp(name), request.param, name, fill, cluster)


@pytest.fixture
def write(tmp_path):
    """write(name, content) -> Path: text is written as UTF-8 bytes exactly as given (no newline translation)."""
    def _write(name: str, content: str | bytes | list | dict) -> Path:
        path = tmp_path / name
        if isinstance(content, (list, dict)):
            content = json.dumps(content, ensure_ascii=False)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path
    return _write


def fact(i: int | str, target: str = "x", **extra) -> dict:
    return {"subject": f"S{i}", "prompt": f"The thing about S{i} is", "target": target, **extra}


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
