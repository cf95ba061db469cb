"""How many tokens the hooks route, on unrelated text and on the edit prompts, after consecutive edits.

    .venv/bin/python bench/routing_share.py --steps 10 --batch 10      # COUNTERFACT tuning cases 0-99

After each evaluated step: per edited layer, α and the share of real tokens with z ≥ α (those that take
the edited weights) on 24 WikiText-2 paragraphs (256 tokens each) and on the bare edit prompts so far.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import DATA, ROOT, default_editable


@torch.no_grad()
def routed_share(em, texts: list[str], max_len: int = 256) -> dict[int, float]:
    """Per layer: routed real tokens / real tokens over ``texts`` (one sequence each, validated mode)."""
    from editor.hook import sequence_stats

    counts = {l: [0, 0] for l in em.layers}
    inputs: dict[int, torch.Tensor] = {}
    handles = [em.spec.projection_module(em.model, l).register_forward_hook(
        lambda m, i, o, l=l: inputs.__setitem__(l, i[0].detach())) for l in em.layers]
    try:
        for t in texts:
            ids = em.tokenizer(t, return_tensors="pt")["input_ids"][:, :max_len].to(em.device)
            em.model(input_ids=ids)
            for l, hook in em.hooks.items():
                M = hook.delta_out(inputs[l]).norm(dim=-1)                       # (1, T)
                real = torch.ones_like(M, dtype=torch.bool)
                mean, std = sequence_stats(M, real)
                z = (M - mean[:, None]) / std[:, None]
                counts[l][0] += int((z >= hook.alpha).sum())
                counts[l][1] += M.numel()
    finally:
        for h in handles:
            h.remove()
    return {l: round(a / max(b, 1), 4) for l, (a, b) in counts.items()}


def main() -> None:
    from evaluation.cases import load_cases
    from evaluation.harness import heldout_texts
    from editor.hook import Mode
    from editor.step import apply_delta, compute_delta

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/routing_share.json")
    args = ap.parse_args()
    cfg, em, stats = default_editable(with_stats=True)
    cases = load_cases("counterfact", DATA / "counterfact-edit.json", (0, args.steps * args.batch))
    wiki = heldout_texts(DATA / "wikitext2-valid.txt")
    rows = []
    for s in range(1, args.steps + 1):
        chunk = cases[(s - 1) * args.batch:s * args.batch]
        apply_delta(em, compute_delta(em, [c.request for c in chunk], stats, cfg))
        if s % args.every and s != args.steps:
            continue
        with em.mode(Mode.VALIDATED):
            row = {"edits": s * args.batch, "alpha": {l: round(h.alpha, 3) for l, h in em.hooks.items()},
                   "wikitext": routed_share(em, wiki),
                   "edit_prompts": routed_share(em, [c.prompt for c in cases[:s * args.batch]])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
