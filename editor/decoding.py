"""The one decoder: batched, left-padded rows, KV cache, per-row sampling, stop and length.

Every answer kbsync gives goes through it: the OpenAI routes, ``kbsync query`` and the admin query
(``EditableModel.generate``: greedy rows), and the evaluation's generation metrics.

:func:`decode` runs several independent rows (one per completion choice) through the model together and
reports each row's text as it grows. Every row keeps its own sampling parameters and random generator, so
a row's tokens do not depend on its neighbours: the hook layers route each sequence by statistics over its
own real tokens (the attention mask hides the left padding), and a finished row leaves the batch (its KV
cache rows and its carried routing statistics are dropped together, so the rows stay aligned).

The caller holds the model lock for the whole call, so every token of every row comes from one version.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import EditableModel

TEXT, DONE = "text", "done"      # the events a row reports: (TEXT, index, delta) and (DONE, index, reason, n)


@dataclass(frozen=True)
class Sampling:
    """One row's decoding parameters (validated by the API)."""

    max_tokens: int = 16
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0


@dataclass(eq=False)
class Continuation:
    """One sequence to continue. ``emit`` is called from the decoding thread with this row's events."""

    prompt: list[int]
    sampling: Sampling
    emit: Callable[[tuple], None]
    index: int = 0                                       # the choice index within its request
    cancelled: Callable[[], bool] = field(default=lambda: False)


@torch.no_grad()
def decode(em: "EditableModel", rows: list[Continuation]) -> None:
    """Continue every row until its stop text, an end-of-sequence token or ``max_tokens``."""
    if not rows:
        return
    tok, model, device = em.tokenizer, em.model, em.device
    eos = _eos_ids(em)
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos), 0)
    B, L = len(rows), max(len(r.prompt) for r in rows)
    ids = torch.full((B, L), pad, dtype=torch.long)                      # (B, L) left-padded
    mask = torch.zeros(B, L, dtype=torch.long)                           # (B, L) 1 = real token
    for i, r in enumerate(rows):
        ids[i, L - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
        mask[i, L - len(r.prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)                             # (B, L) positions of real tokens
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    past, logits = _cache(out), out.logits[:, -1].float()              # (B, V)
    states = [_RowState(r, tok, eos) for r in rows]
    live = list(range(B))                                                # rows[live[j]] is batch row j
    gens = [_generator(r.sampling, device) for r in rows]
    while True:
        picked = _pick(logits, [rows[i].sampling for i in live], [gens[i] for i in live])
        keep = [j for j, i in enumerate(live) if not states[i].push(picked[j])]
        if not keep:
            return
        if len(keep) < len(live):                                        # finished rows leave the batch
            sel = torch.tensor(keep, device=device)
            past.batch_select_indices(sel)
            mask, pos = mask[sel], pos[sel]
            em.context.keep_rows(sel, len(live))                         # the routing statistics carried per row
            live = [live[j] for j in keep]
        nxt = torch.tensor([[states[i].tokens[-1]] for i in live], device=device)   # (b, 1)
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], 1)         # (b, T + 1)
        pos = pos[:, -1:] + 1                                            # (b, 1)
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_arg: past})
        past, logits = _cache(out), out.logits[:, -1].float()          # (b, V)


class _RowState:
    """A row's generated tokens and the text already reported; stop texts are cut, never reported."""

    def __init__(self, row: Continuation, tok, eos: set[int]):
        self.row, self.tok, self.eos = row, tok, eos
        self.tokens: list[int] = []
        self.sent = 0                                                    # characters reported so far

    def push(self, token: int) -> bool:
        """Add one sampled token; True when the row is finished (its DONE event sent)."""
        row = self.row
        if row.cancelled():
            return True
        self.tokens.append(token)
        if token in self.eos:
            return self._finish(self._text(self.tokens[:-1]), "stop")
        text = self._text(self.tokens)
        cut = min((k for k in (text.find(s) for s in row.sampling.stop) if k >= 0), default=-1)
        if cut >= 0:
            return self._finish(text[:cut], "stop")
        if len(self.tokens) >= row.sampling.max_tokens:
            return self._finish(text, "length")
        safe = len(text) - _held_back(text, row.sampling.stop)
        if safe > self.sent:
            row.emit((TEXT, row.index, text[self.sent:safe]))
            self.sent = safe
        return False

    def _finish(self, text: str, reason: str) -> bool:
        if len(text) > self.sent:
            self.row.emit((TEXT, self.row.index, text[self.sent:]))
        self.row.emit((DONE, self.row.index, reason, len(self.tokens)))
        return True

    def _text(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters to hold: an unfinished UTF-8 character, or a possible stop text start."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return max(hold, k)
    return hold


def _pick(logits: torch.Tensor, params: list[Sampling], gens: list[torch.Generator | None]) -> list[int]:
    """The next token of each row (b, V) -> b ints: argmax at temperature 0, else top-p sampling."""
    greedy = logits.argmax(-1).tolist()                                  # (b,)
    out = []
    for j, (p, g) in enumerate(zip(params, gens)):
        if p.temperature == 0:
            out.append(greedy[j])
            continue
        probs = torch.softmax(logits[j] / p.temperature, -1)             # (V,)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)                # (V,), (V,)
            outside = sorted_p.cumsum(0) - sorted_p >= p.top_p           # (V,) beyond the nucleus
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p.masked_fill(outside, 0.0))
        out.append(int(torch.multinomial(probs, 1, generator=g)))
    return out


def _generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    if sampling.temperature == 0:
        return None
    return torch.Generator(device=device).manual_seed(sampling.seed)


def _cache(out):
    """The KV cache of a model output (``cache`` in transformers >= 5.x, ``past_key_values`` before)."""
    return out["cache"] if "cache" in out.keys() else out["past_key_values"]


def _eos_ids(em: "EditableModel") -> set[int]:
    ids = set()
    for source in (getattr(em.model, "generation_config", None), em.model.config, em.tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else (value or []))
    return ids


def greedy(em: "EditableModel", prompts: list[list[int]], max_tokens: int) -> list[str]:
    """Greedy continuations of tokenised prompts, at most ``max_tokens`` tokens each, in the current modes."""
    texts = [[] for _ in prompts]

    def collect(i):
        return lambda event: texts[i].append(event[2]) if event[0] == TEXT else None

    decode(em, [Continuation(p, Sampling(max_tokens=max_tokens, temperature=0.0), collect(i), index=i)
                for i, p in enumerate(prompts)])
    return ["".join(t) for t in texts]
