"""The per-token gate on vLLM's flattened token layout: a version's deltas on the edited down projections.

vLLM runs a forward pass over every scheduled token of every request side by side, x (N, d_in), with no
padding and no sequence axis. The token gate needs neither: token i routes when
a_i = max_j (v_jᵀ x_i) / (v_jᵀ k_j) ≥ α at the first edited layer, and the later edited layers follow that
decision (editor/hook.py, "token"). So one token's output depends only on its own input and the version:
the same under continuous batching, chunked prefill and prefix caching. The cascade gate ("cascade") is
per token too: the deciding layer routes a token and keeps its best-matching edits that reach α, each
later edited layer keeps it while its own input still matches one of them at that edit's bar there, and a
token dropped there gets the Δx the earlier layers added taken back. The prefix gate ("prefix") routes as
the cascade does, and a routed token takes Δ only up to the end of the step of its best candidate still
matching. Pure torch, no vLLM import: the tests check it against kbsync's own hook in the main environment.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from editor.hook import CASCADE_CANDIDATES, CASCADE_GATES, self_response, step_ends
from editor.step import StepDelta, masked_indices


@dataclass(frozen=True)
class LayerFactors:
    """One edited projection at one version: Δ = U Vᵀ, the gate's 1 / (v_jᵀ k_j) per edit, and α."""

    U: torch.Tensor        # (d_out, r) float32
    V: torch.Tensor        # (d_in, r) float32
    inv_s: torch.Tensor    # (r,) float32
    alpha: float
    bars: torch.Tensor | None = None   # (r,) the cascade's per-edit bars: at the deciding layer max(α, the stored
                                       # bar), later the confirmation bars (α where a step has none)
    ends: torch.Tensor | None = None   # (r,) long, per edit the end column of its step: the prefix gate's Δ prefix


@dataclass(frozen=True)
class ServedVersion:
    """What the gated projections serve: a version id (None = base), its chain digest and its factors."""

    version: int | None
    digest: str
    layers: dict[int, LayerFactors]
    gate: str = "token"

    @property
    def decider(self) -> int | None:
        """The layer whose gate decides for every token: the first edited one."""
        return min(self.layers) if self.layers else None


BASE = ServedVersion(None, "", {})
SERVED_GATES = ("token", *CASCADE_GATES)


def served_version(version: int | None, digest: str, deltas: list[StepDelta], device, gate: str) -> ServedVersion:
    """Stack ``deltas`` (a version's chain, in commit order) per layer, as kbsync's hooks do on restore."""
    if gate not in SERVED_GATES:
        raise ValueError(f"version {version} routes with the {gate!r} gate; the vLLM plugin serves the per-token "
                         "gates only (the per-sequence one needs whole sequences, which vLLM never has in one "
                         "piece). Rebuild the history with gate = \"prefix\" (configs/models/*.toml)")
    parts: dict[int, list] = {}
    alphas: dict[int, float] = {}
    for d in deltas:
        for ld in d.layers:
            parts.setdefault(ld.layer, []).append((ld.U.float(), ld.V.float(), ld.K.float(), ld.bars))
            alphas[ld.layer] = ld.alpha                             # α after the layer's latest step
    masked, taken_out = masked_indices(deltas), masked_indices(deltas, "taken_out")   # the same in every layer
    sizes = [d.layers[0].U.shape[1] for d in deltas if d.layers]
    ends = step_ends(sizes)                                         # (r,) the same in every layer
    layers = {}
    for layer, ps in sorted(parts.items()):
        U = torch.cat([u for u, _, _, _ in ps], 1).to(device)       # (d_out, r)
        V = torch.cat([v for _, v, _, _ in ps], 1).to(device)       # (d_in, r)
        S = torch.cat([self_response(v, k) for _, v, k, _ in ps]).to(device)   # (r,)
        bars = torch.cat([b.float() if b is not None else torch.full((u.shape[1],), alphas[layer])
                          for u, _, _, b in ps]).to(device)         # (r,)
        if layer == min(parts):                                     # the deciding layer: no edit's bar below α
            bars = bars.clamp(min=alphas[layer])
        inv_s = 1.0 / S.clamp(min=1e-12)                            # (r,)
        U[:, masked] = 0.0                                          # masked removals: no Δ
        inv_s[taken_out] = 0.0                                      # every removal: never routes
        layers[layer] = LayerFactors(U.contiguous(), V.contiguous(), inv_s, alphas[layer], bars, ends.to(device))
    return ServedVersion(version, digest, layers, gate)


