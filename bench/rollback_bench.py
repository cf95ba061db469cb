"""Rollback speed and storage for the default model: restore any of N versions, bytes per step.

A rollback is timed until the model can serve: blobs loaded and verified, hooks rebuilt, dense Δ built.

Versions hold deltas of the real shapes (5 layers of SmolLM2-135M, batch 10) with random values, committed
through the real ledger; restoring goes through the real service path (load + verify blobs, rebuild hooks).

    .venv/bin/python bench/rollback_bench.py --versions 100
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from daemon.config import AppConfig, ModelConfig, SyncConfig
from daemon.service import Service
from editor.config import EditConfig, StatsConfig
from editor.loading import load_model

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", type=int, default=100)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/rollback_bench.json")
    args = ap.parse_args()
    model, tok = load_model("embedded", ROOT / ".cache/state", device="cpu", dtype="float32")
    editor = EditConfig.from_toml(ROOT / "configs/models/smollm2-135m.toml").replace(stats=StatsConfig(corpus="model", n_tokens=1))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = AppConfig(state_dir=Path(tmp), model=ModelConfig(), editor=editor, sync=SyncConfig())
        svc = Service(cfg, progress=False, preloaded=(model, tok))
        em = svc.live.em
        g = torch.Generator().manual_seed(0)
        ids = []
        for i in range(args.versions):
            change = svc.store.add(f"subject {i}", "{} is a", f"target {i}", source="bench")
            arrays, meta = {}, {"layers": ",".join(str(l) for l in em.layers)}
            for l, h in em.hooks.items():
                arrays[f"{l}.U"] = (torch.randn(h.d_out, args.batch, generator=g) * 1e-3).numpy()
                arrays[f"{l}.V"] = torch.randn(h.d_in, args.batch, generator=g).numpy()
                arrays[f"{l}.K"] = torch.randn(h.d_in, args.batch, generator=g).numpy()
                arrays[f"{l}.alpha"] = torch.tensor([2.2], dtype=torch.float64).numpy()
            v = svc.ledger.commit(arrays, meta, [change.id], config_digest=editor.digest(),
                                  model_fingerprint=em.fingerprint(), metrics={}, actor="bench", reason="bench")
            ids.append(v.id)
        times = {}
        for target in (ids[0], ids[len(ids) // 2], ids[-1], ids[len(ids) // 4]):
            runs = []
            for _ in range(3):
                t = time.perf_counter()
                svc.rollback(target, actor="bench")
                for h in em.hooks.values():     # what the first query would build: the dense Δ
                    h.D
                runs.append(time.perf_counter() - t)
            times[target] = statistics.median(runs)
        step_bytes = statistics.median(v.blob_bytes for v in svc.ledger.versions())
        full = sum(h.d_in * h.d_out * 4 for h in em.hooks.values())
        svc.close()
    doc = {"versions": args.versions, "batch": args.batch, "rollback_seconds": times,
           "worst_rollback_s": max(times.values()), "bytes_per_step": step_bytes, "full_copy_bytes": full,
           "ratio": step_bytes / full}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print("| rollback to version (of %d) | seconds (median of 3) |\n|---|---|" % args.versions)
    for k, v in times.items():
        print(f"| {k} | {v:.3f} |")
    print(f"\nbytes per step {step_bytes:,.0f}; full float32 copy of the hook layers {full:,}; ratio {doc['ratio']:.2%}")


if __name__ == "__main__":
    main()
