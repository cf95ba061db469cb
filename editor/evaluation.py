"""Consecutive-editing benchmark: T steps of B edits, the field's two metric families, perplexity, speed.

Token-level metrics (as EasyEdit and most toolkits report them), teacher-forced:
  reliability  share of the target's tokens predicted (argmax) on the edit prompt
  generality   the same on the paraphrase
  locality     share of the locality answer's tokens whose prediction is unchanged from the unedited model
Probability-based metrics (as MEMIT and AlphaEdit report them for COUNTERFACT), by mean NLL per token:
  efficacy             P(new) > P(true) on the edit prompt
  paraphrase_efficacy  the same on the paraphrase
  specificity          the locality prompt still prefers its own answer over the new target
Generation metrics (what a user sees; teacher forcing overstates success, arXiv 2502.11177), greedy
decoding of ``GEN_TOKENS`` tokens, at the end of a run:
  gen_success          the edit prompt's continuation starts with the new target
  gen_paraphrase       the same from the paraphrase
  gen_locality         the locality prompt's continuation is the unedited model's, token for token
Perplexity on held-out text, before and after. All metrics are means over every edit made so far.

Methods (same cases, same model, one state reset between them): ``comeba-hk``, ``no-hook`` (the same
update on every token), ``memit`` (sequential MEMIT: every token, no accumulation of earlier keys).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import EditConfig
from .errors import EditorError
from .hook import Mode
from .model import EditableModel
from .requests import EditRequest
from .stats import KeyStats
from .step import apply_delta, compute_delta, method_mode

METRICS = ("efficacy", "paraphrase_efficacy", "specificity", "reliability", "generality", "locality")
GEN_METRICS = ("gen_success", "gen_paraphrase", "gen_locality")
GEN_TOKENS = 8
SPLIT = ("targets_s", "keys_s", "solve_s", "routing_s")


@dataclass(frozen=True)
class Case:
    """One edit with its probes."""

    case_id: int
    subject: str
    prompt: str
    target_new: str
    target_true: str
    paraphrase: str
    loc_prompt: str
    loc_answer: str

    @property
    def request(self) -> EditRequest:
        return EditRequest(self.subject, self.prompt, self.target_new)


def load_cases(dataset: str, path: str | Path, span: tuple[int, int]) -> list[Case]:
    """Cases ``span`` = (a, b) of a COUNTERFACT or zsRE file in the formats of ``shared/data``."""
    try:
        records = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EditorError(f"dataset file {path} not found; pass --data PATH (COUNTERFACT or zsRE JSON)") from None
    except json.JSONDecodeError as exc:
        raise EditorError(f"dataset file {path} is not JSON: {exc}") from None
    a, b = span
    if not 0 <= a < b <= len(records):
        raise EditorError(f"cases {a}:{b} are outside the {len(records)} records of {path}")
    out = []
    for i, r in enumerate(records[a:b], start=a):
        try:
            if dataset == "counterfact":
                out.append(Case(int(r.get("case_id", i)), r["subject"], r["prompt"], r["target_new"], r["ground_truth"],
                                r["rephrase_prompt"], r["locality_prompt"], r["locality_ground_truth"]))
            elif dataset == "zsre":
                loc = r["loc"].removeprefix("nq question: ")
                true = (r.get("answers") or [r["pred"]])[0]
                out.append(Case(i, r["subject"], r["src"], r["alt"], true, r["rephrase"], loc, r["loc_ans"]))
            else:
                raise EditorError(f"unknown dataset {dataset!r}: use counterfact or zsre")
        except KeyError as exc:
            raise EditorError(f"record {i} of {path} has no field {exc}; is it a {dataset} file?") from None
    return out


# ----- scoring ------------------------------------------------------------------------------------
@dataclass
class _Probe:
    prompt: str
    answer: str


@torch.no_grad()
def _score(em: EditableModel, probes: list[_Probe], batch_size: int = 64) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    """For each probe: (mean NLL per answer token, argmax predictions at the answer, the answer's ids),
    teacher-forced on ``prompt + answer`` in the model's current modes."""
    tok = em.tokenizer
    encoded = []
    for p in probes:
        ids = tok(p.prompt)["input_ids"]
        ans = tok(p.answer if p.answer[:1].isspace() else " " + p.answer, add_special_tokens=False)["input_ids"]
        encoded.append((ids + ans[:-1], (len(ids) - 1, torch.tensor(ans))))
    order = sorted(range(len(probes)), key=lambda i: len(encoded[i][0]))      # batches of similar lengths
    out: list = [None] * len(probes)
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        rows = [encoded[k][0] for k in chunk]
        spans = [encoded[k][1] for k in chunk]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r)
            mask[j, :len(r)] = 1
        # the vocabulary projection only at the answer positions (a fraction of the B x T positions)
        sel = torch.tensor([j for j, (_, ans) in enumerate(spans) for _ in range(len(ans))])             # (N,)
        pos = torch.tensor([start + t for start, ans in spans for t in range(len(ans))])               # (N,)
        hidden = em.hidden_at(ids.to(em.device), mask.to(em.device), sel.to(em.device), pos.to(em.device))  # (N, d)
        logp = F.log_softmax(em.logits(hidden).float(), dim=-1).cpu()                                  # (N, V)
        at = 0
        for k, (start, ans) in zip(chunk, spans):
            lp = logp[at:at + len(ans)]                                          # (n_ans, V)
            at += len(ans)
            out[k] = (float(-lp.gather(1, ans[:, None]).mean()), lp.argmax(-1), ans)
    return out


