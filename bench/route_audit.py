"""Where each edit prompt routes deep in a history, and whether the failed edits were misrouted (issue 15).

    .venv/bin/python bench/route_audit.py --checkpoint bench/out/ckpt-5000-prefix --every 5 \\
        --json docs/results/route_audit_5000.json

The history of a ``kbsync eval --checkpoint`` folder (a prefix or cascade gate) is restored; for every k-th
edited case its bare edit prompt is run once, and at the subject's last token (where the edit was written)
this reads which edit the first edited layer matched best and which candidate still matched after the last
edited layer (the prefix gate gives the token Δ up to that edit's step). Each case is classed:

- ``own``: its own edit, or another edit of its own step (the same Δ prefix);
- ``earlier``: an edit of an earlier step: the token misses its own step's write;
- ``later``: an edit of a later step: it gets its own write plus the later steps' Δ on its key;
- ``dropped``: routed at the first layer, no candidate left by the last (its Δx taken back);
- ``unrouted``: below every bar at the first layer.

Beside each class: the efficacy (teacher-forced, P(new) > P(true)) of its cases, so the efficacy lost at depth
splits into edits lost to routing and edits routed home but written too weakly. Then the teacher-forced
metrics of the sampled cases and the perplexity, as ``kbsync eval`` reports them.

``--upto newest`` serves the same history with a variant of the prefix rule, for a diagnosis: a routed token
takes Δ up to the newest step among its candidates still matching, not the best-matching one's (a token
that matches its own edit and an older one gets its own step's write). A diagnosis: it chooses nothing.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import DATA, history_arguments, restored_history

CLASSES = ("own", "earlier", "later", "dropped", "unrouted")


def upto_newest(hook, edits: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """(B, T) the end column of the newest step among a token's candidates still matching (0: none)."""
    return torch.where(alive, hook.step_ends()[edits], 0).amax(dim=-1)


@torch.no_grad()
def routes(em, cfg, cases, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per case, at its subject's last token: the first layer's best candidate (-1: none) and the candidate
    still matching after the last edited layer (-1: not routed there); two (N,)."""
    from editor.requests import StepBatch
    first_best, last_best = [], []
    got: dict[str, torch.Tensor] = {}

    def best_alive(at):
        edits, alive = em.context.token_edit                                    # (B, T, k) x2
        e, a = edits[at], alive[at]                                             # (B, k)
        pick = a.to(torch.uint8).argmax(-1, keepdim=True)                       # (B, 1) the first still matching
        return torch.where(a.any(-1), e.gather(-1, pick)[:, 0], -1)             # (B,)

    for i in range(0, len(cases), batch_size):
        chunk = cases[i:i + batch_size]
        batch = StepBatch(em.tokenizer, [c.request for c in chunk], ("{}",), cfg.kl_template)
        rows = batch.keys
        ids, mask = batch.tensors(rows, em.device)                              # (B, T)
        at = (torch.arange(len(rows)), torch.tensor([r.lookup for r in rows]))

        def grab_first(module, inputs, output):
            got["first"] = best_alive(at)

        def grab_last(module, inputs, output):
            got["last"] = torch.where(em.context.token_route[at], best_alive(at), -1)

        first, last = min(em.layers), max(em.layers)
        handles = [em.spec.projection_module(em.model, first).register_forward_hook(grab_first),
                   em.spec.projection_module(em.model, last).register_forward_hook(grab_last)]
        try:
            em.forward_until(last, ids, mask)
        finally:
            for h in handles:
                h.remove()
        first_best.append(got["first"])
        last_best.append(got["last"])
    return torch.cat(first_best), torch.cat(last_best)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    history_arguments(ap)
    ap.add_argument("--upto", choices=("best", "newest"), default="best",
                    help="the prefix rule's Δ end: the best-matching candidate's step (shipped) or the newest one's")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()

    from editor.hook import HookLayer, Mode
    from editor.metrics import Probe, case_probes, perplexity, probe_metrics, score_probes
    from evaluation.harness import heldout_texts

    cfg, em, saved, step_of, cases = restored_history(args.checkpoint, args.depth, args.first_case)
    sizes = [d.layers[0].U.shape[1] for d in saved]
    picked = list(range(0, len(cases), args.every))
    sub = [cases[i] for i in picked]
    own_step = step_of[picked]                                                  # (N,)
    if args.upto == "newest":
        HookLayer._upto = upto_newest
    texts = heldout_texts(DATA / "wikitext2-valid.txt")
    with em.mode(Mode.OFF):
        base_loc = [s[1] for s in score_probes(em, [Probe(c.loc_prompt, c.loc_answer) for c in sub])]
    with em.mode(Mode.VALIDATED):
        first, last = routes(em, cfg, sub)
        scores = score_probes(em, case_probes(sub))
        ppl = perplexity(em, texts)
    em.close()
    effective = torch.tensor([scores[6 * i][0] < scores[6 * i + 1][0] for i in range(len(sub))])
    last_step = torch.where(last >= 0, step_of[last.clamp(min=0)], -1)
    cls = torch.full((len(sub),), CLASSES.index("own"))
    cls[(last >= 0) & (last_step < own_step)] = CLASSES.index("earlier")
    cls[(last >= 0) & (last_step > own_step)] = CLASSES.index("later")
    cls[(first >= 0) & (last < 0)] = CLASSES.index("dropped")
    cls[first < 0] = CLASSES.index("unrouted")
    age = len(sizes) - 1 - own_step                                             # steps made after the case's own
    doc = {"checkpoint": str(args.checkpoint), "steps": len(sizes), "gate": saved[-1].gate, "upto": args.upto,
           "cases": len(sub), **probe_metrics(scores, base_loc), "perplexity": round(ppl, 4),
           "classes": {}, "by_age": []}
    for k, name in enumerate(CLASSES):
        m = cls == k
        doc["classes"][name] = {"cases": int(m.sum()), "share": round(float(m.float().mean()), 4),
                                "efficacy": round(float(effective[m].float().mean()), 4) if m.any() else None,
                                "failed": int((m & ~effective).sum())}
    edges = torch.linspace(0, len(sizes), 6).long().tolist()
    for a, b in zip(edges, edges[1:]):
        m = (age >= a) & (age < b)
        if m.any():
            doc["by_age"].append({"age_steps": f"{a}-{b - 1}", "cases": int(m.sum()),
                                  "efficacy": round(float(effective[m].float().mean()), 4),
                                  **{name: round(float((cls[m] == k).float().mean()), 4) for k, name in enumerate(CLASSES)}})
    print(json.dumps(doc, indent=2), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
