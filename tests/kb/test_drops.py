"""The drop folder, for real: watchdog on a temporary folder, real files, real SQLite."""
from __future__ import annotations

import json
import os
import threading
from types import SimpleNamespace
import time
from collections import Counter

import pytest

from kb import DropFolder
from kb.drops import ignored

from tests.conftest import wait_for

from .conftest import fact, jsonl


@pytest.fixture
def inbox(tmp_path):
    path = tmp_path / "inbox"
    path.mkdir()
    return path


@pytest.fixture
def outcomes():
    return []


@pytest.fixture
def watched(store, inbox, outcomes):
    """A started drop folder with a short settle time; stopped after the test."""
    lock = threading.Lock()

    def record(o):
        with lock:
            outcomes.append(o)
    drops = DropFolder(store, inbox, settle_s=0.5, rescan_s=60, on_outcome=record)
    drops.start()
    yield drops
    drops.stop()


def drop(inbox, name, text):
    """Write then rename into place, as well-behaved producers do."""
    tmp = inbox / f".{name}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, inbox / name)


# -- one pass, no threads --------------------------------------------------------------------------------------

def test_good_file_to_processed_bad_file_to_rejected_with_report(store, inbox):
    drop(inbox, "good.jsonl", jsonl([fact(1), fact(2)]))
    drop(inbox, "bad.jsonl", jsonl([fact(3), {"subject": "S4", "prompt": "no subject", "target": "x"},
                                    fact(5, target=""), fact(6)]) + "{not json\n")
    result = {o.name: o.status for o in DropFolder(store, inbox, settle_s=0).scan_once()}
    assert result == {"good.jsonl": "processed", "bad.jsonl": "rejected"}
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == []
    assert (inbox / "processed" / "good.jsonl").exists() and (inbox / "rejected" / "bad.jsonl").exists()
    report = json.loads((inbox / "rejected" / "bad.jsonl.error.json").read_text())
    assert report["file"] == "bad.jsonl" and report["problems"] == 3
    assert [(e["line"], e["field"]) for e in report["errors"]] == [(2, "prompt"), (3, "target"), (5, None)]
    assert {f.subject for f in store.facts()} == {"S1", "S2"}


def test_temporary_and_editor_files_are_ignored(store, inbox):
    names = [".hidden.jsonl", "facts.jsonl~", ".facts.jsonl.swp", "facts.tmp", "big.jsonl.part", "#facts.jsonl#",
             "x.crdownload"]
    for n in names:
        (inbox / n).write_text(jsonl([fact(n)]))
    assert all(ignored(n) for n in names) and not ignored("facts.jsonl")
    assert DropFolder(store, inbox, settle_s=0).scan_once() == []
    assert store.count() == 0 and sorted(p.name for p in inbox.iterdir() if p.is_file()) == sorted(names)


def test_same_bytes_twice_are_recognised(store, inbox):
    drops = DropFolder(store, inbox, settle_s=0)
    drop(inbox, "a.jsonl", jsonl([fact(1)]))
    assert [o.status for o in drops.scan_once()] == ["processed"]
    store.remove("S1", "The thing about S1 is")
    drop(inbox, "a.jsonl", jsonl([fact(1)]))                 # same name, same bytes
    drop(inbox, "copy.jsonl", jsonl([fact(1)]))              # another name, same bytes
    assert sorted(o.status for o in drops.scan_once()) == ["duplicate", "duplicate"]
    assert store.count() == 0 and store.counts().pending == 2     # not re-added
    assert len(list((inbox / "processed").iterdir())) == 3       # nothing overwritten


