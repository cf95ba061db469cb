"""Target optimisation: per-fact early stopping freezes converged facts; the model is left as it was."""
import pytest
import torch

from editor.config import EditConfig
from editor.hook import Mode
from editor.model import EditableModel
from editor.requests import EditRequest, StepBatch
from editor.targets import compute_targets

REQS = [EditRequest("Paris", "{} is the capital of", "Italy"),
        EditRequest("Apple A5", "Apple A5 was created by", "Microsoft")]


def _targets(model, tok, **changes):
    cfg = EditConfig(layers=(1, 2), v_steps=6, contexts=("{}", "In short, {}")).replace(**changes)
    em = EditableModel(model, tok, cfg.layers)
    batch = StepBatch(tok, REQS, cfg.contexts, cfg.kl_template)
    with em.mode(Mode.VALIDATED):
        out = compute_targets(em, batch, cfg)
    em.close()
    return out


def test_optimisation_lowers_target_nll_and_respects_clamp(tiny_model):
    model, tok = tiny_model
    start = _targets(model, tok, v_steps=1)
    out = _targets(model, tok, v_steps=8, clamp_norm_factor=0.5)
    assert out.steps == 8 and (out.nll < start.nll).all()
    assert ((out.Z - out.h0).norm(dim=-1) <= 0.5 * out.h0.norm(dim=-1) + 1e-4).all()


def test_converged_facts_are_frozen(tiny_model):
    model, tok = tiny_model
    first = _targets(model, tok, v_steps=1)
    everything = _targets(model, tok, early_stop_nll=1e9)
    assert everything.steps == 1 and torch.equal(everything.Z, everything.h0)     # stopped before any update
    lo, hi = sorted(first.nll.tolist())
    split = _targets(model, tok, early_stop_nll=(lo + hi) / 2)
    easy = int(first.nll.argmin())
    assert torch.equal(split.Z[easy], split.h0[easy])                               # frozen at δ = 0
    assert not torch.equal(split.Z[1 - easy], split.h0[1 - easy])                   # the other kept learning
    assert split.steps == 6


@pytest.mark.parametrize("kind", ["llama", "gpt2", "mistral", "qwen2", "gptj"])
def test_prefix_cache_gives_the_same_targets_as_full_rows(make_tiny, tiny_tokenizer, kind, monkeypatch):
    import editor.targets as targets
    runs = []
    real_run = targets._Prefix.run
    monkeypatch.setattr(targets._Prefix, "run", lambda self, *a: runs.append(self.src_s.shape) or real_run(self, *a))
    model = make_tiny(kind)
    # contexts of different lengths and a subject at the start: lookups differ, some rows have short prefixes
    reqs = REQS + [EditRequest("Toko Yasuda", "Toko Yasuda plays the", "piano")]
    cfg = EditConfig(layers=(1,), v_steps=5, contexts=("{}", "The following is a fact. {}", "In short, {}"))
    em = EditableModel(model, tiny_tokenizer, cfg.layers)
    batch = StepBatch(tiny_tokenizer, reqs, cfg.contexts, cfg.kl_template)
    try:
        with em.mode(Mode.VALIDATED):
            full = compute_targets(em, batch, cfg.replace(prefix_cache=False))
            cached = compute_targets(em, batch, cfg.replace(prefix_cache=True))
    finally:
        em.close()
    assert len(runs) == cached.steps and runs[0][1] < batch.tensors(batch.rewrite + batch.kl, "cpu")[0].shape[1]
    assert torch.allclose(cached.nll, full.nll, rtol=1e-4, atol=1e-5)
    assert torch.allclose(cached.Z, full.Z, rtol=1e-4, atol=1e-4) and not torch.equal(full.Z, full.h0)
