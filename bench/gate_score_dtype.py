"""The first edited layer's gate scores at 5,000 edits, float32 against bfloat16, one product alone.

    .venv/bin/python bench/gate_score_dtype.py [--edits 5000] [--rounds 5]

Every served token pays x @ V, x (rows, d_in = 1,536) against V (d_in, edits) (docs/editor.md, cost per token).
This times that product four ways, random values of the real shapes, median of ``--rounds`` rounds of 200
calls each, the four alternating: V as stored (d_in, r) in float32 and in bfloat16, and V transposed
contiguous (r, d_in) through ``F.linear`` in both. It names the CPU and whether it computes bf16 natively
(``editor.precision``), since the answer depends on it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from editor.precision import cpu_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=5000)
    ap.add_argument("--d-in", type=int, default=1536)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    V = torch.randn(args.d_in, args.edits)
    Vb, Vt = V.to(torch.bfloat16), V.T.contiguous()
    Vbt = Vb.T.contiguous()
    cpu = cpu_features()
    out = {"cpu": cpu.describe(), "native_bf16": cpu.native_bf16, "threads": torch.get_num_threads(),
           "edits": args.edits, "microseconds": {}}
    for rows in (1, 8):
        x = torch.randn(rows, args.d_in)
        ways = {"f32 x@V": lambda: x @ V, "bf16 x@V": lambda: (x.to(torch.bfloat16) @ Vb).float(),
                "f32 linear(Vt)": lambda: F.linear(x, Vt),
                "bf16 linear(Vt)": lambda: F.linear(x.to(torch.bfloat16), Vbt).float()}
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(args.rounds):
            for name, fn in ways.items():
                for _ in range(20):
                    fn()
                t = time.perf_counter()
                for _ in range(200):
                    fn()
                times[name].append((time.perf_counter() - t) / 200 * 1e6)
        out["microseconds"][f"{rows} rows"] = {k: round(statistics.median(v), 1) for k, v in times.items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