def _probes(cases: list[Case]) -> list[_Probe]:
    """Six probes per case, in a fixed order (see ``_metrics``)."""
    out = []
    for c in cases:
        out += [_Probe(c.prompt, c.target_new), _Probe(c.prompt, c.target_true),
                _Probe(c.paraphrase, c.target_new), _Probe(c.paraphrase, c.target_true),
                _Probe(c.loc_prompt, c.loc_answer), _Probe(c.loc_prompt, c.target_new)]
    return out


def _metrics(scores, base_loc: list[torch.Tensor]) -> dict[str, float]:
    n = len(scores) // 6
    acc = {k: 0.0 for k in METRICS}
    for i in range(n):
        (pn, pn_pred, pn_ans), (pt, _, _), (qn, qn_pred, qn_ans), (qt, _, _), (ln, l_pred, _), (lx, _, _) = scores[6 * i:6 * i + 6]
        acc["efficacy"] += pn < pt
        acc["paraphrase_efficacy"] += qn < qt
        acc["specificity"] += ln < lx
        acc["reliability"] += float((pn_pred == pn_ans).float().mean())
        acc["generality"] += float((qn_pred == qn_ans).float().mean())
        acc["locality"] += float((l_pred == base_loc[i]).float().mean())
    return {k: round(v / max(n, 1), 4) for k, v in acc.items()}


def _generated(em: EditableModel, prompts: list[str], batch_size: int = 32) -> list[str]:
    """Greedy continuations of ``GEN_TOKENS`` tokens in the model's current modes."""
    out = []
    for i in range(0, len(prompts), batch_size):
        out += em.generate(prompts[i:i + batch_size], max_new_tokens=GEN_TOKENS)
    return out


def _gen_metrics(em: EditableModel, cases: list[Case], base_loc_text: list[str]) -> dict[str, float]:
    """The generation family over ``cases`` (greedy, current modes)."""
    starts = lambda text, target: text.strip().startswith(target.strip())      # noqa: E731
    edit = _generated(em, [c.prompt for c in cases])
    para = _generated(em, [c.paraphrase for c in cases])
    loc = _generated(em, [c.loc_prompt for c in cases])
    n = max(len(cases), 1)
    return {"gen_success": round(sum(starts(t, c.target_new) for t, c in zip(edit, cases)) / n, 4),
            "gen_paraphrase": round(sum(starts(t, c.target_new) for t, c in zip(para, cases)) / n, 4),
            "gen_locality": round(sum(a == b for a, b in zip(loc, base_loc_text)) / n, 4)}


