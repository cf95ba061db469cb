"""How a routed token's match with its edit changes with depth (the evidence behind the cascade gate).

On a saved many-edit state (``bench/noise_gate.py`` makes it: tuning cases 0..edits-1, steps of 10), routed
with the ``token`` gate: for every token that layer 1 routes, its score against the edit that routed it,
s_l = (v_eᵀ x_l) / (v_eᵀ k_e), at each edited layer l, for four kinds of text: the edit prompts, their
paraphrases, the locality prompts (same relation, another subject) and WikiText-2 reference paragraphs.
Then, for confirmation rules "s_l ≥ β at layers 2..": how many prompts of each kind keep a routed token.

    .venv/bin/python bench/gate_depth.py --edits 500 --json docs/results/gate_depth_500.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import DATA, ROOT, default_editable, projection_inputs, reference_texts
from noise_gate import load_steps


@torch.no_grad()
def routed_scores(em, prompts: list[str]) -> list[list[list[float]]]:
    """Per prompt, per token layer 1 routes: [s_l for each edited layer] against layer 1's best edit."""
    from editor.hook import Mode
    out = []
    with projection_inputs(em) as inputs, em.mode(Mode.VALIDATED):
        for p in prompts:
            em.model(input_ids=em.tokenizer(p, return_tensors="pt")["input_ids"][:, :256])
            route = em.context.token_route[0]
            scores = {}
            for l in em.layers:
                _, V, inv_s = em.hooks[l]._factors()
                scores[l] = (inputs[l][0].float() @ V) * inv_s       # (T, r)
            edit = scores[em.layers[0]].argmax(1)                    # (T,)
            out.append([[float(scores[l][t, edit[t]]) for l in em.layers] for t in route.nonzero().flatten().tolist()])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=int, default=500)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--state", type=Path, default=ROOT / "bench" / "out" / "noise-gate-steps")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "gate_depth.json")
    args = ap.parse_args()

    from editor.step import restore_state
    from evaluation.cases import load_cases

    folder = args.state / f"0-{args.edits}-b{args.batch}"
    if not folder.exists():
        raise SystemExit(f"no saved state at {folder}: run bench/noise_gate.py --edits {args.edits} first")
    cfg, em = default_editable()
    em.configure_gate("token", cfg.token_alpha0)
    restore_state(em, load_steps(folder))
    cases = load_cases("counterfact", DATA / "counterfact-edit.json", (0, args.edits))
    kinds = {"edit": [c.request.prompt.replace("{}", c.subject) for c in cases],
             "paraphrase": [c.paraphrase for c in cases],
             "locality": [c.loc_prompt for c in cases],
             "wikitext": reference_texts(16)}
    got = {k: routed_scores(em, v) for k, v in kinds.items()}
    report = {"edits": args.edits, "layers": list(em.layers), "alpha": {str(l): h.alpha for l, h in em.hooks.items()},
              "score_quantiles": {}, "rules": {}}
    for k, per in got.items():
        flat = [t for p in per for t in p]
        report["score_quantiles"][k] = {
            str(l): {q: round(float(torch.tensor([t[i] for t in flat]).quantile(float(q))), 3) for q in ("0.1", "0.5", "0.9")}
            for i, l in enumerate(em.layers)} if flat else {}
    for beta in (0.3, 0.4, 0.5, 0.6):
        row = {}
        for k, per in got.items():
            kept = [[t for t in p if min(t[1:]) >= beta] for p in per]
            row[k] = {"prompts_routed": sum(1 for p in kept if p), "tokens_routed": sum(len(p) for p in kept)}
        report["rules"][f"confirm>={beta}"] = row
    report["rules"]["token gate"] = {k: {"prompts_routed": sum(1 for p in per if p),
                                        "tokens_routed": sum(len(p) for p in per)} for k, per in got.items()}
    lost = [i for i, p in enumerate(got["edit"]) if not any(min(t[1:]) >= 0.4 for t in p)]
    starts = [c.request.prompt.replace("{}", c.subject).startswith(c.subject) for c in cases]
    report["edit_prompts_lost_at_0.4"] = {"prompts": [kinds["edit"][i] for i in lost],
                                          "start_with_subject": sum(starts[i] for i in lost),
                                          "all_prompts_starting_with_subject": sum(starts)}
    print("edit prompts with no token confirmed at 0.4:", len(lost), "of which start with their subject:",
          sum(starts[i] for i in lost), "| all edit prompts starting with their subject:", sum(starts), "of", len(cases))
    for name, row in report["rules"].items():
        print(f"{name:14}", {k: (v["prompts_routed"], v["tokens_routed"]) for k, v in row.items()})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
