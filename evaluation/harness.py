"""The run: T consecutive steps of B edits per method, each from the base model, evaluated on the way; the
unedited model's metrics and perplexity first. Metric definitions: editor/metrics.py."""
from __future__ import annotations

import time
from pathlib import Path

from daemon.memory import release_freed_memory
from editor.config import EditConfig
from editor.errors import EditorError
from editor.hook import Mode
from editor.metrics import (GEN_METRICS, METRICS, Case, case_probes, generated, generation_metrics, perplexity,
                            probe_localities, probe_metrics, score_probes)
from editor.model import EditableModel
from editor.stats import KeyStats
from editor.step import apply_delta, compute_delta, restore_state

from .cases import first_contesting
from .checkpoint import RunCheckpoint
from .methods import method
from .speed import generation_speed

SPLIT = ("targets_s", "keys_s", "solve_s", "routing_s")
#: locality over the scored cases whose locality probe no edit made so far contests (evaluation/cases.py)
UNCONTESTED = "locality_uncontested"


def heldout_texts(path: str | Path, n: int = 24, min_chars: int = 1200) -> list[str]:
    """The last ``n`` long paragraphs of a plain-text corpus (WikiText-2 validation in the benchmarks)."""
    lines = [l.strip() for l in Path(path).read_text(encoding="utf-8").splitlines()]
    long = [l for l in lines if len(l) >= min_chars and not l.startswith("=")]
    return long[-n:]


def run_method(em: EditableModel, cases: list[Case], stats: KeyStats, cfg: EditConfig, *, method_name: str,
               steps: int, batch: int, eval_every: int, base_loc, texts: list[str], speed_at=(),
               speed_prompts: list[str] = (), progress=None, base_loc_text: list[str] | None = None,
               gen_every: int = 1, score_every: int = 1, checkpoint: RunCheckpoint | None = None) -> dict:
    """One method, from the base model: ``steps`` steps of ``batch`` cases each, evaluated every
    ``eval_every`` steps and at the end over the edits so far (teacher-forced on every ``score_every``-th,
    whose unedited predictions ``base_loc`` holds, greedy on every ``gen_every``-th, perplexity). ``em`` is reset before and after. With ``checkpoint``, every step is saved
    and a run saved before goes on from its last step."""
    how = method(method_name)
    live = how.mode
    em.reset()
    gate = how.gate or cfg.gate
    em.configure_gate(gate, cfg.alpha0_for(gate), cfg.confirm_alpha)
    history, speed, split = [], {}, {k: 0.0 for k in SPLIT}
    edit_s, start = 0.0, 0
    if checkpoint is not None:
        saved, record = checkpoint.steps(method_name)
        if saved:
            restore_state(em, saved)
            history, speed, split, edit_s = record["history"], record["speed"], record["split"], record["edit_s"]
            start = len(saved)
    probes = case_probes(cases[::score_every])
    contested_from = first_contesting(cases[::score_every], cases)             # per scored case: an edit index or None
    try:
        for s in range(start, steps + 1):
            done = s * batch
            if s and (s % eval_every == 0 or s == steps) and not (history and history[-1]["step"] == s):
                with em.mode(live):
                    n = len(range(0, done, score_every))                # the scored edits so far
                    scores = score_probes(em, probes[:6 * n])
                    row = {"step": s, "edits": done, **probe_metrics(scores, base_loc[:n]),
                           UNCONTESTED: _uncontested(probe_localities(scores, base_loc[:n]), contested_from, done)}
                    if base_loc_text is not None:
                        row.update(generation_metrics(em, cases[:done:gen_every], base_loc_text[:done:gen_every]))
                    if texts:
                        row["perplexity"] = round(perplexity(em, texts), 4)
                row["edit_seconds"] = round(edit_s, 1)                  # editing time so far: step time by depth
                history.append(row)
                if checkpoint is not None:
                    checkpoint.save_record(method_name, s, _record(history, speed, split, edit_s))
            if done in speed_at and str(done) not in speed:
                speed[str(done)] = generation_speed(em, live, list(speed_prompts), 32, 3)
            if s == steps:
                break
            chunk = cases[done:done + batch]
            t = time.perf_counter()
            delta = compute_delta(em, [c.request for c in chunk], stats, cfg, **how.step_options())
            apply_delta(em, delta)
            edit_s += time.perf_counter() - t
            for k in SPLIT:
                split[k] += delta.metrics.get(k, 0.0)
            if checkpoint is not None:
                checkpoint.save_step(method_name, s + 1, delta, _record(history, speed, split, edit_s))
            del delta
            release_freed_memory()          # or a long run's heap fragments: +45 MB RSS per step at 4,000 edits
            if progress is not None:
                progress(method_name, s + 1, steps, history[-1] if history else None)
        ppl = history[-1].get("perplexity") if history and history[-1]["step"] == steps else None
        if ppl is None:
            with em.mode(live):
                ppl = perplexity(em, texts)
        edits = steps * batch
        return {"method": method_name, "gate": em.gate, "edits": edits,
                "final": {k: history[-1][k] for k in METRICS + (UNCONTESTED,) + GEN_METRICS if k in history[-1]},
                "perplexity": round(ppl, 4), "history": history,
                "alpha": {str(l): round(h.alpha, 4) for l, h in em.hooks.items()},
                "speed": {"edit_seconds": round(edit_s, 2), "edits_per_s": round(edits / edit_s, 4) if edit_s else None,
                          "seconds_per_step": round(edit_s / steps, 2),
                          "split_s": {k: round(v, 2) for k, v in split.items()},
                          "inference": speed}}
    finally:
        em.reset()


