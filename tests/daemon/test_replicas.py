"""Two real daemons on one PostgreSQL fact store: one edits, the other serves and follows HEAD, and takes over
editing when the first dies. A tiny random model keeps it quick; the store, the server and HTTP are real."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx

from tests.conftest import ROOT, wait_for

from .conftest import free_port


class Daemon:
    def __init__(self, project, name: str, url: str):
        self.state, self.port = project / name, free_port()
        self.log = project / f"{name}.log"
        env = {**os.environ, "KBSYNC_STATE_DIR": str(self.state), "KBSYNC_KB_URL": url}
        env.pop("KBSYNC_TOKEN", None)
        env.pop("NOTIFY_SOCKET", None)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(project / "app.toml"),
                                          "run", "--interval", "0.5", "--port", str(self.port)], cwd=ROOT, env=env,
                                         stdout=log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)

    def status(self) -> dict | None:
        try:
            r = self.http.get("/v1/admin/status")
            return r.json() if r.status_code == 200 else None
        except httpx.HTTPError:
            return None

    def until(self, check, what: str, timeout: float = 300):
        return wait_for(lambda: (lambda s: s if s and check(s) else None)(self.status()), timeout, what,
                        process=self.proc, log=self.log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_one_editor_and_a_follower_that_takes_over(project, postgres_cluster):
    import psycopg

    url = postgres_cluster.create_database()
    (project / "app.toml").write_text((project / "app.toml").read_text()
                                      + f"[kb]\nblob_dir = '{project / 'versions'}'\n[sync]\nbatch_size = 2\n")
    a = Daemon(project, "a", url)
    try:
        a.until(lambda s: s["daemon"]["ready"] and s["role"] == "editor", "A to start as the editor")
        b = Daemon(project, "b", url)
        try:
            b.until(lambda s: s["daemon"]["ready"], "B to start")
            assert b.status()["role"] == "follower" and b.status()["kb"]["backend"] == "postgresql"

            with psycopg.connect(url, autocommit=True, options="-c search_path=kbsync") as other:   # another service
                other.execute("INSERT INTO facts (subject, template, target) VALUES "
                              "('Rome', '{} is in', 'Peru'), ('Oslo', '{} is in', 'Chile')")
            v1 = a.until(lambda s: s["head"] is not None and s["served"] == s["head"], "A to edit the batch")["head"]
            b.until(lambda s: s["served"] == v1, "B to serve A's new HEAD")

            refused = b.http.post("/v1/admin/sync")
            assert refused.status_code == 409 and "another kbsync process is the editor" in refused.json()["error"]["message"]

            assert b.http.post("/v1/admin/rollback", json={"version": None, "reason": "test"}).status_code == 200
            a.until(lambda s: s["head"] is None and s["served"] is None, "A to follow B's rollback")
        except BaseException:
            b.stop()
            raise
    finally:
        a.proc.send_signal(signal.SIGKILL)                 # the editor dies without a word
        a.proc.wait()
    try:
        b.until(lambda s: s["role"] == "editor", "B to take the editor lock over")
        with psycopg.connect(url, autocommit=True, options="-c search_path=kbsync") as other:
            other.execute("INSERT INTO facts (subject, template, target) VALUES ('Lima', '{} is in', 'Japan'), "
                          "('Kyiv', '{} is in', 'Ghana')")
        # head and pending come from the store as the step commits; served moves a moment later (a status read
        # may fall between the two), so wait for B to serve what it committed
        done = b.until(lambda s: s["pending"] == 0 and s["head"] is not None and s["versions"] == 2
                       and s["served"] == s["head"], "B to edit the new batch and serve it")
        assert done["head"] != v1
    finally:
        b.stop()
    print(json.dumps({"v1": v1, "after_takeover": done["head"]}))


