"""The per-token gate on tiny random models: a token's route depends only on its own input and the edits."""
import pytest
import torch

from editor.errors import DeltaMismatch
from editor.hook import HookLayer, Mode, RoutingContext
from editor.model import EditableModel
from editor.step import LayerDelta, StepDelta, apply_delta, restore_state
from tests.conftest import edit_keys_of as _edit_keys_of, token_step as _delta


@pytest.fixture
def gated(tiny_model):
    """A tiny model with one token-gate step whose keys are the inputs at two chosen tokens of a text."""
    model, tok = tiny_model
    em = EditableModel(model, tok, layers=(1, 2), gate="token", alpha0=0.5)
    text = torch.randint(2, len(tok), (1, 12))
    keys = {l: _edit_keys_of(em, text, l)[[4, 9]].T.contiguous() for l in em.layers}   # (d_in, 2)
    apply_delta(em, _delta(em, keys, "token", alpha=0.5))
    yield em, text
    em.close()


def _routes(em, ids, mask=None, positions=None):
    """{layer: (B, T) bool} of which tokens each hook routed in one forward."""
    got, handles = {}, []
    for l, hook in em.hooks.items():
        def grab(m, i, o, l=l, hook=hook):
            _, a, _ = hook.delta_out(i[0], scores=True)
            got[l] = hook._route_token(a)
            return None
        handles.append(em.spec.projection_module(em.model, l).register_forward_hook(grab))
    try:
        with torch.no_grad():
            em.model(input_ids=ids, attention_mask=mask, position_ids=positions)
    finally:
        for h in handles:
            h.remove()
    return got


def test_an_edit_key_scores_one_and_routes(gated):
    em, text = gated
    hook = em.hooks[1]
    x = _edit_keys_of(em, text, 1)[[4, 9]]                                         # the keys themselves
    _, a, _ = hook.delta_out(x, scores=True)
    torch.testing.assert_close(a, torch.ones(2), rtol=1e-4, atol=1e-4)
    routes = _routes(em, text)
    assert routes[1][0, 4] and routes[1][0, 9]


def test_a_tokens_route_does_not_depend_on_its_neighbours_or_padding(gated):
    em, text = gated
    alone = _routes(em, text)
    other = torch.randint(2, len(em.tokenizer), (1, 12))
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.cat([text, other])], 1)   # left pads
    mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 12, dtype=torch.long)], 1)
    batched = _routes(em, padded, mask, (mask.cumsum(1) - 1).clamp(min=0))     # the same positions as alone
    for l in em.layers:
        assert torch.equal(batched[l][0, 3:], alone[l][0])                       # same routes in a batch
        assert not batched[l][:, :3].any()                                       # pads never route


def test_full_forward_and_kv_cached_decoding_give_identical_routes_and_logits(gated):
    em, text = gated
    routes_full = _routes(em, text)
    with torch.no_grad():
        full = em.model(input_ids=text).logits                                  # (1, T, V)
    seen = {l: [] for l in em.layers}
    handles = [em.spec.projection_module(em.model, l).register_forward_hook(
        lambda m, i, o, l=l: seen[l].append(em.hooks[l]._route_token(em.hooks[l].delta_out(i[0], scores=True)[1]))
        and None)
        for l in em.layers]
    import inspect
    kw = "cache" if "cache" in inspect.signature(em.model.forward).parameters else "past_key_values"
    steps, cache = [], None
    try:
        with torch.no_grad():
            out = em.model(input_ids=text[:, :5], use_cache=True)               # a prefill of 5, then one at a time
            steps.append(out.logits)
            cache = getattr(out, "cache", None) or out.past_key_values
            for t in range(5, text.shape[1]):
                out = em.model(input_ids=text[:, t:t + 1], use_cache=True, **{kw: cache})
                steps.append(out.logits)
    finally:
        for h in handles:
            h.remove()
    for l in em.layers:
        assert torch.equal(torch.cat(seen[l], 1), routes_full[l])
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    assert any(r.any() for r in routes_full.values())                           # the test routes something


def test_zscore_history_restores_and_keeps_its_gate_under_a_token_config(tiny_model):
    model, tok = tiny_model
    em = EditableModel(model, tok, layers=(1,), gate="token", alpha0=0.5)
    text = torch.randint(2, len(tok), (1, 10))
    keys = {1: _edit_keys_of(em, text, 1)[[3]].T.contiguous()}
    old = _delta(em, keys, "zscore", alpha=2.2)
    arrays, meta = old.to_arrays()
    del meta["gate"]                                                             # a ledger from before the gate
    restored = StepDelta.from_arrays(arrays, meta)
    assert restored.gate == "zscore"
    restore_state(em, [restored])
    assert em.gate == "zscore" and em.hooks[1].alpha == 2.2
    with pytest.raises(ValueError, match="cannot join"):
        apply_delta(em, _delta(em, keys, "token", alpha=0.5, seed=1))
    with pytest.raises(DeltaMismatch, match="mix routing gates"):
        restore_state(em, [restored, _delta(em, keys, "token", alpha=0.5, seed=1)])
    restore_state(em, [])                                                        # back to base: configured gate
    assert em.gate == "token" and em.hooks[1].alpha == 0.5
    em.close()


