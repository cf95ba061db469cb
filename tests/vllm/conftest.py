"""The vLLM suite (`make test-vllm`, its own venv): a kbsync daemon edits the real default model, vLLM
servers with the kbsync plugin serve its versions. Everything is real: vLLM's CPU build, the OpenAI client,
the daemon over HTTP on loopback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DATA, ROOT, wait_for
from tests.daemon.conftest import free_port

N_FACTS = int(os.environ.get("KBSYNC_VLLM_FACTS", "20"))     # edited COUNTERFACT cases (5000 on: report range)
FIRST_CASE = 5000
LONG_PREFIX = ("Here is a short passage from an encyclopedia about people, places, languages and religions, with "
               "many facts that readers often ask about in quizzes and exams held at schools across the world. ")


def cases(n: int = N_FACTS) -> list[dict]:
    return json.loads((DATA / "counterfact-edit.json").read_text())[FIRST_CASE:FIRST_CASE + n]


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def client(self):
        from openai import OpenAI
        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=300, max_retries=0)


def _up(url: str) -> bool:
    import httpx
    try:
        return httpx.get(f"{url}/v1/models", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_vllm(state: Path, model_dir: Path, name: str, cpus: str, *extra: str) -> Server:
    """A vLLM OpenAI server with the kbsync plugin following ``state``; returns once it answers."""
    port = free_port()
    log = state.parent / f"{name}.log"
    run_dir = state.parent / name                       # vLLM starts in a folder of its own
    run_dir.mkdir(exist_ok=True)
    env = {**os.environ, "KBSYNC_STATE_DIR": str(state), "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": cpus, "VLLM_PLUGINS": "kbsync"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", "smollm2", "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
           "--host", "127.0.0.1", "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    server = Server(name, f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_for(lambda: _up(server.url), timeout=600, what=f"vLLM {name} to answer", step=1, process=proc, log=log)
    except BaseException:
        server.stop()
        raise
    return server


def kbsync_cli(state: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "daemon", "--state-dir", str(state), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="session")
def edited_state(tmp_path_factory):
    """A state directory whose HEAD carries N_FACTS edits of the real default model (in steps of 10)."""
    from editor.loading import model_directory

    root = tmp_path_factory.mktemp("vllm")
    state = root / "state"
    state.mkdir()
    model_dir = model_directory("embedded", ROOT / ".cache" / "state")
    (state / "config.toml").write_text(f"[model]\nsource = '{model_dir}'\ndevice = 'cpu'\ndtype = 'float32'\n")
    facts = root / "facts.jsonl"
    facts.write_text("".join(json.dumps({"subject": c["subject"], "prompt": c["prompt"].replace(c["subject"], "{}", 1),
                                         "target": c["target_new"]}) + "\n" for c in cases()))
    kbsync_cli(state, "facts", "import", str(facts))
    kbsync_cli(state, "sync")
    return state, model_dir


@pytest.fixture(scope="session")
def daemon(edited_state):
    """kbsync itself, editing and serving the same state (the reference answers and the HEAD moves)."""
    state, _ = edited_state
    port = free_port()
    log = state.parent / "daemon.log"
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "--state-dir", str(state), "run", "--port", str(port),
                             "--interval", "3600"], cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    server = Server("kbsync", f"http://127.0.0.1:{port}", proc, log)
    wait_for(lambda: _up(server.url), timeout=300, what="the kbsync daemon", step=0.5, process=proc, log=log)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def replicas(edited_state, daemon):
    """Two vLLM replicas with the plugin, one CPU each; chunked prefill forced (32-token steps), 32-token KV
    blocks (the CPU backend's smallest) so that a shared prompt prefix fills whole blocks the prefix cache can reuse."""
    state, model_dir = edited_state
    servers = []
    try:
        for name, cpu in (("replica-a", "0"), ("replica-b", "1")):
            servers.append(start_vllm(state, model_dir, name, cpu, "--max-num-batched-tokens", "32",
                                      "--max-num-seqs", "4", "--block-size", "32"))
        yield servers
    finally:
        for s in servers:
            s.stop()
