"""Step 1 of COMEBA-HK: the target residual z for every fact of a batch, optimised jointly.

For fact j a vector δ_j is added to the residual stream after block L at the subject's last token; it
maximises log P(target | context + prompt) over the contexts, with a KL term keeping "<subject> is a"
stable, a weight decay and a norm clamp. z_j = h_L + δ_j. All facts share one forward per iteration,
and that forward starts after block L (blocks 0..L do not depend on δ, so their output is computed once)
and projects to the vocabulary only where a loss is read. Positions before each row's lookup do not depend
on δ either: their keys and values in blocks L+1.. are computed once (:class:`_Prefix`), and each iteration
runs only the positions from the lookup on (``prefix_cache``; the same numbers as the full rows).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import EditConfig
from .model import EditableModel
from .precision import choose_opt_dtype
from .requests import StepBatch


@dataclass(frozen=True)
class Targets:
    Z: torch.Tensor          # (n, d) target residuals after block L
    h0: torch.Tensor         # (n, d) residuals before optimisation
    nll: torch.Tensor        # (n,) final target NLL per fact
    top1: torch.Tensor       # (n,) bool: at its last evaluation, every target token was the argmax in every context
    steps: int               # optimisation steps run
    opt_dtype: str           # the precision it ran in ("auto" resolved)


def compute_targets(em: EditableModel, batch: StepBatch, cfg: EditConfig) -> Targets:
    """Optimise δ for every fact at once; the model and its hooks are left as they were.

    A fact whose target NLL falls below ``cfg.early_stop_nll`` (or, with ``early_stop = "top1"``, whose
    target is the argmax at every target position of every context) is frozen and its rows leave the
    batch, so later iterations only pay for the facts still learning.
    """
    dev = em.device
    opt_dtype = choose_opt_dtype(cfg.opt_dtype, dev).dtype                 # "auto" resolved for this device
    rows = batch.rewrite + batch.kl
    ids, mask = batch.tensors(rows, dev)                                   # (R, T)
    n, R, n_rw = len(batch), len(rows), len(batch.rewrite)
    ar = torch.arange(R, device=dev)                                       # (R,)
    lookup = torch.tensor([r.lookup for r in rows], device=dev)           # (R,)
    kl_rows = torch.arange(n_rw, R, device=dev)                           # (n,)

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
    frozen = torch.zeros_like(delta, requires_grad=False)                   # (n, d) δ of converged facts
    active = torch.ones(n, dtype=torch.bool)                                # (n,)
    cur: dict[str, _Active] = {}

    def provide():
        a = cur["a"]
        if cur.get("feed") is not None:                                     # the prefix-cached path
            return cur["feed"]
        at = a.hL[a.ar, a.lookup] + delta[a.fact].to(hL.dtype)              # (R_a, d)
        return torch.index_put(a.hL, (a.ar, a.lookup), at)                  # (R_a, T, d)

    def final_hidden(a: _Active) -> torch.Tensor:
        """Final hidden states at the positions a loss reads, (N_a + n_a, d)."""
        if "prefix" not in cur:
            return em.hidden_at(a.ids, a.mask, a.sel_row, a.sel_pos)
        pre = cur["prefix"]
        x = pre.suffix(a.hL)                                                # (R_a, S, d)
        cur["feed"] = torch.index_put(x, (a.ar, torch.zeros_like(a.ar)), x[:, 0] + delta[a.fact].to(x.dtype))
        try:
            h = pre.run(em, cur["feed"])                                    # (R_a, S, d)
        finally:
            cur["feed"] = None
        return h[a.sel_row, a.sel_pos - a.lookup[a.sel_row]]

    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    nll_fact = torch.full((n,), float("inf"))
    top1 = torch.zeros(n, dtype=torch.bool)                                 # (n,) target the argmax everywhere
    steps = 0
    with _attention_for(em.model, dev, opt_dtype), em.resumed_after(cfg.last_layer, provide):
        for steps in range(1, cfg.v_steps + 1):
            if "a" not in cur or not torch.equal(cur["a"].active, active):
                cur["a"] = a = _Active(batch, active.clone(), ids, mask, hL, dev)
                if cfg.prefix_cache:
                    if "all" not in cur:                                  # every row's prefix, computed once
                        with torch.no_grad(), _autocast(dev, opt_dtype):
                            cur["all"] = _Prefix(em, a, cur)
                    cur["prefix"] = cur["all"].select(a.index, a.mask)   # the active rows' share of it
            a = cur["a"]
            opt.zero_grad()
            with _autocast(dev, opt_dtype):
                logits = em.logits(final_hidden(a)).float()                       # (N_a + n_a, V)
            logp = F.log_softmax(logits, dim=-1)                                  # (N_a + n_a, V)
            tok_nll = -logp[:a.N].gather(1, a.t_tok[:, None]).squeeze(1)         # (N_a,)
            row_nll = torch.zeros(a.n_rw, device=dev).index_add(0, a.t_row, tok_nll) / a.row_len   # (n_rw_a,)
            nll = torch.zeros(n, device=dev).index_add(0, a.fact[:a.n_rw], row_nll) / a.rows_per_fact  # (n,)
            kl = torch.zeros(n, device=dev).index_add(                            # (n,)
                0, a.kl_fact, F.kl_div(kl_init[a.kl_fact], logp[a.N:], log_target=True, reduction="none").sum(-1))
            wd = cfg.v_weight_decay * delta.norm(dim=-1) ** 2 / h0_norm ** 2     # (n,)
            nll_fact[active] = nll.detach().cpu()[active]
            miss = (logits[:a.N].detach().argmax(-1) != a.t_tok).float()          # (N_a,) target not the argmax
            row_miss = torch.zeros(a.n_rw, device=dev).index_add(0, a.t_row, miss)                # (n_rw_a,)
            fact_miss = torch.zeros(n, device=dev).index_add(0, a.fact[:a.n_rw], row_miss).cpu()  # (n,)
            top1[active] = fact_miss[active] == 0
            done = active & (nll_fact < cfg.early_stop_nll)                       # (n,)
            if cfg.early_stop == "top1":                                          # ENCORE's MPES
                done |= active & top1
            if done.any():
                frozen[done.to(dev)] = delta.detach()[done.to(dev)]
                active &= ~done
            if not active.any():
                break
            live = active.to(dev).float()                                         # (n,)
            ((nll + cfg.kl_factor * kl + wd) * live).sum().backward()
            opt.step()
            with torch.no_grad():
                limit = cfg.clamp_norm_factor * h0_norm                            # (n,) norm clamp
                delta.mul_((limit / delta.norm(dim=-1).clamp(min=1e-12)).clamp(max=1.0)[:, None])
                delta[~active.to(dev)] = frozen[~active.to(dev)]                   # Adam momentum must not move them
    return Targets(Z=h0 + delta.detach(), h0=h0, nll=nll_fact, top1=top1, steps=steps, opt_dtype=opt_dtype)


def _autocast(dev: torch.device, dtype: str):
    """Mixed precision for the optimisation's forward/backward (``opt_dtype``); float32 turns it off."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=getattr(torch, dtype))


