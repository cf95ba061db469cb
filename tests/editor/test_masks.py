"""Taking edits out: a masked edit adds nothing and routes nothing, an unrouted one routes nothing and keeps
its Δ (what the per-token gates' removals do); the rest of the history is untouched, and a history with
either stores, restores and exports exactly."""
import pytest
import torch

from editor.errors import DeltaMismatch
from editor.hook import Mode
from editor.model import EditableModel
from editor.step import StepDelta, apply_delta, masked_indices, restore_state, taking_out
from editor.export import stacked_factors


def _logits(em, ids):
    with torch.no_grad():
        return em.model(input_ids=ids).logits[0]


def _mask(em, masked):
    return StepDelta((), (), em.fingerprint(), "test", gate="token", masked=tuple(masked))


def _unroute(em, columns):
    return StepDelta((), (), em.fingerprint(), "test", gate="token", **taking_out("token", columns))


def _dropped(delta: StepDelta, column: int) -> StepDelta:
    """The same step without one edit (its columns of U, V and K gone): what masking that edit must equal."""
    from dataclasses import replace
    from editor.step import LayerDelta
    keep = [c for c in range(delta.layers[0].U.shape[1]) if c != column]
    return replace(delta, layers=tuple(LayerDelta(ld.layer, ld.U[:, keep], ld.V[:, keep], ld.K[:, keep], ld.alpha)
                                       for ld in delta.layers))


def test_a_masked_edit_stops_routing_and_the_others_hold(token_history):
    em, text, deltas = token_history
    before = _logits(em, text)
    with em.mode(Mode.OFF):
        base = _logits(em, text)
    routed = (before - base).abs().amax(-1) > 1e-5                  # (T,) the tokens an edit changes
    assert routed[4] and routed[9] and routed[12]

    apply_delta(em, _mask(em, [(0, 1)]))                            # step 0's edit at token 9 out
    after = _logits(em, text)
    assert (after[9] - before[9]).abs().max() > 1e-4                # token 9 changed
    # exactly the history whose step 0 never had that edit: it adds nothing and scores no token
    other = EditableModel(em.model, em.tokenizer, layers=(1, 2), gate="token", alpha0=0.5)
    em.close()
    try:
        restore_state(other, [_dropped(deltas[0], 1), deltas[1]])
        torch.testing.assert_close(_logits(other, text), after, rtol=0, atol=1e-5)
    finally:
        other.close()


def test_a_masked_history_round_trips_through_storage_and_export(token_history):
    em, text, deltas = token_history
    mask = _mask(em, [(0, 0)])
    apply_delta(em, mask)
    served = _logits(em, text)
    stored = [StepDelta.from_arrays(*d.to_arrays()) for d in (*deltas, mask)]
    assert stored[-1].masked == ((0, 0),) and masked_indices(stored) == [0]
    restore_state(em, stored)
    torch.testing.assert_close(_logits(em, text), served, rtol=0, atol=0)
    U, V = stacked_factors(stored)[1]
    assert U.shape[1] == 2                                          # 3 edits, 1 masked
    torch.testing.assert_close(U @ V.T, em.hooks[1].D, rtol=0, atol=1e-5)


def test_a_mask_of_an_edit_that_is_not_there_is_refused(token_history):
    em, text, deltas = token_history
    with pytest.raises(DeltaMismatch, match="masks edit 5 of step 0"):
        apply_delta(em, _mask(em, [(0, 5)]))
    with pytest.raises(DeltaMismatch, match="not before it"):
        restore_state(em, [_mask(em, [(0, 0)]), *deltas])


def test_an_unrouted_edit_routes_nothing_and_keeps_its_delta(token_history):
    em, text, deltas = token_history
    before = _logits(em, text)
    D = {l: h.D.clone() for l, h in em.hooks.items()}

    apply_delta(em, _unroute(em, [(0, 1)]))                         # step 0's edit at token 9: stops routing
    after = _logits(em, text)
    for l, h in em.hooks.items():                                   # Δ itself is untouched
        torch.testing.assert_close(h.D, D[l], rtol=0, atol=0)
    # token 9 no longer takes Δ; every token before it (the other edits' routes included) is exactly as before
    torch.testing.assert_close(after[:9], before[:9], rtol=0, atol=0)
    assert (after[9] - before[9]).abs().max() > 1e-4
    # stored and restored exactly; an export (Δ on every token) leaves the unrouted edit out
    stored = [StepDelta.from_arrays(*d.to_arrays()) for d in (*deltas, _unroute(em, [(0, 1)]))]
    assert stored[-1].unrouted == ((0, 1),) and stored[-1].masked == ()
    assert masked_indices(stored, "unrouted") == [1] and masked_indices(stored) == []
    restore_state(em, stored)
    torch.testing.assert_close(_logits(em, text), after, rtol=0, atol=0)
    U, V = stacked_factors(stored)[1]
    assert U.shape[1] == 2                                          # 3 edits, 1 unrouted


def test_the_per_sequence_gate_takes_an_edit_out_with_its_delta():
    # the z-score gate routes on ‖Δx‖: an edit can only stop answering by losing its part of Δ
    assert taking_out("zscore", [(0, 1)]) == {"masked": ((0, 1),)}
    assert taking_out("cascade", [(0, 1)]) == {"unrouted": ((0, 1),)}
