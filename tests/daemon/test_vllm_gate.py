"""The vLLM plugin's gated projections (daemon/vllm/gate.py) against kbsync's own hooks, on a tiny Llama.

The plugin's layer logic runs here without vLLM: wrapped around the Hugging Face model's down projections it
must give the logits kbsync's hooks give, token for token, whether a sequence comes in one piece or in
chunks (as chunked prefill feeds it), and a version swap must take effect on the next forward pass.
"""
from __future__ import annotations

import pytest
import torch

from daemon.vllm.gate import BASE, GateState, gate_projection, served_version
from editor.hook import Mode
from editor.step import StepDelta, restore_state


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[0]                       # (T, V)


def _chunked_logits(model, ids, size: int) -> torch.Tensor:
    """The sequence fed in chunks of ``size`` tokens with the KV cache in between, as chunked prefill does."""
    out, past = [], None
    with torch.no_grad():
        for start in range(0, ids.shape[1], size):
            r = model(input_ids=ids[:, start:start + size], past_key_values=past, use_cache=True)
            out.append(r.logits[0])
            past = r.past_key_values
    return torch.cat(out)


def _plugin(em) -> GateState:
    """kbsync's hooks off the model, the plugin's gated projections on it."""
    em.close()
    state = GateState()
    for layer in em.layers:
        gate_projection(em.spec.projection_module(em.model, layer), layer, state)
    return state


@pytest.mark.parametrize("taken_out", ["unrouted", "masked"])   # today's removals; those of older ledgers
@pytest.mark.parametrize("history", ["token_history", "cascade_history", "prefix_history"])
def test_the_plugin_gives_kbsyncs_logits_whole_and_in_chunks(history, taken_out, request):
    em, text, deltas = request.getfixturevalue(history)
    gate = deltas[0].gate
    ours = _logits(em.model, text)
    with em.mode(Mode.OFF):
        base = _logits(em.model, text)
    restore_state(em, deltas[:1])
    ours_v1 = _logits(em.model, text)
    removal = StepDelta((), (), em.fingerprint(), "test", gate=gate, **{taken_out: ((0, 1),)})
    restore_state(em, [*deltas, removal])
    ours_removed = _logits(em.model, text)
    assert not torch.allclose(ours_removed, ours)                   # the removal changes what is served
    restore_state(em, deltas)
    assert (ours - base).abs().amax(dim=-1).gt(1e-3).any()         # some tokens route
    assert (ours - base).abs().amax(dim=-1).lt(1e-6).any()         # and some do not

    state = _plugin(em)
    assert torch.equal(_logits(em.model, text), base)               # nothing served yet: the base model
    state.swap(served_version(2, "digest", deltas, "cpu", gate))
    torch.testing.assert_close(_logits(em.model, text), ours, rtol=0, atol=1e-4)
    for size in (1, 5, 7):
        torch.testing.assert_close(_chunked_logits(em.model, text, size), ours, rtol=0, atol=1e-4)

    state.swap(served_version(1, "digest", deltas[:1], "cpu", gate))   # a rollback, on the next pass
    torch.testing.assert_close(_logits(em.model, text), ours_v1, rtol=0, atol=1e-4)
    state.swap(served_version(3, "digest", [*deltas, removal], "cpu", gate))   # a fact taken out
    torch.testing.assert_close(_logits(em.model, text), ours_removed, rtol=0, atol=1e-4)
    state.swap(BASE)
    assert torch.equal(_logits(em.model, text), base)


def test_a_per_sequence_history_is_refused_with_the_fix(token_history):
    em, text, deltas = token_history
    zscore = [d.__class__(d.layers, d.requests, d.model_fingerprint, d.config_digest, gate="zscore") for d in deltas]
    with pytest.raises(ValueError, match='per-token gates only.*gate = "prefix"'):
        served_version(2, "digest", zscore, "cpu", "zscore")


def test_the_cascade_history_drops_a_token_and_keeps_one_by_its_second_candidate(cascade_history):
    """What the cascade comparison above relies on: kbsync's hooks route token 12 at layer 1 and drop it at
    layer 2, keep token 4, which matches edits of both steps at layer 1, and drop token 9 by its edit's bar."""
    em, text, _ = cascade_history
    routes = {}
    hooks = [em.spec.projection_module(em.model, l).register_forward_hook(
        lambda m, i, o, l=l: routes.__setitem__(l, em.context.token_route[0].clone())) for l in em.layers]
    try:
        _logits(em.model, text)
    finally:
        for h in hooks:
            h.remove()
    assert routes[1][12] and not routes[2][12]
    assert routes[1][4] and routes[2][4]
    assert routes[1][9] and not routes[2][9]                      # its edit's bar (5) is out of reach


def test_the_plugin_keeps_the_first_layers_per_edit_bars(cascade_history):
    """A first-layer bar per edit (``route_margin``): the second step's edit keyed on token 12 gets a bar no
    token reaches, so token 12 is never routed, in kbsync's hooks and in the plugin alike."""
    from dataclasses import replace
    em, text, deltas = cascade_history
    first = deltas[1].layers[0]
    barred = replace(deltas[1], layers=(replace(first, bars=torch.tensor([5.0, 0.0])), *deltas[1].layers[1:]))
    history = [deltas[0], barred]
    restore_state(em, history)
    routes = {}
    h = em.spec.projection_module(em.model, 1).register_forward_hook(
        lambda m, i, o: routes.__setitem__(1, em.context.token_route[0].clone()))
    try:
        ours = _logits(em.model, text)
    finally:
        h.remove()
    assert not routes[1][12] and routes[1][4]                     # token 12 out from the first layer; 4 kept
    restore_state(em, deltas)
    assert not torch.allclose(_logits(em.model, text), ours)       # the bar changes what is served
    state = _plugin(em)
    state.swap(served_version(2, "digest", history, "cpu", "cascade"))
    torch.testing.assert_close(_logits(em.model, text), ours, rtol=0, atol=1e-4)
    for size in (1, 5):
        torch.testing.assert_close(_chunked_logits(em.model, text, size), ours, rtol=0, atol=1e-4)
