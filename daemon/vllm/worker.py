"""The worker side: gate the edited down projections of the model this vLLM worker runs, at a given version.

``load_version`` is sent to every worker by the engine core (``collective_rpc``) between two steps.
"""
from __future__ import annotations

import logging

from editor.registry import spec_for

from .gate import GateState, gate_projection, served_version
from .versions import VersionSource

log = logging.getLogger("vllm.kbsync")   # under vLLM's logger: its handler and format

_source: VersionSource | None = None
_states: dict[int, GateState] = {}      # id(model) -> its gate state


def load_version(worker, version: int | None) -> tuple[int | None, str]:
    """Serve ``version`` (None = the base model) on this worker's model; returns (version, chain digest)."""
    global _source
    if _source is None:
        _source = VersionSource.from_env()
    model = worker.get_model() if hasattr(worker, "get_model") else worker.model_runner.get_model()
    chain = _source.chain(version)
    device = next(model.parameters()).device
    served = served_version(version, chain.digest, chain.deltas, device, chain.gate)
    state = _states.setdefault(id(model), GateState())
    spec = spec_for(model.config)
    for layer, f in served.layers.items():
        module = model.get_submodule(spec.projection_name(layer))
        tp = getattr(module, "tp_size", 1)
        if tp != 1:
            raise ValueError(f"tensor parallelism {tp}: the kbsync plugin gates whole down projections and serves "
                             "with --tensor-parallel-size 1; scale out with replicas (docs/serving.md)")
        d_out, d_in = module.output_size, module.input_size   # the weight itself may be repacked (CPU)
        if (d_out, d_in) != (f.U.shape[0], f.V.shape[0]):
            raise ValueError(f"version {version} edits layer {layer} as ({f.U.shape[0]} x {f.V.shape[0]}) but this "
                             f"model's projection is ({d_out} x {d_in}): serve the model the versions were made on")
        gate_projection(module, layer, state)
    state.swap(served)
    log.info("kbsync: serving version %s (digest %s, %d edited layers)", version, chain.digest[:12],
             len(served.layers))
    return version, chain.digest
