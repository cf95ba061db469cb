"""How fast the command line answers: wall time of `kbsync --help`, `facts list`, `log` and `status --json`.

Each command runs as its own process (as a person types it), on a state directory holding 1,000 facts and no
running daemon, `--runs` times; the median is reported. Target (issue 19): ≤ 0.3 s for each.

    .venv/bin/python bench/cli_speed.py --json bench/out/cli_speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KBSYNC = [sys.executable, "-m", "daemon"]
COMMANDS = {"--help": ["--help"], "facts list": ["facts", "list", "--limit", "20"], "log": ["log", "--json"],
            "status --json": ["status", "--json"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", type=Path, default=Path("bench/out/cli_speed.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        env = {**os.environ, "KBSYNC_STATE_DIR": str(state)}
        env.pop("KBSYNC_KB_URL", None)
        facts = Path(tmp) / "facts.jsonl"
        facts.write_text("".join(json.dumps({"subject": f"S{i}", "prompt": f"S{i} is", "target": "x"}) + "\n"
                                 for i in range(1000)))
        subprocess.run(KBSYNC + ["facts", "import", str(facts)], cwd=ROOT, env=env, check=True, capture_output=True)
        results = {}
        for name, argv in COMMANDS.items():
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                subprocess.run(KBSYNC + argv, cwd=ROOT, env=env, check=True, capture_output=True)
                times.append(time.perf_counter() - t)
            results[name] = {"median_s": statistics.median(times), "min_s": min(times), "runs": times}
            print(f"kbsync {name:14} median {statistics.median(times):.2f} s  (min {min(times):.2f} s; target ≤ 0.3 s)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
