"""Which other facts a removal disturbs: are they the ones the removed edits write most onto? (issue 16)

    .venv/bin/python bench/removal_crosstalk.py --state /tmp/history-1000 --result docs/results/removal_bench_1000.json

Reads the history bench/removal_bench.py ran on (a copy of --state; nothing is written) and its result (which
other facts changed their next token after the removals). For every other live fact X it ranks the removed
edits' first-order write onto X's stored keys, max over removed Y of |u_Y| |v_Yᵀ k_X| summed over the edited
layers ("abs"), and the same over |u_X| ("rel"), and prints where the facts that changed fall in that ranking
(0 = the most written onto). If removals disturbed mainly what they wrote onto, the changed facts would
rank near 0.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from common import service_on_copy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--result", type=Path, required=True)
    args = ap.parse_args()
    svc = service_on_copy(args.state, "crosstalk-")
    em, head = svc.model_at_head()
    facts = svc.store.facts()
    live = svc.live.live_columns(head)
    result = json.loads(args.result.read_text())
    removed_facts = [r["fact"] for r in result["removals"]]
    changed = {c["fact"]: c for c in result["others_changed"]}
    first = next(iter(em.hooks.values()))
    starts, s = [], 0
    for u in first.U:                                    # global column index of (step, column)
        starts.append(s)
        s += u.shape[1]
    cols = {i: [starts[st] + c for st, c in live.get((f.subject, f.template), [])] for i, f in enumerate(facts)}
    removed = torch.tensor([c for i in removed_facts for c in cols[i]])
    others = [i for i in range(len(facts)) if i not in removed_facts and cols[i]]
    absolute, relative = torch.zeros(len(facts)), torch.zeros(len(facts))
    for h in em.hooks.values():
        U, V, _ = h._factors()
        K = torch.cat(h.K, 1)
        norm = U.norm(dim=0)                                        # (r,)
        write = (V[:, removed].T @ K).abs() * norm[removed][:, None]   # (n_removed, r): |u_Y| |v_Yᵀ k_X|
        for i in others:
            w = write[:, cols[i]].max()
            absolute[i] += w
            relative[i] += w / norm[cols[i]].max()
    doc = {"others": len(others)}
    for name, score in (("abs", absolute), ("rel", relative)):
        rank = {i: r for r, i in enumerate(sorted(others, key=lambda i: -float(score[i])))}
        for kind, want in (("edits_changed", True), ("non_edits_changed", False)):
            ranks = sorted(rank[i] for i, c in changed.items() if c["was_edit"] is want and i in rank)
            doc[f"{name}_{kind}_ranks"] = ranks
            doc[f"{name}_{kind}_median_rank"] = statistics.median(ranks) if ranks else None
    svc.close()
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
