"""Per-edit noise thresholds for the token gate, measured on a 1,000-edit state (issue 15; benchmarks only).

The token gate routes a token x when max_j s_j(x) ≥ α, where s_j(x) = v_jᵀx / v_jᵀk_j (1 at edit j's own
key). On ordinary text s_j(x) is noise with RMS σ_j = sqrt(v_jᵀ Σ v_j) / v_jᵀk_j, where Σ = E[x xᵀ] is the
key statistics the solve already uses. The max over j of that noise grows with the number of edits and
crosses α: ordinary tokens route, locality falls. The variant asks each edit for s_j ≥ max(α, c σ_j): its
score is divided by f_j = max(1, c σ_j / α0), so an edit whose matcher responds to ordinary text needs
more evidence, and the others route as before.

    .venv/bin/python bench/noise_gate.py --edits 1000 --variants sigma:0,text:1.0,text:1.5

A second variant measures each edit's noise on text instead (WISE's way): m_j = the largest s_j over the
tokens of reference text (the first 16 long WikiText-2 validation paragraphs, which the perplexity does not
use), and f_j = max(1, M m_j / α0) for a margin M: an edit that some ordinary token already matches at α
needs that token's score times M. ``sigma:0`` is the shipped gate.

Step 1 (once; the steps are saved under --state and reused): edit tuning cases 0..edits-1 with the shipped
editor, steps of 10. Step 2, for each c, on the final state: efficacy, paraphrase efficacy, specificity,
reliability, generality, locality (teacher-forced, every edit), the generation family (every --gen-every-th
edit), perplexity on the 24 held-out WikiText-2 paragraphs, and the share of those paragraphs' tokens that
route. This is post hoc: the edits were made with the shipped gate (α adapted to it); only the routing of
the final state changes. It says whether the variant is worth building into the step.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import DATA, ROOT, default_editable


def save_steps(deltas, folder: Path, start: int = 0) -> None:
    from safetensors.numpy import save_file
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(deltas[start:], start=start):
        arrays, meta = d.to_arrays()
        save_file(arrays, folder / f"step-{i:05}.safetensors", metadata=meta)


def load_steps(folder: Path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from editor.step import StepDelta
    out = []
    for p in sorted(folder.glob("step-*.safetensors")):
        with safe_open(str(p), "np") as f:
            meta = f.metadata()
        out.append(StepDelta.from_arrays(load_file(str(p)), meta))
    return out


def set_cascade(em, variant: str, gate: str, alphas: dict) -> bool:
    """``cascade:β[@k]`` routes with the cascade gate, every later edited layer confirming at β, k candidate
    edits per token (``cascade-keep:β``: without taking a vetoed token's earlier Δx back); anything else
    restores the shipped gate and α. Returns whether the variant was a cascade one."""
    from editor.hook import CASCADE_CANDIDATES
    kind, _, value = variant.partition(":")
    value, _, k = value.partition("@")
    k, _, _ = k.partition(":")
    value, _, _ = value.partition(":")
    em.context.cascade_candidates = int(k) if k else CASCADE_CANDIDATES
    first = min(em.hooks)
    em.context.gate = gate
    em.context.cascade_undo = True
    for l, h in em.hooks.items():
        h.alpha = alphas[l]
    if not kind.startswith("cascade"):
        return False
    em.context.gate = "cascade"
    em.context.cascade_undo = kind != "cascade-keep"
    for l, h in em.hooks.items():
        if l != first:
            h.alpha = float(value)
    return True


@torch.no_grad()
def own_bars(em, cases, beta: float, margin: float) -> dict:
    """``cascade-own:β:m``: each edit e confirms at layer l at bar_e = min(β, m x its own bare prompt's score
    there) instead of β (the bare prompt's best token, routed with every layer's Δ). Done by scaling e's
    score: 1 / v_eᵀk_e becomes β / (bar_e v_eᵀk_e) at the later layers."""
    from common import projection_inputs
    from editor.hook import Mode
    first = min(em.hooks)
    own = {l: [] for l in em.hooks}
    em.context.gate, saved = "token", em.context.gate               # every layer applies Δ to routed tokens
    with projection_inputs(em) as inputs, em.mode(Mode.VALIDATED):
        for j, c in enumerate(cases):
            em.model(input_ids=em.tokenizer(c.request.prompt.replace("{}", c.subject), return_tensors="pt")["input_ids"])
            for l, h in em.hooks.items():
                _, V, inv_s = h._factors()
                own[l].append(float(((inputs[l][0].float() @ V[:, j]) * inv_s[j]).max()))
    em.context.gate = saved
    out = {}
    for l, h in em.hooks.items():
        if l == first:
            continue
        bar = torch.tensor(own[l]).mul(margin).clamp(min=0.05, max=beta)   # (r,)
        h._noise_f = (bar / beta).to(torch.float32)
        h._cat, h._D, h._D_fwd = None, None, None
        out[str(l)] = {"lowered": int((bar < beta).sum()), "edits": int(bar.numel()),
                       "own_median": round(float(torch.tensor(own[l]).median()), 3)}
    return out


def set_noise_scale(em, stats, variant: str, alpha0: float, ref_inputs: dict) -> dict:
    """f_j per edit and layer for ``variant`` ("sigma:C" or "text:M"; sigma:0 = 1 everywhere); returns the
    noise figures and how many edits it raises, per layer."""
    kind, _, value = variant.partition(":")
    c = float(value)
    out = {}
    for l, h in em.hooks.items():
        V = torch.cat(h.V, 1).to(torch.float64)                           # (d_in, r)
        S = torch.cat(h.S).to(torch.float64).abs().clamp(min=1e-12)       # (r,)
        if kind == "sigma":
            Sigma = stats.for_layer(l).to(torch.float64)                  # (d_in, d_in)
            noise = (V * (Sigma @ V)).sum(0).clamp(min=0).sqrt() / S      # (r,) RMS of s_j on ordinary text
        elif kind == "text":
            noise = (ref_inputs[l].to(torch.float64) @ V).amax(dim=0) / S   # (r,) the largest s_j on the text
        else:
            raise SystemExit(f"unknown variant {variant!r}: sigma:C or text:M")
        f = (c * noise / alpha0).clamp(min=1.0) if c > 0 else torch.ones_like(noise)
        h._noise_f = f.to(torch.float32)
        h._cat, h._D, h._D_fwd = None, None, None
        out[str(l)] = {"noise_median": round(float(noise.median()), 4), "noise_p90": round(float(noise.quantile(0.9)), 4),
                       "noise_max": round(float(noise.max()), 4), "raised": int((f > 1).sum()), "edits": int(f.numel())}
    return out


@torch.no_grad()
def reference_inputs(em, n: int = 16, seq_len: int = 256) -> dict:
    """{layer: (N, d_in)} the edited projections' inputs over reference text, unedited model (layer 1's
    inputs, which decide the route, are the same in every mode)."""
    from common import projection_inputs, reference_texts
    from editor.hook import Mode
    texts = reference_texts(n)
    got: dict = {l: [] for l in em.layers}
    with projection_inputs(em) as inputs, em.mode(Mode.OFF):
        for t in texts:
            em.model(input_ids=em.tokenizer(t, return_tensors="pt")["input_ids"][:, :seq_len])
            for l in em.layers:
                got[l].append(inputs[l][0, 1:].float())                  # the first token (a sink) left out
    return {l: torch.cat(v) for l, v in got.items()}


def patch_factors() -> None:
    """The gate's per-edit scale 1 / v_jᵀk_j becomes 1 / (f_j v_jᵀk_j) where a hook has ``_noise_f``."""
    from editor.hook import HookLayer
    real = HookLayer._factors

    def factors(self):
        fresh = self._cat is None
        U, V, inv_s = real(self)
        f = getattr(self, "_noise_f", None)
        if fresh and f is not None and f.numel() == inv_s.numel():
            self._cat = (U, V, inv_s / f)
        return self._cat

    HookLayer._factors = factors


