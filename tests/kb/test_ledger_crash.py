"""Kill -9 of a process committing versions (and rolling back) at random moments: the store opens, HEAD is a
whole version or the base model, every version's blob verifies, no change is applied without its version, and
``gc_blobs`` cleans what the crash left behind."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kb import FactStore, Ledger

from .conftest import StoreTemplate, fact, jsonl

ROOT = Path(__file__).resolve().parents[2]
TRIALS = 20
FACTS, BATCH = 150, 10

# Sizable arrays (the default model's shapes: 5 layers, hidden 576, MLP 1536, batch 10; ~0.7 MB a blob) so
# that kills land in every phase: computing, writing the blob, fsync, rename, the transaction.
COMMITTER = """
import logging, sys, time
import numpy as np, structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
from kb import FactStore, Ledger
store = FactStore(sys.argv[1])
ledger = Ledger(store, sys.argv[2])
rng = np.random.default_rng(int(sys.argv[3]))
print("go", flush=True)
t, step = time.monotonic(), 0
while True:
    head = ledger.head()
    if step % 4 == 3 and head is not None:
        ledger.move_head(head.parent, actor="crash-test", reason="rollback")
    else:
        batch = store.next_batch(int(sys.argv[4]))
        if not len(batch):
            break
        if step % 5 == 4:
            store.mark_failed(batch.change_ids, "nan loss")
        else:
            arrays = {}
            for layer in range(5):
                arrays[f"layers.{layer}.U"] = rng.standard_normal((576, 10), dtype=np.float32)
                arrays[f"layers.{layer}.V"] = rng.standard_normal((1536, 10), dtype=np.float32)
                arrays[f"layers.{layer}.K"] = rng.standard_normal((1536, 10), dtype=np.float32)
                arrays[f"layers.{layer}.alpha"] = np.array([2.2 - step / 100])
            ledger.commit(arrays, {"step": str(step)}, batch.change_ids, config_digest="digest",
                          model_fingerprint="model", metrics={"step": step}, actor="crash-test", reason=f"step {step}")
    step += 1
print(time.monotonic() - t, flush=True)
"""


@pytest.fixture(scope="module")
def template(store_template):
    return store_template("ledger_crash", lambda store: store.import_bytes(
        jsonl([fact(i) for i in range(FACTS)]).encode(), "facts.jsonl", name="facts.jsonl"))


def start(template, trial, seed):
    state, url = template.copy(trial)
    proc = subprocess.Popen([sys.executable, "-c", COMMITTER, url, str(state / "blobs"), str(seed), str(BATCH)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "go"
    return state, url, proc


def check(state, url) -> tuple[int, int]:
    """Assert the store and blobs are consistent after a crash; return (versions, orphan files collected)."""
    StoreTemplate.check_integrity(url)
    with FactStore(url) as store:
        ledger = Ledger(store, state / "blobs")
        head, versions, log = ledger.head(), ledger.versions(), ledger.head_log()
        assert (log[-1].to_version if log else None) == (head.id if head else None)   # HEAD moved with its log
        for v in versions:                                                             # every row's blob verifies
            arrays, meta = ledger.load(v.id, expect_fingerprint="model")
            assert len(arrays) == 20 and meta["step"] == v.note.split()[-1]
        chain = {v.id for v in ledger.chain(head.id if head else None)}
        carriers: dict[int, set[int]] = {}
        for vid, cid in store.db.execute("SELECT version_id, change_id FROM version_changes").fetchall():
            carriers.setdefault(cid, set()).add(vid)
        changes = store.changes.list()
        assert len(changes) == FACTS                                                   # nothing lost
        for c in changes:
            mine = carriers.get(c.id, set())
            if c.status == "applied":
                assert c.version_id in chain and c.version_id == max(mine & chain)
            elif c.status == "held":
                assert mine and not mine & chain and c.version_id == max(mine)
            else:
                assert c.status in ("pending", "failed") and not mine and c.version_id is None
        removed = ledger.gc_blobs()
        files = sorted(p for p in (state / "blobs").rglob("*") if p.is_file())
        assert files == sorted({ledger.blob_path(v.id) for v in versions})
        # Restart: the rest is committed on top of HEAD, and every change ends applied, held or failed.
        batch = store.next_batch(FACTS)
        if len(batch):
            ledger.commit({"x": np.zeros(3, np.float32)}, {}, batch.change_ids, config_digest="digest",
                          model_fingerprint="model", metrics={}, actor="restart", reason="after the crash")
        assert store.counts().pending == 0
        assert {c.status for c in store.changes.list()} <= {"applied", "held", "failed"}
    return len(versions), len(removed)


def test_kill_minus_nine_during_commits_at_random_moments(template):
    state, url, proc = start(template, "calibrate", 0)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    duration = float(out.strip())
    check(state, url)

    rng = random.Random(20261125)
    seen: Counter = Counter()
    for trial in range(TRIALS):
        state, url, proc = start(template, trial, trial + 1)
        try:                                              # a random moment inside the run (or its end)
            proc.wait(timeout=rng.uniform(0, duration * 1.1))
        except subprocess.TimeoutExpired:
            pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        versions, orphans = check(state, url)
        seen[(versions, orphans)] += 1
    print(f"{template.backend}: kill -9 over {TRIALS} trials (the run takes {duration:.2f} s): (versions, orphans collected) {dict(seen)}")
    assert len({v for v, _ in seen}) >= 3                       # the kills landed at different moments
