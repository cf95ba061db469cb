"""Resident memory of a long ``kbsync eval`` run, step by step, with and without giving freed heap pages back
after each step (``evaluation.harness.run_method`` now calls ``daemon.memory.release_freed_memory``).

    .venv/bin/python bench/memory_eval.py --checkpoint bench/out/ckpt-5000-prefix --depth 400 --steps 8 \\
        --json docs/results/memory_eval.json

The history of a ``kbsync eval --checkpoint`` folder is restored to ``--depth`` steps in a fresh process per
variant, then ``--steps`` steps of 10 COUNTERFACT cases (9000 on) are edited as the harness edits them. After
each step: RSS, the bytes of every live tensor (gc), and glibc's own counts (``mallinfo2``: bytes in use,
bytes free inside the heap), so a leak (in use grows) is told apart from fragmentation (free grows).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

from common import DATA, ROOT
from memory_growth import rss_mb, rss_slope, tensor_mb, variant_rows


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def one(args) -> list[dict]:
    from daemon.memory import release_freed_memory
    from editor.step import apply_delta, compute_delta, restore_state
    from evaluation.cases import load_cases

    from common import checkpoint_steps, default_editable

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    cfg, em, stats = default_editable(with_stats=True)
    em.configure_gate(cfg.gate, cfg.alpha0_for(cfg.gate), cfg.confirm_alpha)
    _, saved = checkpoint_steps(args.checkpoint, args.depth)
    restore_state(em, saved)
    del saved
    cases = load_cases("counterfact", DATA / "counterfact-edit.json", (9000, 9000 + 10 * args.steps))
    out = []
    for s in range(args.steps):
        t = time.perf_counter()
        apply_delta(em, compute_delta(em, [c.request for c in cases[10 * s:10 * s + 10]], stats, cfg))
        if not args.no_trim:
            release_freed_memory()
        seconds = time.perf_counter() - t
        m = libc.mallinfo2()
        out.append({"step": s + 1, "seconds": round(seconds, 2), "rss_mb": round(rss_mb()),
                    "tensor_mb": round(tensor_mb()), "heap_in_use_mb": m.uordblks >> 20,
                    "heap_free_mb": m.fordblks >> 20})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "bench/out/ckpt-5000-prefix")
    ap.add_argument("--depth", type=int, default=400)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--variants", default="trim,no-trim")
    ap.add_argument("--no-trim", action="store_true", help="(internal) one run without the trim")
    ap.add_argument("--one", action="store_true", help="(internal) run one variant and print its rows")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/out/memory_eval.json")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    doc = {"checkpoint": str(args.checkpoint), "depth_steps": args.depth, "steps": args.steps}
    for name in args.variants.split(","):                                          # a fresh process each
        rows = doc[name] = variant_rows(__file__, ["--checkpoint", str(args.checkpoint), "--depth", str(args.depth),
                                                   "--steps", str(args.steps), *(["--no-trim"] if name == "no-trim" else [])])
        print(f"{name:8} RSS {rows[0]['rss_mb']} -> {rows[-1]['rss_mb']} MB ({rss_slope(rows):.0f} MB per step), heap in use "
              f"{rows[0]['heap_in_use_mb']} -> {rows[-1]['heap_in_use_mb']} MB, free in heap "
              f"{rows[0]['heap_free_mb']} -> {rows[-1]['heap_free_mb']} MB, tensors {rows[0]['tensor_mb']} -> "
              f"{rows[-1]['tensor_mb']} MB", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
