"""Step 1 of COMEBA-HK: the target residual z for every fact of a batch, optimised jointly.

For fact j a vector δ_j is added to the residual stream after block L at the subject's last token; it
maximises log P(target | context + prompt) over the contexts, with a KL term keeping "<subject> is a"
stable, a weight decay and a norm clamp. z_j = h_L + δ_j. All facts share one forward per iteration,
and that forward starts after block L (blocks 0..L do not depend on δ, so their output is computed once)
and projects to the vocabulary only where a loss is read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import EditConfig
from .model import EditableModel
from .requests import StepBatch


@dataclass(frozen=True)
class Targets:
    Z: torch.Tensor          # (n, d) target residuals after block L
    h0: torch.Tensor         # (n, d) residuals before optimisation
    nll: torch.Tensor        # (n,) final target NLL per fact
    steps: int               # optimisation steps run


def compute_targets(em: EditableModel, batch: StepBatch, cfg: EditConfig) -> Targets:
    """Optimise δ for every fact at once; the model and its hooks are left as they were."""
    dev = em.device
    rows = batch.rewrite + batch.kl
    ids, mask = batch.tensors(rows, dev)                                   # (R, T)
    n, R, n_rw = len(batch), len(rows), len(batch.rewrite)
    ar = torch.arange(R, device=dev)                                       # (R,)
    fact = torch.tensor([r.fact for r in rows], device=dev)               # (R,)
    lookup = torch.tensor([r.lookup for r in rows], device=dev)           # (R,)
    tri = [(i, r.target_from + k, batch.target_ids[r.fact][k])
           for i, r in enumerate(batch.rewrite) for k in range(r.n_target)]
    t_row = torch.tensor([t[0] for t in tri], device=dev)                 # (N,) row of each target token
    t_tok = torch.tensor([t[2] for t in tri], device=dev)                 # (N,)
    kl_rows = torch.arange(n_rw, R, device=dev)                           # (n,)
    sel_row = torch.cat([t_row, kl_rows])                                  # (N + n,)
    sel_pos = torch.cat([torch.tensor([t[1] for t in tri], device=dev), lookup[kl_rows]])  # (N + n,)
    N = len(tri)
    row_len = torch.bincount(t_row, minlength=n_rw).float()               # (n_rw,)
    rows_per_fact = torch.bincount(fact[:n_rw], minlength=n).float()      # (n,)

    # one pass through the whole model: the stream after block L, and the KL reference distribution
    got: dict[str, torch.Tensor] = {}

    def grab(module, inputs, output):
        got["hL"] = (output[0] if isinstance(output, tuple) else output).detach()   # (R, T, d)

    handle = em.spec.blocks(em.model)[cfg.last_layer].register_forward_hook(grab)
    try:
        with torch.no_grad():
            final = em.hidden_at(ids, mask, kl_rows, lookup[kl_rows])     # (n, d)
            kl_init = F.log_softmax(em.logits(final).float(), dim=-1)     # (n, V)
    finally:
        handle.remove()
    hL = got["hL"]                                                          # (R, T, d)
    h0 = hL[ar, lookup][torch.arange(n, device=dev) * (n_rw // n)].float()  # (n, d) bare-prompt rows
    h0_norm = h0.norm(dim=-1)                                               # (n,)

    delta = torch.zeros(n, hL.shape[-1], device=dev, dtype=torch.float32, requires_grad=True)   # (n, d)

    def provide():
        at = hL[ar, lookup] + delta[fact].to(hL.dtype)                      # (R, d)
        return torch.index_put(hL, (ar, lookup), at)                        # (R, T, d)

    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    nll_fact = torch.full((n,), float("inf"))
    steps = 0
    with em.resumed_after(cfg.last_layer, provide):
        for steps in range(1, cfg.v_steps + 1):
            opt.zero_grad()
            logits = em.logits(em.hidden_at(ids, mask, sel_row, sel_pos)).float()   # (N + n, V)
            logp = F.log_softmax(logits, dim=-1)                                  # (N + n, V)
            tok_nll = -logp[:N].gather(1, t_tok[:, None]).squeeze(1)             # (N,)
            row_nll = torch.zeros(n_rw, device=dev).index_add(0, t_row, tok_nll) / row_len        # (n_rw,)
            nll = torch.zeros(n, device=dev).index_add(0, fact[:n_rw], row_nll) / rows_per_fact   # (n,)
            kl = F.kl_div(kl_init, logp[N:], log_target=True, reduction="none").sum(-1)           # (n,)
            wd = cfg.v_weight_decay * delta.norm(dim=-1) ** 2 / h0_norm ** 2                        # (n,)
            nll_fact = nll.detach().cpu()
            if float(nll_fact.max()) < cfg.early_stop_nll:
                break
            (nll + cfg.kl_factor * kl + wd).sum().backward()
            opt.step()
            with torch.no_grad():                                                 # norm clamp
                limit = cfg.clamp_norm_factor * h0_norm                            # (n,)
                delta.mul_((limit / delta.norm(dim=-1).clamp(min=1e-12)).clamp(max=1.0)[:, None])
    return Targets(Z=h0 + delta.detach(), h0=h0, nll=nll_fact, steps=steps)
