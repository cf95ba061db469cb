"""Routing-rule study on saved consecutive edits (tuning cases; nothing here changes the editor).

    .venv/bin/python bench/routing_gate.py record --steps 20 --batch 10      # edits COUNTERFACT 0-199, saves deltas
    .venv/bin/python bench/routing_gate.py analyse                           # per-token M, z on probes and WikiText
    .venv/bin/python bench/routing_gate.py growth --at 1,2,5,10,20           # the same after the first N steps
    .venv/bin/python bench/routing_gate.py gates                             # z-score gate against a plain M gate
    .venv/bin/python bench/routing_gate.py token --at 5,10,20                # the per-token gate's score a

``record`` runs COMEBA-HK as configured and writes every step's delta to bench/out/gate/step-NNN.safetensors.
``analyse`` restores them and reports, per layer, the distribution of M = ‖Δx‖ and z on: the subject's last
token of edit prompts, other tokens of edit prompts, locality prompts, and WikiText-2 text.
``growth`` restores the first N steps for each N and reports how the subjects' M (the edits made so far)
and WikiText's M grow with the number of edits: the selectivity the z-score routing has to work with.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from common import DATA, ROOT, default_editable, projection_inputs

OUT = ROOT / "bench" / "out" / "gate"


def setup():
    return default_editable(with_stats=True)


def record(args) -> None:
    from evaluation.cases import load_cases
    from editor.step import apply_delta, compute_delta
    from kb.blobs import serialize
    cfg, em, stats = setup()
    cases = load_cases("counterfact", DATA / "counterfact-edit.json", (args.start, args.start + args.steps * args.batch))
    OUT.mkdir(parents=True, exist_ok=True)
    for s in range(args.steps):
        t = time.perf_counter()
        d = compute_delta(em, [c.request for c in cases[s * args.batch:(s + 1) * args.batch]], stats, cfg)
        apply_delta(em, d)
        arrays, meta = d.to_arrays()
        meta["cases"] = f"{args.start + s * args.batch}:{args.start + (s + 1) * args.batch}"
        (OUT / f"step-{s:03d}.safetensors").write_bytes(serialize(arrays, meta))   # as the daemon stores it
        print(f"step {s + 1}/{args.steps} {time.perf_counter() - t:.1f}s alpha "
              f"{ {l: round(h.alpha, 3) for l, h in em.hooks.items()} }", flush=True)


def restore(em, args, upto: int | None = None):
    """Replay the recorded steps (the first ``upto``); they must have been recorded for ``args``' cases."""
    from editor.step import StepDelta, restore_state
    from kb.blobs import deserialize
    deltas = []
    for s, f in enumerate(sorted(OUT.glob("step-*.safetensors"))[:upto]):
        arrays, meta = deserialize(f.read_bytes())
        want = f"{args.start + s * args.batch}:{args.start + (s + 1) * args.batch}"
        if meta.get("cases") != want:
            raise SystemExit(f"{f} holds the edits of cases {meta.get('cases', 'unknown')}, not {want}: "
                             f"run `routing_gate.py record` with the same --start/--batch first")
        deltas.append(StepDelta.from_arrays(arrays, meta))
    restore_state(em, deltas)
    return len(deltas)


def encode(em, text: str, subject: str | None):
    """(ids (1, T), the subject's last token or -1): the subject's row when ``text`` holds it, else the
    text's first 256 tokens."""
    from editor.requests import subject_row
    if subject is not None and subject in text:
        row = subject_row(em.tokenizer, text, subject, 0)
        return torch.tensor([row.ids]), row.lookup
    return em.tokenizer(text, return_tensors="pt")["input_ids"][:, :256], -1


@torch.no_grad()
def token_norms(em, texts: list[str], subjects: list[str | None]):
    """Per text: {layer: (M (T,), z (T,))} in validated mode, and the subject's last token (or -1)."""
    from editor.hook import Mode, sequence_stats
    out = []
    with projection_inputs(em) as inputs, em.mode(Mode.VALIDATED):
        for t, s in zip(texts, subjects):
            ids, look = encode(em, t, s)
            em.model(input_ids=ids.to(em.device))
            per = {}
            for l, hook in em.hooks.items():
                M = hook.delta_out(inputs[l]).norm(dim=-1)                  # (1, T)
                mean, std = sequence_stats(M, torch.ones_like(M, dtype=torch.bool))
                per[l] = (M[0].cpu(), ((M - mean[:, None]) / std[:, None])[0].cpu())
            out.append((per, look))
    return out


def q(x: torch.Tensor, qs=(0.0, 0.05, 0.5, 0.95, 0.99, 1.0)) -> list[float]:
    return [round(float(v), 3) for v in torch.quantile(x.float(), torch.tensor(qs))] if x.numel() else []


