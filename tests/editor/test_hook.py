"""Hook layer mechanics on tiny random models: identity, modes, routing over real tokens, carried stats."""
import pytest
import torch

from editor.hook import HookLayer, Mode, RoutingContext, sequence_stats
from editor.model import EditableModel


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_no_deltas_is_exactly_the_base_model(tiny_model):
    model, tok = tiny_model
    ids = torch.randint(2, len(tok), (3, 11))
    base = _logits(model, ids)
    em = EditableModel(model, tok, layers=(1, 2))
    for mode in Mode:
        with em.mode(mode):
            assert torch.equal(_logits(model, ids), base)
    em.close()


def _commit_random(em, scale=1.0, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    for h in em.hooks.values():
        U = torch.randn(h.d_out, n, generator=g) * scale
        V = torch.randn(h.d_in, n, generator=g)
        h.commit(U, V, torch.randn(h.d_in, n, generator=g), alpha=h.alpha)


def test_modes(tiny_model):
    model, tok = tiny_model
    ids = torch.randint(2, len(tok), (2, 9))
    base = _logits(model, ids)
    em = EditableModel(model, tok, layers=(1,))
    _commit_random(em)
    with em.mode(Mode.OFF):
        assert torch.equal(_logits(model, ids), base)
    with em.mode(Mode.TEMPORARY):
        assert not torch.allclose(_logits(model, ids), base)
    # a very high alpha routes nothing: validated == base exactly
    em.hooks[1].alpha = 1e9
    assert torch.equal(_logits(model, ids), base)
    # a very low alpha routes every token: validated == temporary
    em.hooks[1].alpha = -1e9
    with em.mode(Mode.TEMPORARY):
        temp = _logits(model, ids)
    assert torch.allclose(_logits(model, ids), temp)
    assert em.hooks[1].mode is Mode.VALIDATED   # modes restored by the context manager


def test_state_after_n_steps_equals_sum_of_deltas_and_weights(tiny_model):
    """Temporary mode after N commits == the base model with W0 + Σ U_t V_tᵀ written into the weights."""
    model, tok = tiny_model
    ids = torch.randint(2, len(tok), (2, 7))
    em = EditableModel(model, tok, layers=(1, 2))
    factors = {l: [] for l in em.layers}
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        for l, h in em.hooks.items():
            U, V, K = torch.randn(h.d_out, 3, generator=g), torch.randn(h.d_in, 3, generator=g), torch.randn(h.d_in, 3, generator=g)
            h.commit(U, V, K, 1.5)
            factors[l].append((U, V, K))
    for l, h in em.hooks.items():
        assert torch.allclose(h.D, sum(U @ V.T for U, V, _ in factors[l]), atol=1e-5)
        assert torch.allclose(h.KK, sum(K.double() @ K.double().T for _, _, K in factors[l]))
        assert h.rank == 12
    with em.mode(Mode.TEMPORARY):
        hooked = _logits(model, ids)
    em.close()
    with torch.no_grad():
        for l in em.layers:
            W = em.spec.weight(em.spec.projection_module(model, l))       # (d_out, d_in) view
            W += sum(U @ V.T for U, V, _ in factors[l])
    assert torch.allclose(_logits(model, ids), hooked, atol=1e-4)


def test_low_rank_and_dense_paths_agree():
    ctx = RoutingContext()
    lin = torch.nn.Linear(40, 8, bias=False)
    hook = HookLayer(lin, 0, 40, 8, ctx, 2.2)
    x = torch.randn(2, 5, 40)
    hook.commit(torch.randn(8, 2), torch.randn(40, 2), torch.randn(40, 2), 2.2)
    low = hook.delta_out(x)                       # rank 2: factor path
    assert torch.allclose(low, x @ hook.D.T, atol=1e-5)
    for _ in range(4):                            # rank 10 * (40 + 8) > 40 * 8: dense path
        hook.commit(torch.randn(8, 2), torch.randn(40, 2), torch.randn(40, 2), 2.2)
    assert torch.allclose(hook.delta_out(x), x @ hook.D.T, atol=1e-5)


def test_bfloat16_dense_delta_serves_the_same_edit_at_half_the_bytes():
    ctx = RoutingContext()
    lin = torch.nn.Linear(40, 8, bias=False)
    hook = HookLayer(lin, 0, 40, 8, ctx, 2.2, delta_dtype=torch.bfloat16)
    x = torch.randn(2, 5, 40)
    hook.commit(torch.randn(8, 3), torch.randn(40, 3), torch.randn(40, 3), 2.2)
    assert not hook.dense_path                    # 4 bytes * 3 * 48 < 2 bytes * 320: factors, exact
    assert torch.allclose(hook.delta_out(x), x @ hook.D.T, atol=1e-5)
    hook.commit(torch.randn(8, 1), torch.randn(40, 1), torch.randn(40, 1), 2.2)
    assert hook.dense_path                        # 4 * 4 * 48 >= 2 * 320, while float32 would still use factors
    hook.set_delta_dtype(torch.float32)
    assert not hook.dense_path
    hook.set_delta_dtype(torch.bfloat16)
    exact, served = x @ hook.D.T, hook.delta_out(x)
    assert served.dtype == torch.float32 and not torch.equal(served, exact)
    assert torch.allclose(served, exact, rtol=2e-2, atol=2e-2 * float(exact.abs().max()))
    assert hook.D.dtype == torch.float32          # the stored Δ itself stays exact


def test_delta_dtype_is_validated_and_reaches_the_hooks(tiny_model):
    from editor.config import EditConfig
    from editor.errors import EditorError
    em = EditableModel.for_config(*tiny_model, EditConfig(layers=(1, 2), delta_dtype="bfloat16"))
    assert {h.delta_dtype for h in em.hooks.values()} == {torch.bfloat16}
    em.close()
    with pytest.raises(EditorError, match="delta_dtype.*float32, bfloat16"):
        EditConfig(delta_dtype="int8")


def test_sequence_stats_ignore_padding():
    M = torch.tensor([[1.0, 2.0, 3.0, 100.0], [5.0, 5.0, 7.0, 9.0]])
    real = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    mean, std = sequence_stats(M, real)
    assert torch.allclose(mean, torch.tensor([2.0, 6.5]))
    assert torch.allclose(std, torch.stack([torch.tensor([1.0, 2, 3]).std(), torch.tensor([5.0, 5, 7, 9]).std()]))
    _, std1 = sequence_stats(M[:, :1], real[:, :1])
    assert torch.isnan(std1).all()                # one token has no std


def test_padding_does_not_change_routing(tiny_model):
    """A sequence gives the same logits alone and right- or left-padded in a batch with a longer one."""
    model, tok = tiny_model
    em = EditableModel(model, tok, layers=(1, 2))
    _commit_random(em, scale=3.0)
    for h in em.hooks.values():
        h.alpha = 0.5                            # route a few tokens per sequence
    short = torch.randint(2, len(tok), (1, 6))
    long_ = torch.randint(2, len(tok), (1, 10))
    alone = _logits(model, short, torch.ones_like(short))
    ids = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros(2, 10, dtype=torch.long)
    ids[0, :6], mask[0, :6] = short[0], 1
    ids[1], mask[1] = long_[0], 1
    batched = _logits(model, ids, mask)
    assert torch.allclose(batched[0, :6], alone[0], atol=1e-4)
    # the routing really routed something (else the test proves nothing)
    with em.mode(Mode.OFF):
        assert not torch.allclose(_logits(model, short), alone, atol=1e-4)


def test_single_token_input_routes_to_base(tiny_model):
    model, tok = tiny_model
    ids = torch.randint(2, len(tok), (3, 1))
    base = _logits(model, ids)
    em = EditableModel(model, tok, layers=(1,))
    _commit_random(em, scale=5.0)
    em.hooks[1].alpha = -1e9                      # even "route everything" cannot route without a std
    assert torch.equal(_logits(model, ids), base)


def test_decoding_steps_use_the_prompt_statistics():
    ctx = RoutingContext()
    lin = torch.nn.Linear(6, 4, bias=False)
    hook = HookLayer(lin, 0, 6, 4, ctx, 1.0)
    hook.commit(torch.eye(4, 2), torch.eye(6, 2), torch.zeros(6, 2), 1.0)
    prompt = torch.zeros(1, 5, 6)
    prompt[0, :, 0] = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05])   # ‖Δx‖ mean ~1, small std
    ctx.attention_mask, ctx.incremental = torch.ones(1, 5), False
    lin(prompt)                                                    # full pass: statistics carried
    mean, std, _ = ctx.carry[0]
    ctx.attention_mask, ctx.incremental = torch.ones(1, 6), True
    big = torch.zeros(1, 1, 6)
    big[0, 0, 0] = 10.0                                            # far above the prompt's mean
    small = torch.zeros(1, 1, 6)
    small[0, 0, 0] = 1.0
    base = lambda x: x @ lin.weight.T
    assert not torch.allclose(lin(big), base(big))                 # routed through the hook
    assert torch.equal(lin(small), base(small))                    # not routed
    ctx.carry.clear()                                              # no carried stats: never routed
    assert torch.equal(lin(big), base(big))


