"""The verify gate: a step is committed only if the edited model gives its new targets and keeps the canaries.

``[verify] min_success``: the share of the step's prompts whose next token must be its new target's first
token. ``[verify] canaries``: prompts whose next token must stay what the unedited model said (at least
``min_canary`` of them); the unedited answers are computed once per process and kept.
"""
from __future__ import annotations

from editor.hook import Mode
from editor.model import EditableModel
from editor.requests import EditRequest

from .config import VerifyConfig


class VerifyGate:
    """Checks an edited (not yet committed) model; owns the canaries' unedited answers."""

    def __init__(self, cfg: VerifyConfig):
        self.cfg = cfg
        self._canary_base = None                      # canaries' next tokens on the unedited model

    def refuses(self, em: EditableModel, requests: list[EditRequest]) -> str | None:
        """None if ``em`` (the step applied) passes, else the reason it does not."""
        gate = self.cfg
        if not gate.enabled:
            return None
        tok = em.tokenizer
        top = em.next_token_logits([r.text for r in requests]).argmax(-1).tolist()
        wanted = [tok(r.target_text, add_special_tokens=False)["input_ids"][0] for r in requests]
        hits = sum(a == b for a, b in zip(top, wanted))
        if hits < gate.min_success * len(requests):
            return (f"verify gate: {hits} of {len(requests)} prompts give their new target, "
                    f"[verify] min_success is {gate.min_success:.0%}")
        if gate.canaries:
            if self._canary_base is None:
                with em.mode(Mode.OFF):
                    self._canary_base = em.next_token_logits(list(gate.canaries)).argmax(-1)
            kept = int((em.next_token_logits(list(gate.canaries)).argmax(-1) == self._canary_base).sum())
            if kept < gate.min_canary * len(gate.canaries):
                return (f"verify gate: {kept} of {len(gate.canaries)} canary prompts kept the unedited model's "
                        f"answer, [verify] min_canary is {gate.min_canary:.0%}")
        return None