def analyse(args) -> None:
    from evaluation.cases import load_cases
    from evaluation.harness import heldout_texts
    cfg, em, stats = setup()
    n = restore(em, args)
    cases = load_cases("counterfact", DATA / "counterfact-edit.json", (args.start, args.start + n * args.batch))
    print("steps", n, "alpha", {l: round(h.alpha, 3) for l, h in em.hooks.items()})
    groups = {
        "edit": token_norms(em, [c.request.text for c in cases], [c.subject for c in cases]),
        "para": token_norms(em, [c.paraphrase for c in cases], [c.subject for c in cases]),
        "loc": token_norms(em, [c.loc_prompt + " " + c.loc_answer for c in cases], [None] * len(cases)),
        "wiki": token_norms(em, heldout_texts(DATA / "wikitext2-valid.txt"), [None] * 24),
    }
    report = {}
    for l, hook in em.hooks.items():
        r = {"alpha": hook.alpha}
        for g, rows in groups.items():
            allM = torch.cat([per[l][0] for per, _ in rows])
            allz = torch.cat([per[l][1] for per, _ in rows])
            first = torch.stack([per[l][0][0] for per, _ in rows])
            subj = [per[l][0][look] for per, look in rows if look >= 0]
            subjz = [per[l][1][look] for per, look in rows if look >= 0]
            other = torch.cat([torch.cat([per[l][0][:look], per[l][0][look + 1:]]) if look >= 0 else per[l][0][1:]
                               for per, look in rows])
            routed = allz >= hook.alpha
            r[g] = {"M_all": q(allM), "M_first": q(first), "M_other_nonfirst": q(other),
                    "routed_share": round(float(routed.float().mean()), 4),
                    "routed_M": q(allM[routed])}
            if subj:
                r[g]["M_subj"] = q(torch.stack(subj))
                r[g]["z_subj"] = q(torch.stack(subjz))
        report[l] = r
        print(l, json.dumps(r), flush=True)
    (OUT / "analysis.json").write_text(json.dumps(report, indent=1))


