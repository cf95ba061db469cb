"""`kbsync run` end to end on a tiny model: a real daemon subprocess, the CLI talking to it, systemd notify."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import ROOT
from tests.daemon.test_cli import kbsync, project  # noqa: F401  (the tiny-model project fixture)

FACTS = ('{"subject": "Paris", "prompt": "{} is the capital of", "target": "Italy"}\n'
         '{"subject": "Apple A5", "prompt": "Apple A5 was created by", "target": "Microsoft"}\n')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    if len(str(path)) > 100:
        pytest.skip("tmp_path too long for an AF_UNIX socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    yield sock, str(path)
    sock.close()


def messages(sock: socket.socket, until: str, timeout: float) -> list[str]:
    """Datagrams received until one equals ``until`` (or the timeout)."""
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if out[-1] == until:
            break
    return out


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_daemon_ingests_syncs_rolls_back_notifies_and_stops(project, notify_socket):  # noqa: F811
    sock, sock_path = notify_socket
    with open(project / "app.toml", "a") as f:
        f.write("[daemon]\ninbox_settle_s = 0.1\nrescan_s = 0.5\n")
    state, port = project / "state", free_port()
    env = {**os.environ, "KBSYNC_STATE_DIR": str(state), "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1000000"}
    env.pop("KBSYNC_TOKEN", None)
    env.pop("WATCHDOG_PID", None)
    with open(project / "daemon.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(project / "app.toml"), "run",
                                 "--interval", "1", "--port", str(port)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        got = messages(sock, "READY=1", timeout=120)
        assert got and got[-1] == "READY=1", (got, (project / "daemon.log").read_text()[-3000:])
        info = json.loads((state / "daemon.json").read_text())
        assert info["pid"] == proc.pid and info["port"] == port
        http = httpx.Client(base_url=info["url"], timeout=30)
        assert http.get("/readyz").status_code == 200

        status = json.loads(kbsync(project, "status", "--json").stdout)    # through the daemon
        assert status["daemon"]["pid"] == proc.pid and status["head"] is None and status["model_loaded"]

        (state / "inbox" / "facts.jsonl.tmp").write_text(FACTS)             # ignored until renamed
        os.replace(state / "inbox" / "facts.jsonl.tmp", state / "inbox" / "facts.jsonl")
        done = wait_for(lambda: (lambda s: s if s["head"] is not None and s["pending"] == 0 else None)(
            http.get("/v1/admin/status").json()), 60, "the dropped facts to be synced")
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
        reload = messages(sock, "READY=1", timeout=30)
        assert [m for m in reload if m.startswith("RELOADING=1")] and reload[-1] == "READY=1"
        got += reload
        assert proc.poll() is None and http.get("/healthz").status_code == 200

        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - t <= 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (state / "daemon.json").exists()
    got += messages(sock, "STOPPING=1", timeout=2)
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


def test_run_refuses_a_public_host_without_a_token(project):  # noqa: F811
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


def test_sigterm_mid_step_exits_within_10s_and_leaves_head_consistent(project):  # noqa: F811
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

        def mid_step():
            try:
                return http.get("/v1/admin/status").json()["daemon"]["tick_running"]
            except httpx.HTTPError:
                return False
        wait_for(mid_step, 120, "a step to start")
        time.sleep(0.5)
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - t <= 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (state / "daemon.json").exists()
    status = json.loads(kbsync(project, "status", "--json").stdout)      # in-process: nothing half-written
    assert status["head"] is None and status["pending"] == 2 and status["versions"] == 0
