"""Removal, restore and rollback in a 1,000-version history (issue 16): does their cost grow with depth?

    .venv/bin/python bench/removal_depth.py --versions 1000 --json docs/results/removal_depth.json

The real default model and the real service (store, ledger, live model, verify gate). The history: --versions
versions of one fact each (COUNTERFACT 5000 on, held at their true answers), committed through the service's
own plan (a fact per column, as a real step records it) with rank-1 factors of the real shapes and random
values (V = K, α 2.2: a version costs what a real one of one fact costs to store, load, restore and mask;
what real edits answer, and a correction, are measured by bench/removal_bench.py: a real edit on top of
1,000 random keys of full norm is not one a real history would see, since they dominate C). Then, timed:
- restoring HEAD in a fresh service (a daemon start): every blob of the chain loaded and verified;
- `facts rm` + sync of the fact in version 1, the middle one and the last: one masking version each;
- rollback to the middle version and back to HEAD.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from common import DATA, ROOT, STATE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", type=int, default=1000)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "removal_depth.json")
    args = ap.parse_args()
    os.environ.setdefault("KBSYNC_CACHE_DIR", str(STATE))
    from daemon.config import load_config
    from daemon.service import Service, request_for
    from editor.loading import model_directory
    from editor.step import LayerDelta, StepDelta

    state = Path(tempfile.mkdtemp(prefix="removal-depth-")) / "state"
    state.mkdir(parents=True)
    (state / "config.toml").write_text(
        f"[model]\nsource = '{model_directory('embedded', STATE)}'\ndevice = 'cpu'\ndtype = 'float32'\n")
    svc = Service(load_config(None, state), progress=False)
    em, _ = svc.model_at_head()
    digest = svc.cfg.editor.replace(opt_dtype=svc.live.precision.dtype).digest()
    g = torch.Generator().manual_seed(0)
    cases = json.loads((DATA / "counterfact-edit.json").read_text())[5000:5000 + args.versions]
    templates = [c["prompt"].replace(c["subject"], "{}", 1) for c in cases]
    t = time.perf_counter()
    for i, c in enumerate(cases):
        change = svc.store.add(c["subject"], templates[i], c["ground_truth"], source="bench")
        layers = []
        for layer, h in em.hooks.items():
            K = torch.randn(h.d_in, 1, generator=g)
            layers.append(LayerDelta(layer, torch.randn(h.d_out, 1, generator=g) * 1e-3, K, K, 2.2))
        delta = StepDelta(tuple(layers), (request_for(change),), em.fingerprint(), digest, gate=em.gate)
        svc._commit_one(delta, [change.id], "bench", f"synthetic version {i + 1}")
    build_s = time.perf_counter() - t
    head = svc.ledger.head().id
    svc.close()

    t = time.perf_counter()                                  # a daemon start: HEAD restored from the ledger
    svc = Service(load_config(None, state), progress=False)
    em, at = svc.model_at_head()
    restore_s = time.perf_counter() - t
    assert at == head and sum(h.rank for h in em.hooks.values()) == args.versions * len(em.hooks)
    versions = [v.id for v in svc.ledger.chain(head)]
    depths = {"first": 0, "middle": len(versions) // 2, "last": len(versions) - 1}
    facts = {ch.subject: ch for v in versions for ch in svc.live.carried(v)}
    removals = {}
    for name, i in depths.items():
        svc.store.remove(cases[i]["subject"], templates[i], source="bench")
        t = time.perf_counter()
        reports = svc.sync()
        removals[name] = {"version": versions[i], "kind": [r.kind for r in reports],
                          "sync_seconds": round(time.perf_counter() - t, 3),
                          "masked": svc.ledger.head().note}
        print(json.dumps({name: removals[name]}), flush=True)

    now = svc.ledger.head().id
    rollbacks = {}
    for name, target in (("middle", versions[len(versions) // 2]), ("head", now)):
        t = time.perf_counter()
        svc.rollback(target, actor="bench")
        for h in em.hooks.values():                          # what the first query builds: the dense Δ
            h.D
        rollbacks[name] = round(time.perf_counter() - t, 3)
    svc.close()
    doc = {"versions": args.versions, "facts": len(facts), "build_seconds": round(build_s, 1),
           "restore_head_seconds": round(restore_s, 2), "removals": removals,
           "rollback_seconds": rollbacks, "torch_threads": torch.get_num_threads()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
