"""The verify gate: a step is committed only if the edited model gives its new targets and keeps the canaries.

``[verify] min_success``: the share of the step's prompts whose next token must be its new target's first
token. ``[verify] canaries``: prompts whose next token the step must leave as the model answered just before
it (at least ``min_canary`` of them). The gate judges each step by what that step changes, so the canaries
that earlier committed steps moved do not refuse every later step; how many canaries the whole history has
moved from the unedited model is measured too (``drifted``: logged with each commit) for the operator.
"""
from __future__ import annotations

import torch

from editor.hook import Mode
from editor.model import EditableModel
from editor.requests import EditRequest

from .config import VerifyConfig


class VerifyGate:
    """Checks an edited (not yet committed) model; owns the canaries' unedited answers."""

    def __init__(self, cfg: VerifyConfig):
        self.cfg = cfg
        self._canary_base = None                      # canaries' next tokens on the unedited model
        self.drifted: int | None = None               # canaries the last checked model answers unlike the unedited one

    @property
    def _checks_canaries(self) -> bool:
        return self.cfg.enabled and bool(self.cfg.canaries)

    def canary_answers(self, em: EditableModel) -> torch.Tensor | None:
        """The canaries' next tokens on ``em`` as it is now: take them before a step is applied."""
        if not self._checks_canaries:
            return None
        return em.next_token_logits(list(self.cfg.canaries)).argmax(-1)

    def refuses(self, em: EditableModel, requests: list[EditRequest],
                before: torch.Tensor | None) -> str | None:
        """None if ``em`` (the step applied) passes, else the reason it does not. ``before``: the canaries'
        answers just before the step (:meth:`canary_answers`)."""
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
            if before is None:
                raise ValueError("VerifyGate.refuses needs the canaries' answers from before the step")
            if self._canary_base is None:
                with em.mode(Mode.OFF):
                    self._canary_base = em.next_token_logits(list(gate.canaries)).argmax(-1)
            after = em.next_token_logits(list(gate.canaries)).argmax(-1)
            self.drifted = int((after != self._canary_base).sum())
            kept = int((after == before).sum())
            if kept < gate.min_canary * len(gate.canaries):
                return (f"verify gate: this step changed the answer of {len(gate.canaries) - kept} of "
                        f"{len(gate.canaries)} canary prompts ({kept} kept theirs), [verify] min_canary is "
                        f"{gate.min_canary:.0%}")
        return None
