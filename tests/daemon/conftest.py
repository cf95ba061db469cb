"""Fixtures of the daemon tests: a project with a tiny random model, the CLI as a subprocess, a free port."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT


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
