"""Sampling speed of the offline key-statistics corpus (text drawn from the model), batch sizes side by side.

    .venv/bin/python bench/stats_speed.py                      # default model, batch 16 vs 64, 2 rounds each

The full build is timed by `kbsync stats build` itself (its `stats.ready` log line carries the seconds).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import ROOT, default_editable


def main() -> None:
    from editor.stats import _sampled_batches

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/stats_speed.json")
    args = ap.parse_args()
    cfg, em = default_editable()
    rows = []
    for bs in (int(b) for b in args.batches.split(",")):
        sc = cfg.stats.__class__(**{**cfg.stats.__dict__, "batch_size": bs,
                                    "n_tokens": bs * (cfg.stats.seq_len + 1) * args.rounds})
        t, n = time.perf_counter(), 0
        for _, mask in _sampled_batches(em, sc):
            n += int(mask.sum())
        dt = time.perf_counter() - t
        rows.append({"batch_size": bs, "tokens": n, "seconds": round(dt, 1), "tokens_per_s": round(n / dt, 1),
                     "seconds_for_configured_tokens": round(cfg.stats.n_tokens / (n / dt))})
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
