"""Removing and correcting facts in a real edit history (issue 16), on the default model (CPU, float32).

    .venv/bin/python bench/removal_bench.py --state /tmp/export-state --json docs/results/removal_bench.json

--state is a state directory whose HEAD carries real edits (bench/export_check.py leaves one with 100
COUNTERFACT facts, cases 5000-5099, in 10 steps of 10). On a copy of it:
- remove --removals facts spread evenly over the history, one `kbsync facts rm` + sync each, and time the
  sync (the removal's version committed and served);
- after each removal, the removed prompt's next token against the unedited model's; after all of them, the
  next token of every other edited prompt against before (≥ 99 % must keep it);
- rollback to before the first removal and back: the next tokens are exactly the same;
- a correction chain A -> B -> C -> B on one fact: the sync time of each step and which target wins.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import DATA, ROOT, STATE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--removals", type=int, default=10)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "removal_bench.json")
    args = ap.parse_args()
    import os
    os.environ.setdefault("KBSYNC_CACHE_DIR", str(STATE))
    from daemon.config import load_config
    from daemon.service import Service
    from editor.hook import Mode

    state = Path(tempfile.mkdtemp(prefix="removal-")) / "state"
    shutil.copytree(args.state, state)
    svc = Service(load_config(None, state), progress=False)
    facts = svc.store.facts()
    cases = {c["subject"]: c for c in json.loads((DATA / "counterfact-edit.json").read_text())[5000:6000]}
    em, head0 = svc.model_at_head()
    tok = em.tokenizer
    prompts = [f.prompt for f in facts]
    nxt = lambda: em.next_token_logits(prompts).argmax(-1)           # noqa: E731
    with em.mode(Mode.OFF):
        base = nxt()
    before = nxt()
    n_versions = len(svc.ledger.versions())
    blob_bytes = svc.ledger.blob_bytes_total()

    step = max(1, len(facts) // args.removals)
    chosen = list(range(0, len(facts), step))[:args.removals]       # spread over the history (facts by id)
    removals = []
    for i in chosen:
        f = facts[i]
        svc.store.remove(f.subject, f.template, source="bench")
        t = time.perf_counter()
        reports = svc.sync()
        seconds = time.perf_counter() - t
        em, _ = svc.model_at_head()
        now = nxt()
        removals.append({"fact": i, "subject": f.subject, "kind": [r.kind for r in reports],
                         "sync_seconds": round(seconds, 3),
                         "answers_as_base": bool(now[i] == base[i]),
                         "answered_edit_before": bool(before[i] != base[i])})
        print(json.dumps(removals[-1]), flush=True)
    after = nxt()
    others = [i for i in range(len(facts)) if i not in chosen]
    kept = sum(bool(after[i] == before[i]) for i in others)

    svc.rollback(head0)
    exact_back = bool(torch.equal(nxt(), before))
    last = svc.ledger.versions()[-1].id
    svc.rollback(last)
    exact_forward = bool(torch.equal(nxt(), after))

    # A -> B -> C -> B on one fact that is still live: A its edited target, B the true answer, C another
    # fact's target
    f = facts[others[0]]
    other = facts[others[1]]
    B = cases[f.subject]["ground_truth"] if f.subject in cases else other.target
    first = lambda s: tok(" " + s.strip(), add_special_tokens=False)["input_ids"][0]   # noqa: E731
    corrections = []
    for target in (B, other.target, B):
        svc.store.add(f.subject, f.template, target, source="bench")
        t = time.perf_counter()
        reports = svc.sync()
        seconds = time.perf_counter() - t
        em, _ = svc.model_at_head()
        top = int(em.next_token_logits([f.prompt]).argmax(-1)[0])
        corrections.append({"target": target, "kind": [r.kind for r in reports], "sync_seconds": round(seconds, 2),
                            "top_is_target": top == first(target)})
        print(json.dumps(corrections[-1]), flush=True)

    doc = {"facts": len(facts), "versions_before": n_versions, "blob_bytes_before": blob_bytes,
           "versions_after": len(svc.ledger.versions()), "blob_bytes_after": svc.ledger.blob_bytes_total(),
           "removals": removals,
           "removal_sync_seconds_max": max(r["sync_seconds"] for r in removals),
           "removed_answer_as_base": sum(r["answers_as_base"] for r in removals),
           "others_kept": kept, "others": len(others), "rollback_exact": exact_back and exact_forward,
           "corrections": corrections}
    svc.close()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k not in ("removals", "corrections")}, indent=2))


if __name__ == "__main__":
    main()
