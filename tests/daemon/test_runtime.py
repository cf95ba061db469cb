"""`kbsync run` end to end on a tiny model: a real daemon subprocess, the CLI talking to it, systemd notify."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.conftest import ROOT, wait_for
from .conftest import free_port, kbsync

FACTS = ('{"subject": "Paris", "prompt": "{} is the capital of", "target": "Italy"}\n'
         '{"subject": "Apple A5", "prompt": "Apple A5 was created by", "target": "Microsoft"}\n')


class NotifyListener:
    """systemd's side of the notify socket: a thread reads every datagram as it arrives, so none is lost
    to the socket's small queue (WATCHDOG=1 goes out every half second and sends never block)."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.got: list[str] = []
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096).decode()
            except (TimeoutError, OSError):
                continue
            with self.cond:
                self.got.append(data)
                self.cond.notify_all()

    def wait(self, message: str, after: int = 0, timeout: float = 300, process=None) -> int:
        """Index of the first datagram at or after index ``after`` whose first line is ``message``
        (failing at once if ``process`` exits first)."""
        def found():
            return next((i for i in range(after, len(self.got)) if self.got[i].split("\n")[0] == message), None)
        stop = lambda: found() is not None or (process is not None and process.poll() is not None)  # noqa: E731
        deadline = time.monotonic() + timeout
        with self.cond:
            while not stop() and time.monotonic() < deadline:
                self.cond.wait(0.2)                                  # a notify, or a look at the process
            assert found() is not None, (message, self.got[after:], process and process.poll())
            return found()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    if len(str(path)) > 100:
        pytest.skip("tmp_path too long for an AF_UNIX socket")
    listener = NotifyListener(str(path))
    yield listener
    listener.close()