def _uncontested(localities: list[float], contested_from: list[int | None], done: int) -> float:
    """The mean locality of the cases whose probe none of the first ``done`` edits contests (1.0: none left)."""
    kept = [x for x, j in zip(localities, contested_from) if j is None or j >= done]
    return round(sum(kept) / len(kept), 4) if kept else 1.0


def _record(history, speed, split, edit_s) -> dict:
    return {"history": history, "speed": speed, "split": split, "edit_s": edit_s}


def evaluate(em: EditableModel, cases: list[Case], stats: KeyStats, cfg: EditConfig, *, methods=("comeba-hk",),
             gen_every: int = 1, score_every: int = 1,
             steps: int, batch: int, eval_every: int = 0, heldout: list[str] = (), speed_at=(),
             stats_seconds: float | None = None, progress=None, checkpoint: Path | None = None) -> dict:
    """The whole report: the unedited model's metrics and perplexity, then each method side by side. With
    ``checkpoint`` (a folder), the run is saved as it goes and a saved run goes on (evaluation/checkpoint.py)."""
    for m in methods:
        method(m)
    if steps * batch > len(cases):
        raise EditorError(f"{steps} steps x {batch} edits need {steps * batch} cases, the range holds {len(cases)}")
    cases = cases[:steps * batch]
    t0 = time.perf_counter()
    em.reset()
    ck = None
    if checkpoint is not None:
        ck = RunCheckpoint(checkpoint, {"cases": [c.case_id for c in cases[:1]] + [c.case_id for c in cases[-1:]],
                                        "n_cases": len(cases), "steps": steps, "batch": batch,
                                        "eval_every": eval_every, "gen_every": gen_every,
                                        "score_every": score_every, "methods": list(methods),
                                        "config": cfg.digest(), "model": em.fingerprint()})
    saved_base = ck.base() if ck is not None else None
    if saved_base is not None:
        base, base_loc, base_loc_text = saved_base
    else:
        with em.mode(Mode.OFF):
            base_scores = score_probes(em, case_probes(cases[::score_every]))
            base_loc = [base_scores[6 * i + 4][1] for i in range(len(base_scores) // 6)]
            base_loc_text = [None] * len(cases)               # greedy answers of the unedited model, every gen_every-th
            base_loc_text[::gen_every] = generated(em, [c.loc_prompt for c in cases[::gen_every]])
            base_metrics = probe_metrics(base_scores, base_loc)
            base = {"final": {**base_metrics, UNCONTESTED: base_metrics["locality"],
                              **generation_metrics(em, cases[::gen_every], base_loc_text[::gen_every])},
                    "perplexity": round(perplexity(em, list(heldout)), 4)}
        if ck is not None:
            ck.save_base((base, base_loc, base_loc_text))
    speed_prompts = [c.prompt for c in cases[:8]]
    runs = {}
    for m in methods:
        runs[m] = run_method(em, cases, stats, cfg, method_name=m, steps=steps, batch=batch,
                             eval_every=eval_every or steps, base_loc=base_loc, texts=list(heldout),
                             speed_at=set(speed_at), speed_prompts=speed_prompts, progress=progress,
                             base_loc_text=base_loc_text, gen_every=gen_every, score_every=score_every,
                             checkpoint=ck)
    first = runs[methods[0]]
    return {"edits": steps * batch, "steps": steps, "batch": batch, "seconds": round(time.perf_counter() - t0, 2),
            "method": methods[0], "final": first["final"], "perplexity": first["perplexity"],
            "base": base, "methods": runs, "stats_seconds": stats_seconds,
            "config": cfg.to_dict()}
