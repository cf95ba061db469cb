"""How much of each edit a saved history still holds, by its age (issue 15: why efficacy falls with edits).

    .venv/bin/python bench/edit_retention.py --state /tmp/history-tune-1000 --cases 0:1000 --json docs/results/edit_retention_tune.json

Every step keeps the target residual z it solved each fact for (``StepDelta.targets``, after block L at the
subject's last token). For every k-th edited case this reads, in the served (routed) mode, h_L at that
token and scores reach = 1 - ‖h_L - z‖ / ‖h_L(unedited) - z‖ (1: the target itself, 0: the unedited
model), whether the last edited layer still routes the token, and the greedy answer. It does so at HEAD and
right after the case's own step (its chain restored), so a fact the solve wrote only in part shows a low
reach at commit, and a fact later steps wore away shows a reach that falls from commit to HEAD. The
first-layer bars are set post hoc at ``--margin`` x each edit's own prompt's score (as bench/route_margin.py).
A diagnosis: on report cases it chooses nothing.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import DATA, edited_cases, service_on_copy
from route_margin import own_scores, set_route_bars


@torch.no_grad()
def probe(em, cfg, cases) -> dict[str, torch.Tensor]:
    """h_L at each case's subject's last token (N, d), and whether the last edited layer routes it (N,)."""
    from editor.requests import StepBatch
    from editor.step import _keys_and_residual
    batch = StepBatch(em.tokenizer, [c.request for c in cases], ("{}",), cfg.kl_template)
    lookup = torch.tensor([r.lookup for r in batch.keys])                    # (N,)
    got: dict[str, torch.Tensor] = {}

    def grab_route(module, inputs, output):
        route = em.context.token_route
        got["routed"] = route[torch.arange(len(lookup)), lookup].clone() if route is not None \
            else torch.zeros(len(lookup), dtype=torch.bool)

    handle = em.spec.projection_module(em.model, max(em.layers)).register_forward_hook(grab_route)
    try:
        _, got["h"] = _keys_and_residual(em, batch, max(em.layers), cfg)     # (N, d) h_L at the lookup
    finally:
        handle.remove()
    return got


def reach(h, z, h0) -> torch.Tensor:
    return 1 - (h - z).norm(dim=-1) / (h0 - z).norm(dim=-1).clamp(min=1e-6)   # (N,)


def answers(em, cases) -> list[bool]:
    from editor.metrics import generated
    return [t.strip().startswith(c.target_new.strip()) for t, c in zip(generated(em, [c.prompt for c in cases]), cases)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--cases", default="0:1000")
    ap.add_argument("--every", type=int, default=2, help="every k-th edited case")
    ap.add_argument("--commit-every", type=int, default=10, help="restore the chain after every k-th step")
    ap.add_argument("--margin", type=float, default=0.9)
    ap.add_argument("--gate", default=None, help="serve the history with this per-token gate instead of its own")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    svc = service_on_copy(args.state, "edit-retention-")
    from editor.hook import Mode
    from editor.step import restore_state
    from evaluation.cases import load_cases

    em, head = svc.model_at_head()
    if args.gate:
        em.context.gate = args.gate
    cfg = svc.cfg.editor
    deltas = [d for d in svc.live.deltas(head) if d.layers]
    a, b = (int(x) for x in args.cases.split(":"))
    cases = load_cases("counterfact", DATA / "counterfact-edit.json", (a, b))
    rows = edited_cases(svc, head, em, cases)[::args.every]                  # (column, step, column in it, case)
    own = own_scores(em, [(g, c.prompt) for g, _, _, c in rows])
    bars = own * args.margin if args.margin > 0 else None
    sub = [c for *_, c in rows]
    z = torch.stack([deltas[s].targets[j] for _, s, j, _ in rows]).float()   # (N, d)
    with em.mode(Mode.OFF):
        h0 = probe(em, cfg, sub)["h"]
    set_route_bars(em, bars)
    got = probe(em, cfg, sub)
    at_head = {"reach": reach(got["h"], z, h0), "routed": got["routed"], "answer": torch.tensor(answers(em, sub))}
    # right after each sampled case's own step: restore its chain (for steps every --commit-every)
    commit = {"reach": torch.full((len(rows),), torch.nan), "answer": torch.zeros(len(rows), dtype=torch.bool),
              "routed": torch.zeros(len(rows), dtype=torch.bool), "measured": torch.zeros(len(rows), dtype=torch.bool)}
    for s in range(0, len(deltas), args.commit_every):
        mine = [i for i, (_, st, _, _) in enumerate(rows) if st == s]
        if not mine:
            continue
        restore_state(em, deltas[:s + 1])
        em.context.gate = args.gate or em.context.gate
        n = sum(d.layers[0].U.shape[1] for d in deltas[:s + 1])
        set_route_bars(em, bars[:n] if bars is not None else None)
        part = [sub[i] for i in mine]
        g = probe(em, cfg, part)
        commit["reach"][mine] = reach(g["h"], z[mine], h0[mine])
        commit["routed"][mine] = g["routed"]
        commit["answer"][mine] = torch.tensor(answers(em, part))
        commit["measured"][mine] = True
    svc.close()
    steps = torch.tensor([s for _, s, _, _ in rows])
    n_steps = len(deltas)
    doc = {"state": str(args.state), "cases": args.cases, "steps": n_steps, "scored": len(rows), "margin": args.margin,
           "head": {"reach_median": round(float(at_head["reach"].median()), 3),
                    "routed": round(float(at_head["routed"].float().mean()), 3),
                    "gen_success": round(float(at_head["answer"].float().mean()), 3)},
           "by_age": []}
    m = commit["measured"]
    fail = ~at_head["answer"]
    doc["failures_at_head"] = {"n": int(fail.sum()), "not_routed": int((fail & ~at_head["routed"]).sum()),
                               "routed_reach_median": round(float(at_head["reach"][fail & at_head["routed"]].median()), 3)
                               if (fail & at_head["routed"]).any() else None}
    doc["commit_vs_head"] = {"measured": int(m.sum()),
                             "reach_commit_median": round(float(commit["reach"][m].median()), 3),
                             "reach_head_median": round(float(at_head["reach"][m].median()), 3),
                             "gen_success_commit": round(float(commit["answer"][m].float().mean()), 3),
                             "gen_success_head": round(float(at_head["answer"][m].float().mean()), 3),
                             "routed_commit": round(float(commit["routed"][m].float().mean()), 3),
                             "routed_head": round(float(at_head["routed"][m].float().mean()), 3)}
    for lo in range(0, n_steps, max(n_steps // 5, 1)):
        hi = lo + max(n_steps // 5, 1)
        sel = (steps >= lo) & (steps < hi)
        if sel.any():
            doc["by_age"].append({"steps": f"{lo}-{hi - 1}", "n": int(sel.sum()),
                                  "reach_head_median": round(float(at_head["reach"][sel].median()), 3),
                                  "routed_head": round(float(at_head["routed"][sel].float().mean()), 3),
                                  "gen_success_head": round(float(at_head["answer"][sel].float().mean()), 3)})
    print(json.dumps(doc, indent=1), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
