"""vLLM with the kbsync plugin against plain vLLM, and how fast a HEAD move reaches a replica.

    .venv-vllm/bin/python bench/vllm_bench.py --edits 0,1000 --json docs/results/vllm_bench.json

Runs in the vLLM venv (`make install-vllm`). One server at a time, on the same model directory (the default
model, float32, --enforce-eager): plain vLLM (no plugin), then vLLM with the plugin serving a HEAD of 0, 1,000
(... --edits) edits. The edits are synthetic with the real shapes (5 edited layers, steps of 10 edits):
what a gated forward costs depends on the rank and the shapes, not on the values. Their keys are random
directions with the norm of the layer's real projection inputs, so ordinary text routes as rarely as with
real edits. Workload: --requests completions of --tokens new tokens each (min_tokens = max_tokens), --concurrency
at once, after a warm-up; throughput = generated tokens / wall time, best of --rounds.
HEAD moves: with the plugin server up, HEAD is moved in the ledger between two versions --moves times; the
time from the commit until the server answers with the new version's system_fingerprint.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, STATE, hparams  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def synthetic_state(root: Path, edits: int, model_dir: Path) -> Path:
    """A state directory whose HEAD carries ``edits`` synthetic edits in steps of 10 (plus an empty sibling
    version for the HEAD-move timing)."""
    import torch

    from editor.hook import self_response
    from editor.step import LayerDelta, StepDelta
    from kb import FactStore
    from kb.ledger import Ledger
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state = root / f"state-{edits}"
    state.mkdir(parents=True, exist_ok=True)
    (state / "config.toml").write_text(f"[model]\nsource = '{model_dir}'\ndevice = 'cpu'\n")
    cfg = hparams()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    norms, dims, handles = {}, {}, []
    for l in cfg.layers:
        proj = model.model.layers[l].mlp.down_proj
        dims[l] = (proj.out_features, proj.in_features)
        handles.append(proj.register_forward_hook(
            lambda m, i, o, l=l: norms.__setitem__(l, float(i[0][0].norm(dim=-1).median()))))
    with torch.no_grad():
        model(**tok([PROMPT * 4], return_tensors="pt"))
    for h in handles:
        h.remove()
    del model
    store = FactStore(state / "kb.sqlite")
    ledger = Ledger(store, state / "versions")
    g = torch.Generator().manual_seed(edits)
    for step in range(edits // 10):
        layers = []
        for l in cfg.layers:
            d_out, d_in = dims[l]
            K = torch.randn(d_in, 10, generator=g)
            K = K / K.norm(dim=0) * norms[l]                           # (d_in, 10), real input norms
            V = K / (K * K).sum(0)                                     # v_jᵀ k_j = 1
            U = torch.randn(d_out, 10, generator=g) * 0.05
            assert torch.allclose(self_response(V, K), torch.ones(10), atol=1e-4)
            layers.append(LayerDelta(l, U, V, K, cfg.token_alpha0))
        arrays, meta = StepDelta(tuple(layers), (), "synthetic", "synthetic", gate="token").to_arrays()
        ledger.commit(arrays, meta, [], config_digest="synthetic", model_fingerprint="synthetic", metrics={}, actor="bench",
                      reason=f"synthetic step {step}")
    store.close()
    return state


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model_dir: Path, port: int, log: Path, state: Path | None) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_PLUGINS": "kbsync" if state else ""}
    if state:
        env["KBSYNC_STATE_DIR"] = str(state)
    run_dir = log.parent / f"run-{port}"
    run_dir.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                             "--served-model-name", "m", "--dtype", "float32", "--max-model-len", "512",
                             "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=run_dir, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"vLLM did not answer in {timeout} s")


def throughput(url: str, requests: int, tokens: int, concurrency: int) -> float:
    from openai import OpenAI
    client = OpenAI(base_url=f"{url}/v1", api_key="x", timeout=600, max_retries=0)

    def one(i):
        r = client.completions.create(model="m", prompt=f"{PROMPT} ({i})", max_tokens=tokens, temperature=0,
                                      extra_body={"min_tokens": tokens, "ignore_eos": True})
        return r.usage.completion_tokens

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency)))                                # warm-up
        t = time.perf_counter()
        n = sum(pool.map(one, range(requests)))
    return n / (time.perf_counter() - t)


def head_moves(url: str, state: Path, moves: int) -> list[float]:
    """Seconds from a HEAD commit in the ledger until the server answers with that version's fingerprint."""
    from openai import OpenAI

    from kb import FactStore
    from kb.ledger import Ledger
    from kb.records import version_label
    client = OpenAI(base_url=f"{url}/v1", api_key="x", timeout=600, max_retries=0)
    store = FactStore(state / "kb.sqlite")
    ledger = Ledger(store, state / "versions")
    versions = [v.id for v in ledger.versions()]
    targets = [versions[-1], versions[0]]
    out = []
    for i in range(moves):
        to = targets[i % 2]
        ledger.move_head(to, actor="bench", reason="bench: HEAD move")
        t = time.perf_counter()
        while client.completions.create(model="m", prompt="Hi", max_tokens=1,
                                        temperature=0).system_fingerprint != f"kbsync-{version_label(to)}":
            pass
        out.append(time.perf_counter() - t)
    ledger.move_head(versions[-1], actor="bench", reason="bench: back to the last version")
    store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edits", default="0,1000")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--moves", type=int, default=10)
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: the converted default model)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "vllm_bench.json")
    args = ap.parse_args()
    from editor.loading import model_directory

    model_dir = args.model or model_directory("embedded", STATE)
    root = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    configs = [("plain", None)] + [(f"plugin@{n}", int(n)) for n in args.edits.split(",")]
    doc = {"model": str(model_dir), "requests": args.requests, "tokens": args.tokens,
           "concurrency": args.concurrency, "results": {}}
    for name, edits in configs:
        state = synthetic_state(root, edits, model_dir) if edits is not None else None
        port = free_port()
        log = root / f"{name}.log"
        proc = start(model_dir, port, log, state)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_up(url, proc, log)
            tps = [throughput(url, args.requests, args.tokens, args.concurrency) for _ in range(args.rounds)]
            entry = {"tokens_per_s": max(tps), "rounds": tps}
            if edits:
                entry["head_move_s"] = moves = head_moves(url, state, args.moves)
                entry["head_move_median_s"] = statistics.median(moves)
                entry["head_move_max_s"] = max(moves)
            doc["results"][name] = entry
            print(name, json.dumps(entry), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    plain = doc["results"]["plain"]["tokens_per_s"]
    for name, entry in doc["results"].items():
        entry["vs_plain"] = round(entry["tokens_per_s"] / plain, 3)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
