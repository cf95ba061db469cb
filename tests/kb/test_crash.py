"""Kill -9 of a process importing a dropped file, at random moments: the store opens, is consistent, and the
file is either fully imported or still waiting; no fact is ever lost. On SQLite and on PostgreSQL."""
from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from kb import DropFolder, FactStore

from .conftest import StoreTemplate, fact, jsonl

ROOT = Path(__file__).resolve().parents[2]
TRIALS = 20
OLD, NEW, UPDATED = 200, 4_000, 100      # facts before; facts in the dropped file; of which updates of old ones

IMPORTER = """
import logging, sys, time
import structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
from kb import DropFolder, FactStore
store = FactStore(sys.argv[1])
drops = DropFolder(store, sys.argv[2], settle_s=0)
print("go", flush=True)
t = time.monotonic()
drops.scan_once()
print(time.monotonic() - t, flush=True)
"""


@pytest.fixture(scope="module")
def template(store_template):
    """A store holding OLD facts, and the file to drop: NEW facts, UPDATED of them changing old targets."""
    t = store_template("crash", lambda store: store.import_bytes(
        jsonl([fact(f"old{i}") for i in range(OLD)]).encode(), "old.jsonl", name="old.jsonl"))
    records = [fact(f"old{i}", target="updated") for i in range(UPDATED)]
    records += [fact(f"new{i}", paraphrases=[f"About Snew{i}:"]) for i in range(NEW - UPDATED)]
    (t.root / "drop.jsonl").write_text(jsonl(records))
    return t


def start(template, trial):
    state, url = template.copy(trial)
    (state / "inbox").mkdir()
    shutil.copy(template.root / "drop.jsonl", state / "inbox" / "drop.jsonl")
    proc = subprocess.Popen([sys.executable, "-c", IMPORTER, url, str(state / "inbox")],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "go"
    return state, url, proc


def check(state, url) -> str:
    """Assert the store is whole and in one of the two allowed states; return which."""
    StoreTemplate.check_integrity(url)
    waiting = (state / "inbox" / "drop.jsonl").exists()
    moved = (state / "inbox" / "processed" / "drop.jsonl").exists()
    assert waiting != moved
    with FactStore(url) as store:
        facts = {f.subject: f.target for f in store.facts()}
        n_changes = len(store.changes.list())
        ingested = store.db.execute("SELECT count(*) FROM ingested_files").fetchone()[0]
    assert all(facts.get(f"Sold{i}") in ("x", "updated") for i in range(OLD))          # no old fact lost
    if ingested == 1:                                   # not imported: exactly as before
        assert waiting and len(facts) == OLD and n_changes == OLD
        assert all(t == "x" for t in facts.values())
        return "waiting"
    assert ingested == 2 and len(facts) == OLD + NEW - UPDATED and n_changes == OLD + NEW
    assert sum(t == "updated" for t in facts.values()) == UPDATED
    return "imported, moved" if moved else "imported, not yet moved"


def test_kill_minus_nine_at_random_moments(template):
    state, url, proc = start(template, "calibrate")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    duration = float(out.strip())
    assert check(state, url) == "imported, moved"

    rng = random.Random(20261125)
    seen = Counter()
    for trial in range(TRIALS):
        state, url, proc = start(template, trial)
        try:                                              # a random moment inside the import (or its end)
            proc.wait(timeout=rng.uniform(0, duration * 1.2))
        except subprocess.TimeoutExpired:
            pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        after_kill = check(state, url)
        seen[after_kill] += 1
        with FactStore(url) as store:                                                      # restart
            outcomes = DropFolder(store, state / "inbox", settle_s=0).scan_once()
        expected = {"waiting": ["processed"], "imported, not yet moved": ["duplicate"], "imported, moved": []}
        assert [o.status for o in outcomes] == expected[after_kill]
        assert check(state, url) == "imported, moved"
    print(f"{template.backend}: kill -9 outcomes over {TRIALS} trials (import takes {duration:.2f} s): {dict(seen)}")
    assert sum(seen.values()) == TRIALS
