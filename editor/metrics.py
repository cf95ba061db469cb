"""The editing metrics of one set of edits: what each probe scores and what the field's metrics mean.

Token-level metrics (as EasyEdit and most toolkits report them), teacher-forced:
  reliability  share of the target's tokens predicted (argmax) on the edit prompt
  generality   the same on the paraphrase
  locality     share of the locality answer's tokens whose prediction is unchanged from the unedited model
Probability-based metrics (as MEMIT and AlphaEdit report them for COUNTERFACT), by mean NLL per token:
  efficacy             P(new) > P(true) on the edit prompt
  paraphrase_efficacy  the same on the paraphrase
  specificity          the locality prompt still prefers its own answer over the new target
Generation metrics (what a user sees; teacher forcing overstates success, arXiv 2502.11177), greedy
decoding of ``GEN_TOKENS`` tokens:
  gen_success          the edit prompt's continuation starts with the new target
  gen_paraphrase       the same from the paraphrase
  gen_locality         the locality prompt's continuation is the unedited model's, token for token
Perplexity on held-out text. Every metric is a mean over the cases given, in the model's current modes.
The benchmark that runs edits and calls these lives in the ``evaluation`` package.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import EditableModel
from .requests import EditRequest

METRICS = ("efficacy", "paraphrase_efficacy", "specificity", "reliability", "generality", "locality")
GEN_METRICS = ("gen_success", "gen_paraphrase", "gen_locality")
GEN_TOKENS = 8


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


@dataclass(frozen=True)
class Probe:
    """A prompt and the answer whose tokens are scored after it."""

    prompt: str
    answer: str


def case_probes(cases: list[Case]) -> list[Probe]:
    """Six probes per case, in the fixed order ``probe_metrics`` reads them in."""
    out = []
    for c in cases:
        out += [Probe(c.prompt, c.target_new), Probe(c.prompt, c.target_true),
                Probe(c.paraphrase, c.target_new), Probe(c.paraphrase, c.target_true),
                Probe(c.loc_prompt, c.loc_answer), Probe(c.loc_prompt, c.target_new)]
    return out


@torch.no_grad()
def score_probes(em: EditableModel, probes: list[Probe], batch_size: int = 64) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
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


def probe_localities(scores, base_loc: list[torch.Tensor]) -> list[float]:
    """Per case of ``score_probes(case_probes(...))``: its locality, the share of its locality answer's tokens
    whose argmax is the unedited model's (``base_loc``)."""
    return [float((scores[6 * i + 4][1] == base_loc[i]).float().mean()) for i in range(len(scores) // 6)]


def probe_metrics(scores, base_loc: list[torch.Tensor]) -> dict[str, float]:
    """The teacher-forced ``METRICS`` from ``score_probes`` of ``case_probes``; ``base_loc``: the unedited
    model's predictions on each case's locality answer."""
    n = len(scores) // 6
    acc = {k: 0.0 for k in METRICS}
    acc["locality"] = sum(probe_localities(scores, base_loc))
    for i in range(n):
        (pn, pn_pred, pn_ans), (pt, _, _), (qn, qn_pred, qn_ans), (qt, _, _), (ln, _, _), (lx, _, _) = scores[6 * i:6 * i + 6]
        acc["efficacy"] += pn < pt
        acc["paraphrase_efficacy"] += qn < qt
        acc["specificity"] += ln < lx
        acc["reliability"] += float((pn_pred == pn_ans).float().mean())
        acc["generality"] += float((qn_pred == qn_ans).float().mean())
    return {k: round(v / max(n, 1), 4) for k, v in acc.items()}


def generated(em: EditableModel, prompts: list[str], batch_size: int = 32) -> list[str]:
    """Greedy continuations of ``GEN_TOKENS`` tokens in the model's current modes."""
    out = []
    for i in range(0, len(prompts), batch_size):
        out += em.generate(prompts[i:i + batch_size], max_new_tokens=GEN_TOKENS)
    return out


def generation_metrics(em: EditableModel, cases: list[Case], base_loc_text: list[str]) -> dict[str, float]:
    """The ``GEN_METRICS`` over ``cases`` (greedy, current modes); ``base_loc_text``: the unedited model's
    continuations of each locality prompt."""
    starts = lambda text, target: text.strip().startswith(target.strip())      # noqa: E731
    edit = generated(em, [c.prompt for c in cases])
    para = generated(em, [c.paraphrase for c in cases])
    loc = generated(em, [c.loc_prompt for c in cases])
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
