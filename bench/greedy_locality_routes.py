"""Why greedy locality continuations differ from the unedited model's on a saved history (issue 15).

    .venv/bin/python bench/greedy_locality_routes.py --state /tmp/history-1000 --cases 5000:6000 --json docs/results/greedy_locality_routes_1000.json

For every edited case's locality prompt: the greedy continuation (``editor.metrics.GEN_TOKENS``) with the hooks
and without. Each prompt whose continuation differs is decoded again one at a time while the routes are
recorded after the first and the last edited layer, and classed: a prompt token routed through every layer
("prompt"), else a generated token routed through every layer ("decode"), else a token routed at the first
layer and dropped later ("dropped": its Δx was taken back, what the layers in between made of it was not),
else none. A diagnosis: on report cases it chooses nothing.
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch

from common import DATA, service_on_copy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--cases", default="5000:6000")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    svc = service_on_copy(args.state, "greedy-locality-")
    from editor.hook import Mode
    from editor.metrics import GEN_TOKENS, generated
    from evaluation.cases import load_cases

    em, head = svc.model_at_head()
    a, b = (int(x) for x in args.cases.split(":"))
    live = svc.live.live_columns(head)
    cases = [c for c in load_cases("counterfact", DATA / "counterfact-edit.json", (a, b))
             if live.get((c.subject, c.prompt.replace(c.subject, "{}", 1)))]
    prompts = [c.loc_prompt for c in cases]
    with em.mode(Mode.OFF):
        base = generated(em, prompts)
    hooked = generated(em, prompts)
    differ = [i for i in range(len(cases)) if base[i] != hooked[i]]
    routes: list[tuple[str, torch.Tensor]] = []
    first, last = (em.spec.projection_module(em.model, l) for l in (min(em.layers), max(em.layers)))
    grab = lambda where: (lambda m, i, o: routes.append((where, em.context.token_route[0].clone())))   # noqa: E731
    handles = [first.register_forward_hook(grab("first")), last.register_forward_hook(grab("last"))]
    kinds, examples = collections.Counter(), []
    try:
        for i in differ:
            routes.clear()
            em.generate([prompts[i]], max_new_tokens=GEN_TOKENS)
            firsts = [r for w, r in routes if w == "first"]
            lasts = [r for w, r in routes if w == "last"]
            kind = ("prompt" if lasts[0].any() else "decode" if any(r.any() for r in lasts[1:])
                    else "dropped" if any(r.any() for r in firsts) else "none")
            kinds[kind] += 1
            examples.append({"prompt": prompts[i], "base": base[i], "hooked": hooked[i], "kind": kind})
    finally:
        for h in handles:
            h.remove()
        svc.close()
    doc = {"state": str(args.state), "cases": args.cases, "edited_cases": len(cases), "differ": len(differ),
           "greedy_locality": round(1 - len(differ) / max(len(cases), 1), 4), "kinds": dict(kinds),
           "examples": examples}
    print(json.dumps({k: v for k, v in doc.items() if k != "examples"}), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