def test_daemon_ingests_syncs_rolls_back_notifies_and_stops(project, notify_socket):
    listener, sock_path = notify_socket, notify_socket.path
    with open(project / "app.toml", "a") as f:
        f.write("[daemon]\ninbox_settle_s = 0.1\ninbox_rescan_s = 0.5\n")
    state, port = project / "state", free_port()
    env = {**os.environ, "KBSYNC_STATE_DIR": str(state), "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1000000"}
    env.pop("KBSYNC_TOKEN", None)
    env.pop("WATCHDOG_PID", None)
    with open(project / "daemon.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(project / "app.toml"), "run",
                                 "--interval", "1", "--port", str(port)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        ready_at = listener.wait("READY=1", timeout=600, process=proc)
        info = json.loads((state / "daemon.json").read_text())
        assert info["pid"] == proc.pid and info["port"] == port
        http = httpx.Client(base_url=info["url"], timeout=30)
        assert http.get("/readyz").status_code == 200

        status = json.loads(kbsync(project, "status", "--json").stdout)    # through the daemon
        assert status["daemon"]["pid"] == proc.pid and status["head"] is None and status["model_loaded"]

        (state / "inbox" / "facts.jsonl.tmp").write_text(FACTS)             # ignored until renamed
        os.replace(state / "inbox" / "facts.jsonl.tmp", state / "inbox" / "facts.jsonl")
        done = wait_for(lambda: (lambda s: s if s["head"] is not None and s["pending"] == 0 else None)(
            http.get("/v1/admin/status").json()), 600, "the dropped facts to be synced", process=proc,
            log=project / "daemon.log")
        status = json.loads(kbsync(project, "status", "--json").stdout)
        assert status["head"] == done["head"] and status["pending"] == 0 and status["last_tick"]["ok"]
        head = status["head"]
        asked = json.loads(kbsync(project, "query", "Paris is the capital of", "--max-tokens", "2", "--json").stdout)
        assert asked["version"] == head                                     # answered by the daemon at HEAD

        assert json.loads(kbsync(project, "rollback", "base", "--json").stdout) == {"from": head, "head": None}
        assert json.loads(kbsync(project, "query", "Paris is", "--json").stdout)["version"] is None
        assert json.loads(kbsync(project, "status", "--json").stdout)["head"] is None
        assert json.loads(kbsync(project, "sync", "--json").stdout) == {"steps": [], "head": None}
        proc_err = kbsync(project, "rollback", "42", check=False)
        assert proc_err.returncode == 1 and "42" in proc_err.stderr and "kbsync log" in proc_err.stderr

        proc.send_signal(signal.SIGHUP)                                     # reload the config, keep running
        seen = len(listener.got)
        reloading = listener.wait("RELOADING=1", after=seen)
        listener.wait("READY=1", after=reloading)
        assert proc.poll() is None and http.get("/healthz").status_code == 200

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0                                   # the unit's TimeoutStopSec
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (state / "daemon.json").exists()
    listener.wait("STOPPING=1", after=ready_at, timeout=30)
    with listener.cond:
        got = list(listener.got)
    lifecycle = [m.split("\n")[0] for m in got if not m.startswith(("WATCHDOG", "STATUS"))]
    ready, stopping = lifecycle.index("READY=1"), lifecycle.index("STOPPING=1")
    assert ready < stopping == len(lifecycle) - 1
    ready_at, stopping_at = got.index("READY=1"), got.index("STOPPING=1")
    after = [m for m in got[ready_at:] if m.startswith("STATUS=")]
    assert after and any(f"head {head}" in m for m in after) and "head base, 0 pending" in after[-1]
    assert "WATCHDOG=1" in got[ready_at:stopping_at]                           # pings while serving

    # with no daemon, the same commands work in-process on the state directory
    status = json.loads(kbsync(project, "status", "--json").stdout)
    assert status["daemon"] is None and status["head"] is None and set(status) >= {"last_tick", "next_tick"}


def test_run_refuses_a_public_host_without_a_token(project):
    env = {**os.environ, "KBSYNC_STATE_DIR": str(project / "state")}
    env.pop("KBSYNC_TOKEN", None)
    proc = subprocess.run([sys.executable, "-m", "daemon", "--config", str(project / "app.toml"), "run",
                           "--host", "0.0.0.0", "--port", str(free_port())], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "without a token" in proc.stderr and "KBSYNC_TOKEN" in proc.stderr
    assert not (project / "state" / "daemon.json").exists()


def test_run_has_help_with_an_example():
    proc = subprocess.run([sys.executable, "-m", "daemon", "run", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "Example" in proc.stdout and "--interval" in proc.stdout


def test_sigterm_mid_step_exits_within_10s_and_leaves_head_consistent(project):
    tiny = (project / "tiny.toml").read_text().replace("v_steps = 3", "v_steps = 1000000\nearly_stop_nll = 0.0")
    (project / "tiny.toml").write_text(tiny)                             # a step that never finishes by itself
    state, port = project / "state", free_port()
    (state / "inbox").mkdir(parents=True)
    (state / "inbox" / "facts.jsonl").write_text(FACTS)
    env = {**os.environ, "KBSYNC_STATE_DIR": str(state)}
    env.pop("KBSYNC_TOKEN", None)
    env.pop("NOTIFY_SOCKET", None)
    with open(project / "daemon.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(project / "app.toml"), "run",
                                 "--interval", "0.5", "--port", str(port)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

        def mid_step():                                  # a tick running with the dropped facts taken in (an
            try:                                         # earlier tick may run before the drop has settled)
                doc = http.get("/v1/admin/status").json()
                return doc["daemon"]["tick_running"] and doc["pending"] == 2
            except httpx.HTTPError:
                return False
        wait_for(mid_step, 600, "a step to start", process=proc, log=project / "daemon.log")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0                                   # the unit's TimeoutStopSec
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (state / "daemon.json").exists()
    status = json.loads(kbsync(project, "status", "--json").stdout)      # in-process: nothing half-written
    assert status["head"] is None and status["pending"] == 2 and status["versions"] == 0
