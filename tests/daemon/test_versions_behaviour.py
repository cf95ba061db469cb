"""Versions on the real default model: rollback, revert, removal and correction change what the model answers."""
import pytest
import torch

from daemon.config import AppConfig, ModelConfig, SyncConfig, VerifyConfig
from daemon.service import Service
from daemon.verify import VerifyGate
from editor.config import EditConfig, StatsConfig
from tests.conftest import DATA, ROOT

pytestmark = pytest.mark.model


def test_rollback_revert_delete(default_model, counterfact, tmp_path):
    model, tok = default_model
    editor = EditConfig.from_toml(ROOT / "configs/models/smollm2-135m.toml").replace(
        stats=StatsConfig(corpus=str(DATA / "wikitext2-valid.txt"), n_tokens=20_000, seq_len=256))
    cfg = AppConfig(state_dir=tmp_path, model=ModelConfig(), editor=editor, sync=SyncConfig(batch_size=2),
                    verify=VerifyConfig(min_success=0.5))
    cases = counterfact[200:206]                       # tuning range; 3 steps of 2 facts
    svc = Service(cfg, progress=False, preloaded=(model, tok))
    try:
        prompts = [c["prompt"] for c in cases]
        first = lambda s: tok(" " + s, add_special_tokens=False)["input_ids"][0]
        new = torch.tensor([first(c["target_new"]) for c in cases])
        old = torch.tensor([first(c["ground_truth"]) for c in cases])
        def top() -> torch.Tensor:                       # greedy next token at HEAD
            svc.live.at_head()
            return svc.live.em.next_token_logits(prompts).argmax(-1)

        def holds() -> list[bool]:                       # prefers the new target over the true one
            svc.live.at_head()
            lp = svc.live.em.next_token_logits(prompts).log_softmax(-1)
            return (lp.gather(1, new[:, None]) > lp.gather(1, old[:, None])).squeeze(1).tolist()

        base_top = top()
        versions, tops = [], []
        for step in range(3):                            # three syncs of two facts: v1, v2, v3
            for c in cases[2 * step:2 * step + 2]:
                svc.store.add(c["subject"], c["prompt"], c["target_new"], source="test")
            versions += [r.version for r in svc.sync()]
            tops.append(top())
        v1, v2, v3 = versions
        assert all(holds())

        svc.rollback(v1)                                 # steps 2-3 prompts answer as before them
        assert torch.equal(top(), tops[0]) and holds()[:2] == [True, True]
        svc.rollback(v3)                                 # and forward again
        assert torch.equal(top(), tops[2])

        svc.revert(v2)                                   # step 2's facts out, steps 1 and 3 kept
        h = holds()
        assert h[:2] == [True, True] and h[4:] == [True, True] and h[2:4] == [False, False]
        assert torch.equal(top()[2:4], tops[0][2:4])
        assert svc.ledger.head().id not in (v1, v2, v3)
        assert svc.ledger.head().metrics["targets_reused"] == 2        # step 3's facts replayed from stored z

        before_removal = svc.ledger.head().id
        n_versions = len(svc.ledger.versions())
        svc.store.remove(cases[4]["subject"], cases[4]["prompt"], source="test")
        reports = svc.sync()                             # the deleted fact answers as the unedited model
        assert [r.kind for r in reports] == ["remove"] and len(svc.ledger.versions()) == n_versions + 1
        h = holds()
        assert int(top()[4]) == int(base_top[4])
        assert h[5] and h[:2] == [True, True] and h[2:4] == [False, False]
        assert svc.status()["pending"] == 0
        removed = svc.ledger.head().id

        # a correction: one step, then the new target wins over the edit it replaces
        svc.store.add(cases[5]["subject"], cases[5]["prompt"], cases[5]["ground_truth"], source="test")
        assert [r.kind for r in svc.sync()] == ["edit"]
        assert int(top()[5]) == int(old[5]) and not holds()[5] and holds()[:2] == [True, True]

        corrected = svc.ledger.head().id
        at_corrected = top()

        svc.rollback(before_removal)                     # rollback across the removal is exact
        assert holds()[4] and holds()[5]
        svc.rollback(removed)
        assert int(top()[4]) == int(base_top[4]) and holds()[5]

        # compaction: the three live facts solved again from the base model, the same answers
        svc.rollback(corrected)
        doc = svc.compact()
        assert doc["finished"] and doc["live"] == 3 and svc.ledger.head().id != corrected
        h = holds()
        assert h[:2] == [True, True] and int(top()[4]) == int(base_top[4]) and int(top()[5]) == int(old[5])
        assert torch.equal(top(), at_corrected)
        svc.rollback(corrected)                          # rollback across the compaction is exact
        assert torch.equal(top(), at_corrected)
    finally:
        svc.close()


def test_verify_gate_judges_each_step_by_what_it_changes(default_model, counterfact, tmp_path):
    """A canary an earlier committed step moved does not refuse every later step (the gate once compared
    with the unedited model, so a long history ended up refusing all new facts); a step that itself moves
    too many canaries is still refused, and commits nothing."""
    model, tok = default_model
    a, b, c, d = counterfact[220:224]                  # tuning range
    editor = EditConfig.from_toml(ROOT / "configs/models/smollm2-135m.toml").replace(
        stats=StatsConfig(corpus=str(DATA / "wikitext2-valid.txt"), n_tokens=20_000, seq_len=256))
    other = "The capital of France is"
    cfg = AppConfig(state_dir=tmp_path, model=ModelConfig(), editor=editor, sync=SyncConfig(batch_size=2),
                    verify=VerifyConfig(min_success=0.5, min_canary=0.6, canaries=(a["prompt"], b["prompt"], other)))
    svc = Service(cfg, progress=False, preloaded=(model, tok))
    try:
        for case in (a, b):                            # each step moves its own canary: 2 of 3 kept
            svc.store.add(case["subject"], case["prompt"], case["target_new"], source="test")
            [report] = svc.sync()
            assert report.kind == "edit" and report.version is not None, report.error
        assert svc.verify.drifted == 2                 # 1 of 3 still the unedited model's answer
        head = svc.ledger.head().id

        svc.verify = VerifyGate(VerifyConfig(min_success=0.5, min_canary=0.6, canaries=(c["prompt"], d["prompt"], other)))
        for case in (c, d):                            # one step of two facts moves two of its three canaries
            svc.store.add(case["subject"], case["prompt"], case["target_new"], source="test")
        [report] = svc.sync()
        assert report.version is None and "changed the answer of 2 of 3 canary prompts" in report.error
        assert svc.ledger.head().id == head and svc.store.counts().failed == 2
    finally:
        svc.close()
