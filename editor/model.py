"""EditableModel: a causal LM with COMEBA-HK hook layers on its editable MLP output projections."""
from __future__ import annotations

import contextlib
import hashlib
import json

import torch
from torch import nn

from .hook import CASCADE_GATES, GATES, HookLayer, Mode, RoutingContext
from .registry import spec_for


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)


def _checked(gate: str) -> str:
    if gate not in GATES:
        raise ValueError(f"gate {gate!r} is not one of {', '.join(GATES)}")
    return gate


class _StopForward(Exception):
    """Raised by a forward hook to end a pass early (see ``EditableModel.forward_until``)."""


class EditableModel:
    """Owns the hooks of one model. All mutation goes through ``apply_delta``/``reset`` or context managers."""

    def __init__(self, model: nn.Module, tokenizer, layers, alpha0: float = 2.2, massive_ratio: float = 0.0,
                 delta_dtype: torch.dtype | str = torch.float32, gate: str = "zscore", confirm_alpha: float = 0.4,
                 score_dtype: torch.dtype | str = torch.float32):
        self.model, self.tokenizer = model, tokenizer
        self.spec = spec_for(model.config)
        n_layers = len(self.spec.blocks(model))
        bad = [l for l in layers if not 0 <= l < n_layers]
        if bad:
            raise ValueError(f"editable layers {bad} are outside 0..{n_layers - 1} for this model")
        self.layers = tuple(layers)
        self.configured_gate = _checked(gate)       # the gate of new histories; a restored one keeps its own
        self.context = RoutingContext(massive_ratio=float(massive_ratio), gate=gate)
        self.hooks: dict[int, HookLayer] = {}
        for l in self.layers:
            module = self.spec.projection_module(model, l)
            d_in, d_out = self.spec.dims(module)
            self.hooks[l] = HookLayer(module, l, d_in, d_out, self.context, alpha0, _dtype(delta_dtype),
                                      _dtype(score_dtype))
        self._set_alpha0(gate, alpha0, confirm_alpha)
        # on the base model: every forward (CausalLM, generate, or base-model calls) passes through it
        self._pre = model.base_model.register_forward_pre_hook(self._capture, with_kwargs=True)
        self._fingerprint: str | None = None
        self.score_choice = None                    # PrecisionChoice of the gate's score dtype (``for_config``)

    @classmethod
    def for_config(cls, model: nn.Module, tokenizer, cfg) -> "EditableModel":
        """Hooks as an ``EditConfig`` describes them (layers, gate and its α0, massive-token exclusion, Δ's dtype,
        the gate's score dtype resolved for the model's device: ``score_choice`` says what and why)."""
        from .precision import choose_score_dtype
        choice = choose_score_dtype(cfg.score_dtype, next(model.parameters()).device)
        em = cls(model, tokenizer, cfg.layers, cfg.alpha0_for(), cfg.massive_ratio, cfg.delta_dtype, cfg.gate,
                 cfg.confirm_alpha, choice.dtype)
        em.score_choice = choice
        return em

    @property
    def gate(self) -> str:
        """The gate the hooks route with now: the committed history's, or the configured one on the base model."""
        return self.context.gate

    def configure_gate(self, gate: str, alpha0: float, confirm_alpha: float = 0.4) -> None:
        """The gate (and its α0) of new histories; the model must be at the base (benchmarks switch it)."""
        if self.edited:
            raise ValueError("configure the gate on the base model (reset first)")
        self.configured_gate = _checked(gate)
        self._set_alpha0(gate, alpha0, confirm_alpha)
        self.reset()

    def _set_alpha0(self, gate: str, alpha0: float, confirm_alpha: float) -> None:
        """α0 per hook: ``alpha0`` everywhere, but the cascade gate's later layers confirm at ``confirm_alpha``."""
        first = min(self.hooks)
        for l, h in self.hooks.items():
            h.alpha0 = float(confirm_alpha if gate in CASCADE_GATES and l != first else alpha0)
            if not h.U:                                              # a committed history keeps its own α
                h.alpha = h.alpha0

    def adopt_gate(self, gate: str) -> None:
        """Route with ``gate`` (a history is routed with the gate it was made with); only on the base model."""
        if self.edited and _checked(gate) != self.context.gate:
            raise ValueError(f"the committed steps route with the {self.context.gate!r} gate; a step made with "
                             f"{gate!r} cannot join them")
        self.context.gate = _checked(gate)

    @property
    def edited(self) -> bool:
        """Whether any step is committed."""
        return any(h.U for h in self.hooks.values())

    def set_delta_dtype(self, dtype: torch.dtype | str) -> None:
        """The dtype of the dense Δ every hook reads per token (benchmarks compare them in one process)."""
        for h in self.hooks.values():
            h.set_delta_dtype(_dtype(dtype))

    def set_score_dtype(self, dtype: torch.dtype | str) -> None:
        """The dtype the first edited layer's gate scores are screened in (float32: no screen); the routes are
        float32's either way (``editor/gate_screen.py``). Benchmarks compare the two in one process."""
        for h in self.hooks.values():
            h.set_score_dtype(_dtype(dtype))

    def _capture(self, module, args, kwargs):
        past = kwargs.get("cache", kwargs.get("past_key_values"))    # transformers 5 renamed it `cache`
        self.context.attention_mask = kwargs.get("attention_mask")
        self.context.token_route = None                                # each pass decides afresh
        self.context.incremental = past is not None and past.get_seq_length() > 0
        return None

    def close(self) -> None:
        """Remove every hook; the model is the base model again."""
        for h in self.hooks.values():
            h.remove()
        self._pre.remove()

    # ----- facts about the model -----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_blocks(self) -> int:
        return len(self.spec.blocks(self.model))

    def fingerprint(self) -> str:
        """Identity of the base model: config plus a sample of every parameter (fast, even for 8B models)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            cfg = {k: v for k, v in self.model.config.to_dict().items()
                   if k not in ("_name_or_path", "_model_name_or_path", "transformers_version", "dtype", "torch_dtype")}
            h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
            for name, p in self.model.named_parameters():
                flat = p.detach().reshape(-1)
                sample = torch.cat([flat[:256], flat[-256:]]).to("cpu", torch.float32)
                h.update(name.encode() + str(tuple(p.shape)).encode() + sample.numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    # ----- modes -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def mode(self, mode: Mode, layers=None):
        """Set the hooks of ``layers`` (default all) to ``mode``; the previous modes come back on exit."""
        chosen = [self.hooks[l] for l in (self.layers if layers is None else layers)]
        before = [h.mode for h in chosen]
        try:
            for h in chosen:
                h.mode = mode
            yield self
        finally:
            for h, m in zip(chosen, before):
                h.mode = m

    @contextlib.contextmanager
    def recording(self):
        """Collect max z per sequence per layer during the enclosed forward passes."""
        self.context.records = {}
        try:
            yield self.context.records
        finally:
            self.context.records = None

    @contextlib.contextmanager
    def resumed_after(self, layer: int, provide):
        """Forward passes skip blocks 0..layer: ``provide()`` gives the residual stream after ``layer``.

        Exact for anything downstream of ``layer`` (causal blocks see only the stream); used to optimise
        targets without recomputing the frozen lower blocks on every iteration.
        """
        parent_path, _, name = self.spec.layers.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        blocks = getattr(parent, name)
        handle = self.model.get_submodule(self.spec.stream_in).register_forward_hook(lambda m, i, o: provide())
        try:
            setattr(parent, name, nn.ModuleList(list(blocks)[layer + 1:]))
            yield self
        finally:
            setattr(parent, name, blocks)
            handle.remove()

    def forward_until(self, layer: int, input_ids, attention_mask) -> None:
        """Run blocks 0..``layer`` only (for forward hooks on them: keys, residuals, routing records);
        nothing after block ``layer`` is computed."""
        def stop(module, inputs, output):
            raise _StopForward

        handle = self.spec.blocks(self.model)[layer].register_forward_hook(stop)
        try:
            self.model.base_model(input_ids=input_ids, attention_mask=attention_mask)
        except _StopForward:
            pass
        finally:
            handle.remove()

    def hidden_at(self, input_ids, attention_mask, rows, positions) -> torch.Tensor:
        """Final hidden states (after the last norm) at (rows, positions) -> (N, d); logits come from ``logits``."""
        h = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return h[rows, positions]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden)

    def reset(self) -> None:
        """Back to the base model (no committed deltas), routing with the configured gate."""
        self.context.gate = self.configured_gate
        for h in self.hooks.values():
            h.reset()

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the whole edit state, for checks and checkpoints: per layer D, Σ K Kᵀ and α."""
        out = {}
        for l, h in self.hooks.items():
            out[f"{l}.D"] = h.D.detach().clone()
            out[f"{l}.KK"] = h.KK.detach().clone()
            out[f"{l}.alpha"] = torch.tensor(h.alpha, dtype=torch.float64)
            out[f"{l}.rank"] = torch.tensor(h.rank)
        return out

    # ----- inference helpers ---------------------------------------------------------------------
    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Right-padded batch on the model's device (padded here: the tokenizer's settings are never changed,
        so request threads can share it)."""
        rows = [self.tokenizer(t)["input_ids"] for t in texts]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)           # (B, T)
        mask = torch.zeros(len(rows), width, dtype=torch.long)                # (B, T)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    @torch.no_grad()
    def next_token_logits(self, prompts: list[str]) -> torch.Tensor:
        """(B, V) logits of the token after each prompt (padding handled)."""
        enc = self.encode(prompts)
        logits = self.model(**enc).logits                                 # (B, T, V)
        last = enc["attention_mask"].sum(1) - 1                           # (B,)
        return logits[torch.arange(len(prompts), device=logits.device), last].float()

    def generate(self, prompts: list[str], max_new_tokens: int = 16) -> list[str]:
        """Greedy continuations through the one decoder (``editor.decoding``; KV-cached, routing carried)."""
        from .decoding import greedy
        return greedy(self, [self.tokenizer(p)["input_ids"] for p in prompts], max_new_tokens)
