"""The hook layer: a frozen MLP output projection plus committed low-rank deltas and a routing gate.

For input x (B, T, d_in) the base projection gives P = W0 x. The hook adds (Wh - W0) x = Δx where
Δ = Σ_t U_t V_tᵀ. Modes:
  off        -> P                           (the base model)
  temporary  -> O = P + Δx for every token  (while a step is computed)
  validated  -> token i gets O_i if its gate score reaches α, else P_i. Three gates (``RoutingContext.gate``):
    "zscore" (the paper's): per sequence, M_i = ‖Δx_i‖, score z_i = (M_i - mean M) / std M over real tokens;
    "token" (per token, stateless): score a_i = max_j (v_jᵀ x_i) / (v_jᵀ k_j) over every committed edit j,
       where k_j is edit j's key and v_j its column of V = (C + K Kᵀ)⁻¹ K: how much of edit j's own key,
       in the whitened metric the edit was solved in, x_i carries (1 at the key itself). The first edited
       layer that routes in a forward pass decides for the token, and the later edited layers follow it:
       the first layer separates edited subjects from ordinary text best (docs/editor.md). A token's route
       depends only on its own input and the committed edits, so it is the same in a full forward, in
       KV-cached decoding, in any batch and under chunked prefill.
    "cascade" (per token, stateless; the default): the token gate's decision at the first edited layer,
       confirmed at each later one: a routed token stays routed only while its input there still carries
       α of one of its best-matching edits' keys, and a token dropped at a layer gets the Δx the earlier
       layers added taken back. Tokens that resemble an edited subject at layer 1 alone (a shared last
       sub-word, the attention sink) stop there (docs/editor.md, "Routing gates").
    "prefix" (per token, stateless): the cascade's routes, but a routed token takes Δ only up to the step of
       the edit it matches best (its best candidate still confirmed at this layer): Σ_{t ≤ s} U_t V_tᵀ x, the Δ
       that edit was solved against. Later steps never reach it, so committing a step changes nothing for
       tokens routed to older edits (under "cascade" each later step's write on an old key, ΣKKᵀ keeps it
       small but not zero, adds up: reach of the target falls from 0.79 at commit to 0.51 after 1,000 edits).
Massive activations: with ``massive_ratio`` ρ > 0, a token whose input norm ‖x_i‖ exceeds ρ x the median
‖x‖ of its sequence (the attention-sink tokens of Llama-family models, ~10-30x the median in SmolLM2's
layers 1-2) takes no part in the statistics and is never routed. A huge ‖x‖ can give a huge M and so own
a sequence's maximum z; on SmolLM2 the edits barely respond to the sinks (docs/layers.md), so it is off.
The base weight is never written: the hook is a forward hook that only replaces the module's output.
"""
from __future__ import annotations

import contextlib
import enum
import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from .gate_screen import ScoreScreen


GATES = ("zscore", "token", "cascade", "prefix")
CASCADE_GATES = ("cascade", "prefix")   # the gates that confirm a token's route at every edited layer
CASCADE_CANDIDATES = 4      # cascade gate: how many best-matching edits a token keeps after its first layer
CONFIRM_FLOOR = 0.05        # cascade gate: the lowest bar an edit confirms at (and a step's own bar while it is made)


class Mode(enum.Enum):
    OFF = "off"
    TEMPORARY = "temporary"
    VALIDATED = "validated"


