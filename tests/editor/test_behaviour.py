"""Behaviour on the real default model: a consecutive run of 3 steps x 5 COUNTERFACT facts."""
import pytest
import torch

from editor.config import EditConfig, StatsConfig
from editor.model import EditableModel
from editor.requests import EditRequest
from editor.stats import key_stats
from editor.step import apply_delta, compute_delta
from tests.conftest import DATA, ROOT

pytestmark = pytest.mark.model


def test_three_consecutive_steps_edit_and_keep_unrelated(default_model, counterfact):
    model, tok = default_model
    cfg = EditConfig.from_toml(ROOT / "configs" / "models" / "smollm2-135m.toml")
    cfg = cfg.replace(stats=StatsConfig(corpus=str(DATA / "wikitext2-valid.txt"), n_tokens=20_000, seq_len=256))
    em = EditableModel.for_config(model, tok, cfg)     # the shipped gate (prefix)
    assert em.gate == "prefix"
    try:
        stats = key_stats(em, cfg.stats, ROOT / ".cache" / "state" / "stats", progress=False)
        cases = counterfact[100:115]                 # tuning range (0-1999), not the sweep's cases
        unrelated = [c["locality_prompt"] for c in counterfact[1500:1510]]
        before = em.next_token_logits(unrelated).argmax(-1)
        for s in range(3):
            batch = cases[5 * s:5 * s + 5]
            apply_delta(em, compute_delta(em, [EditRequest(c["subject"], c["prompt"], c["target_new"]) for c in batch],
                                          stats, cfg))
        logp = em.next_token_logits([c["prompt"] for c in cases]).log_softmax(-1)
        first = lambda s: tok(" " + s, add_special_tokens=False)["input_ids"][0]
        new = torch.tensor([first(c["target_new"]) for c in cases])
        old = torch.tensor([first(c["ground_truth"]) for c in cases])
        prefers_new = logp.gather(1, new[:, None]) > logp.gather(1, old[:, None])
        assert int(prefers_new.sum()) >= 14, [c["prompt"] for c, ok in zip(cases, prefers_new) if not ok]
        kept = em.next_token_logits(unrelated).argmax(-1) == before
        assert int(kept.sum()) >= 9, [p for p, ok in zip(unrelated, kept) if not ok]
    finally:
        em.close()
