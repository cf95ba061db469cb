"""Removing and correcting facts deep in a history: one new version that masks the old edits, whatever
their depth; no replay. On a tiny random Llama (the real-model behaviour is in test_versions_behaviour)."""
from __future__ import annotations

import torch

from daemon.config import load_config
from daemon.service import Service
from editor.hook import Mode

FACTS = [("Paris", "{} is the capital of", "Italy"), ("Rome", "{} is the capital of", "France"),
         ("Berlin", "{} is the capital of", "Spain"), ("Madrid", "{} is the capital of", "Germany"),
         ("Lisbon", "{} is the capital of", "Japan"), ("Vienna", "{} is the capital of", "Peru")]


def _prompts():
    return [t.replace("{}", s) for s, t, _ in FACTS]


def test_remove_and_correct_cost_one_version_at_any_depth_and_roll_back_exactly(project):
    svc = Service(load_config(project / "app.toml", project / "state"), progress=False)
    try:
        for k in range(3):                                           # 3 steps of 2 facts: v1, v2, v3
            for s, t, target in FACTS[2 * k:2 * k + 2]:
                svc.store.add(s, t, target)
            svc.sync()
        em, v3 = svc.model_at_head()
        logits = lambda: em.next_token_logits(_prompts())          # noqa: E731
        at_v3 = logits()
        with em.mode(Mode.OFF):
            base = logits()

        svc.store.remove("Paris", "{} is the capital of")           # a fact of the first step
        reports = svc.sync()
        assert [(r.kind, r.facts) for r in reports] == [("remove", 1)]
        v4 = svc.ledger.head().id
        assert svc.ledger.get(v4).parent == v3 and len(svc.ledger.versions()) == 4   # no replay
        em, _ = svc.model_at_head()
        at_v4 = logits()
        assert not torch.allclose(at_v4[0], at_v3[0])                # Paris answers differently
        assert svc.status()["pending"] == 0

        svc.store.add("Rome", "{} is the capital of", "Chile")       # a correction of a first-step fact
        reports = svc.sync()
        assert [(r.kind, r.facts) for r in reports] == [("edit", 1)]
        v5 = svc.ledger.head().id
        assert svc.ledger.get(v5).parent == v4
        em, _ = svc.model_at_head()
        # Paris and the old Rome edit are out: they route nothing (their Δ stays until compaction)
        assert em.hooks[1].unrouted == {(0, 0), (0, 1)} and not em.hooks[1].masked
        at_v5 = logits()

        for version, expected in ((v3, at_v3), (v4, at_v4), (v5, at_v5), (None, base), (v5, at_v5)):
            svc.rollback(version)                                    # exact across the removals
            em, _ = svc.model_at_head()
            torch.testing.assert_close(logits(), expected, rtol=0, atol=0)
    finally:
        svc.close()