def test_trial_steps_score_with_their_own_keys():
    ctx = RoutingContext(gate="token")
    lin = torch.nn.Linear(6, 4, bias=False)
    hook = HookLayer(lin, 0, 6, 4, ctx, 0.5)
    K = torch.eye(6, 1) * 2.0                                                    # one edit, key 2·e0
    V = K / 8.0
    ctx.attention_mask, ctx.incremental = torch.ones(1, 3), False
    x = torch.zeros(1, 3, 6)
    x[0, 0, 0], x[0, 1, 0], x[0, 2, 1] = 2.0, 0.4, 5.0                          # the key, a fifth of it, unrelated
    with hook.trial(torch.ones(4, 1), V, K):
        _, a, _ = hook.delta_out(x, scores=True)
        torch.testing.assert_close(a[0], torch.tensor([1.0, 0.2, 0.0]))
        out = lin(x)
    routed = (out - x @ lin.weight.T).abs().sum(-1)[0] > 0
    assert routed.tolist() == [True, False, False]


def _two_hooks(undo: bool = True):
    """Two hooked 6 -> 4 projections sharing one cascade context, one committed edit each (key 2·e0)."""
    ctx = RoutingContext(gate="cascade", cascade_undo=undo)
    ctx.attention_mask, ctx.incremental = torch.ones(1, 3), False
    hooks = []
    for layer in (0, 1):
        lin = torch.nn.Linear(6, 4, bias=False)
        hook = HookLayer(lin, layer, 6, 4, ctx, 0.5)
        K = torch.eye(6, 1) * 2.0
        hook.commit(torch.ones(4, 1) * (layer + 1), K / 8.0, K, 0.5)            # Δx = (layer + 1) · x₀ / 4 per row
        hooks.append((lin, hook))
    return ctx, hooks


def test_the_cascade_keeps_a_token_only_while_every_layer_matches_its_edit():
    ctx, ((lin0, _), (lin1, _)) = _two_hooks()
    x0 = torch.zeros(1, 3, 6)
    x0[0, :, 0] = torch.tensor([2.0, 2.0, 0.4])                                 # the key, the key, a fifth of it
    ctx.token_route = None                                                      # a new forward pass
    d0 = lin0(x0) - x0 @ lin0.weight.T                                          # (1, 3, 4)
    assert ctx.token_route[0].tolist() == [True, True, False]
    torch.testing.assert_close(d0[0, 0], torch.full((4,), 0.5))               # Δx of layer 0 on the key
    x1 = torch.zeros(1, 3, 6)
    x1[0, :, 0] = torch.tensor([2.0, 0.6, 2.0])                                 # token 1 no longer matches at layer 1
    d1 = lin1(x1) - x1 @ lin1.weight.T
    assert ctx.token_route[0].tolist() == [True, False, False]
    torch.testing.assert_close(d1[0, 0], torch.full((4,), 1.0))               # kept: layer 1's Δx
    torch.testing.assert_close(d1[0, 1], torch.full((4,), -0.5))              # vetoed: layer 0's Δx taken back
    torch.testing.assert_close(d1[0, 2], torch.zeros(4))                      # never routed: nothing, whatever x


def test_without_undo_a_vetoed_token_keeps_what_the_earlier_layers_added():
    ctx, ((lin0, _), (lin1, _)) = _two_hooks(undo=False)
    x = torch.zeros(1, 3, 6)
    x[0, 0, 0] = 2.0
    ctx.token_route = None
    lin0(x)
    d1 = lin1(x * 0.3) - (x * 0.3) @ lin1.weight.T
    assert not ctx.token_route.any()
    torch.testing.assert_close(d1, torch.zeros(1, 3, 4))


@pytest.mark.parametrize("history,first_layer_bars,score_dtype", [
    ("cascade_history", False, "float32"), ("cascade_history", True, "float32"), ("prefix_history", False, "float32"),
    ("cascade_history", True, "bfloat16"), ("prefix_history", False, "bfloat16")])
