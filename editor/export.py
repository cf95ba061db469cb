"""Exports of an edited model for other servers: a PEFT LoRA adapter, or a merged Hugging Face directory.

Both hold Δ = Σ_t U_t V_tᵀ of every committed step up to a version, and both apply it to **every** token:
they serve the edit without the gate (what ``kbsync eval`` calls no-hook). The gate needs kbsync's own
server or the vLLM plugin (docs/serving.md).

peft: per edited projection lora_A = Vᵀ (r, d_in), lora_B = U (d_out, r), lora_alpha = r (scaling 1), so
B A = Δ exactly while the total rank r fits ``max_rank`` (vLLM's largest LoRA rank is 512). Above it the
factors are compressed by a truncated SVD of Δ (exact while rank(Δ) ≤ max_rank: Δ's rank is at most
min(d_in, d_out)); the relative Frobenius error of each layer is written down in the adapter's metadata.
merged: W = W0 + Δ computed in float32 from the base weights and cast once to the weights' dtype; every
other tensor is the base model's. It loads with ``from_pretrained`` unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .model import EditableModel
from .step import StepDelta, check_delta, masked_indices

MAX_LORA_RANK = 512        # vLLM's largest --max-lora-rank
METADATA_FILE = "kbsync.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def stacked_factors(deltas: list[StepDelta]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per edited layer the factors of every step side by side: U (d_out, r), V (d_in, r), float32, with
    Σ_t U_t V_tᵀ = U Vᵀ; the columns of removed facts (masked or unrouted) are left out: an export
    applies Δ to every token, so an edit that routes nothing must not be in it."""
    parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for d in deltas:
        for ld in d.layers:
            parts.setdefault(ld.layer, []).append((ld.U.float(), ld.V.float()))
    out = {}
    for l, p in sorted(parts.items()):
        U, V = torch.cat([u for u, _ in p], 1), torch.cat([v for _, v in p], 1)
        keep = torch.ones(U.shape[1], dtype=torch.bool)
        keep[masked_indices(deltas, "taken_out")] = False
        out[l] = (U[:, keep].contiguous(), V[:, keep].contiguous())
    return out


def low_rank(U: torch.Tensor, V: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, relative error) with B A ≈ U Vᵀ and rank ≤ ``max_rank``: the factors themselves when they fit,
    else a truncated SVD computed from QR factors in float64 (Δ itself is never formed)."""
    if U.shape[1] <= max_rank:
        return U, V.T.contiguous(), 0.0
    Qu, Ru = torch.linalg.qr(U.double())                          # (d_out, k), (k, r)
    Qv, Rv = torch.linalg.qr(V.double())                          # (d_in, k'), (k', r)
    P, S, Qh = torch.linalg.svd(Ru @ Rv.T, full_matrices=False)   # the small core (k, k')
    total = float((S ** 2).sum())
    kept = S[:max_rank]
    error = (max(total - float((kept ** 2).sum()), 0.0) / total) ** 0.5 if total > 0 else 0.0
    B = (Qu @ P[:, :max_rank]) * kept                             # (d_out, k)
    A = Qh[:max_rank] @ Qv.T                                      # (k, d_in)
    return B.float().contiguous(), A.float().contiguous(), error


def _check(em: EditableModel, deltas: list[StepDelta]) -> None:
    """Raise DeltaMismatch unless every delta fits this model; the model and its hooks are not touched."""
    for d in deltas:
        check_delta(em, d)


def write_peft(em: EditableModel, deltas: list[StepDelta], out: str | Path, metadata: dict[str, str],
               max_rank: int = MAX_LORA_RANK) -> dict:
    """Write a PEFT LoRA adapter holding ``deltas`` to ``out``; returns what was written (ranks, errors)."""
    from safetensors.torch import save_file

    if em.spec.orientation != "linear":
        raise ValueError(f"a PEFT export needs nn.Linear projections; {em.spec.model_type} has "
                         f"{em.spec.orientation} ones: export --format merged instead")
    _check(em, deltas)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors, ranks, errors = {}, {}, {}
    for layer, (U, V) in stacked_factors(deltas).items():
        B, A, err = low_rank(U, V, max_rank)
        name = f"base_model.model.{em.spec.projection_name(layer)}"
        tensors[f"{name}.lora_A.weight"] = A.contiguous()          # (r, d_in)
        tensors[f"{name}.lora_B.weight"] = B.contiguous()          # (d_out, r)
        ranks[layer], errors[layer] = A.shape[0], err
    if not tensors:
        raise ValueError("this version edits nothing (the base model); there is no adapter to export")
    r = max(ranks.values())
    module = em.spec.projection.rsplit(".", 1)[-1]
    # Layers whose rank differs from r get their own rank (and α = rank, so every layer's scaling is 1).
    pattern = {em.spec.projection_name(l): k for l, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "inference_mode": True,
        "base_model_name_or_path": str(getattr(em.model.config, "_name_or_path", "") or ""),
        "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": [module], "layers_to_transform": sorted(ranks), "layers_pattern": "layers",
        "rank_pattern": pattern, "alpha_pattern": dict(pattern), "use_rslora": False, "use_dora": False,
        "modules_to_save": None,
    }
    doc = {**metadata, "format": "peft", "gate": "none: the delta applies to every token (no-hook)",
           "ranks": {str(l): k for l, k in ranks.items()},
           "relative_error": {str(l): e for l, e in errors.items()}, "max_rank": max_rank}
    save_file(tensors, str(out / PEFT_WEIGHTS),
              metadata={"format": "pt", **{f"kbsync_{k}": json.dumps(v) for k, v in doc.items()}})
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (out / METADATA_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def write_merged(em: EditableModel, deltas: list[StepDelta], out: str | Path, metadata: dict[str, str]) -> dict:
    """Write the base model with W0 + Δ in every edited projection as a Hugging Face directory."""
    _check(em, deltas)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = dict(em.model.state_dict())                        # the base tensors, shared, never written
    factors = stacked_factors(deltas)
    for layer, (U, V) in factors.items():
        key = f"{em.spec.projection_name(layer)}.weight"
        W0 = state[key]
        D = (U.to(W0.device) @ V.to(W0.device).T)              # (d_out, d_in) float32
        if em.spec.orientation == "conv1d":
            D = D.T                                            # stored (d_in, d_out)
        state[key] = (W0.float() + D).to(W0.dtype)
    em.model.save_pretrained(out, state_dict=state)
    if em.tokenizer is not None:
        em.tokenizer.save_pretrained(out)
    doc = {**metadata, "format": "merged", "gate": "none: the delta applies to every token (no-hook)",
           "layers": sorted(factors)}
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["kbsync"] = {k: v for k, v in doc.items() if k != "layers"}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / METADATA_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    return doc
