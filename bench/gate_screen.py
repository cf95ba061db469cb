"""The bfloat16 screen of the first layer's gate scores on a real history: same routes and logits as float32?
How many rows does it send to the float32 rescore, and what does the first layer's scoring cost each way?

    .venv/bin/python bench/gate_screen.py --checkpoint bench/out/ckpt-5000-prefix
    .venv/bin/python bench/gate_screen.py --checkpoint bench/out/ckpt-5000-zscore --regate prefix

Texts: ``--texts`` WikiText-2 validation paragraphs (the front ones, 256 tokens each) and every ``--every``-th
edit prompt of the history (each names an edited subject). Each is run through the hooked model twice, the
first layer's scores in float32 and through the bf16 screen (``editor/gate_screen.py``); every edited layer's
routes and the logits are compared exactly. Then the first edited layer's hook alone is timed on the
captured inputs of one token that routes nowhere and one that routes (decode steps) and of a whole
paragraph, float32 against the screen, alternating, median of ``--rounds`` rounds. ``--decode-tokens N``: one row decoded from ordinary prompts, base and hooked each
way, the time inside the edited projections per token (``decode_spans``). ``--regate``: serve a history made with another gate under this one
(``bench/common.regated``: α0 at the first layer, ``confirm_alpha`` after it, no stored bars).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import (ROOT, checkpoint_steps, default_editable, no_eos, projection_inputs, reference_texts,
                    regated, screen_share)


def routes_and_logits(em, ids: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """{layer: (1, T) the tokens routed there} and the logits of one forward pass."""
    got, handles = {}, []
    for l in em.layers:
        handles.append(em.spec.projection_module(em.model, l).register_forward_hook(
            lambda m, i, o, l=l: got.__setitem__(l, em.context.token_route.clone())))
    try:
        with torch.no_grad():
            logits = em.model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return got, logits


def decode_spans(em, new_tokens: int, rounds: int) -> dict:
    """One row decoded greedily from each of four ordinary prompts, base (hooks off) and hooked with the
    scores in float32 and through the screen, interleaved by round: the time per token inside the edited
    projections (their hooks included) and in the whole decode step. The projections' time less the base
    side's is what the hooks add, measured where they run, apart from the noise of the rest of the step."""
    from editor.decoding import Continuation, Sampling, decode
    from editor.hook import Mode

    prompts = ["The capital of France is", "Once upon a time, in a small village,",
               "Python is a programming language that", "In 1969, the first humans"]
    tok = em.tokenizer
    spent = {"t": 0.0}
    started: dict = {}
    handles = []
    for l in em.layers:
        module = em.spec.projection_module(em.model, l)
        handles.append(module.register_forward_pre_hook(lambda m, i: started.__setitem__(m, time.perf_counter())))
    after = []                                       # registered after the HookLayer's, so it runs after it
    for l in em.layers:
        module = em.spec.projection_module(em.model, l)
        after.append(module.register_forward_hook(
            lambda m, i, o: spent.__setitem__("t", spent["t"] + time.perf_counter() - started[m])))
    sides = {"base": (Mode.OFF, torch.float32), "float32": (Mode.VALIDATED, torch.float32),
             "bfloat16": (Mode.VALIDATED, torch.bfloat16)}
    proj: dict[str, list[float]] = {k: [] for k in sides}
    step: dict[str, list[float]] = {k: [] for k in sides}
    try:
        for r in range(rounds + 1):                  # round 0 warms up
            order = list(sides)[r % 3:] + list(sides)[:r % 3]
            for name in order:
                mode, dt = sides[name]
                em.set_score_dtype(dt)
                rows = [Continuation(tok(p)["input_ids"], Sampling(max_tokens=new_tokens, temperature=0),
                                     lambda e: None, index=0) for p in prompts]
                spent["t"] = 0.0
                with em.mode(mode), no_eos(em.model, tok.eos_token_id):
                    t = time.perf_counter()
                    for row in rows:
                        decode(em, [row])
                    total = time.perf_counter() - t
                if r:
                    n = len(prompts) * new_tokens
                    proj[name].append(spent["t"] / n * 1e3)
                    step[name].append(total / n * 1e3)
    finally:
        for h in handles + after:
            h.remove()
    med = lambda v: round(statistics.median(v), 3)   # noqa: E731
    res = {"tokens_per_side_per_round": len(prompts) * new_tokens, "rounds": rounds,
           "edited_projections_ms_per_token": {k: med(v) for k, v in proj.items()},
           "step_ms_per_token": {k: med(v) for k, v in step.items()}}
    res["hooks_add_ms_per_token"] = {k: round(res["edited_projections_ms_per_token"][k]
                                              - res["edited_projections_ms_per_token"]["base"], 3)
                                     for k in ("float32", "bfloat16")}
    res["hooks_add_share_of_base_step"] = {k: round(v / res["step_ms_per_token"]["base"], 4)
                                           for k, v in res["hooks_add_ms_per_token"].items()}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "bench/out/ckpt-5000-prefix")
    ap.add_argument("--regate", default=None, help="serve the history with this gate (e.g. prefix)")
    ap.add_argument("--first-case", type=int, default=5000)
    ap.add_argument("--texts", type=int, default=16)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=0,
                    help="also decode one row of this many tokens per prompt, timing the edited projections")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/gate_screen.json")
    args = ap.parse_args()

    from editor.precision import cpu_features
    from editor.step import restore_state
    from evaluation.cases import load_cases

    cfg, em = default_editable()
    manifest, saved = checkpoint_steps(args.checkpoint)
    made_with = saved[-1].gate
    if args.regate:
        saved = [regated(d, args.regate, cfg) for d in saved]
    em.configure_gate(saved[-1].gate, cfg.alpha0_for(saved[-1].gate), cfg.confirm_alpha)
    restore_state(em, saved)
    if em.gate not in ("cascade", "prefix"):
        raise SystemExit(f"the history routes with the {em.gate!r} gate, which has no first-layer bars to screen "
                         f"against; pass --regate prefix")
    edits = sum(d.layers[0].U.shape[1] for d in saved)
    cases = load_cases("counterfact", ROOT.parent / "shared/data/counterfact-edit.json",
                       (args.first_case, args.first_case + edits))
    tok = em.tokenizer
    texts = {"wikitext": [tok(t, return_tensors="pt")["input_ids"][:, :256] for t in reference_texts(args.texts)],
             "edit_prompts": [tok(cases[i].prompt, return_tensors="pt")["input_ids"] for i in range(0, edits, args.every)]}
    first = em.hooks[min(em.layers)]
    out = {"cpu": cpu_features().describe(), "threads": torch.get_num_threads(), "edits": edits,
           "gate": em.gate, "made_with_gate": made_with, "checkpoint": str(args.checkpoint)}
    for name, rows in texts.items():
        tokens = differ = routed = 0
        same_logits = True
        first.screened_rows = first.rescored_rows = 0
        for ids in rows:
            em.set_score_dtype(torch.float32)
            want, logits32 = routes_and_logits(em, ids)
            em.set_score_dtype(torch.bfloat16)
            got, logits16 = routes_and_logits(em, ids)
            tokens += ids.shape[1]
            routed += int(want[min(em.layers)].sum())
            differ += sum(int((want[l] != got[l]).sum()) for l in em.layers)
            same_logits &= torch.equal(logits32, logits16)
        out[name] = {"sequences": len(rows), "tokens": tokens, "route_differences": differ,
                     "logits_identical": bool(same_logits), "routed_first_layer_share": round(routed / tokens, 4),
                     "rescored_share": screen_share(em)["rescored_share"]}
        print(name, out[name], flush=True)

    # the first layer's hook alone on real inputs: one token that routes nowhere and one that routes (decode
    # steps), and a whole paragraph
    em.set_score_dtype(torch.float32)
    want, _ = routes_and_logits(em, texts["wikitext"][0])
    route = want[min(em.layers)][0]                                     # (256,)
    with projection_inputs(em) as grabbed, torch.no_grad():
        em.model(input_ids=texts["wikitext"][0])
    x = grabbed[min(em.layers)]                                         # (1, 256, d_in)
    quiet, loud = int((~route).nonzero()[-1]), int(route.nonzero()[-1])
    module = em.spec.projection_module(em.model, min(em.layers))
    times: dict[str, list[float]] = {}
    for rows_name, xi in (("1 token, not routed", x[:, quiet:quiet + 1]), ("1 token, routed", x[:, loud:loud + 1]),
                          (f"{x.shape[1]} tokens", x)):
        y = torch.nn.functional.linear(xi, module.weight, module.bias)   # the projection's own output
        for _ in range(args.rounds):
            for dt in (torch.float32, torch.bfloat16):
                em.set_score_dtype(dt)
                key = f"{rows_name}, {str(dt).removeprefix('torch.')}"
                calls = 200 if xi.shape[1] == 1 else 20
                with torch.no_grad():
                    for _ in range(5):
                        em.context.token_route = None
                        first._forward_hook(module, (xi,), y)
                    t = time.perf_counter()
                    for _ in range(calls):
                        em.context.token_route = None
                        first._forward_hook(module, (xi,), y)
                times.setdefault(key, []).append((time.perf_counter() - t) / calls * 1e6)
    out["first_layer_hook_us"] = {k: round(statistics.median(v), 1) for k, v in times.items()}
    print(json.dumps(out["first_layer_hook_us"]), flush=True)
    if args.decode_tokens:
        out["decode"] = decode_spans(em, args.decode_tokens, args.rounds)
        print(json.dumps(out["decode"]), flush=True)
    em.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
