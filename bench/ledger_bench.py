"""Ledger benchmark: bytes per step against full copies of the hook layers; commit, load and HEAD-move times.

Shapes of the default model: 5 edited layers, hidden 576, MLP 1536, batch 10, so one step stores per layer
U (576×10), V (1536×10), K (1536×10) float32 and α (1,) float64. A full float32 copy of the hook layers is
5 × 576 × 1536 × 4 bytes. Target (issue 5): storage per step ≤ 5% of that full copy at batch 10.

Timings include fsync of every blob and of SQLite (synchronous=FULL); loads read from a warm page cache.

    .venv/bin/python bench/ledger_bench.py                         # 100 versions, writes bench/out/ledger_bench.json
    .venv/bin/python bench/ledger_bench.py --versions 30 --batch 30 --json /tmp/ledger.json
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kb import FactStore, Ledger  # noqa: E402


def step_arrays(rng: np.random.Generator, layers: int, hidden: int, mlp: int, batch: int) -> dict[str, np.ndarray]:
    out = {}
    for layer in range(layers):
        out[f"layers.{layer}.U"] = rng.standard_normal((hidden, batch), dtype=np.float32)   # R: d_out × n
        out[f"layers.{layer}.V"] = rng.standard_normal((mlp, batch), dtype=np.float32)      # A: d_in × n
        out[f"layers.{layer}.K"] = rng.standard_normal((mlp, batch), dtype=np.float32)      # K: d_in × n
        out[f"layers.{layer}.alpha"] = np.array([2.2], dtype=np.float64)                    # α: (1,)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--versions", type=int, default=100, help="length of the chain to commit and load")
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--mlp", type=int, default=1536)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--dir", type=Path, default=None, help="where to put the store and blobs (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=Path("bench/out/ledger_bench.json"))
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        with FactStore(tmp / "kb.sqlite") as store:
            ledger = Ledger(store, tmp / "blobs")
            for i in range(args.versions * args.batch):
                store.add(f"Person {i:06d}", f"The mother tongue of Person {i:06d} is", "English")
            commit_s, build_s = [], []
            for step in range(args.versions):
                t = time.perf_counter()
                arrays = step_arrays(rng, args.layers, args.hidden, args.mlp, args.batch)
                batch = store.next_batch(args.batch)
                t_commit = time.perf_counter()
                ledger.commit(arrays, {"layers": json.dumps([f"layers.{i}" for i in range(args.layers)]),
                                       "orientation": "out_in"}, batch.change_ids, config_digest="bench",
                              model_fingerprint="bench-model", metrics={"step": step}, actor="bench",
                              reason=f"step {step}")
                commit_s.append(time.perf_counter() - t_commit)
                build_s.append(t_commit - t)
            head = ledger.head()
            chain = ledger.chain(head.id)
            assert len(chain) == args.versions

            t = time.perf_counter()
            loaded = [ledger.load(v.id, expect_fingerprint="bench-model") for v in chain]
            load_all_s = time.perf_counter() - t
            assert all(len(arrays) == 4 * args.layers for arrays, _ in loaded)
            del loaded
            chain_s = min(_timed(lambda: ledger.chain(head.id)) for _ in range(5))
            order = random.Random(0).sample([v.id for v in chain], min(20, len(chain)))
            move_s = [_timed(lambda v=v: ledger.move_head(v, actor="bench", reason="rollback")) for v in order]

            step_bytes = int(statistics.median(v.blob_bytes for v in chain))
            total_bytes = ledger.blob_bytes_total()
            sqlite_bytes = sum(p.stat().st_size for p in tmp.glob("kb.sqlite*"))

    full_copy = args.layers * args.hidden * args.mlp * 4
    raw = args.layers * (args.hidden + 2 * args.mlp) * args.batch * 4 + args.layers * 8
    doc = {"layers": args.layers, "hidden": args.hidden, "mlp": args.mlp, "batch": args.batch,
           "versions": args.versions,
           "bytes_per_step": step_bytes, "array_bytes_per_step": raw, "header_bytes": step_bytes - raw,
           "full_copy_bytes": full_copy, "ratio_to_full_copy": step_bytes / full_copy,
           "blobs_total_bytes": total_bytes, "sqlite_bytes": sqlite_bytes,
           "commit_ms": {"median": statistics.median(commit_s) * 1e3, "max": max(commit_s) * 1e3},
           "make_arrays_ms": statistics.median(build_s) * 1e3,
           "load_chain_s": load_all_s, "load_per_version_ms": load_all_s / args.versions * 1e3,
           "chain_query_ms": chain_s * 1e3,
           "move_head_ms": {"median": statistics.median(move_s) * 1e3, "max": max(move_s) * 1e3},
           "python": platform.python_version(), "machine": platform.machine(), "numpy": np.__version__,
           "safetensors": __import__("safetensors").__version__, "sqlite": __import__("sqlite3").sqlite_version}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2))

    rows = [("bytes per step (blob)", f"{step_bytes:,} B ({raw:,} B arrays + {step_bytes - raw:,} B header)"),
            (f"full float32 copy of {args.layers} hook layers", f"{full_copy:,} B"),
            ("ratio per step (target ≤ 5%)", f"{step_bytes / full_copy:.2%}"),
            (f"blobs for {args.versions} versions", f"{total_bytes / 1e6:.1f} MB (SQLite {sqlite_bytes / 1e6:.1f} MB)"),
            ("commit one version (blob + fsync + transaction)",
             f"median {doc['commit_ms']['median']:.1f} ms, max {doc['commit_ms']['max']:.1f} ms"),
            (f"load + verify all blobs of a {args.versions}-version chain",
             f"{load_all_s * 1e3:.0f} ms ({doc['load_per_version_ms']:.2f} ms each)"),
            (f"chain({head.id}) query", f"{chain_s * 1e3:.2f} ms"),
            ("move HEAD (rollback, statuses re-derived)",
             f"median {doc['move_head_ms']['median']:.1f} ms, max {doc['move_head_ms']['max']:.1f} ms")]
    print(f"ledger benchmark: {args.layers} layers, hidden {args.hidden}, MLP {args.mlp}, batch {args.batch}\n")
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"\nwritten to {args.json}")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
