"""The change log as the daemon sees it: pending batches, coalescing, applied / failed, counts."""
from __future__ import annotations

import pytest

from kb import ChangeStateError

from .conftest import fact, jsonl


def test_several_pending_changes_to_one_key_collapse_to_the_last(store):
    ids = [store.add("S", "S is", t).id for t in ("a", "b", "c")]
    store.add("T", "T is", "x")
    batch = store.next_batch(10)
    assert [(e.change.subject, e.change.target) for e in batch] == [("S", "c"), ("T", "x")]
    assert batch.entries[0].change_ids == tuple(ids) and batch.entries[0].change.id == ids[-1]
    assert len(batch.change_ids) == 4


def test_add_then_remove_coalesces_to_a_delete(store):
    store.add("S", "S is", "a")
    store.remove("S", "S is")
    (entry,) = store.next_batch(5)
    assert entry.change.op == "delete" and entry.change.target is None and len(entry.change_ids) == 2


def test_batches_come_in_order_of_first_change_and_respect_the_limit(store, write):
    store.import_file(write("a.jsonl", jsonl([fact(i) for i in range(10)])))
    store.add("S3", "The thing about S3 is", "late update")       # S3 keeps its place in the queue
    batch = store.next_batch(4)
    assert [e.change.subject for e in batch] == ["S0", "S1", "S2", "S3"]
    assert batch.entries[3].change.target == "late update"
    assert store.next_batch(4) == batch                           # reading does not consume
    with pytest.raises(ValueError):
        store.next_batch(0)


def test_mark_applied_moves_the_queue_on(store, write):
    store.import_file(write("a.jsonl", jsonl([fact(i) for i in range(10)])))
    first = store.next_batch(4)
    assert store.mark_applied(first.change_ids, version_id=1) == 4
    second = store.next_batch(4)
    assert [e.change.subject for e in second] == ["S4", "S5", "S6", "S7"]
    applied = store.changes.list("applied")
    assert [c.id for c in applied] == list(first.change_ids) and {c.version_id for c in applied} == {1}
    c = store.counts()
    assert (c.facts, c.pending, c.pending_keys, c.applied, c.failed) == (10, 6, 6, 4, 0)


def test_a_change_arriving_after_the_batch_stays_pending(store):
    store.add("S", "S is", "a")
    batch = store.next_batch(5)
    store.add("S", "S is", "b")                       # written while the daemon computes the step
    store.mark_applied(batch.change_ids, version_id=7)
    (entry,) = store.next_batch(5)
    assert entry.change.target == "b" and len(entry.change_ids) == 1


def test_mark_applied_is_all_or_nothing(store):
    a = store.add("A", "A is", "x").id
    b = store.add("B", "B is", "x").id
    store.mark_applied([a], 1)
    with pytest.raises(ChangeStateError, match=rf"\[{a}, 999\].*nothing was marked"):
        store.mark_applied([a, b, 999], 2)
    assert [c.id for c in store.changes.list("pending")] == [b]
    assert store.changes.list("applied")[0].version_id == 1


def test_mark_failed_records_why_and_retry_brings_them_back(store):
    store.add("A", "A is", "x")
    store.add("B", "B is", "x")
    batch = store.next_batch(1)
    assert store.mark_failed(batch.change_ids, "target optimisation did not converge") == 1
    failed = store.changes.list("failed")
    assert [(c.subject, c.error) for c in failed] == [("A", "target optimisation did not converge")]
    assert [e.change.subject for e in store.next_batch(5)] == ["B"]
    assert store.counts().failed == 1
    with pytest.raises(ValueError):
        store.mark_failed(store.next_batch(1).change_ids, "")
    assert store.changes.retry_failed() == 1
    assert [e.change.subject for e in store.next_batch(5)] == ["A", "B"]
    assert store.changes.list("pending")[0].error is None


def test_large_batches_cross_the_parameter_chunks(store, write):
    store.import_file(write("big.jsonl", jsonl([fact(i) for i in range(1_200)])))
    batch = store.next_batch(1_100)
    assert len(batch) == 1_100
    assert store.mark_applied(batch.change_ids, 3) == 1_100
    assert store.counts().pending == 100 and store.next_batch(500).entries[0].change.subject == "S1100"


def test_status_and_outcome_columns_are_the_only_mutable_ones(store):
    store.add("A", "A is", "x")
    (entry,) = store.next_batch(1)
    store.mark_applied(entry.change_ids, 5)
    (change,) = store.changes.list()
    assert (change.op, change.subject, change.target, change.status, change.version_id) == \
        ("upsert", "A", "x", "applied", 5)