@dataclass
class RoutingContext:
    """What every hook of one model needs to know about the forward pass in progress.

    Filled by a pre-hook on the whole model. ``carry`` keeps each layer's per-sequence routing statistics
    from the last full-sequence pass so that KV-cached decoding steps (one new token, no statistics of its
    own) are routed with their prompt's statistics. ``records`` collects max z per sequence when enabled.
    """

    attention_mask: torch.Tensor | None = None   # (B, T_total) 1 for real tokens, 0 for pads
    incremental: bool = False                    # a KV-cached continuation: hidden T < T_total
    carry: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)   # layer -> (mean, std or nan, median ‖x‖)
    records: dict[int, list[torch.Tensor]] | None = None   # layer -> max gate score per sequence, when recording
    massive_ratio: float = 0.0                   # ρ; 0 = every real token counts (the paper's rule)
    gate: str = "zscore"                         # "zscore" (per sequence, the paper's) or "token" (per token)
    token_route: torch.Tensor | None = None      # token gates: this forward's decision, made by its first routing layer
    token_edit: tuple | None = None              # cascade gate: (B, T, k) candidate edits per token, (B, T, k) still matching
    token_added: torch.Tensor | None = None      # cascade gate: (B, T, d_out) Δx added so far to each routed token
    cascade_undo: bool = True                    # cascade gate: a vetoed token's earlier Δx is taken back
    cascade_candidates: int = CASCADE_CANDIDATES # cascade gate: edits a token may match after its first layer

    def keep_rows(self, rows: torch.Tensor, batch: int) -> None:
        """A KV-cached decode dropped finished rows: keep the carried statistics of ``rows`` (of ``batch``)."""
        self.carry = {l: tuple(t[rows] for t in v) for l, v in self.carry.items() if v[0].shape[0] == batch}

    def real_tokens(self, batch: int, length: int, device) -> torch.Tensor:
        """(B, T) bool mask of real tokens for the hidden states in flight."""
        if self.attention_mask is None:
            return torch.ones(batch, length, dtype=torch.bool, device=device)
        return self.attention_mask[:, -length:].to(device=device, dtype=torch.bool)


