"""Inference speed of an edited model: greedy KV-cached decoding, hooked against the base model."""
from __future__ import annotations

import time

import torch

from editor.decoding import DONE, Continuation, Sampling, decode
from editor.hook import Mode
from editor.model import EditableModel


@torch.no_grad()
def generation_speed(em: EditableModel, mode: Mode, prompts: list[str], new_tokens: int, rounds: int) -> dict:
    """Tokens per second of greedy KV-cached generation, hooked (``mode``) against the base model (OFF),
    measured in alternating rounds in one run; ``ratio`` = hooked / base (1.0 = no slowdown)."""
    ids = [em.tokenizer(p)["input_ids"] for p in prompts]
    times: dict[str, list[float]] = {"hooked": [], "base": []}         # tokens/s per round
    made: list[int] = []

    def run():                      # the one decoder, greedy; an early end-of-sequence is counted as it is
        made.clear()
        rows = [Continuation(r, Sampling(max_tokens=new_tokens, temperature=0.0),
                             lambda e: made.append(e[3]) if e[0] == DONE else None) for r in ids]
        t = time.perf_counter()
        decode(em, rows)
        return sum(made) / (time.perf_counter() - t)

    with em.mode(mode):
        run()                                                                   # warm-up
    for _ in range(rounds):
        for name, m in (("hooked", mode), ("base", Mode.OFF)):
            with em.mode(m):
                times[name].append(run())
    best = {k: max(v) for k, v in times.items()}                                # tokens/s of the best round
    return {"tokens_per_s": round(best["hooked"], 1), "base_tokens_per_s": round(best["base"], 1),
            "ratio": round(best["hooked"] / best["base"], 4), "rounds": rounds, "tokens": len(prompts) * new_tokens}
