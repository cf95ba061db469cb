"""Make an edit history through the service: COUNTERFACT cases A:B, in steps of ``[sync] batch_size`` (10),
the shipped configuration, on the default model (CPU, float32). What the removal and gate benches read.

    .venv/bin/python bench/make_history.py --cases 0:1000 --state /tmp/history-tune-1000

Cases 0-4999 are for tuning, 5000 on for reporting.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import DATA, STATE


def make_history(state: Path, first: int, end: int) -> dict:
    """Edit COUNTERFACT cases ``first``..``end``-1 into a new state directory ``state``; what it took."""
    os.environ.setdefault("KBSYNC_CACHE_DIR", str(STATE))
    from daemon.config import load_config
    from daemon.service import Service
    from editor.loading import model_directory

    state.mkdir(parents=True, exist_ok=True)
    (state / "config.toml").write_text(
        f"[model]\nsource = '{model_directory('embedded', STATE)}'\ndevice = 'cpu'\ndtype = 'float32'\n")
    svc = Service(load_config(None, state), progress=False)
    try:
        for c in json.loads((DATA / "counterfact-edit.json").read_text())[first:end]:
            svc.store.add(c["subject"], c["prompt"].replace(c["subject"], "{}", 1), c["target_new"])
        t = time.perf_counter()
        while svc.store.counts().pending:
            svc.sync()
        return {"history": str(state), "cases": f"{first}:{end}", "versions": len(svc.ledger.versions()),
                "seconds": round(time.perf_counter() - t, 1)}
    finally:
        svc.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="0:1000", help="A:B, COUNTERFACT cases (0-4999 tune, 5000 on report)")
    ap.add_argument("--state", type=Path, required=True, help="a new state directory")
    args = ap.parse_args()
    if (args.state / "kb.sqlite").exists():
        raise SystemExit(f"{args.state} holds a knowledge base already; choose a new directory")
    a, b = (int(x) for x in args.cases.split(":"))
    print(json.dumps(make_history(args.state, a, b)), flush=True)


if __name__ == "__main__":
    main()