@torch.no_grad()
def perplexity(em: EditableModel, texts: list[str], seq_len: int = 256) -> float:
    """Perplexity over ``texts`` cut into sequences of ``seq_len`` tokens (one per text), current modes."""
    tok, nll, count = em.tokenizer, 0.0, 0
    for t in texts:
        ids = tok(t, return_tensors="pt")["input_ids"][:, :seq_len].to(em.device)
        if ids.shape[1] < 2:
            continue
        logits = em.model(input_ids=ids).logits.float()
        nll += float(F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(nll / max(count, 1))


def heldout_texts(path: str | Path, n: int = 24, min_chars: int = 1200) -> list[str]:
    """The last ``n`` long paragraphs of a plain-text corpus (WikiText-2 validation in the benchmarks)."""
    lines = [l.strip() for l in Path(path).read_text(encoding="utf-8").splitlines()]
    long = [l for l in lines if len(l) >= min_chars and not l.startswith("=")]
    return long[-n:]


@torch.no_grad()
def generation_speed(em: EditableModel, mode: Mode, prompts: list[str], new_tokens: int, rounds: int) -> dict:
    """Tokens per second of greedy KV-cached generation, hooked (``mode``) against the base model (OFF),
    measured in alternating rounds in one run; ``ratio`` = hooked / base (1.0 = no slowdown)."""
    from .decoding import DONE, Continuation, Sampling, decode
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


# ----- the run -----------------------------------------------------------------------------------
def run_method(em: EditableModel, cases: list[Case], stats: KeyStats, cfg: EditConfig, *, method: str,
               steps: int, batch: int, eval_every: int, base_loc, texts: list[str], speed_at=(),
               speed_prompts: list[str] = (), progress=None, base_loc_text: list[str] | None = None,
               gen_every: int = 1) -> dict:
    """One method, from the base model: ``steps`` steps of ``batch`` cases each, evaluated every
    ``eval_every`` steps and at the end over every edit so far. ``em`` is reset before and after."""
    live = method_mode(method)
    em.reset()
    em.configure_gate(cfg.gate, cfg.alpha0_for())
    history, speed, split = [], {}, {k: 0.0 for k in SPLIT}
    edit_s = 0.0
    probes = _probes(cases)
    try:
        for s in range(steps + 1):
            done = s * batch
            if s and (s % eval_every == 0 or s == steps):
                with em.mode(live):
                    history.append({"step": s, "edits": done, **_metrics(_score(em, probes[:6 * done]), base_loc)})
                    if s == steps and base_loc_text is not None:
                        history[-1].update(_gen_metrics(em, cases[:done:gen_every], base_loc_text[:done:gen_every]))
            if done in speed_at:
                speed[str(done)] = generation_speed(em, live, list(speed_prompts), 32, 3)
            if s == steps:
                break
            chunk = cases[done:done + batch]
            t = time.perf_counter()
            delta = compute_delta(em, [c.request for c in chunk], stats, cfg, method=method)
            apply_delta(em, delta)
            edit_s += time.perf_counter() - t
            for k in SPLIT:
                split[k] += delta.metrics.get(k, 0.0)
            if progress is not None:
                progress(method, s + 1, steps, history[-1] if history else None)
        with em.mode(live):
            ppl = perplexity(em, texts)
        edits = steps * batch
        return {"method": method, "gate": em.gate, "edits": edits,
                "final": {k: history[-1][k] for k in METRICS + GEN_METRICS if k in history[-1]},
                "perplexity": round(ppl, 4), "history": history,
                "alpha": {str(l): round(h.alpha, 4) for l, h in em.hooks.items()},
                "speed": {"edit_seconds": round(edit_s, 2), "edits_per_s": round(edits / edit_s, 4) if edit_s else None,
                          "seconds_per_step": round(edit_s / steps, 2),
                          "split_s": {k: round(v, 2) for k, v in split.items()},
                          "inference": speed}}
    finally:
        em.reset()


def evaluate(em: EditableModel, cases: list[Case], stats: KeyStats, cfg: EditConfig, *, methods=("comeba-hk",),
             gen_every: int = 1,
             steps: int, batch: int, eval_every: int = 0, heldout: list[str] = (), speed_at=(),
             stats_seconds: float | None = None, progress=None) -> dict:
    """The whole report: the unedited model's metrics and perplexity, then each method side by side."""
    for m in methods:
        method_mode(m)
    if steps * batch > len(cases):
        raise EditorError(f"{steps} steps x {batch} edits need {steps * batch} cases, the range holds {len(cases)}")
    cases = cases[:steps * batch]
    t0 = time.perf_counter()
    em.reset()
    with em.mode(Mode.OFF):
        base_scores = _score(em, _probes(cases))
        base_loc = [base_scores[6 * i + 4][1] for i in range(len(cases))]
        base_loc_text = [None] * len(cases)               # greedy answers of the unedited model, every gen_every-th
        base_loc_text[::gen_every] = _generated(em, [c.loc_prompt for c in cases[::gen_every]])
        base = {"final": {**_metrics(base_scores, base_loc), **_gen_metrics(em, cases[::gen_every], base_loc_text[::gen_every])},
                "perplexity": round(perplexity(em, list(heldout)), 4)}
    speed_prompts = [c.prompt for c in cases[:8]]
    runs = {}
    for m in methods:
        runs[m] = run_method(em, cases, stats, cfg, method=m, steps=steps, batch=batch,
                             eval_every=eval_every or steps, base_loc=base_loc, texts=list(heldout),
                             speed_at=set(speed_at), speed_prompts=speed_prompts, progress=progress,
                             base_loc_text=base_loc_text, gen_every=gen_every)
    first = runs[methods[0]]
    return {"edits": steps * batch, "steps": steps, "batch": batch, "seconds": round(time.perf_counter() - t0, 2),
            "method": methods[0], "final": first["final"], "perplexity": first["perplexity"],
            "base": base, "methods": runs, "stats_seconds": stats_seconds,
            "config": cfg.to_dict()}
