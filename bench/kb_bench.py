"""Knowledge-base benchmark: import N facts from one JSONL file; compute the pending batch out of N changes.

Targets (issue 4): import 100,000 facts in ≤ 10 s; the pending batch out of 100,000 changes in ≤ 50 ms.

    .venv/bin/python bench/kb_bench.py                    # 100,000 facts, batch 30, 3 import runs
    .venv/bin/python bench/kb_bench.py --facts 20000 --json bench/out/kb_bench.json
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kb import FactStore  # noqa: E402


def write_facts(path: Path, n: int, target: str = "English", offset: int = 0) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(offset, offset + n):
            subject = f"Person {i:06d}"
            f.write(json.dumps({"subject": subject, "prompt": f"The mother tongue of {subject} is", "target": target,
                                "paraphrases": [f"Where {subject} is from, people speak"],
                                "locality": [{"prompt": "Michel Rocard is a native speaker of", "target": "French"}]},
                               ensure_ascii=False) + "\n")


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3, help="import runs (a fresh database each)")
    ap.add_argument("--json", type=Path, default=Path("bench/out/kb_bench.json"))
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "facts.jsonl"
        write_facts(src, args.facts)
        size_mb = src.stat().st_size / 1e6

        import_s = []
        for run in range(args.repeat):
            with FactStore(tmp / f"import{run}.sqlite") as store:
                t = time.perf_counter()
                result = store.import_file(src)
                import_s.append(time.perf_counter() - t)
                assert result.facts == args.facts and result.changes == args.facts

        # the pending batch out of N changes, one per key (the import above) ...
        with FactStore(tmp / "import0.sqlite") as store:
            assert store.counts().pending == args.facts
            first = timed(lambda: store.next_batch(args.batch), 1)[0]
            batch_s = timed(lambda: store.next_batch(args.batch), 50)
            counts_s = timed(store.counts, 5)
            half = store.next_batch(args.facts // 2)                  # ... and from the middle of the log
            store.mark_applied(half.change_ids, version_id=1)
            middle_s = timed(lambda: store.next_batch(args.batch), 50)

        # ... and N changes over N/10 keys (ten updates each): coalescing does real work
        with FactStore(tmp / "coalesce.sqlite") as store:
            for k in range(10):
                part = tmp / f"update{k}.jsonl"
                write_facts(part, args.facts // 10, target=f"Language {k}")
                store.import_file(part)
            assert store.counts().pending == args.facts // 10 * 10
            coalesced = store.next_batch(args.batch)
            assert all(len(e.change_ids) == 10 and e.change.target == "Language 9" for e in coalesced)
            coalesce_s = timed(lambda: store.next_batch(args.batch), 50)

    doc = {"facts": args.facts, "batch": args.batch, "file_mb": round(size_mb, 1),
           "import_s": {"min": min(import_s), "median": statistics.median(import_s), "runs": import_s},
           "import_facts_per_s": round(args.facts / min(import_s)),
           "next_batch_ms": {"first": first * 1e3, "median": statistics.median(batch_s) * 1e3,
                             "max": max(batch_s) * 1e3},
           "next_batch_after_half_applied_ms": statistics.median(middle_s) * 1e3,
           "next_batch_coalescing_10_per_key_ms": statistics.median(coalesce_s) * 1e3,
           "counts_ms": statistics.median(counts_s) * 1e3,
           "python": platform.python_version(), "machine": platform.machine(),
           "sqlite": __import__("sqlite3").sqlite_version}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2))
    print(f"import {args.facts:,} facts ({size_mb:.1f} MB JSONL): min {min(import_s):.2f} s, "
          f"median {statistics.median(import_s):.2f} s  (target ≤ 10 s)")
    print(f"next_batch({args.batch}) out of {args.facts:,} pending changes: median "
          f"{doc['next_batch_ms']['median']:.2f} ms, first {doc['next_batch_ms']['first']:.2f} ms, "
          f"max {doc['next_batch_ms']['max']:.2f} ms  (target ≤ 50 ms)")
    print(f"  after half applied: {doc['next_batch_after_half_applied_ms']:.2f} ms; "
          f"{args.facts:,} changes over {args.facts // 10:,} keys: {doc['next_batch_coalescing_10_per_key_ms']:.2f} ms;"
          f" counts(): {doc['counts_ms']:.1f} ms")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
