"""The first edited layer's gate scores in bfloat16 as a screen, every decision still made in float32.

Serving scores every token against every committed edit at the first edited layer of the cascade and prefix
gates: s_j(x) = (v_jᵀ x) / (v_jᵀ k_j), r·d_in multiply-adds that read all of V (d_in x r float32: 30.7 MB at
5,000 edits on the default model, 5.7 % of the model's bytes). One decoded row is memory-bound, so that read
is what one row pays. In bfloat16 the product reads half the bytes and runs on the CPU's native bf16 units
(0.35-0.44x of float32's time for one row on an AVX512_BF16 EPYC, docs/benchmarks.md), but its rounding
could move a score across an edit's bar and change a route. So the bfloat16 scores only screen rows:

* a row (token) whose every edit is below its bar by more than the rounding bound cannot route; its scores
  stay the screen's (every one under its bar, so no edit survives the bars, exactly as in float32);
* every other row is scored again in float32 at each edit that may reach its bar (bound included), as
  without the screen, and decides there (a row with many such edits is scored again whole).

The bound. u = 2⁻⁸ is bfloat16's unit roundoff. Rounding x and v_j to bfloat16 moves each product x_i v_ij
by at most (2u + u²)|x_i v_ij| (the products of two bf16 numbers are exact in float32); float32 accumulation
of d_in terms adds at most γ = d_in·2⁻²⁴ / (1 - d_in·2⁻²⁴) of Σ|x_i v_ij| (times (1 + u)²); rounding the sum
to bfloat16 adds u / (1 - u) of the returned value. With Σ|x_i v_ij| ≤ ‖x‖‖v_j‖:

    |p̂_j - v_jᵀx| ≤ c·‖x‖‖v_j‖ + u/(1-u)·|p̂_j|,    c = 2u + u² + γ(1 + u)²

and the score is that times 1 / (v_jᵀk_j). The screen uses twice this bound (``SAFETY``), for the float32
rounding of the norms, of the scale, and of the float32 rescore itself. A row is rescored when, for some
edit, screen score + bound reaches the bar, or is not a number.

Where bf16 is not native (AVX2, AVX-512 without BF16) the product is emulated and slower than float32, so
``score_dtype = "auto"`` keeps float32 there and no screen runs (``editor/precision.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

UNIT_ROUNDOFF = 2.0 ** -8        # bfloat16
FP32_ROUNDOFF = 2.0 ** -24
SAFETY = 2.0
FEW_CANDIDATES = 64              # a row with more edits near their bars is rescored whole (one x @ V)


def norm_factor(d_in: int) -> float:
    """c of the module docstring: the bound's share of ‖x‖‖v_j‖ for a length-``d_in`` dot product."""
    u, g = UNIT_ROUNDOFF, d_in * FP32_ROUNDOFF
    gamma = g / (1.0 - g)
    return 2 * u + u * u + gamma * (1 + u) ** 2


@dataclass(frozen=True)
class ScoreScreen:
    """The committed edits' matchers in bfloat16, (r, d_in) contiguous, and each edit's share of the bound."""

    Vt: torch.Tensor        # (r, d_in) bfloat16: V transposed, as ``F.linear`` reads it
    slack: torch.Tensor     # (r,) float32: SAFETY · c · ‖v_j‖ / (v_jᵀ k_j); zero for an edit that never routes
    inv_s: torch.Tensor     # (r,) float32: 1 / (v_jᵀ k_j), zero for an edit that never routes

    @classmethod
    def build(cls, V: torch.Tensor, inv_s: torch.Tensor) -> "ScoreScreen":
        """From the committed factors' V (d_in, r) float32 and their gate scale (r,)."""
        c = norm_factor(V.shape[0])
        return cls(V.T.contiguous().to(torch.bfloat16), SAFETY * c * V.norm(dim=0) * inv_s, inv_s)

    def screen(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bfloat16 scores for x (N, d_in) float32 and how far each may be from float32's: (N, r) each."""
        approx = F.linear(x.to(torch.bfloat16), self.Vt).to(torch.float32)            # (N, r) p̂
        bound = (SAFETY * UNIT_ROUNDOFF / (1 - UNIT_ROUNDOFF)) * approx.abs() * self.inv_s   # (N, r)
        bound = bound + x.norm(dim=-1, keepdim=True) * self.slack                       # (N, r)
        return approx * self.inv_s, bound

    def scores(self, x: torch.Tensor, V: torch.Tensor, bars: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Every edit's score for x (N, d_in) float32 -> (N, r) float32, and how many rows were rescored.

        Every (row, edit) that may reach the edit's bar (``bars`` (r,)), bound included, holds its float32
        score v_jᵀx / (v_jᵀ k_j); every other entry holds its bfloat16 score, below the bar either way. A row
        with at most ``FEW_CANDIDATES`` such edits is rescored at those edits alone (a routed token reads a
        few columns of V, not all of it), a row with more as a whole, ``x @ V``."""
        approx, bound = self.screen(x)                                                  # (N, r) x2
        cand = ~((approx + bound) < bars)                                               # (N, r) nan: candidate
        per_row = cand.sum(dim=-1)                                                      # (N,)
        near = per_row > 0
        n = int(near.sum())
        if not n:
            return approx, 0
        whole = per_row > FEW_CANDIDATES                                                # (N,)
        if bool(whole.any()):
            approx[whole] = (x[whole] @ V) * self.inv_s                                 # (w, r) exact
        rows, cols = (cand & ~whole[:, None]).nonzero(as_tuple=True)                    # (p,) each
        if rows.numel():
            exact = torch.einsum("pd,dp->p", x[rows], V[:, cols])                      # (p,) v_jᵀx
            approx[rows, cols] = exact * self.inv_s[cols]
        return approx, n