class GateState:
    """One model's served version and the route its deciding layer chose in the forward pass in flight.

    ``swap`` replaces the version between forward passes (the engine calls it between steps); each pass
    reads ``current`` once, at its first gated layer, so a pass never mixes two versions."""

    def __init__(self):
        self.current: ServedVersion = BASE
        self._pass: ServedVersion = BASE
        self._route: torch.Tensor | None = None
        self._edit: torch.Tensor | None = None                      # cascade: (n, k) the routed tokens' candidates
        self._alive: torch.Tensor | None = None                     # cascade: (n, k) which still match
        self._added: torch.Tensor | None = None                     # cascade: (n, d_out) Δx added to each routed token
        self._last_layer = float("inf")                             # the gated layer the pass in flight is at

    def swap(self, version: ServedVersion) -> None:
        self.current = version

    def delta(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """The gated Δx of ``layer`` for tokens x (N, d_in) -> (N, d_out) float32, or None (nothing routes).
        Only the deciding layer reads every token (its scores); Δx is computed for the routed tokens alone."""
        if layer <= self._last_layer:                              # layers run in order: a new pass begins
            self._pass, self._route = self.current, None
        self._last_layer = layer
        f = self._pass.layers.get(layer)
        if f is None:
            return None
        cascade = self._pass.gate in CASCADE_GATES
        if layer == self._pass.decider:                             # scores need every token's x V
            xV = x.to(torch.float32) @ f.V                          # (N, r)
            scores = xV * f.inv_s                                   # (N, r)
            if cascade:                                             # an edit counts from its own bar (≥ α) up
                scores = scores.masked_fill(scores < f.bars, -torch.inf)
            self._route = scores.amax(dim=-1) >= f.alpha            # (N,) bool
            rows = self._route.nonzero().squeeze(-1)                # (n,) the routed tokens
            if not len(rows):
                return None
            if cascade:
                best, self._edit = scores[rows].topk(min(CASCADE_CANDIDATES, scores.shape[1]), dim=-1)   # (n, k)
                self._alive = best > -torch.inf
            part = self._upto(f, xV[rows]) @ f.U.T                  # (n, d_out)
            if cascade:
                self._added = part
        elif cascade:
            return self._confirm(f, x)
        else:                                                       # later layers: the routed tokens only
            route = self._route
            if route is None or route.shape[0] != x.shape[0]:
                return None
            rows = route.nonzero().squeeze(-1)                      # (n,)
            if not len(rows):
                return None
            part = (x[rows].to(torch.float32) @ f.V) @ f.U.T        # (n, d_out)
        return torch.zeros(x.shape[0], f.U.shape[0], dtype=torch.float32, device=x.device).index_copy_(0, rows, part)

    def _confirm(self, f: LayerFactors, x: torch.Tensor) -> torch.Tensor | None:
        """A later layer of the cascade gate: the routed tokens whose input still matches one of their candidate
        edits get this layer's Δx; the others leave the route and get back what the earlier layers added
        (negated)."""
        route = self._route
        if route is None or route.shape[0] != x.shape[0]:
            return None
        rows = route.nonzero().squeeze(-1)                          # (n,) routed so far, in order
        if not len(rows):
            return None
        xr = x[rows].to(torch.float32)                              # (n, d_in)
        e = self._edit                                              # (n, k)
        alive = self._alive & (torch.einsum("nd,dnk->nk", xr, f.V[:, e]) * f.inv_s[e] >= f.bars[e])   # (n, k)
        keep = alive.any(-1)                                        # (n,) bool
        self._alive = alive
        part = torch.where(keep[:, None], self._upto(f, xr @ f.V) @ f.U.T, -self._added)   # (n, d_out)
        self._route = torch.zeros_like(route).index_fill_(0, rows[keep], True)
        self._added = (self._added + part)[keep]                    # the rows still routed, in order
        self._edit, self._alive = e[keep], alive[keep]
        return torch.zeros(x.shape[0], f.U.shape[0], dtype=torch.float32, device=x.device).index_copy_(0, rows, part)

    def _upto(self, f: LayerFactors, xV: torch.Tensor) -> torch.Tensor:
        """x V of the routed tokens, (n, r), with the prefix gate's columns past each token's prefix zeroed: the
        end of the step of its best candidate still matching (candidates come best first). Other gates: as is."""
        if self._pass.gate != "prefix":
            return xV
        first = self._alive.to(torch.uint8).argmax(dim=-1, keepdim=True)     # (n, 1) the first still matching
        upto = f.ends[self._edit.gather(-1, first)[:, 0]]                   # (n,)
        cols = torch.arange(xV.shape[1], device=xV.device)                   # (r,)
        return xV.masked_fill(cols[None] >= upto[:, None], 0.0)


def gate_projection(module: nn.Module, layer: int, state: GateState) -> None:
    """Serve ``state``'s gated Δ on top of ``module`` (a vLLM RowParallelLinear, whose forward returns
    (output, bias)). The module itself stays in place, so whatever vLLM reads from it (its quantisation
    method, its weights) is unchanged; only its instance ``forward`` is wrapped, once."""
    if getattr(module, "_kbsync_layer", None) == layer:
        return
    inner = module.forward

    def forward(x: torch.Tensor, *args, **kwargs):
        out = inner(x, *args, **kwargs)
        y, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        dx = state.delta(layer, x.reshape(-1, x.shape[-1]))          # vLLM's x is (N, d_in) already
        if dx is not None:
            y = y + dx.to(y.dtype).view(y.shape)
        return (y, *rest) if rest is not None else y

    module.forward = forward
    module._kbsync_layer = layer
