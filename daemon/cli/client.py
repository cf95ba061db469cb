"""The CLI's client of a running daemon's admin API (stdlib only, so the CLI stays light to start).

Discovery: the daemon writes ``<state-dir>/daemon.json`` (host, port, pid, url) once its API answers and
removes it on stop. :func:`find_daemon` trusts it only if that pid is alive and ``/healthz`` answers with
the same pid; otherwise the CLI works on the state directory in-process.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import structlog

from ..errors import ServiceError

log = structlog.get_logger("kbsync.client")

DAEMON_FILE = "daemon.json"


class DaemonClient:
    """Calls the admin API at ``url``; API errors become :class:`ServiceError` with the daemon's message."""

    def __init__(self, url: str, token: str = "", timeout: float = 600.0):
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    def status(self) -> dict:
        return self._call("GET", "/v1/admin/status")

    def sync(self) -> dict:
        return self._call("POST", "/v1/admin/sync", {})

    def rollback(self, version: int | None, reason: str = "") -> dict:
        return self._call("POST", "/v1/admin/rollback", {"version": version, "reason": reason})

    def revert(self, version: int) -> dict:
        return self._call("POST", "/v1/admin/revert", {"version": version})

    def compact(self) -> dict:
        return self._call("POST", "/v1/admin/compact", {})

    def query(self, prompt: str, max_tokens: int = 16) -> dict:
        return self._call("POST", "/v1/admin/query", {"prompt": prompt, "max_tokens": max_tokens})

    def healthz(self, timeout: float = 2.0) -> dict:
        return self._call("GET", "/healthz", timeout=timeout)

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise ServiceError(_message(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ServiceError(f"the daemon at {self.url} did not answer ({exc}); is `kbsync run` still up? "
                               "Stop it, or remove a stale daemon.json in the state directory") from None


def find_daemon(state_dir: str | Path, token: str = "") -> DaemonClient | None:
    """A client for the daemon serving ``state_dir``, or None when none is running there."""
    path = Path(state_dir) / DAEMON_FILE
    try:
        info = json.loads(path.read_text())
        pid, url = int(info["pid"]), str(info["url"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("daemon.file_unreadable", path=str(path), error=str(exc))
        return None
    if not _alive(pid):
        log.info("daemon.stale_file", path=str(path), pid=pid)
        return None
    client = DaemonClient(url, token)
    try:
        health = client.healthz()
    except ServiceError:
        log.warning("daemon.not_answering", url=url, pid=pid, fallback="in-process")
        return None
    if not isinstance(health, dict) or health.get("pid") != pid:
        log.warning("daemon.pid_mismatch", url=url, expected=pid, fallback="in-process")
        return None
    return client


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:        # alive, another user's
        return True
    return True


def _message(exc: urllib.error.HTTPError) -> str:
    try:
        err = json.loads(exc.read())["error"]
        return f"daemon: {err['message']}"
    except Exception:
        return f"daemon: HTTP {exc.code} {exc.reason}"
