"""Target optimisation: per-fact early stopping freezes converged facts; the model is left as it was."""
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