def growth(args) -> None:
    from evaluation.cases import load_cases
    from evaluation.harness import heldout_texts
    cfg, em, stats = setup()
    wiki_texts = heldout_texts(DATA / "wikitext2-valid.txt")
    rows = []
    for n in (int(x) for x in args.at.split(",")):
        got = restore(em, args, n)
        cases = load_cases("counterfact", DATA / "counterfact-edit.json", (args.start, args.start + got * args.batch))
        edit = token_norms(em, [c.request.text for c in cases], [c.subject for c in cases])
        wiki = token_norms(em, wiki_texts, [None] * len(wiki_texts))
        for l, hook in em.hooks.items():
            subj = torch.stack([per[l][0][look] for per, look in edit if look >= 0])
            wM = torch.cat([per[l][0][1:] for per, _ in wiki])                   # without the first token
            wz = torch.cat([per[l][1] for per, _ in wiki])
            row = {"steps": got, "edits": got * args.batch, "layer": l, "alpha": round(hook.alpha, 3),
                   "M_subject_median": round(float(subj.median()), 3),
                   "M_wiki_median": round(float(wM.median()), 3),
                   "M_wiki_p95": round(float(torch.quantile(wM, 0.95)), 3),
                   "wiki_routed_share": round(float((wz >= hook.alpha).float().mean()), 4)}
            row["subject_over_wiki_median"] = round(row["M_subject_median"] / row["M_wiki_median"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    (OUT / "growth.json").write_text(json.dumps(rows, indent=1))


def gates(args) -> None:
    """At equal recall of edited subjects, how many unrelated tokens does each gate open for?

    Per layer, on the restored state: the paper's score z (per-sequence z-score of M) and the plain M.
    For each, the threshold is set to the 1 %, 5 % and 10 % quantile of the score at edited subjects'
    last tokens (edit prompts and paraphrases), so 99 %, 95 % and 90 % of them are routed, and the share
    of WikiText-2 tokens at or above it is reported. The shipped α is reported beside them.
    """
    from evaluation.cases import load_cases
    from evaluation.harness import heldout_texts
    cfg, em, stats = setup()
    n = restore(em, args)
    cases = load_cases("counterfact", DATA / "counterfact-edit.json", (args.start, args.start + n * args.batch))
    subj_rows = (token_norms(em, [c.request.text for c in cases], [c.subject for c in cases])
                 + token_norms(em, [c.paraphrase for c in cases], [c.subject for c in cases]))
    wiki = token_norms(em, heldout_texts(DATA / "wikitext2-valid.txt"), [None] * 24)
    report = {"steps": n, "layers": {}}
    for l, hook in em.hooks.items():
        r = {"alpha": round(hook.alpha, 3),
             "shipped": {"subjects_routed": round(float(torch.stack([per[l][1][look] >= hook.alpha
                                                                      for per, look in subj_rows if look >= 0]).float().mean()), 3),
                         "wiki_routed": round(float((torch.cat([per[l][1] for per, _ in wiki]) >= hook.alpha).float().mean()), 4)}}
        for name, k in (("z", 1), ("M", 0)):
            at_subj = torch.stack([per[l][k][look] for per, look in subj_rows if look >= 0])
            at_subj = at_subj[torch.isfinite(at_subj)]
            wk = torch.cat([per[l][k] for per, _ in wiki])
            wk = wk[torch.isfinite(wk)]
            r[name] = {f"recall_{1 - qq:.2f}": round(float((wk >= torch.quantile(at_subj, qq)).float().mean()), 4)
                       for qq in (0.01, 0.05, 0.10)}
        report["layers"][l] = r
        print(l, json.dumps(r), flush=True)
    (OUT / "gates.json").write_text(json.dumps(report, indent=1))


@torch.no_grad()
def token_scores(em, texts: list[str], subjects: list[str | None]):
    """Per text: {layer: a (T,)}, the per-token gate's score a = max_j v_jᵀx / v_jᵀk_j, and the subject's
    last token (or -1)."""
    from editor.hook import Mode
    out = []
    with projection_inputs(em) as inputs, em.mode(Mode.OFF):          # the base model's inputs
        for t, s in zip(texts, subjects):
            ids, look = encode(em, t, s)
            em.model(input_ids=ids.to(em.device))
            out.append(({l: hook.delta_out(inputs[l], scores=True)[1][0].cpu() for l, hook in em.hooks.items()}, look))
    return out


def token(args) -> None:
    """The per-token gate's score on edited subjects against unrelated text, as the edits accumulate.

    Per layer and number of restored steps: the score a at the subject's last token of edit prompts and
    of paraphrases (their recall at thresholds τ), and the share of WikiText-2 tokens and of locality
    prompts (any token) that would route at τ. Scores are read on the base model's inputs (routing
    upstream layers would change them only where a token routes)."""
    from evaluation.cases import load_cases
    from evaluation.harness import heldout_texts
    cfg, em, stats = setup()
    wiki_texts = heldout_texts(DATA / "wikitext2-valid.txt")
    taus = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    rows = []
    for n in (int(x) for x in args.at.split(",")):
        got = restore(em, args, n)
        cases = load_cases("counterfact", DATA / "counterfact-edit.json", (args.start, args.start + got * args.batch))
        edit = token_scores(em, [c.request.text for c in cases], [c.subject for c in cases])
        para = token_scores(em, [c.paraphrase for c in cases], [c.subject for c in cases])
        para_any = token_scores(em, [c.paraphrase for c in cases], [None] * len(cases))
        loc = token_scores(em, [c.loc_prompt for c in cases], [None] * len(cases))
        wiki = token_scores(em, wiki_texts, [None] * len(wiki_texts))
        for l in em.layers:
            subj = torch.stack([a[l][look] for a, look in edit if look >= 0])
            psub = torch.stack([a[l][look] for a, look in para if look >= 0])
            pany = torch.stack([a[l].max() for a, _ in para_any])
            lmax = torch.stack([a[l].max() for a, _ in loc])
            w = torch.cat([a[l] for a, _ in wiki])
            wfirst = torch.stack([a[l][0] for a, _ in wiki])
            row = {"steps": got, "edits": got * args.batch, "layer": l,
                   "a_edit_subject": q(subj), "a_para_subject": q(psub), "a_para_max": q(pany),
                   "a_loc_max": q(lmax), "a_wiki": q(w, (0.5, 0.99, 0.999, 1.0)), "a_wiki_first": q(wfirst),
                   "at": {str(t): {"edit_recall": round(float((subj >= t).float().mean()), 3),
                                   "para_recall": round(float((pany >= t).float().mean()), 3),
                                   "loc_routed": round(float((lmax >= t).float().mean()), 3),
                                   "wiki_routed": round(float((w >= t).float().mean()), 5)} for t in taus}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    (OUT / "token.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["record", "analyse", "growth", "gates", "token"])
    ap.add_argument("--at", default="1,2,5,10,20", help="growth: numbers of steps to restore")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=10)
    a = ap.parse_args()
    {"record": record, "analyse": analyse, "growth": growth, "gates": gates, "token": token}[a.what](a)
