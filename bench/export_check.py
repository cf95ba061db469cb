"""Exports on the real default model: `kbsync export --format peft|merged` against kbsync's no-hook mode, and what
serving without the gate costs.

    .venv/bin/python bench/export_check.py --facts 100 --json docs/results/export_check.json

Edits COUNTERFACT cases 5000.. (the report range; --facts of them, steps of 10) through the real service on a
fresh state directory (kept with --state DIR and reused when it already carries them), exports HEAD both ways,
then compares on the edited prompts and their locality prompts:
- greedy answers (8 new tokens) of the peft-loaded model, the merged model and kbsync's no-hook mode (Δ on
  every token), and the largest logit difference at the next token (float32);
- what the gate buys: edit success (next token = the target's first token) and locality (next token = the
  unedited model's) with the gate (how kbsync and the vLLM plugin serve) and without it (how the exports serve).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from common import DATA, ROOT, STATE

MAX_NEW = 8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", type=int, default=100)
    ap.add_argument("--state", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "export_check.json")
    args = ap.parse_args()

    import os
    os.environ.setdefault("KBSYNC_CACHE_DIR", str(STATE))
    from daemon.config import load_config
    from daemon.service import Service
    from editor.hook import Mode
    from editor.loading import model_directory
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    state = args.state or Path(tempfile.mkdtemp(prefix="export-check-"))
    state.mkdir(parents=True, exist_ok=True)
    model_dir = model_directory("embedded", STATE)
    (state / "config.toml").write_text(f"[model]\nsource = '{model_dir}'\ndevice = 'cpu'\ndtype = 'float32'\n")
    cases = json.loads((DATA / "counterfact-edit.json").read_text())[5000:5000 + args.facts]
    svc = Service(load_config(None, state), progress=False)
    t = time.perf_counter()
    if svc.store.count() < len(cases):
        for c in cases:
            svc.store.add(c["subject"], c["prompt"].replace(c["subject"], "{}", 1), c["target_new"])
        while svc.store.counts().pending:
            svc.sync()
    edit_s = time.perf_counter() - t
    head = svc.ledger.head().id
    em, _ = svc.model_at_head()
    tok = em.tokenizer
    edited = [c["prompt"] for c in cases]
    local = [c["locality_prompt"] for c in cases]
    prompts = edited + local

    def first_ids(texts):
        return [tok(" " + x.strip(), add_special_tokens=False)["input_ids"][0] for x in texts]

    with em.mode(Mode.OFF):
        base_next = em.next_token_logits(prompts).argmax(-1)
    gated_next = em.next_token_logits(prompts).argmax(-1)
    with em.mode(Mode.TEMPORARY):
        nohook_logits = em.next_token_logits(prompts)
        nohook_answers = em.generate(prompts, MAX_NEW)
    nohook_next = nohook_logits.argmax(-1)

    out = Path(tempfile.mkdtemp(prefix="exports-"))
    t = time.perf_counter()
    peft_doc = svc.export(head, "peft", out / "peft")
    peft_s = time.perf_counter() - t
    t = time.perf_counter()
    svc.export(head, "merged", out / "merged")
    merged_s = time.perf_counter() - t

    def run(model):
        tok.padding_side = "right"
        enc = tok(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**enc).logits
        last = enc["attention_mask"].sum(1) - 1
        nxt = logits[torch.arange(len(prompts)), last].float()
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id)
        return nxt, tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    results = {}
    for name, load in (("peft", lambda: PeftModel.from_pretrained(
                            AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), out / "peft")),
                       ("merged", lambda: AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32))):
        model = load().eval()
        nxt, answers = run(model)
        results[name] = {
            "same_answers_edited": sum(a == b for a, b in zip(answers[:len(edited)], nohook_answers)),
            "same_answers_locality": sum(a == b for a, b in zip(answers[len(edited):], nohook_answers[len(edited):])),
            "max_abs_logit_diff": float((nxt - nohook_logits).abs().max()),
        }
        del model

    targets = torch.tensor(first_ids([c["target_new"] for c in cases]))
    n = len(cases)
    doc = {
        "facts": n, "head": head, "edit_seconds": round(edit_s, 1), "export_seconds": {"peft": round(peft_s, 2),
                                                                                       "merged": round(merged_s, 2)},
        "peft_ranks": peft_doc["ranks"], "peft_relative_error": peft_doc["relative_error"],
        "exports": results,
        "gate": {"edit_success": float((gated_next[:n] == targets).float().mean()),
                 "locality": float((gated_next[n:] == base_next[n:]).float().mean())},
        "no_hook": {"edit_success": float((nohook_next[:n] == targets).float().mean()),
                    "locality": float((nohook_next[n:] == base_next[n:]).float().mean())},
        "state": str(state),
    }
    svc.close()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
