"""How fully a new edit is written deep in a history, and whether the solve's Σ K Kᵀ is what holds it back
(issue 15: greedy success fell from 0.92 at 1,000 edits to 0.65 at 4,000 under the prefix gate, while the
edits kept what they had at commit).

    .venv/bin/python bench/depth_write.py --checkpoint bench/out/ckpt-5000-prefix --depth 400 --steps 5 \\
        --json docs/results/depth_write.json

The history of a ``kbsync eval --checkpoint`` folder is restored to ``--depth`` steps, then ``--steps`` steps
of 10 tuning cases (COUNTERFACT ``--cases``, none of them in the history) are edited on top, once per arm,
each arm from the same restored history:
- ``shipped``: the solve as shipped, C = λ E[kkᵀ] + Σ K Kᵀ over every earlier step;
- ``no-history``: the same step without Σ K Kᵀ (``compute_delta(accumulate=False)``): C = λ E[kkᵀ] alone.
  Under the prefix gate a token routed to an older edit never takes a later step's Δ, so Σ K Kᵀ protects
  nothing there; it still shrinks every new write, and more so the more keys it holds;
- ``window:N``: Σ K Kᵀ over the last N steps only (``compute_delta(key_steps=N)``); ``weight:B``: B x Σ K Kᵀ
  (patched in for the diagnosis: the editor has no such switch);
and, for the new edits after the last step, the teacher-forced metrics and greedy success (editor/metrics.py),
their locality prompts against the unedited model's answers, and perplexity on the held-out text. Also from
the base model (depth 0), the shipped solve, for the same cases. With ``--old-every K``, the teacher-forced
metrics of every K-th edit of the restored history as well (``old_*``: what the new steps did to the edits
below them; the history's cases are COUNTERFACT from ``--first-case`` on). A diagnosis on tuning cases: it
ships nothing.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import DATA, ROOT, checkpoint_steps, default_editable


def middle_way(arm: str, shipped_kk):
    """The ``HookLayer.KK`` property for ``weight:B`` arms (the shipped one for the others)."""
    kind, _, value = arm.partition(":")
    if kind == "weight":
        return property(lambda hook: float(value) * shipped_kk.fget(hook))
    return shipped_kk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "bench/out/ckpt-5000-prefix")
    ap.add_argument("--depth", type=int, default=400, help="steps of the history to restore")
    ap.add_argument("--steps", type=int, default=5, help="new steps of 10 edits on top")
    ap.add_argument("--cases", default="4000:4050", help="tuning cases (COUNTERFACT, 0-4999)")
    ap.add_argument("--arms", default="base,shipped,no-history", help="base, shipped, no-history, window:N, weight:B")
    ap.add_argument("--old-every", type=int, default=0, help="also score every K-th edit of the history (0: no)")
    ap.add_argument("--first-case", type=int, default=5000, help="the history run's first COUNTERFACT record")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/out/depth_write.json")
    args = ap.parse_args()

    from editor.hook import HookLayer, Mode
    from editor.metrics import case_probes, generated, generation_metrics, perplexity, probe_metrics, score_probes
    from editor.step import apply_delta, compute_delta, restore_state
    from evaluation.cases import load_cases
    from evaluation.harness import heldout_texts

    cfg, em, stats = default_editable(with_stats=True)
    manifest, saved = checkpoint_steps(args.checkpoint, args.depth)
    lo, hi = (int(x) for x in args.cases.split(":"))
    cases = load_cases("counterfact", DATA / "counterfact-edit.json", (lo, hi))[:10 * args.steps]
    old = load_cases("counterfact", DATA / "counterfact-edit.json",
                     (args.first_case, args.first_case + args.depth * manifest["batch"]))[::args.old_every] \
        if args.old_every else []
    if old and old[0].case_id != manifest["cases"][0]:
        raise SystemExit(f"{args.checkpoint} does not start at COUNTERFACT record {args.first_case}; pass --first-case")
    texts = heldout_texts(DATA / "wikitext2-valid.txt")
    with em.mode(Mode.OFF):
        base_scores = score_probes(em, case_probes(cases))
        base_loc = [base_scores[6 * i + 4][1] for i in range(len(cases))]
        base_loc_text = generated(em, [c.loc_prompt for c in cases])
        old_base_loc = [s[1] for s in score_probes(em, case_probes(old)[4::6])]
    shipped_kk = HookLayer.KK
    doc = {"checkpoint": str(args.checkpoint), "depth_steps": args.depth, "cases": args.cases,
           "gate": cfg.gate, "arms": {}}
    for arm in args.arms.split(","):
        em.reset()
        em.configure_gate(cfg.gate, cfg.alpha0_for(cfg.gate), cfg.confirm_alpha)
        depth = 0 if arm == "base" else args.depth
        restore_state(em, saved[:depth])
        HookLayer.KK = middle_way(arm, shipped_kk)
        t = time.perf_counter()
        try:
            for s in range(args.steps):
                chunk = cases[10 * s:10 * s + 10]
                delta = compute_delta(em, [c.request for c in chunk], stats, cfg, accumulate=arm != "no-history",
                                      key_steps=int(arm.partition(":")[2]) if arm.startswith("window:") else 0)
                apply_delta(em, delta)
        finally:
            HookLayer.KK = shipped_kk
        seconds = time.perf_counter() - t
        with em.mode(Mode.VALIDATED):
            row = {"depth_edits": depth * manifest["batch"], "edit_seconds": round(seconds, 1),
                   **probe_metrics(score_probes(em, case_probes(cases)), base_loc),
                   **generation_metrics(em, cases, base_loc_text),
                   "perplexity": round(perplexity(em, texts), 4)}
            if old and depth:
                row |= {f"old_{k}": v for k, v in probe_metrics(score_probes(em, case_probes(old)), old_base_loc).items()}
        doc["arms"][arm] = row
        print(arm, json.dumps(row), flush=True)
    em.close()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
