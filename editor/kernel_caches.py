"""Bounding the CPU kernel caches that grow with every new tensor shape.

On CPU, bfloat16 matmuls run through oneDNN (PyTorch's ``mkldnn``/ideep path). Both oneDNN
(``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and ideep (``LRU_CACHE_CAPACITY``) keep a compiled kernel, with its
scratch buffers, for every shape they meet, up to 1,024 entries each. An edit step meets new shapes every
time (its prompts' lengths, the facts still optimising, the growing rank of Δ), so a long-running process
filled those caches step after step: about 30 MB more resident memory per step with bfloat16, while the
live tensors stayed flat (docs/benchmarks.md, "Memory over a long history").

One iteration of the target optimisation reuses a few dozen kernels, so a capacity of 128 keeps every
kernel a step reuses and bounds what the caches hold. Both libraries read the variables when they first
run a kernel, so this is set when ``editor`` is imported; a value already in the environment wins.
"""
from __future__ import annotations

import os

CAPACITY = 128
VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_kernel_caches(capacity: int = CAPACITY) -> dict[str, str]:
    """Set both cache capacities to ``capacity`` unless the environment sets them; what is in force."""
    for name in VARIABLES:
        os.environ.setdefault(name, str(capacity))
    return {name: os.environ[name] for name in VARIABLES}
