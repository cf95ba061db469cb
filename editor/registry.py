"""Architecture registry: where each supported model keeps its MLP output projection.

Keyed by ``config.model_type``, never by model-name substrings. Orientation is declared here, never
inferred from shapes: ``"linear"`` weights are stored (d_out, d_in) as in ``torch.nn.Linear``;
``"conv1d"`` weights are stored (d_in, d_out) as in GPT-2's ``Conv1D``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedArchitecture


@dataclass(frozen=True)
class ArchSpec:
    """How to find the editable pieces of one architecture."""

    model_type: str
    layers: str        # dotted path from the CausalLM to the ModuleList of blocks
    projection: str    # dotted path inside a block to the MLP output projection
    orientation: str   # "linear" (weight is d_out x d_in) or "conv1d" (weight is d_in x d_out)
    stream_in: str     # module whose output is the residual stream entering block 0

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def projection_module(self, model: nn.Module, layer: int) -> nn.Module:
        return self.blocks(model)[layer].get_submodule(self.projection)

    def projection_name(self, layer: int) -> str:
        return f"{self.layers}.{layer}.{self.projection}"

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The projection weight in math orientation, (d_out, d_in), as a view."""
        return module.weight if self.orientation == "linear" else module.weight.T

    def dims(self, module: nn.Module) -> tuple[int, int]:
        """(d_in, d_out) of the projection."""
        d_out, d_in = self.weight(module).shape
        return d_in, d_out


REGISTRY: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama", "model.layers", "mlp.down_proj", "linear", "model.embed_tokens"),
        ArchSpec("mistral", "model.layers", "mlp.down_proj", "linear", "model.embed_tokens"),
        ArchSpec("qwen2", "model.layers", "mlp.down_proj", "linear", "model.embed_tokens"),
        ArchSpec("gpt2", "transformer.h", "mlp.c_proj", "conv1d", "transformer.drop"),
        ArchSpec("gptj", "transformer.h", "mlp.fc_out", "linear", "transformer.drop"),
    )
}


def spec_for(config) -> ArchSpec:
    """The registry entry for a transformers config, or a clear error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    try:
        return REGISTRY[model_type]
    except KeyError:
        supported = ", ".join(sorted(REGISTRY))
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported for editing; supported: {supported}. "
            "Add an ArchSpec for it in editor/registry.py."
        ) from None
