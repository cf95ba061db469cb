"""Choose the editable layers and λ for a model by measurement on COUNTERFACT tuning cases.

For each configuration: a consecutive run of STEPS steps x BATCH facts from the tuning range, then
efficacy (P(new) > P(true) on the prompt), paraphrase efficacy (same on the rephrased prompt), locality
(next-token prediction on each case's locality prompt unchanged) and seconds per step.

    .venv/bin/python bench/layer_sweep.py --out bench/out/layer_sweep.json

Writes JSON and prints a markdown table (docs/layers.md holds the last run).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from editor.config import EditConfig, StatsConfig
from editor.loading import load_model
from editor.model import EditableModel
from editor.requests import EditRequest
from editor.stats import key_stats
from editor.step import apply_delta, compute_delta

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

WINDOWS = [(1, 2, 3, 4, 5), (3, 4, 5, 6, 7), (6, 7, 8, 9, 10), (9, 10, 11, 12, 13), (13, 14, 15, 16, 17), (3, 4, 5)]
LAMBDAS = [500.0, 1500.0, 4000.0, 15000.0]


def first_token(tok, text: str) -> int:
    return tok(" " + text, add_special_tokens=False)["input_ids"][0]


def evaluate(em, tok, cases, base_loc) -> dict:
    new = torch.tensor([first_token(tok, c["target_new"]) for c in cases])
    old = torch.tensor([first_token(tok, c["ground_truth"]) for c in cases])
    out = {}
    for name, key in (("efficacy", "prompt"), ("paraphrase_efficacy", "rephrase_prompt")):
        lp = em.next_token_logits([c[key] for c in cases]).log_softmax(-1)
        out[name] = float((lp.gather(1, new[:, None]) > lp.gather(1, old[:, None])).float().mean())
    loc = em.next_token_logits([c["locality_prompt"] for c in cases]).argmax(-1)
    out["locality"] = float((loc == base_loc).float().mean())
    return out


def run(model, tok, cases, layers, lam, steps, batch, stats_tokens, corpus) -> dict:
    base = EditConfig.from_toml(ROOT / "configs/models/smollm2-135m.toml")
    stats_cfg = base.stats if corpus == "config" else StatsConfig(corpus=corpus, n_tokens=stats_tokens, seq_len=256)
    cfg = base.replace(layers=tuple(layers), mom2_weight=lam, stats=stats_cfg)
    em = EditableModel.for_config(model, tok, cfg)
    try:
        t = time.perf_counter()
        stats = key_stats(em, cfg.stats, ROOT / ".cache/state/stats", progress=False)
        stats_s = time.perf_counter() - t
        edited = cases[:steps * batch]
        base_loc = em.next_token_logits([c["locality_prompt"] for c in edited]).argmax(-1)
        t = time.perf_counter()
        for s in range(steps):
            chunk = edited[s * batch:(s + 1) * batch]
            apply_delta(em, compute_delta(em, [EditRequest(c["subject"], c["prompt"], c["target_new"]) for c in chunk], stats, cfg))
        seconds = (time.perf_counter() - t) / steps
        return {"layers": list(layers), "lambda": lam, "corpus": corpus, **evaluate(em, tok, edited, base_loc),
                "seconds_per_step": round(seconds, 1), "stats_seconds": round(stats_s, 1)}
    finally:
        em.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="0:20", help="COUNTERFACT range A:B (tuning cases only: below 2000)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--stats-tokens", type=int, default=20_000)
    ap.add_argument("--grid", default=None,
                    help="configurations as FIRST-LAST@LAMBDA,... (default: the windows and λ values above)")
    ap.add_argument("--corpus", default=str(DATA / "wikitext2-valid.txt"),
                    help="statistics corpus; 'config' = the model config's own [editor.stats]")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/layer_sweep.json")
    args = ap.parse_args()
    a, b = (int(x) for x in args.cases.split(":"))
    assert b <= 2000, "tune on cases 0-1999 only"
    cases = json.loads((DATA / "counterfact-edit.json").read_text())[a:b]
    model, tok = load_model("embedded", ROOT / ".cache/state", device="cpu", dtype="float32")
    grid = [(w, 1500.0) for w in WINDOWS] + [((3, 4, 5, 6, 7), lam) for lam in LAMBDAS if lam != 1500.0]
    if args.grid:
        grid = []
        for item in args.grid.split(","):
            span, lam = item.split("@")
            lo, hi = (int(x) for x in span.split("-"))
            grid.append((tuple(range(lo, hi + 1)), float(lam)))
    results = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for layers, lam in grid:
        results.append(run(model, tok, cases, layers, lam, args.steps, args.batch, args.stats_tokens, args.corpus))
        print(json.dumps(results[-1]), flush=True)
        args.out.write_text(json.dumps({"cases": args.cases, "steps": args.steps, "batch": args.batch,
                                        "results": results}, indent=2))
    print("\n| layers | λ | corpus | efficacy | paraphrase | locality | s/step |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['layers'][0]}-{r['layers'][-1]} | {r['lambda']:g} | {Path(r['corpus']).name} | {r['efficacy']:.2f} | "
              f"{r['paraphrase_efficacy']:.2f} | {r['locality']:.2f} | {r['seconds_per_step']} |")


if __name__ == "__main__":
    main()
