"""A variant of the editor against the shipped one, on the same cases, by the real evaluation (benchmarks only).

    .venv/bin/python bench/variant_eval.py --gate norm --quantile 0.98                 # ~20 min, both runs
    .venv/bin/python bench/variant_eval.py --set mom2_weight=4000 --skip-shipped      # ~10 min, the variant only

Variants: ``--set KEY=VALUE`` changes the shipped ``[editor]`` configuration (numbers as TOML reads them);
``--gate norm`` swaps in the prototype gate below.

The norm gate: route on M = ‖Δx‖ against a threshold calibrated on ordinary text.

The routing study (docs/layers.md) found that in layers 3-5 a threshold on M itself routes 2-3x fewer
unrelated tokens than the paper's per-sequence z-score at the same recall of edited subjects. This runs
the real evaluation (``evaluation.harness.evaluate``, COMEBA-HK) twice on the same cases, one after the other
in one process: the shipped editor, then the variant. With ``--gate norm``: after every committed step, each
layer's τ is set to the ``--quantile`` of M over reference text (WikiText-2 validation paragraphs that the
perplexity and the routing study do not use), and a token takes Δ when M ≥ τ. Nothing here changes the
editor: the gate is patched in for the second run only. Report: bench/out/variant.json.
"""
from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

import torch

from common import DATA, ROOT, default_editable, projection_inputs, reference_texts


@torch.no_grad()
def calibrate(em, ids: list[torch.Tensor], q: float) -> None:
    """τ per layer: the q-quantile of M over the reference tokens (first token left out), validated mode."""
    from editor.hook import Mode
    got: dict[int, list[torch.Tensor]] = {l: [] for l in em.layers}
    with projection_inputs(em) as inputs, em.mode(Mode.VALIDATED):
        for x in ids:
            em.model(input_ids=x)
            for l, hook in em.hooks.items():
                got[l].append(hook.delta_out(inputs[l][0, 1:]).norm(dim=-1))
    for l, hook in em.hooks.items():
        hook.tau = float(torch.quantile(torch.cat(got[l]).float(), q))


def main() -> None:
    import evaluation.harness as ev
    import editor.hook as hook_mod
    from evaluation.cases import load_cases
    from evaluation.harness import evaluate, heldout_texts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="0:200")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--gen-every", type=int, default=1, help="generation metrics on every k-th edit only")
    ap.add_argument("--gate", choices=["z", "norm"], default="z", help="z: the paper's rule; norm: the prototype")
    ap.add_argument("--quantile", type=float, default=0.98, help="norm gate: τ = this quantile of M on reference text")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change the [editor] config")
    ap.add_argument("--skip-shipped", action="store_true", help="only the prototype gate (the shipped rule's metrics are deterministic)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "variant.json")
    args = ap.parse_args()

    cfg, em, stats = default_editable(with_stats=True)
    changes = {}
    for item in args.set:
        key, _, value = item.partition("=")
        changes[key] = tomllib.loads(f"v = {value}")["v"]
        if isinstance(changes[key], list):
            changes[key] = tuple(changes[key])
    variant_cfg = cfg.replace(**changes) if changes else cfg
    a, b = (int(x) for x in args.cases.split(":"))
    cases = load_cases("counterfact", DATA / "counterfact-edit.json", (a, b))
    heldout = heldout_texts(DATA / "wikitext2-valid.txt")
    ref = [em.tokenizer(t, return_tensors="pt")["input_ids"][:, :256] for t in reference_texts()]
    kw = dict(steps=args.steps, batch=args.batch, eval_every=args.eval_every, heldout=heldout,
              gen_every=args.gen_every)

    def tick(method, s, total, last):
        taus = {l: round(getattr(h, "tau", float("nan")), 2) for l, h in em.hooks.items()}
        print(f"step {s}/{total} alpha {[round(h.alpha, 2) for h in em.hooks.values()]} tau {taus}",
              f"last {last}" if last else "", flush=True)

    shipped = None
    if not args.skip_shipped:
        shipped = evaluate(em, cases, stats, cfg, progress=tick, **kw)
        print("shipped", json.dumps(shipped["final"]), shipped["perplexity"], flush=True)

    z_route = hook_mod.HookLayer._route

    def norm_route(self, dx, x):
        tau = getattr(self, "tau", None)
        if tau is None:                                    # before the first commit: the paper's rule
            return z_route(self, dx, x)
        B, T = dx.shape[:2]
        return self.context.real_tokens(B, T, dx.device) & (dx.float().norm(dim=-1) >= tau)

    plain_apply = ev.apply_delta

    def apply_and_calibrate(em_, delta):
        plain_apply(em_, delta)
        calibrate(em_, ref, args.quantile)

    if args.gate == "norm":
        hook_mod.HookLayer._route, ev.apply_delta = norm_route, apply_and_calibrate
        for h in em.hooks.values():
            h.tau = None
    gated = evaluate(em, cases, stats, variant_cfg, progress=tick, **kw)
    print("variant", json.dumps(gated["final"]), gated["perplexity"], flush=True)
    report = {"cases": args.cases, "steps": args.steps, "batch": args.batch, "gate": args.gate,
              "quantile": args.quantile if args.gate == "norm" else None, "set": changes,
              "base": gated["base"], "shipped": shipped["methods"]["comeba-hk"] if shipped else None,
              "variant": gated["methods"]["comeba-hk"],
              "tau": {str(l): round(h.tau, 3) for l, h in em.hooks.items() if getattr(h, "tau", None)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
