"""Edit requests and their tokenised form: the rows every part of a step runs through the model."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import EditRequestError


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt`` contains ``subject`` (or is a template with ``{}``); ``target`` follows it."""

    subject: str
    prompt: str
    target: str

    def __post_init__(self):
        for name in ("subject", "prompt", "target"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise EditRequestError(f"edit request: `{name}` must be a non-empty string, got {getattr(self, name)!r}")
        if "{}" not in self.prompt and self.subject not in self.prompt:
            raise EditRequestError(
                f"edit request: prompt {self.prompt!r} does not contain subject {self.subject!r}; "
                "include the subject verbatim or write the prompt as a template with '{}'")

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1) if "{}" in self.prompt else self.prompt

    @property
    def target_text(self) -> str:
        """The target as it continues the prompt (a leading space unless it has one)."""
        return self.target if self.target[:1].isspace() else " " + self.target


@dataclass
class Row:
    ids: list[int]
    lookup: int            # position of the subject's last token
    fact: int              # index of the request in the batch
    target_from: int = -1  # first position whose next-token prediction is a target token (-1: none)
    n_target: int = 0


def subject_row(tok, text: str, subject: str, fact: int, occurrence: str = "last") -> Row:
    """Tokenise ``text`` and find the last token of ``subject`` in it (by character offsets)."""
    start = text.rfind(subject) if occurrence == "last" else text.find(subject)
    if start < 0:
        raise EditRequestError(f"subject {subject!r} not found in {text!r}")
    end = start + len(subject)
    enc = tok(text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    lookup = max(i for i, (a, b) in enumerate(offsets) if a < end and b > a)
    return Row(list(enc["input_ids"]), lookup, fact)


class StepBatch:
    """The tokenised rows of one step: rewrite rows (context x prompt + target), key rows, KL rows."""

    def __init__(self, tok, requests: list[EditRequest], contexts: tuple[str, ...], kl_template: str):
        if not requests:
            raise EditRequestError("a step needs at least one edit request")
        self.requests = requests
        self.target_ids = [tok(r.target_text, add_special_tokens=False)["input_ids"] for r in requests]
        self.rewrite: list[Row] = []
        self.keys: list[Row] = []     # contexts x prompts, no target; contexts[0] == "{}" gives h_L
        for j, r in enumerate(requests):
            for c in contexts:
                row = subject_row(tok, c.replace("{}", r.text, 1), r.subject, j)
                self.keys.append(Row(list(row.ids), row.lookup, j))
                t = self.target_ids[j]
                row.target_from = len(row.ids) - 1
                row.n_target = len(t)
                row.ids = row.ids + t[:-1]
                self.rewrite.append(row)
        self.kl = [subject_row(tok, kl_template.replace("{}", r.subject, 1), r.subject, j) for j, r in enumerate(requests)]
        self.plain = [row for row in self.keys if row is self.keys[row.fact * len(contexts)]]
        self.pad_id = tok.pad_token_id

    def __len__(self) -> int:
        return len(self.requests)

    def tensors(self, rows: list[Row], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (input_ids, attention_mask) for ``rows``."""
        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r.ids)] = torch.tensor(r.ids)
            mask[i, :len(r.ids)] = 1
        return ids.to(device), mask.to(device)
