"""A throwaway PostgreSQL cluster on a unix socket, for the tests and benchmarks of the PostgreSQL fact store.

``initdb`` refuses to run as root, so as root (as CI runs) the cluster belongs to the ``postgres`` user and its
commands run through ``runuser``; as anyone else it belongs to that user. Nothing listens on TCP.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def missing() -> str | None:
    """Why no cluster can be started here, or None when one can."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if shutil.which(tool) is None:
            return f"the PostgreSQL server binaries are not installed ({tool} is not on PATH)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root, and runuser (needed to run initdb as the postgres user) is missing"
    if os.geteuid() == 0:
        import pwd
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no postgres user to own the cluster"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'kbsync[postgresql]')"
    return None


class Cluster:
    """``with Cluster() as pg: pg.create_database("kb1") -> url``; stopped and removed on exit."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="kbsync-pg-"))
        self.data = self.root / "data"
        self.socket = self.root              # the socket directory (short path: unix sockets are ≤ 107 bytes)
        self._n = 0

    def _run(self, *cmd: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(prefix + list(cmd), check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> Cluster:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60", "-o",
                  f"-k {self.socket} -c listen_addresses='' -c max_connections=200", "start")
        return self

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@/{dbname}?host={self.socket}"

    def create_database(self, name: str | None = None, template: str | None = None) -> str:
        """A new empty database (or a copy of ``template``); returns its URL."""
        import psycopg
        if name is None:
            self._n += 1
            name = f"kb{self._n}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        import psycopg
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
