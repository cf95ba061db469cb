"""The CLI end to end on a tiny model saved to disk (real files, real subprocess, no mocks)."""
import json
import os
import subprocess
import sys
from pathlib import Path

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
        f"[model]\nsource = '{tmp_path / 'model'}'\ndevice = 'cpu'\nhparams = '{tmp_path / 'tiny.toml'}'\n")
    return tmp_path


def kbsync(project, *args, check=True):
    env = {**os.environ, "KBSYNC_STATE_DIR": str(project / "state")}
    proc = subprocess.run([sys.executable, "-m", "daemon", "--config", str(project / "app.toml"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_stats_build_then_cached(project):
    first = json.loads(kbsync(project, "stats", "build", "--json").stdout)
    assert first["tokens"] == 300 and first["layers"] == [1, 2]
    files = list((project / "state" / "stats").glob("keystats-*.safetensors"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    assert json.loads(kbsync(project, "stats", "build", "--json").stdout) == first
    assert files[0].stat().st_mtime_ns == mtime                 # read from cache, not rewritten


def test_query_and_demo(project):
    out = json.loads(kbsync(project, "query", "Paris is the capital of", "--max-tokens", "3", "--json").stdout)
    assert set(out) == {"text", "version"} and isinstance(out["text"], str)
    facts = project / "facts.jsonl"
    facts.write_text('{"subject": "Paris", "prompt": "{} is the capital of", "target": "Italy"}\n')
    doc = json.loads(kbsync(project, "demo", str(facts), "--json").stdout)
    assert doc["facts"][0]["prompt"] == "Paris is the capital of" and doc["seconds"] > 0


def test_errors_are_clear_with_exit_codes(project, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"subject": "Paris", "prompt": "Rome is nice", "target": "Italy"}\n')
    proc = kbsync(project, "demo", str(bad), check=False)
    assert proc.returncode == 1 and "does not contain subject" in proc.stderr
    proc = kbsync(project, "query", check=False)                   # missing argument: usage error
    assert proc.returncode == 2 and "PROMPT" in proc.stderr
    (tmp_path / "broken.toml").write_text("[model\n")
    proc = subprocess.run([sys.executable, "-m", "daemon", "--config", str(tmp_path / "broken.toml"), "stats", "build"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "not valid TOML" in proc.stderr


@pytest.mark.parametrize("args", [[], ["stats"], ["stats", "build"], ["query"], ["demo"]])
def test_every_command_has_help_with_an_example(args):
    proc = subprocess.run([sys.executable, "-m", "daemon", *args, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "Usage:" in proc.stdout
    if args and args != ["stats"]:
        assert "Example" in proc.stdout