def test_cascade_full_forward_and_kv_cached_decoding_give_identical_logits(history, first_layer_bars, score_dtype,
                                                                           request):
    em, text, deltas = request.getfixturevalue(history)
    em.set_score_dtype(score_dtype)                  # bfloat16: the first layer's scores through the screen
    if first_layer_bars:                 # the second step's first edit needs 0.9 at layer 1 (route_margin)
        from dataclasses import replace
        first = deltas[1].layers[0]
        restore_state(em, [deltas[0], replace(deltas[1], layers=(replace(first, bars=torch.tensor([0.9, 0.0])),
                                                                 *deltas[1].layers[1:]))])
    with torch.no_grad():
        full = em.model(input_ids=text).logits                                  # (1, T, V)
        with em.mode(Mode.OFF):
            base = em.model(input_ids=text).logits
        first, second = [], []
        h = [em.spec.projection_module(em.model, 1).register_forward_hook(
                 lambda m, i, o: first.append(em.context.token_route.clone())),
             em.spec.projection_module(em.model, 2).register_forward_hook(
                 lambda m, i, o: second.append(em.context.token_route.clone()))]
        try:
            em.model(input_ids=text)
        finally:
            for x in h:
                x.remove()
        import inspect
        kw = "cache" if "cache" in inspect.signature(em.model.forward).parameters else "past_key_values"
        out = em.model(input_ids=text[:, :5], use_cache=True)                  # a prefill of 5, then one at a time
        steps, cache = [out.logits], getattr(out, "cache", None) or out.past_key_values
        for t in range(5, text.shape[1]):
            out = em.model(input_ids=text[:, t:t + 1], use_cache=True, **{kw: cache})
            steps.append(out.logits)
            cache = getattr(out, "cache", None) or out.past_key_values
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    assert (full - base).abs().amax(-1).gt(1e-3).any()                       # the history changes something
    assert first[0].any()                                                       # the first layer routes tokens
    screen = em.hooks[min(em.layers)]
    if score_dtype == "bfloat16":                                               # the screen decided some rows alone
        assert screen.screened_rows > 0 and screen.rescored_rows > 0


def test_a_token_history_restores_with_its_own_gate_under_a_cascade_config(token_history, tiny_tokenizer, make_tiny):
    _, _, deltas = token_history
    em = EditableModel(make_tiny("llama"), tiny_tokenizer, layers=(1, 2), gate="cascade", alpha0=0.6,
                       confirm_alpha=0.3)
    assert [h.alpha for h in em.hooks.values()] == [0.6, 0.3]
    restore_state(em, deltas)
    assert em.gate == "token" and [h.alpha for h in em.hooks.values()] == [0.5, 0.5]
    restore_state(em, [])
    assert em.gate == "cascade" and [h.alpha for h in em.hooks.values()] == [0.6, 0.3]
    em.close()


def test_an_edit_confirms_at_its_own_bar_and_the_bars_round_trip():
    ctx, ((lin0, _), (lin1, hook1)) = _two_hooks()
    x = torch.zeros(1, 3, 6)
    x[0, :, 0] = 2.0
    later = x.clone()
    later[0, :, 0] = 0.6                                                        # score 0.3 at layer 1: below α 0.5
    ctx.token_route = None
    lin0(x)
    lin1(later)
    assert not ctx.token_route.any()
    hook1.reset()
    hook1.commit(torch.ones(4, 1) * 2, torch.eye(6, 1) / 4.0, torch.eye(6, 1) * 2.0, 0.5, bars=torch.tensor([0.25]))
    ctx.token_route = None
    lin0(x)
    lin1(later)
    assert ctx.token_route.all()                                                # 0.3 reaches the edit's own bar
    delta = StepDelta((LayerDelta(1, torch.ones(4, 1), torch.eye(6, 1), torch.eye(6, 1), 0.5, torch.tensor([0.25])),
                       LayerDelta(0, torch.ones(4, 1), torch.eye(6, 1), torch.eye(6, 1), 0.6)), (), "fp", "cfg",
                      gate="cascade")
    back = StepDelta.from_arrays(*delta.to_arrays())
    assert torch.equal(back.layers[0].bars, torch.tensor([0.25])) and back.layers[1].bars is None


def test_a_first_layer_bar_keeps_a_token_that_only_reaches_alpha_out_of_the_route():
    ctx, ((lin0, hook0), (lin1, _)) = _two_hooks()
    x = torch.zeros(1, 3, 6)
    x[0, :, 0] = torch.tensor([2.0, 1.4, 0.8])                                 # scores 1.0, 0.7, 0.4 (α 0.5)
    ctx.token_route = None
    lin0(x)
    assert ctx.token_route[0].tolist() == [True, True, False]                  # no bar: α decides
    hook0.reset()
    hook0.commit(torch.ones(4, 1), torch.eye(6, 1) * 2.0 / 8.0, torch.eye(6, 1) * 2.0, 0.5, bars=torch.tensor([0.9]))
    ctx.token_route = None
    d0 = lin0(x) - x @ lin0.weight.T
    assert ctx.token_route[0].tolist() == [True, False, False]                 # 0.7 is below the edit's bar 0.9
    torch.testing.assert_close(d0[0, 1], torch.zeros(4))                      # and gets nothing at all
    hook0.reset()
    hook0.commit(torch.ones(4, 1), torch.eye(6, 1) * 2.0 / 8.0, torch.eye(6, 1) * 2.0, 0.5, bars=torch.tensor([0.2]))
    ctx.token_route = None
    lin0(x)
    assert ctx.token_route[0].tolist() == [True, True, False]                  # a bar below α: α still holds


