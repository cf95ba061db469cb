"""The offline key statistics (text sampled from the model): the shipped build against the earlier one, side by side.

    .venv/bin/python bench/stats_speed.py                          # 2 rounds each, alternating, 64 rows
    .venv/bin/python bench/stats_speed.py --full                   # also the whole configured build, both ways

- ``measured`` (shipped): ``editor.stats.compute_key_stats`` with the model corpus. A sampling loop of its
  own (KV cache, one uniform per row to draw a token) measures the keys in the same forwards that sample.
- ``generate`` (before, commit 8be8a8b): ``transformers`` ``generate`` (``torch.multinomial`` draws), then a
  second forward over the sampled rows up to the last editable layer to measure them.

Both draw ``--rows`` rows of ``seq_len`` tokens per round, the same amount of text; rounds alternate
(ABBA) so machine noise hits both alike. With ``--full`` it also builds the configured statistics both ways
(30,000 tokens) and compares them: the relative difference between the two builds against the difference
between two seeds of the shipped build (sampling noise), per layer.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import ROOT, default_editable


@torch.no_grad()
def generate_then_measure(em, cfg):
    """The earlier build: sample with ``generate``, then forward the text again to measure it."""
    from editor.hook import Mode
    from editor.stats import STARTERS

    tok, last = em.tokenizer, em.layers[-1]
    sums = {l: torch.zeros(em.hooks[l].d_in, em.hooks[l].d_in, dtype=torch.float64) for l in em.layers}
    held: dict = {}

    class Stop(Exception):
        pass

    def capture(layer):
        def fn(module, inputs, output):
            if "mask" in held:
                k = inputs[0][held["mask"]]
                sums[layer] += (k.T @ k).double()
                if layer == last:
                    raise Stop
        return fn

    handles = [em.spec.projection_module(em.model, l).register_forward_hook(capture(l)) for l in em.layers]
    produced, round_ = 0, 0
    try:
        with em.mode(Mode.OFF), torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            while produced < cfg.n_tokens:
                prompts = [STARTERS[(round_ * cfg.batch_size + j) % len(STARTERS)] for j in range(cfg.batch_size)]
                tok.padding_side = "left"
                enc = tok(prompts, return_tensors="pt", padding=True)
                out = em.model.generate(**enc, max_new_tokens=cfg.seq_len, do_sample=True, top_k=0, top_p=1.0,
                                        temperature=1.0, pad_token_id=tok.pad_token_id)
                P = enc["attention_mask"].shape[1]
                mask = torch.ones_like(out)
                mask[:, :P] = enc["attention_mask"]
                mask[:, P:][(out[:, P:] == tok.eos_token_id).long().cumsum(1) > 1] = 0
                held["mask"] = mask.bool()
                try:
                    em.model(input_ids=out, attention_mask=mask)
                except Stop:
                    pass
                finally:
                    del held["mask"]
                produced += int(mask.sum())
                round_ += 1
    finally:
        for h in handles:
            h.remove()
    return {l: s / produced for l, s in sums.items()}, produced


def main() -> None:
    from dataclasses import replace

    from editor.stats import compute_key_stats

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/stats_speed.json")
    args = ap.parse_args()
    cfg, em = default_editable()
    one = replace(cfg.stats, batch_size=args.rows, n_tokens=1)          # exactly one round of rows
    builds = {"measured": lambda c: (lambda s: (s.mom2, s.n_tokens))(compute_key_stats(em, c, progress=False)),
              "generate": lambda c: generate_then_measure(em, c)}
    timing = {name: {"seconds": 0.0, "tokens": 0} for name in builds}
    order = [n for r in range(args.rounds) for n in (list(builds) if r % 2 == 0 else list(builds)[::-1])]
    for i, name in enumerate(order):
        t = time.perf_counter()
        _, n = builds[name](replace(one, seed=i))
        timing[name]["seconds"] += time.perf_counter() - t
        timing[name]["tokens"] += n
        print(f"{name}: {n} tokens in {time.perf_counter() - t:.1f} s", flush=True)
    for r in timing.values():
        r["tokens_per_s"] = round(r["tokens"] / r["seconds"], 1)
        r["seconds_for_configured_tokens"] = round(cfg.stats.n_tokens / r["tokens_per_s"])
        r["seconds"] = round(r["seconds"], 1)
    report = {"rows": args.rows, "seq_len": cfg.stats.seq_len, "threads": torch.get_num_threads(),
              "cpu": torch.backends.cpu.get_cpu_capability(), "sampling": timing,
              "speedup": round(timing["measured"]["tokens_per_s"] / timing["generate"]["tokens_per_s"], 2)}
    if args.full:
        full = {}
        for name, seed in (("measured", cfg.stats.seed), ("generate", cfg.stats.seed), ("measured-seed1", 1)):
            t = time.perf_counter()
            mom2, n = builds[name.split("-")[0]](replace(cfg.stats, seed=seed))
            full[name] = {"mom2": mom2, "tokens": n, "seconds": round(time.perf_counter() - t, 1)}
            print(f"full build {name}: {n} tokens in {full[name]['seconds']} s", flush=True)
        rel = lambda a, b: float((a - b).norm() / b.norm())
        report["full_build"] = {name: {"tokens": f["tokens"], "seconds": f["seconds"]} for name, f in full.items()}
        report["relative_difference"] = {
            str(l): {"shipped_vs_before": round(rel(full["measured"]["mom2"][l], full["generate"]["mom2"][l]), 4),
                     "seed0_vs_seed1": round(rel(full["measured"]["mom2"][l], full["measured-seed1"]["mom2"][l]), 4)}
            for l in em.layers}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
