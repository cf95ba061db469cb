"""Versions on the real default model: rollback, revert, removal and correction change what the model answers."""
import pytest
import torch

from daemon.config import AppConfig, ModelConfig, SyncConfig, VerifyConfig
from daemon.service import Service
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