@pytest.mark.parametrize("route_margin", [0.0, 0.8])
def test_a_cascade_step_keeps_its_own_prompts_routed_through_every_layer(route_margin, make_tiny, tiny_tokenizer,
                                                                         corpus_file, tmp_path):
    from editor.config import EditConfig, StatsConfig
    from editor.hook import CONFIRM_FLOOR
    from editor.requests import EditRequest
    from editor.stats import key_stats
    from editor.step import compute_delta

    # confirm_alpha 1.0: no bare prompt matches its key (a mean over contexts) fully in the deeper layers, so
    # without per-edit bars no prompt would stay routed
    cfg = EditConfig(layers=(1, 2, 3), v_steps=4, contexts=("{}", "In short, {}"), gate="cascade", confirm_alpha=1.0,
                     stats=StatsConfig(corpus=str(corpus_file), n_tokens=500, seq_len=32))
    em = EditableModel.for_config(make_tiny("llama"), tiny_tokenizer, cfg)
    stats = key_stats(em, cfg.stats, tmp_path / "stats", progress=False)
    requests = [EditRequest("Paris", "Paris is the capital of", "Italy"),
                EditRequest("Toko Yasuda", "Toko Yasuda plays the", "piano")]
    delta = compute_delta(em, requests, stats, cfg)
    assert delta.gate == "cascade" and delta.layers[0].bars is None
    for ld in delta.layers[1:]:
        assert ld.bars.shape == (2,) and bool(((ld.bars >= CONFIRM_FLOOR) & (ld.bars <= ld.alpha)).all())
    # with route_margin, a first-layer bar per edit too, below each own prompt's score there: it still routes
    if route_margin:
        delta = compute_delta(em, requests, stats, cfg.replace(route_margin=route_margin))
        first = delta.layers[0].bars
        assert first is not None and first.shape == (2,) and bool((first > 0).all())
    apply_delta(em, delta)
    last = []
    h = em.spec.projection_module(em.model, 3).register_forward_hook(
        lambda m, i, o: last.append(em.context.token_route.clone()))
    try:
        with torch.no_grad(), em.mode(Mode.VALIDATED):
            for r in requests:
                em.model(input_ids=em.tokenizer(r.prompt, return_tensors="pt")["input_ids"])
    finally:
        h.remove()
        em.close()
    assert all(route.any() for route in last)                                   # each prompt still routed at layer 3



def test_the_prefix_gate_gives_a_token_the_delta_up_to_its_edits_step():
    ctx = RoutingContext(gate="prefix")
    ctx.attention_mask, ctx.incremental = torch.ones(1, 3), False
    lin = torch.nn.Linear(6, 4, bias=False)
    hook = HookLayer(lin, 0, 6, 4, ctx, 0.5)
    e = torch.eye(6)
    hook.commit(torch.ones(4, 1), e[:, :1] / 4.0, e[:, :1] * 2.0, 0.5)        # step 1: key 2·e0, Δx = x₀ / 4
    hook.commit(torch.full((4, 1), 10.0), e[:, 1:2] / 4.0 + e[:, :1] / 40.0, e[:, 1:2] * 2.0, 0.5)   # step 2: key 2·e1
    x = torch.zeros(1, 3, 6)
    x[0, 0, 0] = 2.0                                                            # step 1's key
    x[0, 1, 1] = 2.0                                                            # step 2's key
    x[0, 2, 2] = 2.0                                                            # neither
    ctx.token_route = None
    d = lin(x) - x @ lin.weight.T                                               # (1, 3, 4)
    assert ctx.token_route[0].tolist() == [True, True, False]
    torch.testing.assert_close(d[0, 0], torch.full((4,), 0.5))                # step 1's Δ alone: 2 / 4
    torch.testing.assert_close(d[0, 1], torch.full((4,), 5.0))                # both steps' Δ: 0 + 10 · 2 / 4
    torch.testing.assert_close(d[0, 2], torch.zeros(4))
    ctx.gate, ctx.token_route = "cascade", None                                 # the cascade: all of Δ
    d = lin(x) - x @ lin.weight.T
    torch.testing.assert_close(d[0, 0], torch.full((4,), 0.5 + 10 * 2 / 40))  # step 2's write on step 1's key
