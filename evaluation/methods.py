"""The editing methods the benchmark compares. Only ``comeba-hk`` ships; the others are ablations that exist
here, not in the editor's step, which exposes the switches they flip (``route``, ``accumulate``,
``key_steps``)."""
from __future__ import annotations

from dataclasses import dataclass

from editor.errors import EditorError
from editor.hook import GATES, Mode


@dataclass(frozen=True)
class Method:
    """How a method edits: ``mode`` is how the edited model runs (routed hooks, or Δ on every token);
    ``accumulate``: the solve counts the keys of earlier steps (Σ K Kᵀ), or forgets them; ``gate``: the
    routing gate, when not the configured one (``comeba-hk@zscore``: the paper's rule beside the default);
    ``key_steps``: Σ K Kᵀ over the latest this many steps only (0: every earlier step)."""

    name: str
    mode: Mode
    accumulate: bool
    gate: str | None = None
    key_steps: int = 0

    def step_options(self) -> dict:
        """The keyword arguments of ``editor.step.compute_delta`` for this method."""
        return {"route": self.mode, "accumulate": self.accumulate, "key_steps": self.key_steps}


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("comeba-hk", Mode.VALIDATED, True),      # the shipped editor: hook layers route Δ
    Method("no-hook", Mode.TEMPORARY, True),        # the paper's ablation: the same update on every token
    Method("memit", Mode.TEMPORARY, False),         # sequential MEMIT: every token, C = λ E[k kᵀ] only
    # routed like comeba-hk, each step solved with C = λ E[k kᵀ] only (under the prefix gate no later step
    # reaches an older edit's tokens, so Σ K Kᵀ protects nothing there)
    Method("comeba-hk-fresh", Mode.VALIDATED, False),
    # between the two: Σ K Kᵀ over the last 50 steps only (new edits on a deep history are written nearly as
    # fully as without it; docs/benchmarks.md, "The middle ways, measured at depth")
    Method("comeba-hk-window", Mode.VALIDATED, True, key_steps=50),
)}


def method(name: str) -> Method:
    """A method by name: one of ``METHODS``, or ``comeba-hk@GATE`` (the shipped editor routed by another gate)."""
    base, at, gate = name.partition("@")
    if at and base == "comeba-hk" and gate in GATES:
        return Method(name, Mode.VALIDATED, True, gate)
    if not at and name in METHODS:
        return METHODS[name]
    raise EditorError(f"unknown editing method {name!r}; choose one of {', '.join(METHODS)}, or comeba-hk@GATE "
                      f"with GATE one of {', '.join(GATES)}")