def test_a_settling_file_is_not_taken_until_it_stops_changing(store, inbox, monkeypatch):
    import kb.drops
    clock = [1000.0]                                          # the drop folder's clock, moved by hand
    monkeypatch.setattr(kb.drops, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    drops = DropFolder(store, inbox, settle_s=0.4)
    (inbox / "slow.jsonl").write_text(json.dumps(fact(1)) + "\n")
    assert drops.scan_once() == []
    clock[0] += 0.25
    with open(inbox / "slow.jsonl", "a") as f:
        f.write(json.dumps(fact(2)) + "\n")
    assert drops.scan_once() == []                            # changed: settling starts again
    clock[0] += 0.25
    assert drops.scan_once() == []                            # unchanged for 0.25 s of 0.4
    clock[0] += 0.2
    (outcome,) = drops.scan_once()
    assert outcome.result.facts == 2


def test_committed_but_not_moved_is_only_moved(store, inbox):
    """The state a crash between the commit and the move leaves behind."""
    text = jsonl([fact(1), fact(2)])
    drop(inbox, "a.jsonl", text)
    store.import_bytes(text.encode(), str(inbox / "a.jsonl"), name="a.jsonl")
    (outcome,) = DropFolder(store, inbox, settle_s=0).scan_once()
    assert outcome.status == "duplicate" and (inbox / "processed" / "a.jsonl").exists()
    assert store.counts().pending == 2


# -- the watcher, for real ------------------------------------------------------------------------------------

def test_atomic_rename_is_taken_once(watched, store, inbox, outcomes):
    drop(inbox, "renamed.jsonl", jsonl([fact(i) for i in range(5)]))
    assert wait_for(lambda: len(outcomes) == 1)
    assert watched.scan_once() == []        # nothing left to take (waits for a pass in flight to finish)
    assert [(o.name, o.status) for o in outcomes] == [("renamed.jsonl", "processed")]
    assert store.count() == 5 and store.counts().pending == 5


def test_slow_writer_is_read_whole(watched, store, inbox, outcomes):
    n = 40
    with open(inbox / "slow.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps(fact(i)))
            f.flush()
            time.sleep(0.01)
            f.write("\n")
            f.flush()
            time.sleep(0.01)            # the file is invalid JSONL between the two halves of a line
    assert wait_for(lambda: len(outcomes) == 1)
    assert watched.scan_once() == []
    assert [o.status for o in outcomes] == ["processed"] and outcomes[0].result.facts == n
    assert store.count() == n and store.counts().pending == n


def test_duplicate_events_ingest_once(watched, store, inbox, outcomes):
    path = inbox / "touched.jsonl"
    path.write_text(jsonl([fact(1), fact(2)]))
    for _ in range(20):                 # a storm of events for one file: modify, attrib
        os.utime(path)
        time.sleep(0.005)
    assert wait_for(lambda: len(outcomes) == 1)
    assert watched.scan_once() == []
    assert len(outcomes) == 1 and store.counts().pending == 2


def test_burst_of_a_thousand_small_files(watched, store, inbox, outcomes):
    for i in range(1_000):
        drop(inbox, f"f{i:04}.jsonl", json.dumps(fact(i)) + "\n")
    assert wait_for(lambda: len(outcomes) >= 1_000, timeout=600)
    assert watched.scan_once() == []
    names = Counter(o.name for o in outcomes)
    assert len(names) == 1_000 and set(names.values()) == {1}
    assert {o.status for o in outcomes} == {"processed"}
    assert store.count() == 1_000 and store.counts().pending == 1_000
    assert len(list((inbox / "processed").iterdir())) == 1_000


def test_file_written_while_the_watcher_was_down(store, inbox, outcomes):
    drops = DropFolder(store, inbox, settle_s=0.1, rescan_s=60, on_outcome=outcomes.append)
    drops.start()
    drops.stop()
    drop(inbox, "while-down.jsonl", jsonl([fact(1)]))
    drops.start()
    try:
        assert wait_for(lambda: len(outcomes) == 1, timeout=120)
    finally:
        drops.stop()
    assert outcomes[0].name == "while-down.jsonl" and store.count() == 1


def test_periodic_rescan_catches_missed_events(store, inbox, outcomes, monkeypatch):
    drops = DropFolder(store, inbox, settle_s=0.1, rescan_s=0.5, on_outcome=outcomes.append)
    monkeypatch.setattr(drops, "_notify", lambda name: None)   # every watchdog event lost (overflow, NFS)
    with drops:
        time.sleep(0.2)
        drop(inbox, "missed.jsonl", jsonl([fact(1)]))
        assert wait_for(lambda: len(outcomes) == 1, timeout=120)
    assert outcomes[0].name == "missed.jsonl" and store.count() == 1


def test_bad_file_among_good_ones_while_watching(watched, store, inbox, outcomes):
    drop(inbox, "a.jsonl", jsonl([fact(1)]))
    drop(inbox, "b.json", "[{\"subject\": \"S9\"}]")
    drop(inbox, "c.csv", "subject,prompt,target\nS3,S3 is,x\n")
    assert wait_for(lambda: len(outcomes) == 3)
    assert {o.name: o.status for o in outcomes} == {"a.jsonl": "processed", "b.json": "rejected",
                                                    "c.csv": "processed"}
    rejected = next(o for o in outcomes if o.status == "rejected")
    assert {(p.record, p.field) for p in rejected.problems} == {(1, "prompt"), (1, "target")}
    assert (inbox / "rejected" / "b.json.error.json").exists()
    assert {f.subject for f in store.facts()} == {"S1", "S3"}
