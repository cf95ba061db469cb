"""Removing and correcting facts in a real edit history (issue 16), on the default model (CPU, float32).

    .venv/bin/python bench/removal_bench.py --state /tmp/export-state --json docs/results/removal_bench.json

--state is a state directory whose HEAD carries real edits; when it holds none yet, the history is made there
first (--facts COUNTERFACT facts from case 5000, in steps of 10, the shipped configuration). On a copy of it:
- remove --removals facts spread evenly over the history, one `kbsync facts rm` + sync each, and time the
  sync (the removal's version committed and served);
- after each removal, the removed prompt's next token against the unedited model's; after all of them, the
  next token of every other edited prompt against before (≥ 99 % must keep it);
- rollback to before the first removal and back: the next tokens are exactly the same;
- a correction chain A -> B -> C -> B on one fact: the sync time of each step and which target wins;
- compaction (`kbsync compact`): its time and rate against the editing rate, the next tokens of every
  prompt against the masked history's, HEAD's chain (versions, bytes) before and after, and rollback across
  it;
- prune (`kbsync prune`): the weights off HEAD's history deleted, the ledger's bytes before and after, and
  a fresh process restoring HEAD with the same next tokens.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import DATA, ROOT, STATE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--removals", type=int, default=10)
    ap.add_argument("--facts", type=int, default=100, help="when --state holds no history yet: edit this many")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "removal_bench.json")
    ap.add_argument("--build-only", action="store_true", help="make the history in --state and stop (its time is "
                    "not a figure of this benchmark, so it may run beside other work)")
    args = ap.parse_args()
    import os
    os.environ.setdefault("KBSYNC_CACHE_DIR", str(STATE))
    from daemon.config import load_config
    from daemon.service import Service
    from editor.hook import Mode

    if not (args.state / "kb.sqlite").exists():          # make the history: --facts cases from 5000, steps of 10
        from make_history import make_history
        print(json.dumps(make_history(args.state, 5000, 5000 + args.facts)), flush=True)
    if args.build_only:
        return
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
    # where the changed ones sit: in a version with a removed fact (crosstalk inside a step) or elsewhere
    version_of = {c.subject: v.id for v in svc.ledger.chain(head0) for c in svc.live.carried(v.id)}
    removed_versions = {version_of.get(facts[i].subject) for i in chosen}
    changed = [{"fact": i, "subject": facts[i].subject, "version": version_of.get(facts[i].subject),
                "with_a_removed_fact": version_of.get(facts[i].subject) in removed_versions,
                "was_edit": bool(before[i] != base[i]), "now_base": bool(after[i] == base[i])}
               for i in others if after[i] != before[i]]

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

    # Compaction: the live facts solved again from the base model; its answers against the masked history's
    chain_bytes = lambda: sum(v.blob_bytes for v in svc.ledger.chain(svc.ledger.head().id))   # noqa: E731
    em, masked_head = svc.model_at_head()
    masked_answers = nxt()
    masked_chain = {"versions": len(svc.ledger.chain(masked_head)), "bytes": chain_bytes()}
    edit_s = [v.metrics.get("total_s") for v in svc.ledger.chain(head0) if v.metrics.get("total_s")]
    edited = sum(v.n_facts for v in svc.ledger.chain(head0) if v.metrics.get("total_s"))
    t = time.perf_counter()
    compaction = svc.compact(actor="bench")
    compact_s = time.perf_counter() - t
    em, compact_head = svc.model_at_head()
    compacted = nxt()
    live_idx = [i for i in range(len(facts)) if i not in chosen]
    svc.rollback(masked_head)
    exact_before = bool(torch.equal(nxt(), masked_answers))
    svc.rollback(compact_head)
    exact_after = bool(torch.equal(nxt(), compacted))
    compaction = {"seconds": round(compact_s, 2), "live_facts": compaction["live"],
                  "versions": compaction["versions"], "facts_per_s": round(compaction["live"] / compact_s, 3),
                  "editing_facts_per_s": round(edited / sum(edit_s), 3) if edit_s else None,
                  # the median step: robust to a history made while other work shared the CPU for a while
                  "editing_facts_per_s_median_step": round(edited / len(edit_s) / statistics.median(edit_s), 3)
                  if edit_s else None,
                  "same_next_token_as_masked": sum(bool(compacted[i] == masked_answers[i]) for i in range(len(facts))),
                  "of": len(facts),
                  "removed_answer_as_base": sum(bool(compacted[i] == base[i]) for i in chosen),
                  "live_same_as_masked": sum(bool(compacted[i] == masked_answers[i]) for i in live_idx),
                  "live": len(live_idx),
                  "head_chain_before": masked_chain,
                  "head_chain_after": {"versions": len(svc.ledger.chain(compact_head)), "bytes": chain_bytes()},
                  "rollback_exact": exact_before and exact_after}
    print(json.dumps(compaction), flush=True)

    # Prune: the weights off HEAD's history go; a fresh process restores HEAD and answers as before
    from daemon.compaction import branch_tip
    versions_after, bytes_after = len(svc.ledger.versions()), svc.ledger.blob_bytes_total()
    t = time.perf_counter()
    tip = branch_tip(svc.ledger, compact_head)
    report = svc.ledger.prune(keep=[tip] if tip else [], actor="bench", reason="removal bench")
    prune_s = time.perf_counter() - t
    svc.close()
    svc = Service(load_config(None, state), progress=False)
    em, at = svc.model_at_head()
    prune = {"seconds": round(prune_s, 3), "versions": len(report.versions), "blobs": report.blobs,
             "bytes_freed": report.bytes, "blob_bytes_before": bytes_after,
             "blob_bytes_after": svc.ledger.blob_bytes_total(),
             "blob_files_after": sum(1 for _ in (state / "versions").rglob("*.safetensors")),
             "head_restored_same_answers": at == compact_head and bool(torch.equal(nxt(), compacted))}
    print(json.dumps(prune), flush=True)

    doc = {"facts": len(facts), "versions_before": n_versions, "blob_bytes_before": blob_bytes,
           "versions_after": versions_after, "blob_bytes_after": bytes_after, "prune": prune,
           "removals": removals,
           "removal_sync_seconds_max": max(r["sync_seconds"] for r in removals),
           "removed_answer_as_base": sum(r["answers_as_base"] for r in removals),
           "others_kept": kept, "others": len(others), "others_changed": changed,
           "rollback_exact": exact_back and exact_forward,
           "corrections": corrections, "compaction": compaction}
    svc.close()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k not in ("removals", "corrections")}, indent=2))


if __name__ == "__main__":
    main()