class HookLayer:
    """COMEBA-HK hook on one projection. Holds Δ as factors (U_t, V_t) with a dense copy, the keys K_t
    (for Σ K Kᵀ) and α."""

    def __init__(self, module: nn.Module, layer: int, d_in: int, d_out: int,
                 context: RoutingContext, alpha0: float, delta_dtype: torch.dtype = torch.float32,
                 score_dtype: torch.dtype = torch.float32):
        self.module, self.layer, self.d_in, self.d_out = module, layer, d_in, d_out
        self.context = context
        self.alpha0 = float(alpha0)
        self.delta_dtype = delta_dtype    # of the dense Δ the forward pass reads (D itself stays float32)
        self.screened_rows = 0            # rows the bf16 screen decided alone / sent to the float32 rescore
        self.rescored_rows = 0
        self.mode = Mode.VALIDATED
        self._trial: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.reset()
        self.set_score_dtype(score_dtype) # bfloat16: the first layer's gate scores screened in bf16 (gate_screen.py)
        self._handle = module.register_forward_hook(self._forward_hook)

    # ----- state -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def reset(self) -> None:
        """Back to the base model: no deltas, no accumulated keys, α = α0."""
        self.U: list[torch.Tensor] = []   # each (d_out, r_t) float32
        self.V: list[torch.Tensor] = []   # each (d_in, r_t) float32
        self.K: list[torch.Tensor] = []   # each (d_in, r_t) float32, the steps' keys
        self.S: list[torch.Tensor] = []   # each (r_t,) float32: v_jᵀ k_j, edit j's response to its own key
        self.bars: list[torch.Tensor | None] = []   # cascade: each (r_t,) the edits' bars here (first layer: route_bars, later: confirm_bars), None = α
        self.masked: set[tuple[int, int]] = set()   # (step, column) of edits taken out whole: no Δ, no route
        self.unrouted: set[tuple[int, int]] = set() # (step, column) of edits that route no token (Δ kept)
        self.alpha = self.alpha0
        self._drop_derived()
        self._KK = torch.zeros(self.d_in, self.d_in, dtype=torch.float64, device=self.device)
        self._kk_steps = 0                # how many of self.K are summed into self._KK
        self.context.carry.pop(self.layer, None)

    def _drop_derived(self) -> None:
        """Forget what is computed from the committed steps (built again when next needed)."""
        self._cat: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None   # the concatenated factors
        self._bars: torch.Tensor | None = None
        self._route_bars: torch.Tensor | None = None
        self._ends: torch.Tensor | None = None
        self._D: torch.Tensor | None = None          # Σ_t U_t V_tᵀ
        self._D_fwd: torch.Tensor | None = None      # D in delta_dtype, as the forward pass reads it
        self._screen: ScoreScreen | None = None      # V in bfloat16 and the rounding bound per edit

    @property
    def D(self) -> torch.Tensor:
        """Σ_t U_t V_tᵀ (d_out, d_in) float32: one product of the concatenated factors, a pure function of
        the committed steps, so a restored hook is bit-identical to the live one. Built when first needed."""
        if self._D is None:
            if self.U:
                Uc, Vc, _ = self._factors()
                self._D = Uc @ Vc.T                                 # (d_out, d_in)
            else:
                self._D = torch.zeros(self.d_out, self.d_in, dtype=torch.float32, device=self.device)
        return self._D

    @property
    def KK(self) -> torch.Tensor:
        """Σ_t K_t K_tᵀ (d_in, d_in) float64, summed step by step in commit order when a step needs it
        (restoring a version only stores the keys: serving never needs this sum)."""
        while self._kk_steps < len(self.K):
            K = self.K[self._kk_steps].to(torch.float64)            # (d_in, r_t)
            self._KK += K @ K.T                                     # (d_in, d_in)
            self._kk_steps += 1
        return self._KK

    def recent_KK(self, steps: int) -> torch.Tensor:
        """Σ K_t K_tᵀ (d_in, d_in) float64 over the last ``steps`` committed steps only."""
        out = torch.zeros(self.d_in, self.d_in, dtype=torch.float64, device=self.device)
        for K in self.K[-steps:]:
            K = K.to(torch.float64)                                 # (d_in, r_t)
            out += K @ K.T
        return out

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """U, V and 1 / v_jᵀ k_j (the token gate's scale per edit), concatenated over the steps. An edit taken
        out has a zero gate scale, so it never routes a token; a masked one's column of U is zero as well (it
        adds nothing), an unrouted one's stays (what every later edit was solved on top of)."""
        if self._cat is None:
            U, V = torch.cat(self.U, 1), torch.cat(self.V, 1)                      # (d_out, r), (d_in, r)
            inv_s = 1.0 / torch.cat(self.S).clamp(min=1e-12)                      # (r,)
            if self.masked or self.unrouted:
                starts = [0]
                for u in self.U[:-1]:
                    starts.append(starts[-1] + u.shape[1])
                index = lambda cols: torch.tensor([starts[s] + c for s, c in sorted(cols)],   # noqa: E731
                                                  dtype=torch.long, device=U.device)
                U[:, index(self.masked)] = 0.0
                inv_s[index(self.masked | self.unrouted)] = 0.0
            self._cat = (U, V, inv_s)
        return self._cat

    def mask(self, step: int, column: int, keep_delta: bool = False) -> None:
        """Take edit ``column`` of committed step ``step`` (counted over the steps this hook holds) out: it
        routes no token from now on, and unless ``keep_delta`` its part of Δ goes too (see ``_factors``)."""
        if not (0 <= step < len(self.U) and 0 <= column < self.U[step].shape[1]):
            raise IndexError(f"layer {self.layer}: no edit {column} in step {step} (it holds {len(self.U)} steps)")
        (self.unrouted if keep_delta else self.masked).add((step, column))
        self._drop_derived()

    @property
    def rank(self) -> int:
        return sum(u.shape[1] for u in self.U)

    def commit(self, U: torch.Tensor, V: torch.Tensor, K: torch.Tensor, alpha: float,
               bars: torch.Tensor | None = None) -> None:
        """Add one step's Δ = U Vᵀ, accumulate K Kᵀ and set α. U (d_out, n), V (d_in, n), K (d_in, n);
        ``bars`` (n,): the cascade gate's per-edit confirmation bars at this layer (None: α)."""
        U = U.to(self.device, torch.float32)                       # (d_out, n)
        V = V.to(self.device, torch.float32)                       # (d_in, n)
        K = K.to(self.device, torch.float32)                       # (d_in, n)
        self.U.append(U)
        self.V.append(V)
        self.K.append(K)
        self.S.append(self_response(V, K))
        self.bars.append(None if bars is None else bars.to(self.device, torch.float32))
        self.alpha = float(alpha)
        self._drop_derived()

    def set_delta_dtype(self, dtype: torch.dtype) -> None:
        self.delta_dtype = dtype
        self._D_fwd = None

    def set_score_dtype(self, dtype: torch.dtype) -> None:
        """float32, or bfloat16 to screen the scores (the screen is derived from the factors alone, so it is
        kept across switches and built again only when the committed steps change)."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"gate scores are computed in float32 or screened in bfloat16, not {dtype}")
        self.score_dtype = dtype

    def _screens(self, bars: torch.Tensor | None) -> bool:
        """Whether this call's scores go through the bfloat16 screen: bars to screen against, no trial edits
        (a step being made), and no α records (they need every row's exact best score)."""
        return (bars is not None and self.score_dtype == torch.bfloat16 and not self._trial
                and self.context.records is None)

    @contextlib.contextmanager
    def trial(self, U: torch.Tensor, V: torch.Tensor, K: torch.Tensor):
        """Temporarily add Δ = U Vᵀ with keys K (used while a step is computed); removed on exit, also on error."""
        V = V.to(self.device, torch.float32)                        # (d_in, n)
        inv_s = 1.0 / self_response(V, K.to(self.device, torch.float32)).clamp(min=1e-12)   # (n,)
        self._trial.append((U.to(self.device, torch.float32), V, inv_s))
        try:
            yield
        finally:
            self._trial.pop()

    def remove(self) -> None:
        self._handle.remove()

    # ----- forward -----------------------------------------------------------------------------
    @property
    def dense_path(self) -> bool:
        """Whether the forward pass reads the dense Δ: fewer bytes than the float32 factors (U, V)."""
        return 4 * self.rank * (self.d_in + self.d_out) >= self.delta_dtype.itemsize * self.d_in * self.d_out

    def delta_out(self, x: torch.Tensor, scores: bool = False, top: int = 1, delta: bool = True,
                  bars: torch.Tensor | None = None):
        """Δx for x (..., d_in) -> (..., d_out) in float32, from factors or the dense copy, whichever is cheaper
        (the dense copy in ``delta_dtype``: bfloat16 halves the bytes each token reads). With ``scores``,
        also the token gate's score a = max_j (v_jᵀ x) / (v_jᵀ k_j), (...,), and the ``top`` best-matching
        edits with their scores, (..., top) each (indices into the committed edits followed by the trial ones;
        with ``bars`` (r_all,), only edits scoring at least their bar count, the others score -inf there).
        ``delta=False`` (with ``scores``): the scores alone, Δx is None. With ``bars`` and ``delta=False``
        and a bfloat16 ``score_dtype``, the committed edits are scored through the bf16 screen
        (``gate_screen.py``): the same edits pass the bars, with float32 scores; a row none can reach
        reports the screen's best score as its raw best (below every bar, so it routes nowhere either way)."""
        xf = x.to(torch.float32)
        out, parts = None, []
        if self.U:
            Uc, Vc, inv_s = self._factors()                         # (d_out, r), (d_in, r), (r,)
            screened = scores and not delta and self._screens(bars)    # serving's first layer: bf16 screen
            if screened:
                parts.append(self._screened_scores(xf, Vc, inv_s, bars))   # (..., r)
            # (..., r) shared by Δx and the gate
            xV = xf @ Vc if (scores and not screened) or (delta and not self.dense_path) else None
            if delta and not self.dense_path:
                out = xV @ Uc.T                                     # (..., d_out)
            elif delta and self.delta_dtype == torch.float32:
                out = xf @ self.D.T                                 # (..., d_out)
            elif delta:
                if self._D_fwd is None:
                    self._D_fwd = self.D.to(self.delta_dtype)           # (d_out, d_in)
                out = (x.to(self.delta_dtype) @ self._D_fwd.T).to(torch.float32)   # (..., d_out)
            if scores and not screened:
                parts.append(xV * inv_s)                            # (..., r)
        for U, V, inv_s in self._trial:
            xV = xf @ V                                             # (..., n)
            if delta:
                part = xV @ U.T                                     # (..., d_out)
                out = part if out is None else out + part
            if scores:
                parts.append(xV * inv_s)                            # (..., n)
        if not scores:
            return out
        every = parts[0] if len(parts) == 1 else torch.cat(parts, -1)   # (..., r_all)
        a = None
        if bars is not None:                                            # the raw best score, before the bars
            a = every.amax(dim=-1)                                      # (...,)
            every = every.masked_fill(every < bars, -torch.inf)         # (..., r_all)
        best, edits = every.topk(min(top, every.shape[-1]), dim=-1)     # (..., top), (..., top)
        return out, best[..., 0] if a is None else a, (edits, best)

    def _screened_scores(self, xf: torch.Tensor, Vc: torch.Tensor, inv_s: torch.Tensor,
                         bars: torch.Tensor) -> torch.Tensor:
        """The committed edits' scores (..., r) through the bfloat16 screen: float32 on every row that may
        reach a bar, bf16 (all below their bars) on the others; the routes are float32's (gate_screen.py)."""
        if self._screen is None:
            self._screen = ScoreScreen.build(Vc, inv_s)
        flat = xf.reshape(-1, self.d_in)                            # (N, d_in)
        every, rescored = self._screen.scores(flat, Vc, bars)       # (N, r)
        self.rescored_rows += rescored
        self.screened_rows += flat.shape[0] - rescored
        return every.reshape(*xf.shape[:-1], -1)

    def route_bars(self) -> torch.Tensor:
        """The cascade's first-layer bar per edit, (r_all,): max(α, the edit's stored bar), α where a step
        stored none, and α for the trial edits (a step's own prompts route as α lets them while it is made)."""
        if self._route_bars is None:
            self._route_bars = torch.cat([b if b is not None else torch.zeros(u.shape[1], device=self.device)
                                          for u, b in zip(self.U, self.bars)]) if self.U else torch.zeros(0, device=self.device)
        stored = self._route_bars.clamp(min=self.alpha)             # α itself may move (a step adapts it)
        if not self._trial:
            return stored
        return torch.cat([stored, *(torch.full((v.shape[1],), self.alpha, device=self.device) for _, v, _ in self._trial)])

    def confirm_bars(self) -> torch.Tensor:
        """The cascade's bar per edit, (r_all,): committed edits' stored bars (α where a step has none), then
        the trial edits' ``CONFIRM_FLOOR`` (a step's own prompts are not dropped while it is made)."""
        if self._bars is None:
            self._bars = torch.cat([b if b is not None else torch.full((u.shape[1],), self.alpha, device=self.device)
                                    for u, b in zip(self.U, self.bars)]) if self.U else torch.zeros(0, device=self.device)
        if not self._trial:
            return self._bars
        return torch.cat([self._bars, *(torch.full((v.shape[1],), CONFIRM_FLOOR, device=self.device)
                                        for _, v, _ in self._trial)])

    def edit_scores(self, x: torch.Tensor, edits: torch.Tensor) -> torch.Tensor:
        """Each row's scores against given edits: (v_eᵀ x) / (v_eᵀ k_e) for x (N, d_in), edits (N, k) -> (N, k)
        (``edits`` index the committed edits followed by the trial ones, as ``delta_out`` counts them)."""
        Vs, inv = [], []
        if self.U:
            _, Vc, inv_s = self._factors()
            Vs.append(Vc)
            inv.append(inv_s)
        for _, V, inv_s in self._trial:
            Vs.append(V)
            inv.append(inv_s)
        # serving has no trial: the committed factors as they are, no copy per forward pass
        V, inv_s = (Vs[0], inv[0]) if len(Vs) == 1 else (torch.cat(Vs, 1), torch.cat(inv))   # (d_in, r), (r,)
        return torch.einsum("nd,dnk->nk", x.to(torch.float32), V[:, edits]) * inv_s[edits]

    def _forward_hook(self, module, inputs, output):
        if self.mode is Mode.OFF or (not self.U and not self._trial):
            return None
        x = inputs[0]                                               # (B, T, d_in)
        if self.mode is Mode.TEMPORARY:
            return output + self.delta_out(x).to(output.dtype)
        if self.context.gate in CASCADE_GATES:
            return self._forward_cascade(x, output)
        if self.context.gate == "token":
            route = self.context.token_route                        # decided by an earlier layer of this pass
            if route is None or route.shape != x.shape[:2]:
                dx, a, _ = self.delta_out(x, scores=True)           # (B, T, d_out), (B, T)
                route = self.context.token_route = self._route_token(a)   # (B, T) bool, for the later layers
            else:
                dx = self.delta_out(x)                              # (B, T, d_out)
        else:
            dx = self.delta_out(x)                                  # (B, T, d_out)
            route = self._route(dx, x)                              # (B, T) bool
        return torch.where(route.unsqueeze(-1), output + dx.to(output.dtype), output)

    def _forward_cascade(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The cascade gate. The first edited layer of the pass routes a token when its score
        (v_jᵀx) / (v_jᵀk_j) against some edit j reaches j's bar there (``route_bars``: α, or higher where the
        edit's step set one), and remembers the ``cascade_candidates`` best-matching edits that reach their
        bars; every later edited layer keeps the token only while its own input still matches
        one of those candidates, (v_eᵀx) / (v_eᵀk_e) ≥ e's bar at that layer (``confirm_bars``), and narrows
        the candidates to the ones that do. A token dropped at a layer gets no Δ from there on, and the Δx
        the earlier layers added to it is taken back from the residual stream. Only the first layer records
        scores for α's adaptation: the later layers' bars are fixed per edit."""
        ctx = self.context
        route = ctx.token_route
        if route is None or route.shape != x.shape[:2]:
            _, a, (edits, best) = self.delta_out(x, scores=True, top=ctx.cascade_candidates, delta=False,
                                                 bars=self.route_bars())   # (B, T), (B, T, k) x2
            alive = best > -torch.inf                               # (B, T, k) edits at or above their bar
            route = ctx.token_route = self._route_token(a) & alive[..., 0]   # (B, T) bool
            ctx.token_edit = (edits, alive)                         # the candidates and which still match
            upto = self._upto(edits, alive) if ctx.gate == "prefix" else None   # (B, T)
            ctx.token_added = self._routed_delta(x, route, upto)    # (B, T, d_out), zero off the route
            return output + ctx.token_added.to(output.dtype) if route.any() else None
        at = route.nonzero(as_tuple=True)                           # the tokens still routed
        if not at[0].numel():
            return None
        edits, alive = ctx.token_edit
        s = self.edit_scores(x[at], edits[at])                      # (N, k)
        still = alive[at] & (s >= self.confirm_bars()[edits[at]])   # (N, k)
        alive = alive.clone()
        alive[at] = still
        ctx.token_edit = (edits, alive)
        keep = torch.zeros_like(route)
        keep[at] = still.any(-1)                                    # (B, T)
        vetoed = route & ~keep                                      # (B, T)
        ctx.token_route = keep
        out = output
        if keep.any():
            upto = self._upto(edits, alive) if ctx.gate == "prefix" else None   # (B, T)
            dx = self._routed_delta(x, keep, upto)                  # (B, T, d_out)
            ctx.token_added = ctx.token_added + dx
            out = out + dx.to(output.dtype)
        if vetoed.any() and ctx.cascade_undo:
            back = torch.where(vetoed.unsqueeze(-1), ctx.token_added, 0.0)   # (B, T, d_out)
            out = out - back.to(output.dtype)
            ctx.token_added = ctx.token_added - back
        return out

    def _routed_delta(self, x: torch.Tensor, route: torch.Tensor, upto: torch.Tensor | None = None) -> torch.Tensor:
        """Δx of the routed tokens only, zero elsewhere; (B, T, d_out) float32. Ordinary text routes almost no
        token, so this skips Δ's arithmetic for nearly all of it. ``upto`` (B, T): each token's Δ ends at that
        column (the prefix gate), None: all of Δ."""
        dx = x.new_zeros((*x.shape[:2], self.d_out), dtype=torch.float32)
        if route.any():
            dx[route] = self.delta_out(x[route]) if upto is None else self.delta_upto(x[route], upto[route])   # (N, d_out)
        return dx

    def delta_upto(self, x: torch.Tensor, upto: torch.Tensor) -> torch.Tensor:
        """Σ over the columns c < upto_i of u_c v_cᵀ x_i, for x (N, d_in), upto (N,) -> (N, d_out) float32: each
        row's own prefix of Δ (committed columns, then the trial ones), from the factors; columns past the
        longest prefix of the batch are not read (a token routed to an old edit reads few)."""
        xf = x.to(torch.float32)
        out = xf.new_zeros((x.shape[0], self.d_out))
        at, longest = 0, int(upto.max()) if upto.numel() else 0
        parts = ([self._factors()[:2]] if self.U else []) + [(U, V) for U, V, _ in self._trial]
        for U, V in parts:
            n = min(V.shape[1], longest - at)             # no row reads past the longest prefix
            if n <= 0:
                break
            cols = at + torch.arange(n, device=x.device)                       # (n,)
            xV = (xf @ V[:, :n]).masked_fill(cols[None] >= upto[:, None], 0.0) # (N, n)
            out = out + xV @ U[:, :n].T                                        # (N, d_out)
            at += V.shape[1]
        return out

    def step_ends(self) -> torch.Tensor:
        """(r_all,) long: per edit, the end column of its step (committed edits), or of everything (trial ones):
        the Δ prefix the prefix gate gives a token routed to that edit."""
        if self._ends is None:
            self._ends = step_ends([u.shape[1] for u in self.U]).to(self.device)
        if not self._trial:
            return self._ends
        total = self.rank + sum(v.shape[1] for _, v, _ in self._trial)
        return torch.cat([self._ends, torch.full((total - self.rank,), total, dtype=torch.long, device=self.device)])

    def _upto(self, edits: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """(B, T) the prefix gate's end column per token: its best candidate still matching (candidates come
        best first; a token with none gets 0, and is not routed)."""
        first = alive.to(torch.uint8).argmax(dim=-1, keepdim=True)            # (B, T, 1) the first True
        best = edits.gather(-1, first)[..., 0]                                 # (B, T)
        return torch.where(alive.any(-1), self.step_ends()[best], 0)

    def _route_token(self, a: torch.Tensor) -> torch.Tensor:
        """The per-token gate: a real token routes when its score reaches α; (B, T) bool."""
        B, T = a.shape
        real = self.context.real_tokens(B, T, a.device)             # (B, T)
        if self.context.records is not None and not self.context.incremental:
            self.context.records.setdefault(self.layer, []).append(torch.where(real, a, -torch.inf).amax(dim=1))
        return real & (a >= self.alpha)

    def _route(self, dx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """z-score routing per sequence over real, non-massive tokens; (B, T) bool."""
        B, T, _ = dx.shape
        M = dx.norm(dim=-1)                                         # (B, T)
        real = self.context.real_tokens(B, T, dx.device)            # (B, T)
        rho = self.context.massive_ratio
        xn = x.float().norm(dim=-1) if rho > 0 else None            # (B, T)
        if self.context.incremental:
            carried = self.context.carry.get(self.layer)
            if carried is None or carried[0].shape[0] != B:
                return torch.zeros_like(real)
            mean, std, med = carried                                # (B,), (B,), (B,)
        else:
            med = masked_median(xn, real) if rho > 0 else torch.full((B,), torch.nan, device=dx.device)   # (B,)
        if rho > 0:                                                 # a nan median (carried with ρ = 0) keeps all
            real = real & ~(xn > rho * med[:, None])                # (B, T)
        if not self.context.incremental:
            mean, std = sequence_stats(M, real)                     # (B,), (B,)
            std = torch.where((std > 0) & std.isfinite(), std, torch.nan)   # (B,) nan: no spread, z undefined
            self.context.carry[self.layer] = (mean, std, med)
        z = (M - mean[:, None]) / std[:, None]                      # (B, T); nan rows never route
        if self.context.records is not None and not self.context.incremental:
            zmax = torch.where(real, z, -torch.inf).amax(dim=1)    # (B,); nan where z is undefined
            self.context.records.setdefault(self.layer, []).append(zmax)
        return real & (z >= self.alpha)


def step_ends(sizes: list[int]) -> torch.Tensor:
    """(Σ sizes,) long: for each edit of steps holding ``sizes`` edits each, the end column of its step (the
    prefix gate's Δ prefix for a token routed to that edit)."""
    if not sizes:
        return torch.zeros(0, dtype=torch.long)
    return torch.repeat_interleave(torch.tensor(list(itertools.accumulate(sizes)), dtype=torch.long),
                                   torch.tensor(sizes, dtype=torch.long))


def self_response(V: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """v_jᵀ k_j per column j, (n,): what each edit's key scores against its own matcher."""
    return (V * K).sum(dim=0)


def masked_median(v: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Median of v (B, T) over each row's real tokens, (B,); nan for a row without any."""
    return v.masked_fill(~real, torch.nan).nanmedian(dim=1).values


def sequence_stats(M: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) std of M (B, T) over each row's real tokens; std is nan below 2 tokens."""
    w = real.to(M.dtype)                                            # (B, T)
    n = w.sum(dim=1)                                                # (B,)
    mean = (M * w).sum(dim=1) / n.clamp(min=1)                      # (B,)
    var = (((M - mean[:, None]) ** 2) * w).sum(dim=1) / (n - 1)     # (B,)
    std = torch.where(n >= 2, var.sqrt(), torch.nan)                # (B,)
    return mean, std
