"""The ledger on a real SQLite file or PostgreSQL database and real safetensors blobs: versions, HEAD, statuses, blobs and their errors.

Random numpy arrays stand in for the step deltas (per layer U, V, K, α), as the daemon hands them over.
"""
from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from kb import (BLOB_FORMAT, BlobError, ChangeStateError, FactStore, Ledger, ModelMismatchError,
                VersionNotFoundError, VersionPrunedError)
from kb.migrations import MIGRATIONS, migrate

ROOT = Path(__file__).resolve().parents[2]
FP, DIGEST = "model-fp-1", "config-digest-1"


@pytest.fixture
def ledger(store, tmp_path):
    return Ledger(store, tmp_path / "blobs")


def delta(seed: int, layers: int = 2, batch: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(layers):
        out[f"layers.{layer}.U"] = rng.standard_normal((8, batch), dtype=np.float32)
        out[f"layers.{layer}.V"] = rng.standard_normal((12, batch), dtype=np.float32)
        out[f"layers.{layer}.K"] = rng.standard_normal((12, batch), dtype=np.float32)
        out[f"layers.{layer}.alpha"] = np.array([2.2 - seed / 100], dtype=np.float64)
    return out


def add(store, *subjects: str) -> list[int]:
    """Add one fact per subject; return the change ids of the pending batch they make."""
    for s in subjects:
        store.add(s, f"{s} is", f"target of {s}")
    return list(store.next_batch(len(subjects)).change_ids)


def commit(ledger, ids, seed=0, **kw):
    kw = {"config_digest": DIGEST, "model_fingerprint": FP, "metrics": {"efficacy": 1.0}, "actor": "test",
          "reason": f"step {seed}", **kw}
    return ledger.commit(delta(seed), {"layers": '["layers.0", "layers.1"]'}, ids, **kw)


def statuses(store) -> dict[str, tuple[str, int | None]]:
    return {c.subject: (c.status, c.version_id) for c in store.changes.list()}


# -- versions, HEAD and its log -------------------------------------------------------------------------------

def test_commit_stores_a_version_moves_head_and_applies_its_changes(store, ledger, tmp_path):
    assert ledger.head() is None and ledger.versions() == [] and ledger.head_log() == []
    ids = add(store, "A", "B")
    store.add("A", "A is", "new target of A")                    # a second change of key A, same batch
    ids = list(store.next_batch(5).change_ids)
    v = commit(ledger, ids, metrics={"efficacy": np.float32(0.5), "steps": 3})
    assert (v.id, v.parent, v.config_digest, v.model_fingerprint, v.n_facts) == (1, None, DIGEST, FP, 2)
    assert v.metrics == {"efficacy": 0.5, "steps": 3} and v.note == "step 0"
    assert v.blob_bytes == (tmp_path / "blobs" / v.blob_sha256[:2] / f"{v.blob_sha256}.safetensors").stat().st_size
    assert ledger.head() == v == ledger.get(1)
    assert [c.id for c in ledger.carried(1)] == sorted(ids) and {c.status for c in ledger.carried(1)} == {"applied"}
    assert len(store.next_batch(10)) == 0
    counts = store.counts()
    assert (counts.pending, counts.applied, counts.held) == (0, 3, 0)
    (move,) = ledger.head_log()
    assert (move.actor, move.from_version, move.to_version, move.reason) == ("test", None, 1, "step 0")
    assert v.to_json()["metrics"] == {"efficacy": 0.5, "steps": 3} and move.to_json()["to_version"] == 1


def test_chain_children_and_versions_follow_parents(store, ledger):
    v1 = commit(ledger, add(store, "A"), 1)
    v2 = commit(ledger, add(store, "B"), 2)
    v3 = commit(ledger, add(store, "C"), 3)
    assert (v2.parent, v3.parent) == (1, 2)
    assert [v.id for v in ledger.chain(3)] == [1, 2, 3] and [v.id for v in ledger.chain(1)] == [1]
    assert ledger.chain(None) == []
    assert [v.id for v in ledger.children(None)] == [1] and [v.id for v in ledger.children(1)] == [2]
    assert ledger.children(3) == [] and ledger.versions() == [v1, v2, v3]


def test_unknown_versions_are_refused_by_name(store, ledger):
    commit(ledger, add(store, "A"))
    for call in (lambda: ledger.get(42), lambda: ledger.chain(42), lambda: ledger.children(42),
                 lambda: ledger.carried(42), lambda: ledger.load(42),
                 lambda: ledger.move_head(42, actor="t", reason="r"),
                 lambda: commit(ledger, add(store, "B"), parent=42)):
        with pytest.raises(VersionNotFoundError, match=r"no version 42 .*`kbsync log`"):
            call()
    assert [v.id for v in ledger.versions()] == [1] and ledger.head().id == 1 and len(ledger.head_log()) == 1
    assert statuses(store)["B"] == ("pending", None)


def test_commit_refuses_failed_and_unknown_changes_and_writes_no_row(store, ledger):
    ids = add(store, "A")
    store.mark_failed(ids, "did not converge")
    for bad in (ids, [999]):
        with pytest.raises(ChangeStateError, match=r"cannot carry 1 change.*nothing was committed"):
            commit(ledger, bad)
    assert ledger.versions() == [] and ledger.head() is None and ledger.head_log() == []
    with pytest.raises(ValueError, match="actor"):
        commit(ledger, [], actor="")
    with pytest.raises(ValueError, match="set by the ledger"):
        ledger.commit({}, {"model_fingerprint": "other"}, [], config_digest=DIGEST, model_fingerprint=FP,
                      metrics={}, actor="t", reason="r")


@pytest.mark.parametrize("sql", [
    "UPDATE versions SET note = 'x'", "DELETE FROM versions", "UPDATE version_changes SET change_id = 9",
    "DELETE FROM version_changes", "UPDATE head_log SET actor = 'mallory'", "DELETE FROM head_log",
    "DELETE FROM head"])
def test_versions_their_changes_and_the_head_log_are_immutable(store, ledger, sql):
    commit(ledger, add(store, "A"))
    with pytest.raises(store.db.Error, match="immutable|append-only|cannot be deleted"):
        store.db.execute(sql)


# -- statuses follow HEAD -------------------------------------------------------------------------------------

def test_rollback_holds_later_changes_and_roll_forward_applies_them_again(store, ledger):
    commit(ledger, add(store, "A", "B"), 1)
    commit(ledger, add(store, "C"), 2)
    commit(ledger, add(store, "D"), 3)
    move = ledger.move_head(1, actor="alice", reason="step 2 broke a probe")
    assert (move.from_version, move.to_version, move.actor) == (3, 1, "alice") and ledger.head().id == 1
    assert statuses(store) == {"A": ("applied", 1), "B": ("applied", 1), "C": ("held", 2), "D": ("held", 3)}
    assert len(store.next_batch(10)) == 0                       # the daemon does not re-apply rolled-back edits
    counts = store.counts()
    assert (counts.pending, counts.applied, counts.held) == (0, 2, 2)
    add(store, "E")
    assert [e.change.subject for e in store.next_batch(10)] == ["E"]
    ledger.move_head(3, actor="alice", reason="roll forward")
    assert statuses(store) == {"A": ("applied", 1), "B": ("applied", 1), "C": ("applied", 2), "D": ("applied", 3),
                               "E": ("pending", None)}
    assert [(m.from_version, m.to_version) for m in ledger.head_log()] == [(None, 1), (1, 2), (2, 3), (3, 1), (1, 3)]


def test_a_branch_after_rollback_and_moving_head_between_branches(store, ledger):
    commit(ledger, add(store, "A"), 1)
    commit(ledger, add(store, "B"), 2)
    ledger.move_head(1, actor="t", reason="rollback")
    v3 = commit(ledger, add(store, "C"), 3)                       # parent defaults to HEAD: a branch off 1
    assert v3.parent == 1 and [v.id for v in ledger.chain(3)] == [1, 3]
    assert [v.id for v in ledger.children(1)] == [2, 3]
    assert statuses(store) == {"A": ("applied", 1), "B": ("held", 2), "C": ("applied", 3)}
    ledger.move_head(2, actor="t", reason="other branch")
    assert statuses(store) == {"A": ("applied", 1), "B": ("applied", 2), "C": ("held", 3)}
    ledger.move_head(None, actor="t", reason="base model")
    assert ledger.head() is None and set(statuses(store).values()) == {("held", 1), ("held", 2), ("held", 3)}
    assert len(store.next_batch(10)) == 0


def test_revert_replays_later_changes_into_a_new_version(store, ledger):
    commit(ledger, add(store, "A"), 1)
    commit(ledger, add(store, "B"), 2)
    c_ids = add(store, "C")
    commit(ledger, c_ids, 3)
    ledger.move_head(1, actor="t", reason="revert 2: back to its parent")
    v4 = commit(ledger, [c.id for c in ledger.carried(3)], 4)     # replay 3's facts as a new step
    assert v4.parent == 1 and [c.id for c in ledger.carried(4)] == c_ids == [c.id for c in ledger.carried(3)]
    assert statuses(store) == {"A": ("applied", 1), "B": ("held", 2), "C": ("applied", 4)}
    ledger.move_head(3, actor="t", reason="undo the revert")
    assert statuses(store) == {"A": ("applied", 1), "B": ("applied", 2), "C": ("applied", 3)}


def test_commit_with_an_older_parent_holds_what_left_the_chain(store, ledger):
    commit(ledger, add(store, "A"), 1)
    b_ids = add(store, "B")
    commit(ledger, b_ids, 2)
    v3 = commit(ledger, [c.id for c in ledger.carried(2)] + add(store, "C"), 3, parent=None)
    assert v3.parent is None and ledger.head().id == 3
    assert statuses(store) == {"A": ("held", 1), "B": ("applied", 3), "C": ("applied", 3)}


def test_a_version_committed_off_head_leaves_head_and_statuses_as_they_were(store, ledger):
    a = add(store, "A")
    commit(ledger, a, 1)
    commit(ledger, add(store, "B"), 2)
    log_before = len(ledger.head_log())
    branch = commit(ledger, a, 3, parent=None, move_head=False)          # a compaction's branch version
    assert branch.parent is None and ledger.head().id == 2 and len(ledger.head_log()) == log_before
    assert statuses(store) == {"A": ("applied", 1), "B": ("applied", 2)}
    ledger.move_head(branch.id, actor="t", reason="r")
    assert statuses(store) == {"A": ("applied", 3), "B": ("held", 2)}


def test_moves_leave_pending_and_failed_changes_alone(store, ledger):
    commit(ledger, add(store, "A"), 1)
    store.mark_failed(add(store, "F"), "nan loss")
    add(store, "P")
    for to in (None, 1, None):
        ledger.move_head(to, actor="t", reason="r")
        assert statuses(store)["F"] == ("failed", None) and statuses(store)["P"] == ("pending", None)


def test_concurrent_commits_from_threads_form_one_chain(store, ledger):
    ids = add(store, *[f"S{i}" for i in range(8)])
    threads = [threading.Thread(target=commit, args=(ledger, [i], i)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    versions = ledger.versions()
    assert [v.parent for v in versions] == [None] + [v.id for v in versions[:-1]]
    assert {s for s, _ in statuses(store).values()} == {"applied"} and len(ledger.head_log()) == 8


# -- blobs ----------------------------------------------------------------------------------------------------

def test_blobs_are_content_addressed_and_round_trip_bit_exact(store, ledger, tmp_path):
    arrays = delta(7)
    arrays["odd"] = np.array([np.nan, -0.0, np.inf, 1e-45], dtype=np.float32)
    arrays["half"] = np.arange(6, dtype=np.float16).reshape(2, 3)
    arrays["ids"] = np.arange(5, dtype=np.int64)
    meta = {"layers": "[0, 1]", "orientation": "out_in", "ü": "ñ"}
    kw = dict(config_digest=DIGEST, model_fingerprint=FP, metrics={}, actor="t", reason="r")
    v1 = ledger.commit(arrays, meta, add(store, "A"), **kw)
    v2 = ledger.commit(dict(reversed(list(arrays.items()))), dict(reversed(list(meta.items()))), add(store, "B"), **kw)
    assert v1.blob_sha256 == v2.blob_sha256
    files = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
    assert files == [tmp_path / "blobs" / v1.blob_sha256[:2] / f"{v1.blob_sha256}.safetensors"]
    assert hashlib.sha256(files[0].read_bytes()).hexdigest() == v1.blob_sha256
    assert ledger.blob_bytes_total() == v1.blob_bytes and ledger.blob_path(2) == files[0]
    loaded, loaded_meta = ledger.load(2, expect_fingerprint=FP)
    assert loaded.keys() == arrays.keys()
    for k, a in arrays.items():
        assert loaded[k].dtype == a.dtype and loaded[k].shape == a.shape and loaded[k].tobytes() == a.tobytes()
    assert loaded_meta == {**meta, "format": BLOB_FORMAT, "config_digest": DIGEST, "model_fingerprint": FP}


def test_equal_content_gives_equal_bytes_in_other_processes(store, ledger):
    """safetensors writes metadata in hash-map order; the ledger's canonical header makes the bytes stable."""
    v = commit(ledger, add(store, "A"), 3)
    code = ("import sys, hashlib; sys.path.insert(0, 'tests/kb'); from test_ledger import delta\n"
            "from kb.blobs import serialize; from kb.ledger import _blob_metadata\n"
            "meta = _blob_metadata({'layers': '[\"layers.0\", \"layers.1\"]'}, sys.argv[1], sys.argv[2])\n"
            "print(hashlib.sha256(serialize(delta(3), meta)).hexdigest())")
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code, DIGEST, FP], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=60).stdout.strip()
        assert out == v.blob_sha256


def test_a_version_without_arrays_is_a_valid_blob(store, ledger):
    v = ledger.commit({}, {"note": "delete with nothing left to edit"}, add(store, "A"), config_digest=DIGEST,
                      model_fingerprint=FP, metrics={}, actor="t", reason="delete")
    arrays, meta = ledger.load(v.id)
    assert arrays == {} and meta["note"] == "delete with nothing left to edit" and meta["format"] == BLOB_FORMAT
    assert statuses(store)["A"] == ("applied", v.id)


def _break_missing(path):
    path.unlink()


def _break_truncated(path):
    path.write_bytes(path.read_bytes()[:-100])


def _break_flipped(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _break_directory(path):
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize("damage, message", [
    (_break_missing, "delta blob is missing"), (_break_truncated, "delta blob is truncated or altered: .* bytes"),
    (_break_flipped, "delta blob is corrupted: sha256"), (_break_directory, "delta blob cannot be read")])
def test_a_damaged_blob_is_refused_with_the_way_out_and_the_ledger_stays_usable(store, ledger, damage, message):
    commit(ledger, add(store, "A"), 1)
    v2 = commit(ledger, add(store, "B"), 2)
    path = ledger.blob_path(2)
    damage(path)
    with pytest.raises(BlobError, match=rf"version 2: its {message}.*`kbsync rollback N`.*restore the file") as e:
        ledger.load(2)
    assert e.value.version_id == 2 and str(path) in str(e.value)
    assert ledger.load(1)[0].keys() == delta(1).keys()                           # others still load
    ledger.move_head(1, actor="operator", reason="version 2's blob is damaged")
    assert ledger.head().id == 1 and statuses(store)["B"] == ("held", v2.id)
    if path.is_dir():
        path.rmdir()
    v3 = commit(ledger, [c.id for c in ledger.carried(2)], 2)                    # same content: the blob is rewritten
    assert v3.blob_sha256 == v2.blob_sha256 and ledger.load(2)[0].keys() == ledger.load(3)[0].keys()


def test_a_blob_for_another_model_is_refused_naming_both_fingerprints(store, ledger):
    v = commit(ledger, add(store, "A"))
    with pytest.raises(ModelMismatchError, match=r"version 1: .*made for model 'model-fp-1', not for 'gpt2-xl@abc'"):
        ledger.load(v.id, expect_fingerprint="gpt2-xl@abc")
    # A row whose blob says another model (a blob copied in from another ledger) is refused as well.
    store.db.execute("INSERT INTO versions (parent, config_digest, model_fingerprint, blob_sha256, blob_bytes, "
                       "n_facts) VALUES (1, ?, 'other-model', ?, ?, 0)", (DIGEST, v.blob_sha256, v.blob_bytes))
    with pytest.raises(ModelMismatchError, match=r"version 2: .*made for model 'model-fp-1', not for 'other-model'"):
        ledger.load(2)
    assert ledger.load(1, expect_fingerprint=FP)[1]["model_fingerprint"] == FP


def test_gc_removes_orphan_blobs_and_temp_files_only(store, ledger, tmp_path):
    commit(ledger, add(store, "A"), 1)
    ids = add(store, "B")
    store.mark_failed(ids, "x")
    with pytest.raises(ChangeStateError):
        commit(ledger, ids, 2)                                  # its blob was written first: now an orphan
    kept = ledger.blob_path(1)
    temp = kept.parent / f".{'0' * 64}.abc.tmp"
    temp.write_bytes(b"partial")
    other = tmp_path / "blobs" / "README"
    other.write_text("not ours")
    files = {p for p in (tmp_path / "blobs").rglob("*") if p.is_file()}
    assert len(files) == 4
    assert ledger.gc_blobs(min_age_s=3600) == [p for p in sorted(files) if p.name.endswith(".safetensors")
                                               and p != kept]
    removed = ledger.gc_blobs()
    assert removed == [temp]
    assert {p for p in (tmp_path / "blobs").rglob("*") if p.is_file()} == {kept, other}
    assert ledger.load(1)[0].keys() == delta(1).keys()


# -- pruning --------------------------------------------------------------------------------------------------

def blob_files(tmp_path) -> set[Path]:
    return {p for p in (tmp_path / "blobs").rglob("*.safetensors")}


def test_prune_deletes_the_weights_off_heads_chain_and_keeps_their_history(store, ledger, tmp_path):
    commit(ledger, add(store, "A"), 1)
    commit(ledger, add(store, "B"), 2)
    commit(ledger, add(store, "C"), 3)                          # 1 <- 2 <- 3
    ledger.move_head(1, actor="t", reason="rollback")
    commit(ledger, add(store, "D"), 4)                          # 1 <- 4: HEAD; 2 and 3 are off its chain
    commit(ledger, [], 5, parent=4, move_head=False)            # a branch being built off HEAD (kept below)
    on_disk = {ledger.blob_path(i) for i in (1, 2, 3, 4, 5)}
    assert blob_files(tmp_path) == on_disk
    dry = ledger.prune(keep=[5], actor="t", reason="dry", dry_run=True)
    assert dry.versions == (2, 3) and blob_files(tmp_path) == on_disk and not ledger.pruned()

    commit(ledger, [], 6, parent=5, move_head=False)            # the branch grew meanwhile: kept with it
    on_disk.add(ledger.blob_path(6))
    before = ledger.blob_bytes_total()
    report = ledger.prune(keep=[5], actor="alice", reason="after compaction")
    assert report.versions == (2, 3) and report.blobs == 2 and report.kept_versions == 4
    gone = {ledger.blob_path(2), ledger.blob_path(3)}
    assert blob_files(tmp_path) == on_disk - gone
    assert report.bytes == before - ledger.blob_bytes_total() == sum(ledger.get(i).blob_bytes for i in (2, 3))
    assert set(ledger.pruned()) == {2, 3} and ledger.summary()["pruned_versions"] == 2
    rows = {r["id"]: r for r in ledger.history()}
    assert rows[2]["pruned_at"] and rows[3]["pruned_at"] and rows[1]["pruned_at"] is None
    assert [c.subject for c in ledger.carried(3)] == ["C"] and ledger.get(3).parent == 2   # the history stays

    for way in (lambda: ledger.move_head(3, actor="t", reason="back"), lambda: ledger.load(2),
                lambda: commit(ledger, add(store, "E"), 6, parent=3)):
        with pytest.raises(VersionPrunedError, match=r"version [23]: its weights were pruned at .*kbsync prune"):
            way()
    assert ledger.head().id == 4 and ledger.load(1)[0].keys() == delta(1).keys() and ledger.load(5)
    assert ledger.prune(actor="t", reason="again").versions == (5, 6)   # the branch, once nothing keeps it
    assert ledger.prune(actor="t", reason="again").versions == ()


def test_prune_keeps_a_blob_a_kept_version_shares(store, ledger, tmp_path):
    a = ledger.commit({}, {}, add(store, "A"), config_digest=DIGEST, model_fingerprint=FP, metrics={},
                      actor="t", reason="an empty step")
    ledger.move_head(None, actor="t", reason="base")
    b = ledger.commit({}, {}, add(store, "B"), config_digest=DIGEST, model_fingerprint=FP, metrics={},
                      actor="t", reason="the same bytes")
    assert a.blob_sha256 == b.blob_sha256
    report = ledger.prune(actor="t", reason="r")
    assert report.versions == (a.id,) and report.blobs == 0 and report.bytes == 0
    assert ledger.load(b.id) == ({}, ledger.load(b.id)[1]) and blob_files(tmp_path) == {ledger.blob_path(b.id)}


@pytest.mark.parametrize("sql", ["UPDATE pruned_versions SET actor = 'x'", "DELETE FROM pruned_versions"])
def test_pruned_versions_stay_pruned(store, ledger, sql):
    commit(ledger, add(store, "A"), 1)
    ledger.move_head(None, actor="t", reason="base")
    ledger.prune(actor="t", reason="r")
    with pytest.raises(store.db.Error, match="stays pruned"):
        store.db.execute(sql)


# -- the schema -----------------------------------------------------------------------------------------------

def test_migration_2_rebuilds_the_change_log_keeping_rows_ids_and_triggers(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, MIGRATIONS[:1])
    conn.execute("INSERT INTO facts (subject, template, target) VALUES ('A', '{} is', 'x'), ('B', '{} is', 'y')")
    conn.execute("DELETE FROM facts WHERE subject = 'B'")
    conn.execute("UPDATE changes SET status = 'applied', version_id = 1 WHERE id = 1")
    conn.execute("UPDATE changes SET status = 'failed', error = 'nan' WHERE id = 2")
    before = conn.execute("SELECT * FROM changes ORDER BY id").fetchall()
    conn.close()
    with FactStore(path) as store:
        assert store.db.execute("SELECT * FROM changes ORDER BY id").fetchall() == before
        store.add("C", "C is", "z")                                          # the facts triggers still log
        assert [(c.id, c.subject, c.status) for c in store.changes.list()][-1] == (4, "C", "pending")
        store.db.execute("UPDATE changes SET status = 'held' WHERE id = 4")  # the new status is allowed
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            store.db.execute("DELETE FROM changes")
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            store.db.execute("UPDATE changes SET status = 'lost' WHERE id = 4")
        assert store.db.execute("SELECT version_id FROM head").fetchall() == [(None,)]


def test_commit_chain_is_all_or_nothing(store, ledger):
    from kb.ledger import PlannedVersion

    a = store.add("Paris", "{} is in", "Italy", source="t")
    b = store.add("Rome", "{} is in", "France", source="t")
    arr = {"1.U": np.ones((3, 1), dtype=np.float32)}
    plan = lambda ids: PlannedVersion(arr, {"layers": "1"}, ids, "cfg", "fp")
    v1 = ledger.commit(arr, {"layers": "1"}, [a.id], config_digest="cfg", model_fingerprint="fp", metrics={},
                       actor="t", reason="first")
    with pytest.raises(ChangeStateError):                     # the second planned version is bad
        ledger.commit_chain([plan([b.id]), plan([999])], parent=None, actor="t", reason="rebuild")
    assert [v.id for v in ledger.versions()] == [v1.id] and ledger.head().id == v1.id
    assert store.counts().pending == 1
    made = ledger.commit_chain([plan([a.id]), plan([b.id])], parent=None, actor="t", reason="rebuild")
    assert [v.parent for v in made] == [None, made[0].id] and ledger.head().id == made[1].id
    assert store.counts().pending == 0 and store.counts().held == 0


def test_transposed_arrays_come_back_as_they_were(store, ledger):
    """The editor's factors are often transposed views (Fortran order in numpy); the blob stores values, not memory."""
    arrays = {k: np.asfortranarray(a) for k, a in delta(5).items()}
    assert not arrays["layers.0.U"].flags["C_CONTIGUOUS"]
    v = ledger.commit(arrays, {"layers": "[]"}, add(store, "A"), config_digest=DIGEST, model_fingerprint=FP,
                      metrics={}, actor="t", reason="step")
    back, _ = ledger.load(v.id)
    assert all(np.array_equal(back[k], a) for k, a in arrays.items())
