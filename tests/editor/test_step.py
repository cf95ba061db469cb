"""The step on tiny random models: purity of compute_delta, the solve, apply, round trips."""
import dataclasses

import numpy as np
import safetensors.numpy
import pytest
import torch

from editor import step as step_mod
from editor.config import EditConfig, StatsConfig
from editor.errors import DeltaMismatch, EditorError, EditRequestError
from editor.model import EditableModel
from editor.requests import EditRequest
from editor.stats import key_stats
from editor.step import apply_delta, compute_delta

REQUESTS = [
    EditRequest("Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "English"),
    EditRequest("Paris", "{} is the capital of", "Italy"),
    EditRequest("Apple A5", "Apple A5 was created by", "Microsoft"),
]


@pytest.fixture
def setup(tiny_model, corpus_file, tmp_path):
    model, tok = tiny_model
    cfg = EditConfig(layers=(1, 2), v_steps=4, contexts=("{}", "In short, {}"),
                     stats=StatsConfig(corpus=str(corpus_file), n_tokens=500, seq_len=32))
    em = EditableModel(model, tok, cfg.layers)
    stats = key_stats(em, cfg.stats, tmp_path / "stats", progress=False)
    return em, cfg, stats


def _snapshot(em):
    params = {k: v.clone() for k, v in em.model.state_dict().items()}
    return params, em.state(), {l: h.mode for l, h in em.hooks.items()}, {l: len(h._trial) for l, h in em.hooks.items()}


def _assert_same(em, snap):
    params, state, modes, trials = snap
    for k, v in em.model.state_dict().items():
        assert torch.equal(v, params[k]), k
    now = em.state()
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert {l: h.mode for l, h in em.hooks.items()} == modes
    assert {l: len(h._trial) for l, h in em.hooks.items()} == trials
    assert len(em.spec.blocks(em.model)) == em.model.config.num_hidden_layers   # no blocks left cut off


def test_compute_delta_leaves_model_untouched(setup):
    em, cfg, stats = setup
    apply_delta(em, compute_delta(em, REQUESTS[:1], stats, cfg))     # a non-trivial starting state
    ids = torch.randint(2, 100, (2, 8))
    before_logits = em.model(input_ids=ids).logits
    snap = _snapshot(em)
    delta = compute_delta(em, REQUESTS[1:], stats, cfg)
    _assert_same(em, snap)
    assert torch.equal(em.model(input_ids=ids).logits, before_logits)
    assert {ld.layer for ld in delta.layers} == {1, 2}
    for ld in delta.layers:
        assert ld.U.shape == (em.hooks[ld.layer].d_out, 2) and ld.V.shape == ld.K.shape == (em.hooks[ld.layer].d_in, 2)
        assert ld.alpha <= em.hooks[ld.layer].alpha                   # α only decreases


@pytest.mark.parametrize("fail_at", ["solve", "keys", "alpha"])
def test_compute_delta_restores_model_when_it_raises(setup, monkeypatch, fail_at):
    em, cfg, stats = setup
    apply_delta(em, compute_delta(em, REQUESTS[:1], stats, cfg))
    snap = _snapshot(em)
    calls = {"n": 0}
    target = {"solve": "_solve", "keys": "_keys_and_residual", "alpha": "_adapted_alphas"}[fail_at]
    real = getattr(step_mod, target)

    def boom(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 or fail_at == "alpha":    # halfway: after the first layer's trial delta is on
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(step_mod, target, boom)
    with pytest.raises(RuntimeError, match="injected"):
        compute_delta(em, REQUESTS[1:], stats, cfg)
    _assert_same(em, snap)


def test_solve_satisfies_normal_equations():
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n = 30, 12, 5
    X = torch.randn(200, d_in, generator=g, dtype=torch.float64)
    C = 15.0 * X.T @ X / 200                                           # λ E[k kᵀ]
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    A = step_mod._solve(C + K @ K.T, K)
    assert torch.allclose((C + K @ K.T) @ A, K, atol=1e-10)
    # Δ = R Aᵀ minimises ‖Δ K - R‖² + tr(Δ C Δᵀ): its gradient Δ (C + K Kᵀ) - R Kᵀ vanishes
    delta = R @ A.T
    assert torch.allclose(delta @ (C + K @ K.T), R @ K.T, atol=1e-9)
    # a singular lhs falls back to LU and still solves when consistent
    assert torch.allclose(step_mod._solve(torch.eye(3, dtype=torch.float64) * 2, torch.ones(3, 1, dtype=torch.float64)),
                          torch.full((3, 1), 0.5, dtype=torch.float64))


def test_apply_rejects_foreign_or_misshapen_deltas_atomically(setup):
    em, cfg, stats = setup
    delta = compute_delta(em, REQUESTS[:1], stats, cfg)
    before = em.state()
    with pytest.raises(DeltaMismatch, match="computed for model"):
        apply_delta(em, dataclasses.replace(delta, model_fingerprint="0" * 16))
    bad_layer = dataclasses.replace(delta.layers[-1], U=torch.zeros(3, 1))
    with pytest.raises(DeltaMismatch, match="factor shapes"):
        apply_delta(em, dataclasses.replace(delta, layers=(delta.layers[0], bad_layer)))
    after = em.state()
    assert all(torch.equal(before[k], after[k]) for k in before)      # nothing half-applied
    apply_delta(em, delta)
    assert all(h.rank == 1 for h in em.hooks.values())


def test_delta_arrays_round_trip(setup):
    em, cfg, stats = setup
    delta = compute_delta(em, REQUESTS[:2], stats, cfg)
    arrays, meta = delta.to_arrays()
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    # through a plain safetensors file: U and K are transposed views in memory, and a Fortran-ordered array
    # would be written as it lies and read back scrambled
    arrays = safetensors.numpy.load(safetensors.numpy.save(arrays, metadata=meta))
    back = step_mod.StepDelta.from_arrays(arrays, meta, delta.requests)
    for a, b in zip(delta.layers, back.layers):
        assert a.layer == b.layer and a.alpha == b.alpha
        assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V) and torch.equal(a.K, b.K)
    apply_delta(em, back)


def test_consecutive_steps_accumulate_keys_and_lower_alpha(setup):
    em, cfg, stats = setup
    deltas = []
    for r in REQUESTS:
        deltas.append(compute_delta(em, [r], stats, cfg))
        apply_delta(em, deltas[-1])
    for l, h in em.hooks.items():
        lds = [ld for d in deltas for ld in d.layers if ld.layer == l]
        assert torch.allclose(h.KK, sum(ld.K.double() @ ld.K.double().T for ld in lds))
        assert h.alpha == lds[-1].alpha and all(a.alpha >= b.alpha for a, b in zip(lds, lds[1:]))


def test_alpha_floor_holds_alpha_at_or_above_alpha_min(setup):
    em, cfg, stats = setup
    cfg = cfg.replace(alpha0=50.0)                                   # above any z here: α adapts down
    for h in em.hooks.values():
        h.alpha = cfg.alpha0
    free = [compute_delta(em, [r], stats, cfg) for r in REQUESTS]
    lowest = min(ld.alpha for d in free for ld in d.layers)
    assert lowest < cfg.alpha0                                       # the paper's rule lowers α
    floor = (lowest + cfg.alpha0) / 2
    floored = [compute_delta(em, [r], stats, cfg.replace(alpha_min=floor)) for r in REQUESTS]
    for d, f in zip(free, floored):
        for a, b in zip(d.layers, f.layers):
            assert b.alpha == max(floor, a.alpha)
    with pytest.raises(EditorError, match="alpha_min"):
        cfg.replace(alpha_min=cfg.alpha0 + 1)


def test_bad_requests_are_rejected():
    with pytest.raises(EditRequestError, match="does not contain subject"):
        EditRequest("Paris", "The capital of France is", "Rome")
    with pytest.raises(EditRequestError, match="non-empty"):
        EditRequest("Paris", "{} is in", "  ")
    assert EditRequest("Paris", "{} is in", "Italy").text == "Paris is in"
    assert EditRequest("Paris", "{} is in", "Italy").target_text == " Italy"


def test_braces_in_facts_are_literal_text():
    r = EditRequest("C{x}", "The language {} is written in", "{Rust}")
    assert r.text == "The language C{x} is written in" and r.target_text == " {Rust}"


def test_restore_is_bit_exact_back_and_forward(setup):
    """After 5 steps, restoring the first 3 deltas equals the state captured after step 3; then 5 again."""
    em, cfg, stats = setup
    deltas, states = [], []
    for i in range(5):
        deltas.append(compute_delta(em, [REQUESTS[i % 3]], stats, cfg))
        apply_delta(em, deltas[-1])
        states.append(em.state())
    step_mod.restore_state(em, deltas[:3])
    assert all(torch.equal(em.state()[k], states[2][k]) for k in states[2])
    step_mod.restore_state(em, deltas)
    assert all(torch.equal(em.state()[k], states[4][k]) for k in states[4])
    step_mod.restore_state(em, [])
    assert all(h.rank == 0 and not h.D.any() for h in em.hooks.values())


def test_restore_checks_every_delta_before_touching_state(setup):
    em, cfg, stats = setup
    good = compute_delta(em, REQUESTS[:1], stats, cfg)
    apply_delta(em, good)
    before = em.state()
    with pytest.raises(DeltaMismatch):
        step_mod.restore_state(em, [good, dataclasses.replace(good, model_fingerprint="f" * 16)])
    assert all(torch.equal(em.state()[k], before[k]) for k in before)
