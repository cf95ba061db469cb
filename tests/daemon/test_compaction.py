"""Compaction: HEAD's live facts solved again from the base model into fewer versions, on a branch that is
committed step by step (so it resumes), then HEAD moves onto it. On a tiny random Llama; the real-model
figures (answers before and after) are in bench/removal_bench.py."""
from __future__ import annotations

import torch

import json

import pytest

from daemon.compaction import MARK
from daemon.config import load_config
from daemon.service import Service
from kb import VersionPrunedError
from tests.daemon.conftest import kbsync

FACTS = [("Paris", "{} is the capital of", "Italy"), ("Rome", "{} is the capital of", "France"),
         ("Berlin", "{} is the capital of", "Spain"), ("Madrid", "{} is the capital of", "Germany"),
         ("Lisbon", "{} is the capital of", "Japan"), ("Vienna", "{} is the capital of", "Peru")]


def _service(project, **sync) -> Service:
    cfg = load_config(project / "app.toml", project / "state")
    if sync:
        from dataclasses import replace
        cfg = replace(cfg, sync=replace(cfg.sync, **sync))
    return Service(cfg, progress=False)


def _history(svc: Service) -> None:
    """v1-v3: three steps of two facts; v4 removes Paris; v5 corrects Rome."""
    for k in range(3):
        for s, t, target in FACTS[2 * k:2 * k + 2]:
            svc.store.add(s, t, target)
        svc.sync()
    svc.store.remove("Paris", "{} is the capital of")
    svc.sync()
    svc.store.add("Rome", "{} is the capital of", "Chile")
    svc.sync()


def _columns(svc: Service) -> list[tuple[str, str]]:
    """The facts the model at HEAD holds factors for, in column order, and whether any edit is masked."""
    head = svc.ledger.head()
    svc.live.live_columns(head.id)
    return [tuple(c) for v in svc.ledger.chain(head.id) for c in svc.live.columns[v.id].columns]


def test_compaction_keeps_the_live_facts_only_and_rollback_stays_exact(project):
    svc = _service(project)
    try:
        _history(svc)
        em, v5 = svc.model_at_head()
        prompts = [t.replace("{}", s) for s, t, _ in FACTS]
        before = em.next_token_logits(prompts)
        n_versions = len(svc.ledger.versions())

        doc = svc.compact()
        assert doc["finished"] and doc["live"] == 5 and len(doc["versions"]) == 2   # one step of 5, then HEAD
        head = svc.ledger.head()
        chain = svc.ledger.chain(head.id)
        assert [v.parent for v in chain] == [None, chain[0].id] and all(MARK in v.metrics for v in chain)
        # the live facts only, each once, the corrected one with its new target; nothing masked
        assert sorted(_columns(svc)) == sorted((s, t) for s, t, _ in FACTS[1:])
        em, _ = svc.model_at_head()
        assert all(not h.masked and not h.unrouted for h in em.hooks.values())
        assert chain[0].metrics["targets_reused"] == 5                 # no target optimised again
        rome = [c for c in svc.ledger.carried(chain[0].id) if c.subject == "Rome"]
        assert [c.target for c in rome] == ["Chile"]                   # the corrected fact: its new target
        counts = svc.store.counts()
        assert counts.pending == 0 and counts.held == 0                # the removal and the old target: applied
        assert len(svc.ledger.versions()) == n_versions + 2

        after = em.next_token_logits(prompts)
        svc.rollback(v5)                                               # before the compaction: exact
        em, _ = svc.model_at_head()
        torch.testing.assert_close(em.next_token_logits(prompts), before, rtol=0, atol=0)
        svc.rollback(head.id)                                          # and forward again: exact
        em, _ = svc.model_at_head()
        torch.testing.assert_close(em.next_token_logits(prompts), after, rtol=0, atol=0)

        again = svc.compact()                                          # nothing happened since: nothing to do
        assert again["finished"] and again["versions"] == [] and svc.ledger.head().id == head.id
    finally:
        svc.close()

    # prune: the weights before the compaction go (storage = HEAD's chain), HEAD answers as before
    blobs = lambda: {p.name for p in (project / "state" / "versions").rglob("*.safetensors")}
    doc = json.loads(kbsync(project, "prune", "--json").stdout)
    assert doc["versions"] == list(range(1, n_versions + 1)) and doc["blobs"] == len(doc["versions"])
    assert blobs() == {f"{v.blob_sha256}.safetensors" for v in chain}
    assert doc["kept_bytes"] == sum(v.blob_bytes for v in chain)
    log = kbsync(project, "log").stdout.splitlines()
    assert sum("[pruned]" in line for line in log) == n_versions and "[pruned]" not in log[-1]
    refused = kbsync(project, "rollback", str(v5), check=False)
    assert refused.returncode != 0 and f"version {v5}: its weights were pruned" in refused.stderr
    svc = _service(project)                                            # a new process restores HEAD exactly
    try:
        em, at = svc.model_at_head()
        assert at == head.id
        torch.testing.assert_close(em.next_token_logits(prompts), after, rtol=0, atol=0)
        with pytest.raises(VersionPrunedError):
            svc.rollback(v5)
    finally:
        svc.close()


