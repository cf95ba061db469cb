"""Resident memory of the service across edit steps on a long history, with and without returning freed
heap pages to the OS after each step (daemon/memory.py), and with the CPU kernel caches bounded as shipped
(editor/kernel_caches.py) or at the libraries' own 1,024 entries.

    .venv/bin/python bench/memory_growth.py --state /tmp/history-1000 --steps 8 --json docs/results/memory_growth.json
    .venv/bin/python bench/memory_growth.py --state /tmp/history-1000 --steps 12 \
        --variants trim,trim+caches1024,trim+caches16 --json docs/results/memory_growth_caches.json

--state is a state directory with a history (bench/removal_bench.py --build-only makes one); it is copied, and
--steps steps of 10 new COUNTERFACT facts (cases 7000 on) are synced on the copy, once as shipped and once
with the trim turned off, one after the other in this process order. After each step: the process's RSS and
the bytes of every live tensor (gc), so growth in RSS with flat tensors is the allocator's, not a leak, and
the seconds the step took (the kernel caches' capacity must not slow a step).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA, ROOT, STATE


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def tensor_mb() -> float:
    import torch
    seen, total = set(), 0
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total / 2**20


def variant_rows(script: str, argv: list[str]) -> list[dict]:
    """``script --one ARGV`` in a fresh process (one variant): the rows it prints last."""
    proc = subprocess.run([sys.executable, script, "--one", *argv], capture_output=True, text=True, check=True,
                          cwd=Path(script).parent)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_slope(rows: list[dict]) -> float:
    """MB of RSS per step, first row to last."""
    return (rows[-1]["rss_mb"] - rows[0]["rss_mb"]) / max(len(rows) - 1, 1)


def one(args) -> list[dict]:
    os.environ.setdefault("KBSYNC_CACHE_DIR", str(STATE))
    if args.kernel_cache:                  # before editor is imported (it sets the shipped bound otherwise)
        from editor.kernel_caches import VARIABLES
        for name in VARIABLES:
            os.environ[name] = str(args.kernel_cache)
    import daemon.service
    from daemon.config import load_config
    from daemon.service import Service

    if args.no_trim:
        daemon.service.release_freed_memory = lambda: False
    if args.mmap_threshold:                # blocks this large always from mmap: returned to the OS when freed
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, args.mmap_threshold)         # M_MMAP_THRESHOLD
    state = Path(tempfile.mkdtemp(prefix="memory-")) / "state"
    shutil.copytree(args.state, state)
    svc = Service(load_config(None, state), progress=False)
    svc.model_at_head()
    cases = json.loads((DATA / "counterfact-edit.json").read_text())[7000:7000 + 10 * args.steps]
    out = []
    for s in range(args.steps):
        for c in cases[10 * s:10 * s + 10]:
            svc.store.add(c["subject"], c["prompt"].replace(c["subject"], "{}", 1), c["target_new"], source="bench")
        t = time.perf_counter()
        kinds = [r.kind for r in svc.sync()]
        seconds = time.perf_counter() - t
        gc.collect()
        out.append({"step": s + 1, "kinds": kinds, "seconds": round(seconds, 2), "rss_mb": round(rss_mb()),
                    "tensor_mb": round(tensor_mb())})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    svc.close()
    shutil.rmtree(state.parent, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-trim", action="store_true", help="(internal) one run with the trim turned off")
    ap.add_argument("--mmap-threshold", type=int, default=0, help="(internal) glibc M_MMAP_THRESHOLD in bytes")
    ap.add_argument("--kernel-cache", type=int, default=0, help="(internal) oneDNN and ideep cache capacity")
    ap.add_argument("--variants", default="trim,no-trim",
                    help="trim (as shipped), no-trim, trim+mmap1m, trim+cachesN (kernel caches of N entries)")
    ap.add_argument("--one", action="store_true", help="(internal) run one variant and print its rows")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "memory_growth.json")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    doc = {"state": str(args.state), "steps": args.steps}
    flags = {"trim": [], "no-trim": ["--no-trim"], "trim+mmap1m": ["--mmap-threshold", str(1 << 20)]}
    for name in args.variants.split(","):                                          # a fresh process each
        extra = flags[name] if name in flags else ["--kernel-cache", name.removeprefix("trim+caches")]
        rows = doc[name] = variant_rows(__file__, ["--state", str(args.state), "--steps", str(args.steps), *extra])
        slope = rss_slope(rows)
        seconds = sum(r["seconds"] for r in rows[1:]) / max(len(rows) - 1, 1)
        print(f"{name:16} RSS {rows[0]['rss_mb']} -> {rows[-1]['rss_mb']} MB ({slope:.0f} MB per step), tensors "
              f"{rows[0]['tensor_mb']} -> {rows[-1]['tensor_mb']} MB over {len(rows)} steps, "
              f"{seconds:.1f} s per step after the first", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
