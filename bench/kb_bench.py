"""Knowledge-base benchmark, SQLite and PostgreSQL side by side in one run.

Per backend: import N facts from one JSONL file; the pending batch out of N changes; W writer processes of M facts
each committing while a consumer drains batches (every change must be seen exactly once); and on PostgreSQL the
time from another client's commit until a ``ChangeListener`` has it (NOTIFY).

Targets: import 100,000 facts in ≤ 10 s; ``next_batch(30)`` out of 100,000 pending in ≤ 50 ms; commit to
listener ≤ 1 s (median and 99th percentile reported); 4 writers of 10,000 facts, every change seen exactly once.
PostgreSQL runs on a throwaway cluster on a unix socket (tests/pg_cluster.py), with fsync on.

    .venv/bin/python bench/kb_bench.py                    # 100,000 facts, batch 30, 3 import runs, 4 x 10,000
    .venv/bin/python bench/kb_bench.py --facts 20000 --backends sqlite
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import sys
import threading
import tempfile
import time
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # kb, and tests.pg_cluster

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


WRITER = """
import sqlite3, sys, time
url, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if url.startswith("postgresql:"):
    import psycopg
    conn = psycopg.connect(url, options="-c search_path=kbsync")
    sql = "INSERT INTO facts (subject, template, target) VALUES (%s, '{} is', 'x')"
else:
    conn = sqlite3.connect(url, timeout=60)
    sql = "INSERT INTO facts (subject, template, target) VALUES (?, '{} is', 'x')"
for i in range(n):
    conn.execute(sql, (f"{name}-{i}",))
    if i % 100 == 99:
        conn.commit()
conn.commit()
"""


def backend_run(backend: str, url_for, src: Path, args) -> dict:
    import_s = []
    for run in range(args.repeat):
        with FactStore(url_for(f"import{run}")) as store:
            t = time.perf_counter()
            result = store.import_file(src)
            import_s.append(time.perf_counter() - t)
            assert result.facts == args.facts and result.changes == args.facts

    # the pending batch out of N changes, one per key (the import above) ...
    with FactStore(url_for("import0")) as store:
        assert store.counts().pending == args.facts
        first = timed(lambda: store.next_batch(args.batch), 1)[0]
        batch_s = timed(lambda: store.next_batch(args.batch), 50)
        counts_s = timed(store.counts, 5)
        half = store.next_batch(args.facts // 2)                  # ... and from the middle of the log
        store.mark_applied(half.change_ids, version_id=1)
        middle_s = timed(lambda: store.next_batch(args.batch), 50)

    # ... and N changes over N/10 keys (ten updates each): coalescing does real work
    with FactStore(url_for("coalesce")) as store:
        for k in range(10):
            part = src.with_name(f"update{k}.jsonl")
            write_facts(part, args.facts // 10, target=f"Language {k}")
            store.import_file(part)
        assert store.counts().pending == args.facts // 10 * 10
        coalesced = store.next_batch(args.batch)
        assert all(len(e.change_ids) == 10 and e.change.target == "Language 9" for e in coalesced)
        coalesce_s = timed(lambda: store.next_batch(args.batch), 50)

    doc = {"import_s": {"min": min(import_s), "median": statistics.median(import_s), "runs": import_s},
           "import_facts_per_s": round(args.facts / min(import_s)),
           "next_batch_ms": {"first": first * 1e3, "median": statistics.median(batch_s) * 1e3,
                             "max": max(batch_s) * 1e3},
           "next_batch_after_half_applied_ms": statistics.median(middle_s) * 1e3,
           "next_batch_coalescing_10_per_key_ms": statistics.median(coalesce_s) * 1e3,
           "counts_ms": statistics.median(counts_s) * 1e3,
           "writers": concurrent_writers(url_for("writers"), args)}
    if backend == "postgresql":
        doc["notify_ms"] = notify_latency(url_for("notify"), args.notify)
    return doc


def concurrent_writers(url: str, args) -> dict:
    """W writer processes commit M facts each (100 per transaction) while one consumer drains batches."""
    with FactStore(url) as store:
        path = store.path or url
        t = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"w{k}", str(args.writer_facts)])
                 for k in range(args.writers)]
        seen: list[int] = []
        batches = 0
        while True:
            running = any(p.poll() is None for p in procs)
            batch = store.next_batch(args.batch)
            if len(batch):
                batches += 1
                store.mark_applied(batch.change_ids, batches)     # refuses any id that is not pending
                seen += batch.change_ids
            elif not running:
                break
        seconds = time.perf_counter() - t
        assert all(p.wait() == 0 for p in procs)
        ids = [c.id for c in store.changes.list()]
        total = args.writers * args.writer_facts
        exactly_once = len(ids) == total and sorted(seen) == sorted(ids) and len(set(seen)) == len(seen)
    return {"writers": args.writers, "facts_each": args.writer_facts, "changes": len(ids), "seen": len(seen),
            "exactly_once": exactly_once, "seconds": seconds, "batches": batches}


def notify_latency(url: str, n: int) -> dict:
    """Commit one fact at a time from another client; time until the listener's callback runs."""
    import psycopg

    from kb.listen import ChangeListener
    with FactStore(url) as store:
        heard = threading.Event()
        listener = ChangeListener.for_store(store, on_change=heard.set)
        listener.start()
        assert listener.listening.wait(30)
        out = []
        with psycopg.connect(url, autocommit=True, options="-c search_path=kbsync") as other:
            for i in range(n):
                heard.clear()
                t = time.perf_counter()
                other.execute("INSERT INTO facts (subject, template, target) VALUES (%s, '{} is', 'x')", (f"N{i}",))
                assert heard.wait(30), "no notification within 30 s"
                out.append(time.perf_counter() - t)
        listener.stop()
    out.sort()
    return {"commits": n, "median": statistics.median(out) * 1e3, "p99": out[int(0.99 * (n - 1))] * 1e3,
            "max": out[-1] * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3, help="import runs (a fresh database each)")
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--writer-facts", type=int, default=10_000)
    ap.add_argument("--notify", type=int, default=300, help="commits timed from commit to listener")
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--json", type=Path, default=Path("bench/out/kb_bench.json"))
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "facts.jsonl"
        write_facts(src, args.facts)
        size_mb = src.stat().st_size / 1e6
        for backend in args.backends.split(","):
            if backend == "sqlite":
                results[backend] = backend_run(backend, lambda name: str(tmp / f"{name}.sqlite"), src, args)
            else:
                from tests.pg_cluster import Cluster, missing
                if missing():
                    print(f"postgresql skipped: {missing()}")
                    continue
                with Cluster() as cluster:
                    made: dict[str, str] = {}
                    url_for = lambda name: made.get(name) or made.setdefault(name, cluster.create_database(name))
                    results[backend] = backend_run(backend, url_for, src, args)
                    results[backend]["server"] = _server_version(cluster.url())
            print_backend(backend, results[backend], args, size_mb)

    doc = {"facts": args.facts, "batch": args.batch, "file_mb": round(size_mb, 1), **results,
           "python": platform.python_version(), "machine": platform.machine(),
           "sqlite": __import__("sqlite3").sqlite_version}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2))
    print(f"written to {args.json}")


