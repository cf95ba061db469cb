"""Time one COMEBA-HK step on the default model (CPU), variants side by side in one run.

    .venv/bin/python bench/step_speed.py --steps 3 --batch 10 --variants opt_dtype=float32,opt_dtype=bfloat16

The report names the CPU (torch's capability and whether it has native bf16) and what ``opt_dtype = "auto"``
picks on it, so results from different machines can be told apart.

Each variant starts from the base model and edits the same COUNTERFACT cases (``--first-case``, default 5000) as ``--steps``
consecutive steps; variants alternate step by step so machine noise hits them alike. Prints the time
split (target optimisation, keys, solve, routing) and the step's own success (P(new) > P(true) on its
prompts right after the step). Also times the key statistics build when they are not cached yet.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import DATA, ROOT, STATE, hparams, load


BASELINE = "8be8a8b"     # a variant of this name runs that commit's target optimisation (issue 15's reference)


def baseline_targets(commit: str = BASELINE):
    """``compute_targets`` as it was at ``commit``, loaded from git into this process (same model, same cases).

    Everything around it (keys, solve, routing) is today's; the target optimisation is what issue 15 asks to
    make 4x cheaper, and its code is the part that changed."""
    import subprocess
    import types

    import editor.targets as now
    src = subprocess.run(["git", "show", f"{commit}:editor/targets.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType(f"editor.targets_{commit}")
    mod.__package__ = "editor"
    import sys
    sys.modules[mod.__name__] = mod                  # dataclasses look their module up there
    exec(compile(src, f"{commit}:editor/targets.py", "exec"), mod.__dict__)

    def run(em, batch, cfg):
        old = mod.compute_targets(em, batch, cfg.replace(opt_dtype="float32"))
        return now.Targets(Z=old.Z, h0=old.h0, nll=old.nll, top1=torch.zeros(len(old.nll), dtype=torch.bool),
                           steps=old.steps, opt_dtype="float32")
    return run


def parse_variant(text: str) -> dict:
    out = {}
    if text == BASELINE:
        return {"opt_dtype": "float32", "early_stop": "nll", "v_lr": 0.5, "v_steps": 25,
                "contexts": ("{}", "The following is a fact. {}", "Here is what I know. {}", "In short, {}",
                             "According to the records, {}")}       # 8be8a8b's configuration
    for part in filter(None, text.split(";")):
        k, v = part.split("=")
        current = getattr(BASE, k)
        if k == "contexts":                              # contexts=N: the first N of the shipped ones
            out[k] = BASE.contexts[:int(v)]
            continue
        out[k] = (v.lower() in ("1", "true", "yes")) if isinstance(current, bool) else type(current)(v)
    return out


def main() -> None:
    global BASE
    from editor.metrics import case_probes, probe_metrics, score_probes
    from evaluation.cases import load_cases
    from editor.hook import Mode
    from editor.model import EditableModel
    from editor.stats import key_stats
    from editor.step import apply_delta, compute_delta

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--variants", default="opt_dtype=float32,opt_dtype=bfloat16",
                    help="comma-separated variants; each is k=v;k=v over [editor] fields")
    ap.add_argument("--first-case", type=int, default=5000, help="COUNTERFACT case to start at (0-4999: tuning)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/step_speed.json")
    args = ap.parse_args()
    BASE = hparams()
    model, tok = load()
    em = EditableModel.for_config(model, tok, BASE)
    t = time.perf_counter()
    stats = key_stats(em, BASE.stats, STATE / "stats", progress=False)
    stats_s = time.perf_counter() - t
    first = args.first_case
    cases = load_cases("counterfact", DATA / "counterfact-edit.json", (first, first + args.steps * args.batch))
    variants = {v: BASE.replace(**parse_variant(v)) for v in args.variants.split(",")}
    import editor.step as step_mod
    new_targets, old_targets = step_mod.compute_targets, (baseline_targets() if BASELINE in variants else None)
    states = {v: [] for v in variants}             # committed deltas per variant
    res = {v: {"total_s": [], "targets_s": [], "keys_s": [], "solve_s": [], "routing_s": [], "opt_steps": [], "efficacy": [], "top1": [], "para_top1": []}
           for v in variants}
    for s in range(args.steps):
        chunk = cases[s * args.batch:(s + 1) * args.batch]
        for v, cfg in variants.items():
            em.reset()
            for d in states[v]:
                apply_delta(em, d)
            t = time.perf_counter()
            if v == BASELINE:
                step_mod.compute_targets = old_targets
            try:
                d = compute_delta(em, [c.request for c in chunk], stats, cfg)
            finally:
                step_mod.compute_targets = new_targets
            wall = time.perf_counter() - t
            apply_delta(em, d)
            states[v].append(d)
            for k in ("targets_s", "keys_s", "solve_s", "routing_s", "opt_steps"):
                res[v][k].append(d.metrics.get(k, 0.0))
            res[v]["total_s"].append(wall)
            with em.mode(Mode.VALIDATED):
                res[v]["efficacy"].append(probe_metrics(score_probes(em, case_probes(chunk)), [torch.zeros(1)] * len(chunk))["efficacy"])
                first = torch.tensor([em.tokenizer(" " + c.target_new.strip(), add_special_tokens=False)["input_ids"][0]
                                      for c in chunk])
                for key, prompts in (("top1", [c.prompt for c in chunk]), ("para_top1", [c.paraphrase for c in chunk])):
                    res[v][key].append(float((em.next_token_logits(prompts).argmax(-1).cpu() == first).float().mean()))
            print(f"step {s + 1} {v}: {wall:.1f} s, targets {d.metrics.get('targets_s', 0):.1f} s, "
                  f"efficacy {res[v]['efficacy'][-1]:.2f}, top-1 {res[v]['top1'][-1]:.2f}, "
                  f"paraphrase top-1 {res[v]['para_top1'][-1]:.2f}", flush=True)
    from editor.precision import choose_opt_dtype, cpu_features

    cpu = cpu_features()
    report = {"cpu": cpu.describe(), "native_bf16": cpu.native_bf16,
              "auto_picks": choose_opt_dtype("auto", "cpu").dtype,
              "stats_build_s": round(stats_s, 1), "threads": torch.get_num_threads(), "batch": args.batch,
              "variants": {v: {k: round(statistics.median(x), 3) for k, x in r.items()}
                           | {f"mean_{k}": round(statistics.mean(r[k]), 3) for k in ("total_s", "efficacy", "top1", "para_top1")} | {"steps": len(r["total_s"])}
                           for v, r in res.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