def _sink_layer(rho: float):
    """A hook whose Δ reads input dimension 0; the first token of every sequence is a massive activation."""
    ctx = RoutingContext(massive_ratio=rho)
    lin = torch.nn.Linear(6, 4, bias=False)
    hook = HookLayer(lin, 0, 6, 4, ctx, 1.0)
    hook.commit(torch.eye(4, 1), torch.eye(6, 1), torch.zeros(6, 1), 1.0)   # Δx = x[0] e_0
    x = torch.full((1, 8, 6), 0.5)
    x[0, :, 0] = torch.tensor([0.0, 1.0, 1.1, 0.9, 1.0, 3.0, 1.0, 0.95])     # token 5 is the "subject"
    x[0, 0] = 40.0                                                          # the sink: ‖x‖ ~ 40x the median
    x[0, 0, 0] = 40.0
    ctx.attention_mask, ctx.incremental = torch.ones(1, 8), False
    routed = lambda out: (out - x @ lin.weight.T).abs().sum(-1)[0] > 0      # (T,) which tokens took Δx
    return ctx, lin, x, routed


def test_massive_activation_owns_the_z_scores_without_exclusion():
    ctx, lin, x, routed = _sink_layer(0.0)
    assert routed(lin(x)).tolist() == [True] + [False] * 7                  # only the sink is routed


def test_massive_activation_excluded_routes_the_subject():
    ctx, lin, x, routed = _sink_layer(6.0)
    assert routed(lin(x)).tolist() == [False] * 5 + [True] + [False] * 2    # the subject, not the sink
    mean, std, med = ctx.carry[0]
    assert float(mean) == pytest.approx(float(x[0, 1:, 0].mean()), rel=1e-5)  # statistics without the sink
    # a KV-cached step: a massive new token is not routed, a strong ordinary one is
    ctx.attention_mask, ctx.incremental = torch.ones(1, 9), True
    new = torch.full((1, 1, 6), 0.5)
    new[0, 0, 0] = 3.0
    assert bool((lin(new) != new @ lin.weight.T).any())
    new[0, 0] = 40.0
    assert torch.equal(lin(new), new @ lin.weight.T)


def test_massive_ratio_must_be_off_or_above_one():
    from editor.config import EditConfig
    from editor.errors import EditorError
    with pytest.raises(EditorError, match="massive_ratio"):
        EditConfig(massive_ratio=0.5)
