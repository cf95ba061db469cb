"""The cascade gate's first-layer bar per edit, post hoc on a saved history (issue 15, tuning).

A token that layer 1 routes and a later layer drops still changed what attended to it in between: on the
1,000-fact history of the removal bench, 142 of the 260 locality prompts whose greedy continuation differs
from the unedited model's route no token past layer 1. ``[editor] route_margin`` m gives each edit a
first-layer bar of max(α, m x its own prompt's score there) (editor/step.py ``_confirm_bars``), so such a
token is not routed at all. Layer 1's input does not depend on any edit, so the bars can be set on a history
made without them; this script sets them for each m and scores the history's cases (teacher-forced and
greedy, ``editor.metrics``) and WikiText-2 perplexity. Tune on cases 0-4999 only:

    .venv/bin/python bench/make_history.py --cases 0:1000 --state /tmp/history-tune-1000
    .venv/bin/python bench/route_margin.py --state /tmp/history-tune-1000 --cases 0:1000 --margins 0,0.6,0.7,0.8 --json docs/results/route_margin_tune.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import DATA, edited_cases, service_on_copy


@torch.no_grad()
def own_scores(em, live_cases) -> torch.Tensor:
    """Each committed edit's own bare prompt's best score against it at the first edited layer, (r,) in the
    hooks' column order (0 for columns without a live case)."""
    from editor.hook import Mode
    first = em.hooks[em.layers[0]]
    got = {}
    h = first.module.register_forward_hook(lambda m, i, o: got.__setitem__("x", i[0].detach()))
    out = torch.zeros(first.rank)
    try:
        for col, prompt in live_cases:
            with em.mode(Mode.OFF):
                em.model(input_ids=em.tokenizer(prompt, return_tensors="pt")["input_ids"])
            s = first.edit_scores(got["x"][0], torch.full((got["x"].shape[1], 1), col))    # (T, 1)
            out[col] = float(s.max())
    finally:
        h.remove()
    return out


def set_route_bars(em, bars: torch.Tensor | None) -> None:
    """Give the first edited layer's steps these per-edit bars (None: none, α alone)."""
    first = em.hooks[em.layers[0]]
    at = 0
    for i, u in enumerate(first.U):
        n = u.shape[1]
        first.bars[i] = None if bars is None else bars[at:at + n].clone()
        at += n
    first._route_bars = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--cases", default="0:1000")
    ap.add_argument("--every", type=int, default=1, help="score every k-th edited case")
    ap.add_argument("--margins", default="0,0.6,0.7,0.8")
    ap.add_argument("--gate", default=None, help="serve the history with this per-token gate instead of its own "
                    "(cascade -> prefix: the same routes, Δ only up to the matched edit's step)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    svc = service_on_copy(args.state, "route-margin-")
    from editor.hook import Mode
    from editor.metrics import case_probes, generated, generation_metrics, perplexity, probe_metrics, score_probes
    from evaluation.cases import load_cases
    from evaluation.harness import heldout_texts

    em, head = svc.model_at_head()
    if args.gate:
        em.context.gate = args.gate
    a, b = (int(x) for x in args.cases.split(":"))
    cases = load_cases("counterfact", DATA / "counterfact-edit.json", (a, b))
    edited = [(col, c) for col, _, _, c in edited_cases(svc, head, em, cases)][::args.every]
    t = time.perf_counter()
    own = own_scores(em, [(col, c.prompt) for col, c in edited])
    sub = [c for _, c in edited]
    para = own_scores(em, [(col, c.paraphrase) for col, c in edited])
    ratio = torch.tensor([float(para[col] / own[col]) for col, _ in edited if own[col] > 0])
    margins = [float(x) for x in args.margins.split(",")]
    texts = heldout_texts(DATA / "wikitext2-valid.txt")
    with em.mode(Mode.OFF):
        base_scores = score_probes(em, case_probes(sub))
        base_loc = [base_scores[6 * i + 4][1] for i in range(len(sub))]
        base_loc_text = generated(em, [c.loc_prompt for c in sub])
        base_ppl = perplexity(em, texts) if texts else None
    doc = {"state": str(args.state), "cases": args.cases, "edited_cases_scored": len(sub), "versions": head,
           "alpha_first_layer": em.hooks[em.layers[0]].alpha, "own_score_median": float(own[own > 0].median()),
           "paraphrase_over_own_quantiles": {q: round(float(ratio.quantile(q)), 3) for q in (0.05, 0.1, 0.25, 0.5)},
           "paraphrases_below_margin": {str(m): round(float((ratio < m).float().mean()), 3) for m in margins},
           "base": {**probe_metrics(base_scores, base_loc), "perplexity": base_ppl}, "margins": {}}
    print(json.dumps(doc), flush=True)
    for m in margins:
        set_route_bars(em, own * m if m > 0 else None)
        row = {**probe_metrics(score_probes(em, case_probes(sub)), base_loc),
               **generation_metrics(em, sub, base_loc_text),
               "perplexity": perplexity(em, texts) if texts else None}
        if texts and base_ppl:
            row["perplexity_change"] = round(row["perplexity"] / base_ppl - 1, 4)
        doc["margins"][str(m)] = row
        print(json.dumps({"margin": m, **row, "seconds": round(time.perf_counter() - t, 1)}), flush=True)
    svc.close()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