def test_an_interrupted_compaction_resumes_and_takes_in_what_changed_meanwhile(project):
    svc = _service(project, compact_batch_size=4)
    try:
        _history(svc)
        v5 = svc.ledger.head().id
        first = svc.compact_step()                      # Berlin, Madrid, Lisbon, Vienna onto the branch; "crash"
        assert not first.finished and first.done == 4 and svc.ledger.head().id == v5
        assert svc.model_at_head()[1] == v5            # HEAD is what is served meanwhile
    finally:
        svc.close()
    assert json.loads(kbsync(project, "prune", "--json").stdout)["versions"] == []   # the branch is kept

    svc = _service(project, compact_batch_size=4)      # a new process
    try:
        svc.store.add("Oslo", "{} is the capital of", "Chad")          # a sync and a removal land meanwhile
        svc.sync()
        svc.store.remove("Vienna", "{} is the capital of")
        svc.sync()
        doc = svc.compact()
        head = svc.ledger.head()
        chain = svc.ledger.chain(head.id)
        assert chain[0].id == first.version                            # resumed on the branch it had begun
        assert doc["finished"] and doc["live"] == 5 and svc.store.counts().pending == 0
        live = svc.live.live_columns(head.id)
        for s in ("Rome", "Berlin", "Madrid", "Lisbon", "Oslo"):       # every live fact exactly once
            assert len(live[(s, "{} is the capital of")]) == 1
        assert live[("Vienna", "{} is the capital of")] == []          # on the branch before its removal: masked
        assert ("Paris", "{} is the capital of") not in live           # removed before: never on the branch
    finally:
        svc.close()


def test_a_compaction_moves_a_cascade_history_onto_the_configured_gate(project):
    tiny = project / "tiny.toml"
    tiny.write_text(tiny.read_text().replace("[editor]\n", "[editor]\ngate = 'cascade'\n", 1))
    svc = _service(project)
    try:
        _history(svc)
        assert svc.live.em.gate == "cascade"
        assert {d.gate for d in svc.live.deltas(svc.ledger.head().id) if d.layers} == {"cascade"}
    finally:
        svc.close()
    tiny.write_text(tiny.read_text().replace("gate = 'cascade'", "gate = 'prefix'"))
    svc = _service(project)
    try:
        em, _ = svc.model_at_head()
        assert em.gate == "cascade"                             # a history keeps the gate it was made with
        assert svc.compact()["finished"]
        em, head = svc.model_at_head()
        assert em.gate == "prefix"
        assert {d.gate for d in svc.live.deltas(head) if d.layers} == {"prefix"}
        assert sorted(k[0] for k in svc.live.live_columns(head)) == ["Berlin", "Lisbon", "Madrid", "Rome", "Vienna"]
    finally:
        svc.close()