def _server_version(url: str) -> str:
    import psycopg
    with psycopg.connect(url) as c:
        return c.execute("SHOW server_version").fetchone()[0]


def print_backend(backend: str, doc: dict, args, size_mb: float) -> None:
    imp, nb = doc["import_s"], doc["next_batch_ms"]
    print(f"[{backend}] import {args.facts:,} facts ({size_mb:.1f} MB JSONL): min {imp['min']:.2f} s, "
          f"median {imp['median']:.2f} s  (target ≤ 10 s)")
    print(f"[{backend}] next_batch({args.batch}) out of {args.facts:,} pending changes: median {nb['median']:.2f} ms, "
          f"first {nb['first']:.2f} ms, max {nb['max']:.2f} ms  (target ≤ 50 ms)")
    print(f"[{backend}]   after half applied: {doc['next_batch_after_half_applied_ms']:.2f} ms; {args.facts:,} "
          f"changes over {args.facts // 10:,} keys: {doc['next_batch_coalescing_10_per_key_ms']:.2f} ms; "
          f"counts(): {doc['counts_ms']:.1f} ms")
    w = doc["writers"]
    print(f"[{backend}] {w['writers']} writer processes x {w['facts_each']:,} facts, drained while written: "
          f"{w['changes']:,} changes, {w['seen']:,} seen, exactly once: {w['exactly_once']}, {w['seconds']:.1f} s")
    if "notify_ms" in doc:
        n = doc["notify_ms"]
        print(f"[{backend}] commit by another client -> listener: median {n['median']:.2f} ms, "
              f"p99 {n['p99']:.2f} ms, max {n['max']:.2f} ms over {n['commits']} commits  (target ≤ 1 s)")


if __name__ == "__main__":
    main()
