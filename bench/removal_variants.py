"""Two ways to take removed facts out, side by side on one history (issue 16): zero their edits' Δ as well
as stop them routing (``masked``, removals before stop 26), or only stop them routing (``unrouted``).

    .venv/bin/python bench/removal_variants.py --state /tmp/history-1000 --json docs/results/removal_variants_1000.json

On a copy of --state: the next token of every fact's prompt at HEAD, then with the edits of facts 0, 100, ...
(by id, --removals of them) taken out in memory each way: how many other prompts keep their next token, how
many removed prompts give the unedited model's, and the margin (top-1 minus top-2 logit at HEAD) of the
prompts that changed against all edited prompts'.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from common import service_on_copy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--removals", type=int, default=10)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    svc = service_on_copy(args.state, "removal-variants-")
    from editor.hook import Mode

    em, head = svc.model_at_head()
    facts = svc.store.facts()
    prompts = [f.prompt for f in facts]
    logits = lambda: torch.cat([em.next_token_logits(prompts[i:i + 100]) for i in range(0, len(prompts), 100)])  # noqa: E731
    with em.mode(Mode.OFF):
        base = logits().argmax(-1)
    at_head = logits()
    before = at_head.argmax(-1)
    top2 = at_head.topk(2, -1).values
    margin = top2[:, 0] - top2[:, 1]
    step = max(1, len(facts) // args.removals)
    chosen = list(range(0, len(facts), step))[:args.removals]
    live = svc.live.live_columns(head)
    cols = sorted(m for i in chosen for m in live.get((facts[i].subject, facts[i].template), []))
    others = [i for i in range(len(facts)) if i not in chosen]
    doc = {"state": str(args.state), "facts": len(facts), "removed": chosen, "columns": len(cols),
           "edited_prompts_median_margin": round(statistics.median(float(margin[i]) for i in range(len(facts))
                                                                    if before[i] != base[i]), 3)}
    for name, keep_delta in (("masked", False), ("unrouted", True)):
        for h in em.hooks.values():
            for s, c in cols:
                h.mask(s, c, keep_delta=keep_delta)
        after = logits().argmax(-1)
        changed = [i for i in others if after[i] != before[i]]
        doc[name] = {"others_kept": len(others) - len(changed), "others": len(others),
                     "removed_answer_as_base": sum(bool(after[i] == base[i]) for i in chosen),
                     "changed": changed,
                     "changed_median_margin": round(statistics.median(float(margin[i]) for i in changed), 3)
                     if changed else None}
        print(json.dumps({name: doc[name]}), flush=True)
        svc.live.back_to_head()                                      # the hooks exactly at HEAD again
        assert torch.equal(logits().argmax(-1), before)
    svc.close()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
