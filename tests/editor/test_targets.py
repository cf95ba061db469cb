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


# contexts of different lengths and a subject at the start: lookups differ, some rows have short prefixes
PREFIX_REQS = REQS + [EditRequest("Toko Yasuda", "Toko Yasuda plays the", "piano")]
PREFIX_CONTEXTS = ("{}", "The following is a fact. {}", "In short, {}")


def _without_and_with_prefix_cache(model, tok, cfg, *, tune=None, between=None):
    """Targets of ``PREFIX_REQS`` computed twice on one batch: full rows, then with the prefix cache.
    ``tune(em, batch, cfg)`` may return the config both use; ``between()`` runs after the first."""
    em = EditableModel(model, tok, cfg.layers)
    batch = StepBatch(tok, PREFIX_REQS, cfg.contexts, cfg.kl_template)
    try:
        with em.mode(Mode.VALIDATED):
            cfg = tune(em, batch, cfg) if tune else cfg
            full = compute_targets(em, batch, cfg.replace(prefix_cache=False))
            if between:
                between()
            cached = compute_targets(em, batch, cfg.replace(prefix_cache=True))
    finally:
        em.close()
    return batch, full, cached


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
    cfg = EditConfig(layers=(1,), v_steps=5, contexts=PREFIX_CONTEXTS)
    batch, full, cached = _without_and_with_prefix_cache(make_tiny(kind), tiny_tokenizer, cfg)
    assert len(runs) == cached.steps and runs[0][1] < batch.tensors(batch.rewrite + batch.kl, "cpu")[0].shape[1]
    assert torch.allclose(cached.nll, full.nll, rtol=1e-4, atol=1e-5)
    assert torch.allclose(cached.Z, full.Z, rtol=1e-4, atol=1e-4) and not torch.equal(full.Z, full.h0)


def test_top1_stops_each_fact_once_its_target_is_the_argmax(default_model):
    """ENCORE's MPES on the real model: a fact stops at the first step where its target is the argmax in
    every context. Each fact's δ moves only its own rows, so it stops on the same path the NLL rule follows
    further: its NLL stays higher, and it needs fewer steps."""
    model, tok = default_model
    reqs = [EditRequest("Danielle Darrieux", "The mother tongue of {} is", "English"),
            EditRequest("Toko Yasuda", "{} plays the", "piano")]
    cfg = EditConfig(layers=(3, 4), v_steps=25, early_stop_nll=0.0, contexts=("{}", "In short, {}"),
                     opt_dtype="float32")
    em = EditableModel(model, tok, cfg.layers)
    batch = StepBatch(tok, reqs, cfg.contexts, cfg.kl_template)
    try:
        with em.mode(Mode.VALIDATED):
            by_nll = compute_targets(em, batch, cfg)
            by_top1 = compute_targets(em, batch, cfg.replace(early_stop="top1"))
    finally:
        em.close()
    assert by_nll.steps == 25 and by_nll.top1.all()           # the argmax is reached on the way
    assert by_top1.top1.all() and by_top1.steps < 25
    assert (by_top1.nll > by_nll.nll).all()


def test_early_stop_must_be_a_known_rule():
    from editor.errors import EditorError
    with pytest.raises(EditorError, match="early_stop"):
        EditConfig(early_stop="top-1")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_prefix_cache_follows_facts_that_stop_early(make_tiny, tiny_tokenizer, kind, monkeypatch):
    """Facts leave the batch at different steps: the cached prefix is cut to the active rows, not rebuilt."""
    import editor.targets as targets
    built, shapes = [], []
    real_init, real_run = targets._Prefix.__init__, targets._Prefix.run
    monkeypatch.setattr(targets._Prefix, "__init__", lambda self, *a: built.append(1) or real_init(self, *a))
    monkeypatch.setattr(targets._Prefix, "run", lambda self, em, feed: shapes.append(feed.shape[0]) or real_run(self, em, feed))

    def easiest_stops_at_once(em, batch, cfg):
        first = compute_targets(em, batch, cfg.replace(v_steps=1, prefix_cache=False)).nll.sort().values
        return cfg.replace(early_stop_nll=float(first[0] + first[1]) / 2)

    cfg = EditConfig(layers=(1,), v_steps=6, contexts=PREFIX_CONTEXTS)
    _, full, cached = _without_and_with_prefix_cache(make_tiny(kind), tiny_tokenizer, cfg,
                                                     tune=easiest_stops_at_once, between=built.clear)
    assert len(built) == 1 and len(set(shapes)) > 1                       # built once, cut as facts stopped
    assert cached.steps == full.steps == 6
    assert torch.allclose(cached.Z, full.Z, rtol=1e-4, atol=1e-4)
