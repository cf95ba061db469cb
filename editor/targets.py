"""Step 1 of COMEBA-HK: the target residual z for every fact of a batch, optimised jointly.

For fact j a vector δ_j is added to the residual stream after block L at the subject's last token; it
maximises log P(target | context + prompt) over the contexts, with a KL term keeping "<subject> is a"
stable, a weight decay and a norm clamp. z_j = h_L + δ_j. All facts share one forward per iteration.
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
    n, R = len(batch), len(rows)
    n_rw = len(batch.rewrite)
    fact = torch.tensor([r.fact for r in rows], device=dev)               # (R,)
    lookup = torch.tensor([r.lookup for r in rows], device=dev)           # (R,)
    # gather indices of target predictions: (row, position, token) triples
    tri = [(i, r.target_from + k, batch.target_ids[r.fact][k])
           for i, r in enumerate(batch.rewrite) for k in range(r.n_target)]
    t_row = torch.tensor([t[0] for t in tri], device=dev)                 # (N,)
    t_pos = torch.tensor([t[1] for t in tri], device=dev)                 # (N,)
    t_tok = torch.tensor([t[2] for t in tri], device=dev)                 # (N,)
    row_len = torch.bincount(t_row, minlength=n_rw).float()               # (n_rw,)
    rows_per_fact = torch.bincount(fact[:n_rw], minlength=n).float()      # (n,)
    kl_rows = torch.arange(n_rw, R, device=dev)                           # (n,)

    block = em.spec.blocks(em.model)[cfg.last_layer]
    d = em.model.config.hidden_size
    delta = torch.zeros(n, d, device=dev, dtype=torch.float32, requires_grad=True)   # (n, d)
    captured: dict[str, torch.Tensor] = {}

    def add_delta(module, inputs, output):
        h = output[0] if isinstance(output, tuple) else output            # (R, T, d)
        if "h0" not in captured:
            captured["h0"] = h[torch.arange(R, device=dev), lookup].detach().float()   # (R, d)
        add = delta[fact].to(h.dtype)                                     # (R, d)
        h = torch.index_put(h, (torch.arange(R, device=dev), lookup), h[torch.arange(R, device=dev), lookup] + add)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = block.register_forward_hook(add_delta)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    kl_init = None
    nll_fact = torch.full((n,), float("inf"))
    steps = 0
    try:
        for steps in range(1, cfg.v_steps + 1):
            opt.zero_grad()
            logits = em.model(input_ids=ids, attention_mask=mask).logits      # (R, T, V)
            logp = F.log_softmax(logits[t_row, t_pos].float(), dim=-1)        # (N, V)
            tok_nll = -logp.gather(1, t_tok[:, None]).squeeze(1)              # (N,)
            row_nll = torch.zeros(n_rw, device=dev).index_add(0, t_row, tok_nll) / row_len   # (n_rw,)
            nll = torch.zeros(n, device=dev).index_add(0, fact[:n_rw], row_nll) / rows_per_fact  # (n,)
            kl_logp = F.log_softmax(logits[kl_rows, lookup[kl_rows]].float(), dim=-1)         # (n, V)
            if kl_init is None:
                kl_init = kl_logp.detach()
            kl = F.kl_div(kl_init, kl_logp, log_target=True, reduction="none").sum(-1)        # (n,)
            h0 = _plain_h0(captured["h0"], batch)                              # (n, d)
            wd = cfg.v_weight_decay * delta.norm(dim=-1) ** 2 / h0.norm(dim=-1) ** 2          # (n,)
            nll_fact = nll.detach().cpu()
            if float(nll_fact.max()) < cfg.early_stop_nll:
                break
            loss = (nll + cfg.kl_factor * kl + wd).sum()
            loss.backward()
            opt.step()
            with torch.no_grad():                                             # norm clamp
                limit = cfg.clamp_norm_factor * h0.norm(dim=-1)                # (n,)
                scale = (limit / delta.norm(dim=-1).clamp(min=1e-12)).clamp(max=1.0)
                delta.mul_(scale[:, None])
    finally:
        handle.remove()
    h0 = _plain_h0(captured["h0"], batch)
    return Targets(Z=(h0 + delta.detach()), h0=h0, nll=nll_fact, steps=steps)


def _plain_h0(h_rows: torch.Tensor, batch: StepBatch) -> torch.Tensor:
    """h_L at the subject's last token of each fact's bare prompt (its first rewrite row): (n, d)."""
    per_fact = len(batch.rewrite) // len(batch)
    return h_rows[torch.arange(len(batch), device=h_rows.device) * per_fact]