@torch.no_grad()
def routed_share(em, texts: list[str], seq_len: int = 256) -> float:
    from editor.hook import Mode
    routed = total = 0
    with em.mode(Mode.VALIDATED):
        for t in texts:
            ids = em.tokenizer(t, return_tensors="pt")["input_ids"][:, :seq_len]
            em.model(input_ids=ids)
            route = em.context.token_route
            routed += int(route.sum())
            total += route.numel()
    return routed / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--first-case", type=int, default=0, help="tuning cases: 0-4999")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--variants", default="sigma:0,text:1.0,text:1.5")
    ap.add_argument("--gen-every", type=int, default=5)
    ap.add_argument("--state", type=Path, default=ROOT / "bench" / "out" / "noise-gate-steps")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "noise_gate.json")
    args = ap.parse_args()

    from editor.hook import Mode
    from editor.metrics import case_probes, generated, generation_metrics, perplexity, probe_metrics, score_probes
    from editor.step import apply_delta, compute_delta, restore_state
    from evaluation.cases import load_cases
    from evaluation.harness import heldout_texts

    torch.manual_seed(0)
    cfg, em, stats = default_editable(with_stats=True)
    a = args.first_case
    cases = load_cases("counterfact", DATA / "counterfact-edit.json", (a, a + args.edits))
    texts = heldout_texts(DATA / "wikitext2-valid.txt")
    folder = args.state / f"{a}-{a + args.edits}-b{args.batch}"
    deltas = load_steps(folder) if folder.exists() else []
    report = {"edits": args.edits, "cases": [a, a + args.edits], "batch": args.batch, "gate": cfg.gate,
              "config": cfg.to_dict(), "variants": {}}
    with em.mode(Mode.OFF):
        base_scores = score_probes(em, case_probes(cases))
        base_loc = [base_scores[6 * i + 4][1] for i in range(len(cases))]
        gen_cases = cases[::args.gen_every]
        base_loc_text = generated(em, [c.loc_prompt for c in gen_cases])
        report["base"] = {**probe_metrics(base_scores, base_loc),
                          **generation_metrics(em, gen_cases, base_loc_text), "perplexity": round(perplexity(em, texts), 4)}
    print("unedited", report["base"], flush=True)
    steps = args.edits // args.batch
    if len(deltas) < steps:
        restore_state(em, deltas)
        t = time.perf_counter()
        for s in range(len(deltas), steps):
            d = compute_delta(em, [c.request for c in cases[s * args.batch:(s + 1) * args.batch]], stats, cfg)
            apply_delta(em, d)
            deltas.append(d)
            save_steps(deltas, folder, start=s)                      # resumable: a killed run goes on from here
            if (s + 1) % 10 == 0:
                print(f"step {s + 1}/{steps}  {time.perf_counter() - t:.0f} s", flush=True)
    ref = reference_inputs(em)
    patch_factors()
    restore_state(em, deltas)
    alphas = {l: h.alpha for l, h in em.hooks.items()}
    made_with = em.gate                                              # the gate the saved steps were made with
    for c in args.variants.split(","):
        t = time.perf_counter()
        cascade = set_cascade(em, c, made_with, alphas)
        raised = set_noise_scale(em, stats, "sigma:0" if cascade else c, cfg.alpha0_for(), ref)
        if c.startswith("cascade-own:"):
            raised = own_bars(em, cases, float(c.split(":")[1].split("@")[0]), float(c.split(":")[2]))
        with em.mode(Mode.VALIDATED):
            m = probe_metrics(score_probes(em, case_probes(cases)), base_loc)
            m |= generation_metrics(em, gen_cases, base_loc_text)
            m["perplexity"] = round(perplexity(em, texts), 4)
        m["wiki_routed"] = round(routed_share(em, texts), 5)
        m["raised"] = raised
        m["seconds"] = round(time.perf_counter() - t, 1)
        report["variants"][c] = m
        print(f"c={c}", {k: v for k, v in m.items() if k != "raised"}, raised, flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
