"""The bfloat16 screen of the first layer's gate scores: its rounding bound holds, and it routes exactly as float32."""
import pytest
import torch

from editor.gate_screen import ScoreScreen
from editor.hook import HookLayer, RoutingContext


def _factors(d_in: int, r: int, seed: int, decades: float = 0.0):
    """V with column norms spread over ``decades``, keys K near V (v_jᵀk_j > 0), and 1 / v_jᵀk_j."""
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(d_in, r, generator=g) * torch.logspace(-decades, 0, r)      # (d_in, r)
    K = V * 40.0 + torch.randn(d_in, r, generator=g) * V.norm(dim=0) * 2.0      # (d_in, r)
    inv_s = 1.0 / (V * K).sum(0)
    assert bool((inv_s > 0).all())
    return V, K, inv_s


def test_the_rounding_bound_holds_on_every_score():
    d_in, r = 1536, 400                                       # the default model's first edited projection
    V, K, inv_s = _factors(d_in, r, 0, decades=3.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, d_in, generator=g) * torch.logspace(-3, 3, 96)[:, None]   # rows over six decades
    x[:16] = K[:, :16].T * torch.linspace(0.2, 1.5, 16)[:, None]              # shares of edits' own keys
    x[16:24, :8] *= 300.0                                                     # a few huge coordinates (sinks)
    screen = ScoreScreen.build(V, inv_s)
    approx, bound = screen.screen(x)                                          # (96, r) x2
    exact = (x @ V) * inv_s                                                   # float32, as without the screen
    err = (approx - exact).abs()
    assert bool((err <= bound).all()), f"worst error / bound {(err / bound).max():.3g}"
    assert float((err / bound).max()) > 0.01                                  # the bound is not vacuous
    torch.testing.assert_close(exact[:16].diagonal(), torch.linspace(0.2, 1.5, 16), rtol=1e-4, atol=1e-4)


def _prefix_hook(score_dtype: torch.dtype, d_in: int = 64, steps: int = 3, per_step: int = 20):
    """A prefix-gate hook on a 64 -> 8 projection holding ``steps`` steps of ``per_step`` edits each (α 0.5,
    the second step with its own first-layer bars), one edit taken out."""
    ctx = RoutingContext(gate="prefix")
    lin = torch.nn.Linear(d_in, 8, bias=False)
    hook = HookLayer(lin, 0, d_in, 8, ctx, 0.5, score_dtype=score_dtype)
    for s in range(steps):
        V, K, _ = _factors(d_in, per_step, 10 + s)
        U = torch.randn(8, per_step, generator=torch.Generator().manual_seed(20 + s))
        bars = torch.linspace(0.55, 0.9, per_step) if s == 1 else None
        hook.commit(U, V, K, 0.5, bars=bars)
    hook.mask(2, 3)
    return ctx, lin, hook


def _inputs(hook, rows: int = 200):
    """Rows at, just above and just below the bar of one edit each, and ordinary noise rows."""
    g = torch.Generator().manual_seed(5)
    K = torch.cat(hook.K, 1)                                                   # (d_in, r)
    bars = hook.route_bars()                                                   # (r,)
    picks = torch.randint(0, K.shape[1], (rows // 2,), generator=g)
    # s_j(t · k_j) = t: a share of the key a hair (1e-5 .. 1e-3) from its bar, inside the bound (and
    # outside float32's own rounding, ~1e-7, where the order of a sum may decide)
    hair = torch.logspace(-5, -3, rows // 2) * torch.where(torch.arange(rows // 2) % 2 == 0, 1.0, -1.0)
    near = (K[:, picks] * (bars[picks] + hair)).T                             # (rows/2, d_in)
    scale = 0.3 * K.norm(dim=0).mean() / K.shape[0] ** 0.5                    # ‖noise‖ ≈ 0.3 ‖k‖
    noise = torch.randn(rows - rows // 2, K.shape[0], generator=g) * scale
    return torch.cat([near, noise])[None]                                      # (1, rows, d_in)


def _forward(ctx, lin, x):
    ctx.attention_mask, ctx.incremental, ctx.token_route = torch.ones(x.shape[:2]), False, None
    out = lin(x)
    edits, alive = ctx.token_edit
    return out, ctx.token_route.clone(), torch.where(alive, edits, -1), alive


@pytest.mark.parametrize("few", [64, 0], ids=["near-edits-alone", "whole-rows"])
def test_the_screen_routes_exactly_as_float32(few, monkeypatch):
    monkeypatch.setattr("editor.gate_screen.FEW_CANDIDATES", few)    # 0: every near row rescored whole
    ctx, lin, hook = _prefix_hook(torch.float32)
    x = _inputs(hook)
    want = _forward(ctx, lin, x)
    assert hook.screened_rows == hook.rescored_rows == 0                      # float32: no screen
    hook.set_score_dtype(torch.bfloat16)
    got = _forward(ctx, lin, x)
    for a, b in zip(want, got):
        assert torch.equal(a, b)                                              # routes, candidates, outputs
    routed = want[1][0]
    assert 20 < int(routed.sum()) < 180                                       # some route, some do not
    assert hook.rescored_rows >= 90 and hook.screened_rows >= 90              # both paths ran
    ctx.records = {}                                                          # α's adaptation: every row exact
    before = (hook.screened_rows, hook.rescored_rows)
    _forward(ctx, lin, x)
    assert (hook.screened_rows, hook.rescored_rows) == before


def test_a_row_far_below_every_bar_is_decided_by_the_screen_alone():
    ctx, lin, hook = _prefix_hook(torch.bfloat16)
    K = torch.cat(hook.K, 1)
    x = (K[:, :4] * 0.05).T[None]                                              # a twentieth of four edits' keys
    out, route, _, alive = _forward(ctx, lin, x)
    assert hook.screened_rows == 4 and hook.rescored_rows == 0
    assert not route.any() and not alive.any()
    torch.testing.assert_close(out, x @ lin.weight.T)                         # the base projection alone


def test_score_dtype_is_float32_or_bfloat16():
    ctx = RoutingContext(gate="prefix")
    hook = HookLayer(torch.nn.Linear(4, 2, bias=False), 0, 4, 2, ctx, 0.5)
    with pytest.raises(ValueError, match="float32 or screened in bfloat16"):
        hook.set_score_dtype(torch.float16)
