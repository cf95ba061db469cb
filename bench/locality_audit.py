"""Which edits the locality prompts reach deep in a history, and which of them move (issue 15).

    .venv/bin/python bench/locality_audit.py --checkpoint bench/out/ckpt-5000-prefix --every 5 \\
        --json docs/results/locality_audit_5000_prefix.json

The history of a ``kbsync eval --checkpoint`` folder (a prefix or cascade gate) is restored; for every k-th
edited case its locality probe (a COUNTERFACT neighbourhood prompt and the unedited model's answer, as
``kbsync eval`` scores it, teacher-forced) is run once with the routing records read at the first and the
last edited layer. Each probe is classed by its most-routed token:

- ``clean``: no token routed at the first layer (the probe sees the unedited model);
- ``dropped``: routed at the first layer, no token still routed after the last (Δx taken back there, but what
  the blocks between made of it stays);
- ``own``: a token routed through the last layer to the case's own edit;
- ``other``: a token routed through the last layer to another edit.

Beside each class: the probes' locality (share of answer tokens whose argmax is the unedited one's) and how
many moved (locality below 1). The routed ones also by the age of the newest edit they reach, so a miss
splits into what ordinary-looking prompts pick up from young edits and from old ones.

Each probe is also checked against the edit stream's text: ``contradicted`` when its prompt names the
subject of an edit in the history whose true answer is the probe's answer (the probe asks the very fact that
edit changed, e.g. "Keith Olbermann, who is employed by" -> ESPN after an edit "Keith Olbermann, who works
for" -> BBC: a correct editor must move it), ``subject`` when it names an edited subject otherwise, ``none``
when it names none. The JSON keeps every probe's row. A diagnosis: it chooses nothing.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import history_arguments, restored_history

CLASSES = ("clean", "dropped", "own", "other")
MENTIONS = ("none", "subject", "contradicted")


def mentions(cases, edited) -> list[str]:
    """Per case in ``cases``, what its locality prompt names of the ``edited`` cases (``MENTIONS``);
    ``contradicted`` is ``kbsync eval``'s rule for a contested probe (evaluation/cases.py)."""
    from evaluation.cases import first_contesting
    subjects = {c.subject for c in edited if len(c.subject) > 3}   # shorter subjects match inside other words
    return ["contradicted" if j is not None else "subject" if any(s in c.loc_prompt for s in subjects) else "none"
            for c, j in zip(cases, first_contesting(cases, edited))]


@torch.no_grad()
def probe_routes(em, probes, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per probe, over its teacher-forced tokens (prompt and answer but the last): whether any token was
    routed at the first edited layer, (N,) bool, and the edit columns routed through the last, a list."""
    tok, first, last = em.tokenizer, min(em.layers), max(em.layers)
    routed_first, reached = [], []
    got: dict[str, torch.Tensor] = {}

    def grab_first(module, inputs, output):
        got["first"] = em.context.token_route.clone()                          # (B, T)

    def grab_last(module, inputs, output):
        edits, alive = em.context.token_edit                                    # (B, T, k) x2
        pick = alive.to(torch.uint8).argmax(-1, keepdim=True)                   # the first still matching
        best = edits.gather(-1, pick)[..., 0]                                   # (B, T)
        got["last"] = torch.where(em.context.token_route & alive.any(-1), best, -1)

    for i in range(0, len(probes), batch_size):
        rows = []
        for p in probes[i:i + batch_size]:
            ans = tok(p.answer if p.answer[:1].isspace() else " " + p.answer, add_special_tokens=False)["input_ids"]
            rows.append(tok(p.prompt)["input_ids"] + ans[:-1])                 # as editor.metrics.score_probes
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, :len(r)], mask[j, :len(r)] = torch.tensor(r), 1
        handles = [em.spec.projection_module(em.model, first).register_forward_hook(grab_first),
                   em.spec.projection_module(em.model, last).register_forward_hook(grab_last)]
        try:
            em.forward_until(last, ids.to(em.device), mask.to(em.device))
        finally:
            for h in handles:
                h.remove()
        real = mask.bool().to(got["first"].device)
        routed_first.append((got["first"] & real).any(-1).cpu())
        reached += [sorted(set(row[row >= 0].tolist())) for row in torch.where(real, got["last"], -1).cpu()]
    return torch.cat(routed_first), reached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    history_arguments(ap)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()

    from editor.hook import Mode
    from editor.metrics import Probe, score_probes

    cfg, em, saved, step_of, cases = restored_history(args.checkpoint, args.depth, args.first_case)
    picked = list(range(0, len(cases), args.every))
    probes = [Probe(cases[i].loc_prompt, cases[i].loc_answer) for i in picked]
    with em.mode(Mode.OFF):
        base = [s[1] for s in score_probes(em, probes)]
    with em.mode(Mode.VALIDATED):
        edited = [s[1] for s in score_probes(em, probes)]
        first, reached = probe_routes(em, probes)
    em.close()
    locality = torch.tensor([float((e == b).float().mean()) for e, b in zip(edited, base)])   # (N,)
    cls = torch.tensor([CLASSES.index("own" if i in r else "other") if r else
                        CLASSES.index("dropped" if f else "clean")
                        for i, r, f in zip(picked, reached, first.tolist())])
    steps = len(saved)
    newest = torch.tensor([int(step_of[r].max()) if r else -1 for r in reached])                # (N,)
    doc = {"checkpoint": str(args.checkpoint), "steps": steps, "gate": saved[-1].gate, "probes": len(picked),
           "locality": round(float(locality.mean()), 4), "moved": int((locality < 1).sum()), "classes": {},
           "routed_by_age": []}
    for k, name in enumerate(CLASSES):
        m = cls == k
        doc["classes"][name] = {"probes": int(m.sum()), "share": round(float(m.float().mean()), 4),
                                "locality": round(float(locality[m].mean()), 4) if m.any() else None,
                                "moved": int((m & (locality < 1)).sum())}
    named = mentions([cases[i] for i in picked], cases[:len(step_of)])
    for kind in MENTIONS:
        m = torch.tensor([n == kind for n in named])
        doc.setdefault("mentions", {})[kind] = {"probes": int(m.sum()),
                                                "locality": round(float(locality[m].mean()), 4) if m.any() else None,
                                                "moved": int((m & (locality < 1)).sum()),
                                                "routed_other": int((m & (cls == CLASSES.index("other"))).sum())}
    age = steps - 1 - newest                                                    # steps made after that edit's
    edges = torch.linspace(0, steps, 6).long().tolist()
    for a, b in zip(edges, edges[1:]):
        m = (newest >= 0) & (age >= a) & (age < b)
        if m.any():
            doc["routed_by_age"].append({"age_steps": f"{a}-{b - 1}", "probes": int(m.sum()),
                                         "locality": round(float(locality[m].mean()), 4),
                                         "moved": int((m & (locality < 1)).sum())})
    doc["rows"] = [{"case": cases[i].case_id, "class": CLASSES[int(k)], "mentions": n,
                    "locality": round(float(x), 4), "newest_step": int(s), "reached": len(r)}
                   for i, k, n, x, s, r in zip(picked, cls, named, locality, newest, reached)]
    print(json.dumps({k: v for k, v in doc.items() if k != "rows"}, indent=2), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