@contextlib.contextmanager
def _attention_for(model, dev: torch.device, dtype: str):
    """Eager attention while optimising in reduced precision on CPU: there the fused SDPA kernel's
    backward is much slower in bfloat16 than in float32, while eager attention's matmuls use the CPU's
    bfloat16 instructions."""
    before = getattr(model.config, "_attn_implementation", None)
    if dtype == "float32" or dev.type != "cpu" or before in (None, "eager"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


class _Prefix:
    """Keys and values of blocks L+1.. at every row's positions before its lookup, computed once.

    Those positions never see δ (causal attention), so each iteration feeds only the positions from the
    lookup on (S of them, right-padded) and attends to the cached prefix (P positions, left-padded).
    The masks are additive (0 or the most negative float), which eager and SDPA attention both accept.
    """

    def __init__(self, em: EditableModel, a: "_Active", cur: dict):
        from transformers import DynamicCache

        dev, model = a.hL.device, em.model
        R, T, _ = a.hL.shape
        self.lookup = a.lookup                                              # (R,)
        lengths = a.mask.sum(1)                                             # (R,)
        P, S = max(int(self.lookup.max()), 1), int((lengths - self.lookup).max())
        neg = torch.finfo(torch.float32).min
        j = torch.arange(P, device=dev)                                     # (P,)
        src_p = self.lookup[:, None] - P + j[None]                          # (R, P) source column; < 0 = pad
        real_p = src_p >= 0                                                 # (R, P)
        allowed = (j[None, :, None] >= j[None, None, :]) & real_p[:, None, :]          # (R, P, P) causal, real keys
        allowed |= torch.eye(P, dtype=torch.bool, device=dev)[None]         # pad queries see themselves (no NaN)
        mask_p = torch.zeros(R, 1, P, P, device=dev).masked_fill(~allowed[:, None], neg)   # (R, 1, P, P)
        k = torch.arange(S, device=dev)                                     # (S,)
        self.src_s = (self.lookup[:, None] + k[None]).clamp(max=T - 1)     # (R, S) source column of the suffix
        self.pos_s = self.lookup[:, None] + k[None]                         # (R, S) positions
        causal_s = (k[:, None] >= k[None, :])[None].expand(R, S, S)         # (R, S, S)
        allowed_s = torch.cat([real_p[:, None, :].expand(R, S, P), causal_s], dim=2)      # (R, S, P + S)
        self.mask_s = torch.zeros(R, 1, S, P + S, device=dev).masked_fill(~allowed_s[:, None], neg)
        self.ar = torch.arange(R, device=dev)[:, None]                      # (R, 1)
        self.cache_kw = "cache" if "cache" in inspect.signature(model.base_model.forward).parameters \
            else "past_key_values"
        cache = DynamicCache(config=model.config)
        cur["feed"] = a.hL[self.ar, src_p.clamp(min=0)]                     # (R, P, d)
        try:
            model.base_model(input_ids=torch.zeros(R, P, dtype=torch.long, device=dev), attention_mask=mask_p,
                             position_ids=src_p.clamp(min=0), use_cache=True, **{self.cache_kw: cache})
        finally:
            cur["feed"] = None
        self.kv = [(l, layer.keys, layer.values) for l, layer in enumerate(cache.layers)
                   if getattr(layer, "keys", None) is not None and layer.keys.numel()]

    def select(self, index: torch.Tensor, mask: torch.Tensor) -> "_Prefix":
        """The same cache for the rows ``index`` only (their attention ``mask``), suffix trimmed to them."""
        out = object.__new__(_Prefix)
        P = self.mask_s.shape[-1] - self.src_s.shape[1]
        out.lookup = self.lookup[index]                                     # (R_a,)
        S = int((mask.sum(1) - out.lookup).max())
        out.src_s, out.pos_s = self.src_s[index, :S], self.pos_s[index, :S]  # (R_a, S)
        out.mask_s = self.mask_s[index][:, :, :S, :P + S]                   # (R_a, 1, S, P + S)
        out.ar = torch.arange(len(index), device=index.device)[:, None]     # (R_a, 1)
        out.cache_kw = self.cache_kw
        out.kv = [(l, K[index], V[index]) for l, K, V in self.kv]
        return out

    def suffix(self, hL: torch.Tensor) -> torch.Tensor:
        """The residual stream after block L from each row's lookup on, (R, S, d)."""
        return hL[self.ar, self.src_s]

    def run(self, em: EditableModel, feed: torch.Tensor) -> torch.Tensor:
        """Final hidden states of the suffix positions (fed through ``provide``), (R, S, d)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=em.model.config)
        for l, K, V in self.kv:                                             # a fresh cache over the same tensors
            cache.update(K, V, l)
        R, S = self.src_s.shape
        return em.model.base_model(input_ids=torch.zeros(R, S, dtype=torch.long, device=feed.device),
                                   attention_mask=self.mask_s, position_ids=self.pos_s, use_cache=True,
                                   **{self.cache_kw: cache}).last_hidden_state


class _Active:
    """Index tensors for the rows of the facts still being optimised."""

    def __init__(self, batch: StepBatch, active: torch.Tensor, ids, mask, hL, dev):
        self.active = active
        keep_rw = [i for i, r in enumerate(batch.rewrite) if active[r.fact]]
        keep_kl = [j for j in range(len(batch)) if active[j]]
        rows = [batch.rewrite[i] for i in keep_rw] + [batch.kl[j] for j in keep_kl]
        index = torch.tensor(keep_rw + [len(batch.rewrite) + j for j in keep_kl], device=dev)
        self.index = index                                                  # (R_a,) rows of the whole batch
        self.ids, self.mask, self.hL = ids[index], mask[index], hL[index]  # (R_a, T), (R_a, T), (R_a, T, d)
        self.n_rw = len(keep_rw)
        self.ar = torch.arange(len(rows), device=dev)                       # (R_a,)
        self.fact = torch.tensor([r.fact for r in rows], device=dev)       # (R_a,)
        self.lookup = torch.tensor([r.lookup for r in rows], device=dev)   # (R_a,)
        tri = [(i, r.target_from + k, batch.target_ids[r.fact][k])
               for i, r in enumerate(rows[:self.n_rw]) for k in range(r.n_target)]
        self.N = len(tri)
        self.t_row = torch.tensor([t[0] for t in tri], device=dev)          # (N_a,)
        self.t_tok = torch.tensor([t[2] for t in tri], device=dev)          # (N_a,)
        self.kl_fact = torch.tensor(keep_kl, device=dev)                    # (n_a,)
        kl_local = torch.arange(self.n_rw, len(rows), device=dev)           # (n_a,)
        self.sel_row = torch.cat([self.t_row, kl_local])                     # (N_a + n_a,)
        self.sel_pos = torch.cat([torch.tensor([t[1] for t in tri], device=dev, dtype=torch.long),
                                  self.lookup[kl_local]])                    # (N_a + n_a,)
        self.row_len = torch.bincount(self.t_row, minlength=self.n_rw).float()          # (n_rw_a,)
        self.rows_per_fact = torch.bincount(self.fact[:self.n_rw], minlength=len(batch)).float().clamp(min=1)  # (n,)
