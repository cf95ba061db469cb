"""Fixtures of the daemon tests: a project with a tiny random model, the CLI as a subprocess, a free port, a
runtime and its API served on loopback."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading

import pytest

from tests.conftest import ROOT, wait_for


@pytest.fixture
def project(tmp_path, make_tiny, tiny_tokenizer, corpus_file):
    model = make_tiny("llama")
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "tiny.toml").write_text(
        "[editor]\nlayers = [1, 2]\nv_steps = 3\ncontexts = ['{}', 'In short, {}']\n"
        f"[editor.stats]\ncorpus = '{corpus_file}'\nn_tokens = 300\nseq_len = 32\n")
    (tmp_path / "app.toml").write_text(
        f"[model]\nsource = '{tmp_path / 'model'}'\ndevice = 'cpu'\nhparams = '{tmp_path / 'tiny.toml'}'\n"
        f"cache_dir = '{tmp_path / 'cache'}'\n"
        "[verify]\nenabled = false\n")               # a tiny random model cannot learn its targets
    return tmp_path


def kbsync(project, *args, check=True):
    env = {**os.environ, "KBSYNC_STATE_DIR": str(project / "state")}
    proc = subprocess.run([sys.executable, "-m", "daemon", "--config", str(project / "app.toml"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVE = "[serve]\nbatch_window_ms = 20\nmax_output_tokens = 64\nmax_prompt_tokens = 200\nmax_body_bytes = 20000\n"


@contextlib.contextmanager
def serving(runtime):
    """``runtime`` started and its API served by uvicorn on a free loopback port; yields (base URL, app)."""
    import uvicorn

    from daemon.http.api import create_app
    app = create_app(runtime)
    runtime.start()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_config=None,
                                           access_log=False))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), 120, "uvicorn to start")
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(10)
        runtime.stop()


def make_runtime(project, extra: str = "", **kw):
    """A ``Runtime`` of ``project`` with a long sync interval, a short inbox settle and small serving limits."""
    from daemon.config import load_config
    from daemon.notify import Notifier
    from daemon.runtime import Runtime
    with open(project / "app.toml", "a") as f:
        f.write(f"[daemon]\ninterval_s = 3600\ninbox_settle_s = 0.1\n{SERVE}{extra}")
    return Runtime(load_config(project / "app.toml", project / "state"), notifier=Notifier({}), **kw)


