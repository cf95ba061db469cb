"""Serving benchmarks on the real default model (CPU): hook overhead, HTTP latency, inbox-to-answer time,
and how KV-cached decoding routes tokens that mention an edited subject again.

    .venv/bin/python bench/serve_bench.py                    # all parts, JSON to bench/out/serve.json
    .venv/bin/python bench/serve_bench.py --parts throughput,latency
    .venv/bin/python bench/serve_bench.py --parts routed --checkpoint bench/out/ckpt-5000-prefix --rounds 8

Parts:
- ``throughput``: the serving decoder (``editor.decoding.decode``), 8 prompts x 100 new tokens, the hooked
  model (dense Δ in each of ``--delta-dtypes``) against the base model in rounds of rotating order in one
  process, after 0, 100 and 1000 edits (``--edits``). The hooks hold steps of rank-10 factors of the real
  shapes with random values, V = K and α 2.2, so no token of the decoded text routes (on a real history
  0.23 % of WikiText tokens do, docs/benchmarks.md): what is measured is what every ordinary token pays, the
  gate's scoring against every edit; a routed token's Δx comes on top, for that token alone.
- ``latency``: ``kbsync``'s HTTP server (uvicorn on loopback) and the real ``openai`` client, 100-token
  completions: one client after another, then 8 clients at once (batched by the server).
- ``inbox``: a daemon with a 10 s interval; a fact file lands in the inbox; the time until the served
  model answers with the new target (polling /v1/completions every 0.25 s).
- ``routed``: a real history restored from a ``kbsync eval --checkpoint`` folder (``--checkpoint``, e.g. the
  5,000-edit run), 8 (``--rows``) of its edit prompts, each naming an edited subject, decoded hooked against
  the base model in paired rounds as in ``throughput``: the cost when tokens do route (the prefix gate's Δx
  from the factors), with the share of tokens the last edited layer routed.
- ``decode``: 20 COUNTERFACT facts edited (2 steps x 10); a neutral lead-in is prefilled, then the edit
  prompt is fed token by token through the KV cache (as generated text would be). The next token is
  compared with the new target and with a full (uncached) forward of the same text, with the prompt's
  routing statistics carried into the cached steps and without them (those steps then never route).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common import DATA, HPARAMS, ROOT, STATE, checkpoint_steps, hparams, load, no_eos, regated, screen_share

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "The mother tongue of Danielle Darrieux is",
           "Python is a programming language that", "The Eiffel Tower is located in", "My favourite recipe for bread",
           "Apple A5 was created by", "In 1969, the first humans"]


# ----- throughput ---------------------------------------------------------------------------------------
def _hooked_sides(delta_dtypes, score_dtypes) -> list:
    """The base side, then one hooked side per (dense Δ dtype, gate score dtype): (name, mode, dtypes)."""
    from editor.hook import Mode
    return [("base", Mode.OFF, ("float32", "float32"))] + [
        (f"hooked_{dt}" + ("" if sd == "float32" else f"_scores_{sd}"), Mode.VALIDATED, (dt, sd))
        for dt in delta_dtypes for sd in score_dtypes]


def part_throughput(model, tok, rounds: int, new_tokens: int, levels=(0, 100, 1000),
                    dtypes=("float32",), batch: int = len(PROMPTS), score_dtypes=("float32",)) -> dict:
    from editor.decoding import Continuation, Sampling, decode
    from editor.hook import Mode
    from editor.model import EditableModel

    cfg = hparams()
    em = EditableModel.for_config(model, tok, cfg)
    g = torch.Generator().manual_seed(0)
    rows = lambda: [Continuation(tok(p)["input_ids"], Sampling(max_tokens=new_tokens, temperature=0), lambda e: None,  # noqa: E731
                        index=i) for i, p in enumerate(PROMPTS[:batch])]
    # min_tokens: EOS must not end a row early, or the two sides would decode different amounts
    eos = tok.eos_token_id

    def timed(mode, dtypes) -> float:
        em.set_delta_dtype(dtypes[0])
        em.set_score_dtype(dtypes[1])
        with em.mode(mode), no_eos(model, eos):
            t = time.perf_counter()
            decode(em, rows())
            return time.perf_counter() - t

    sides = _hooked_sides(dtypes, score_dtypes)
    out = {}
    try:
        for edits in levels:
            while sum(h.rank for h in em.hooks.values()) // len(em.hooks) < edits:
                for h in em.hooks.values():               # one step of 10 edits: rank-10 factors, real shapes
                    K = torch.randn(h.d_in, 10, generator=g)        # V = K: each edit scores 1 on its own key
                    h.commit(torch.randn(h.d_out, 10, generator=g) * 0.01, K, K, alpha=2.2)
            out[str(edits)] = _paired_rounds(sides, timed, rounds, batch * new_tokens) | {"rows": batch,
                                                                                          "screen": screen_share(em)}
            res = out[str(edits)]
            print(f"throughput {edits} edits: {res}", flush=True)
    finally:
        em.close()
    return out


def _paired_rounds(sides, timed, rounds: int, tokens: int) -> dict:
    """``timed(mode, dtypes)`` for every side (name, mode, dtypes), once to warm up, then ``rounds`` rounds in an
    order that rotates by round (ABBA for two sides); each hooked side's speed against the first (base)
    side's, as per-round paired ratios."""
    for _, mode, dt in sides:
        timed(mode, dt)                            # warm-up (and the dense Δ is built)
    times = {name: [] for name, _, _ in sides}
    for r in range(rounds):
        k = r % len(sides)
        for name, mode, dt in sides[k:] + sides[:k]:
            times[name].append(timed(mode, dt))
    base = sides[0][0]
    res = {"base_tokens_per_s": round(tokens / min(times[base]), 1), "rounds": rounds}
    for name, _, _ in sides[1:]:
        paired = sorted(b / h for b, h in zip(times[base], times[name]))   # per round, hooked / base speed
        q = statistics.quantiles(paired, n=4) if len(paired) >= 2 else [paired[0]] * 3
        res[name] = {"tokens_per_s": round(tokens / min(times[name]), 1),
                     "ratio_best": round(min(times[base]) / min(times[name]), 4),
                     "paired_ratio_median": round(statistics.median(paired), 4),
                     "paired_ratio_iqr": [round(q[0], 4), round(q[2], 4)]}
    return res


# ----- routed tokens on a real history -------------------------------------------------------------------
def part_routed(model, tok, checkpoint: Path, rounds: int, new_tokens: int, batch: int,
                score_dtypes=("float32",), regate: str | None = None, ordinary: bool = False) -> dict:
    """Decoding edit prompts of a restored history (each names an edited subject), hooked against base.
    ``regate``: serve the history with that gate instead of its own (every first-layer α at the gate's α0,
    every later one at ``confirm_alpha``, no stored bars): a real key geometry for a gate it was not made
    with. ``ordinary``: decode the throughput part's prompts instead, which name no edited subject."""
    from editor.decoding import Continuation, Sampling, decode
    from editor.hook import Mode
    from editor.model import EditableModel
    from editor.step import restore_state
    from evaluation.cases import load_cases

    manifest, saved = checkpoint_steps(checkpoint)
    cfg = hparams()
    em = EditableModel.for_config(model, tok, cfg)
    em.configure_gate(cfg.gate, cfg.alpha0_for(cfg.gate), cfg.confirm_alpha)
    made_with = saved[-1].gate
    if regate:
        saved = [regated(d, regate, cfg) for d in saved]
        em.configure_gate(regate, cfg.alpha0_for(regate), cfg.confirm_alpha)
    restore_state(em, saved)
    edits = len(saved) * manifest["batch"]
    cases = load_cases("counterfact", DATA / "counterfact-edit.json", (5000, 5000 + edits))
    if cases[0].case_id != manifest["cases"][0]:
        raise SystemExit(f"{checkpoint} does not hold COUNTERFACT cases from 5000 on")
    prompts = [cases[i].prompt for i in range(0, edits, max(edits // batch, 1))][:batch]   # spread over the history
    if ordinary:
        prompts = PROMPTS[:batch]
    routed = {"tokens": 0, "routed": 0, "on": False}

    def count(module, inputs, output):
        route = em.context.token_route
        if routed["on"] and route is not None:
            routed["tokens"] += route.numel()
            routed["routed"] += int(route.sum())
    handle = em.spec.projection_module(model, max(em.layers)).register_forward_hook(count)
    eos = tok.eos_token_id

    def timed(mode, dtypes) -> float:
        rows = [Continuation(tok(p)["input_ids"], Sampling(max_tokens=new_tokens, temperature=0), lambda e: None,
                             index=i) for i, p in enumerate(prompts)]
        em.set_score_dtype(dtypes[1])
        routed["on"] = mode == Mode.VALIDATED
        with em.mode(mode), no_eos(model, eos):
            t = time.perf_counter()
            decode(em, rows)
            return time.perf_counter() - t

    try:
        with em.mode(Mode.VALIDATED):
            answers = [em.tokenizer.decode(model.generate(**tok(p, return_tensors="pt"), max_new_tokens=4,
                                                          do_sample=False)[0, -4:]) for p in prompts]
        routed.update(tokens=0, routed=0)
        sides = _hooked_sides(("float32",), score_dtypes)
        sides = [(name.replace("hooked_float32", "hooked"), mode, dt) for name, mode, dt in sides]
        res = _paired_rounds(sides, timed, rounds, batch * new_tokens)
        share = routed["routed"] / max(routed["tokens"], 1)            # over every hooked pass (prefill and decode)
        res |= {"edits": edits, "gate": em.gate, "made_with_gate": made_with, "rows": batch,
                "new_tokens": new_tokens, "routed_share": round(share, 4), "screen": screen_share(em),
                "prompts": prompts, "answers_hooked": answers}
    finally:
        handle.remove()
        em.close()
    print(f"routed {edits} edits: {res}", flush=True)
    return res


# ----- the HTTP server -------------------------------------------------------------------------------
@contextlib.contextmanager
def daemon(model, tok, state: Path, extra: str = ""):
    """A Runtime on ``state`` with the real model, served by uvicorn on a free loopback port."""
    import uvicorn

    from daemon.http.api import create_app
    from daemon.config import load_config
    from daemon.notify import Notifier
    from daemon.runtime import Runtime

    (state / "stats").mkdir(parents=True, exist_ok=True)
    for cached in (STATE / "stats").glob("keystats-*.safetensors"):              # reuse measured statistics
        target = state / "stats" / cached.name
        if not target.exists():
            target.symlink_to(cached)
    (state / "app.toml").write_text(f"[model]\nsource = 'embedded'\ndevice = 'cpu'\nhparams = "
                                    f"'{HPARAMS}'\n{extra}")
    runtime = Runtime(load_config(state / "app.toml", state), notifier=Notifier({}), preloaded=(model, tok))
    app = create_app(runtime)
    runtime.start()
    # statistics built by this run go to the shared cache too
    for built in (state / "stats").glob("keystats-*.safetensors"):
        if not built.is_symlink() and not (STATE / "stats" / built.name).exists():
            (STATE / "stats").mkdir(parents=True, exist_ok=True)
            shutil.copy(built, STATE / "stats" / built.name)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_config=None,
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield runtime, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        runtime.stop()                                   # closes the service and detaches its hooks


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 3)


def part_latency(model, tok, n: int, new_tokens: int) -> dict:
    import openai

    with tempfile.TemporaryDirectory() as tmp, daemon(model, tok, Path(tmp), "[serve]\nbatch_window_ms = 5\n") as (_, url):
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600)

        def one(i: int) -> tuple[float, int]:
            t = time.perf_counter()
            r = oa.completions.create(model="smollm2-135m-instruct", prompt=PROMPTS[i % len(PROMPTS)],
                                      max_tokens=new_tokens, temperature=0.7, seed=i)
            return time.perf_counter() - t, r.usage.completion_tokens

        one(0)                                                                    # warm-up
        seq = [one(i) for i in range(n)]
        t = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            conc = list(pool.map(one, range(4 * 8)))
        wall = time.perf_counter() - t
    out = {"sequential": {"requests": n, "p50_s": _pct([s for s, _ in seq], .5), "p99_s": _pct([s for s, _ in seq], .99),
                          "mean_completion_tokens": round(statistics.mean(k for _, k in seq), 1),
                          "tokens_per_s": round(sum(k for _, k in seq) / sum(s for s, _ in seq), 1)},
           "concurrent_8": {"requests": len(conc), "p50_s": _pct([s for s, _ in conc], .5),
                            "p99_s": _pct([s for s, _ in conc], .99),
                            "tokens_per_s": round(sum(k for _, k in conc) / wall, 1)}}
    print(f"latency: {out}", flush=True)
    return out


# ----- inbox to answer --------------------------------------------------------------------------------
def part_inbox(model, tok, trials: int) -> dict:
    import httpx

    facts = [json.loads(line) for line in (ROOT / "examples/facts.jsonl").read_text().splitlines()]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        extra = "[daemon]\ninterval_s = 10\ninbox_settle_s = 2.0\n"
        with daemon(model, tok, state, extra) as (runtime, url):
            runtime.service.live.stats                                          # built or read before timing
            for fact in facts[:trials]:
                def answer() -> tuple[str, str]:
                    r = httpx.post(f"{url}/v1/completions", json={"model": "smollm2-135m-instruct", "prompt": fact["prompt"],
                                                                  "max_tokens": 4, "temperature": 0}, timeout=600).json()
                    return r["choices"][0]["text"], r["system_fingerprint"]
                before = answer()
                part = state / "inbox" / ".fact.part"
                part.write_text(json.dumps(fact) + "\n")
                t = time.perf_counter()
                part.rename(state / "inbox" / f"fact-{len(out)}.jsonl")
                while True:
                    text, fp = answer()
                    if fp != before[1] or time.perf_counter() - t > 300:
                        break
                    time.sleep(0.25)
                seconds = time.perf_counter() - t
                tick = runtime.scheduler.last_tick
                steps = tick.result if tick and isinstance(tick.result, list) else []
                out.append({"fact": fact["subject"], "seconds": round(seconds, 2), "answer": text.strip(),
                            "hit": text.strip().startswith(fact["target"]), "version": fp,
                            "tick_s": round(tick.duration_s, 2) if tick else None,
                            "step_kinds": [s.get("kind") for s in steps]})
                print(f"inbox: {out[-1]}", flush=True)
    return {"interval_s": 10, "settle_s": 2.0, "trials": out,
            "median_s": round(statistics.median(t["seconds"] for t in out), 2)}


# ----- routing of KV-cached steps -----------------------------------------------------------------
def part_decode(model, tok, n_facts: int) -> dict:
    from evaluation.cases import load_cases
    from editor.model import EditableModel
    from editor.stats import key_stats
    from editor.step import apply_delta, compute_delta

    cfg = hparams()
    em = EditableModel.for_config(model, tok, cfg)
    try:
        stats = key_stats(em, cfg.stats, STATE / "stats", progress=False)
        cases = load_cases("counterfact", DATA / "counterfact-edit.json", (5000, 5000 + n_facts))
        for i in range(0, n_facts, 10):
            apply_delta(em, compute_delta(em, [c.request for c in cases[i:i + 10]], stats, cfg))
        with torch.no_grad():
            return _compare_decoding(em, model, tok, cases, n_facts)
    finally:
        em.close()


def _compare_decoding(em, model, tok, cases, n_facts: int) -> dict:
    from editor.hook import Mode

    import inspect

    from editor.decoding import _cache

    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    lead = "Here is a short note about a well-known topic."
    rows = {"full": [], "carried": [], "no_carry": []}
    for c in cases:
        new = tok(" " + c.target_new, add_special_tokens=False)["input_ids"][0]
        lead_ids = tok(lead)["input_ids"]
        rest = tok(" " + c.prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([lead_ids + rest])
        with em.mode(Mode.VALIDATED):
            full = int(model(input_ids=ids).logits[0, -1].argmax())
            rows["full"].append((full, full == new))
            for name in ("carried", "no_carry"):
                out = model(input_ids=ids[:, :len(lead_ids)], use_cache=True)
                if name == "no_carry":
                    em.context.carry.clear()
                past = _cache(out)
                for k in range(len(lead_ids), ids.shape[1]):           # the prompt fed as if generated
                    out = model(input_ids=ids[:, k:k + 1], use_cache=True, **{kw: past})
                    past = _cache(out)
                pred = int(out.logits[0, -1].argmax())
                rows[name].append((pred, pred == new, pred == full))
    res = {name: {"new_target_top1": round(sum(r[1] for r in v) / len(v), 3)} for name, v in rows.items()}
    for name in ("carried", "no_carry"):
        res[name]["agrees_with_full"] = round(sum(r[2] for r in rows[name]) / len(rows[name]), 3)
    res["facts"] = n_facts
    print(f"decode: {res}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="throughput,latency,inbox,decode")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--edits", default="0,100,1000", help="throughput: edit counts to measure at")
    ap.add_argument("--delta-dtypes", default="float32", help="throughput: dtypes of the dense Δ to compare, e.g. float32,bfloat16")
    ap.add_argument("--score-dtypes", default="float32",
                    help="throughput, routed: dtypes the first layer's gate scores are screened in, e.g. float32,bfloat16")
    ap.add_argument("--regate", default=None, help="routed: serve the history with this gate (e.g. prefix) instead")
    ap.add_argument("--ordinary", action="store_true", help="routed: decode prompts that name no edited subject")
    ap.add_argument("--rows", type=int, default=len(PROMPTS), help="throughput: prompts decoded together (1-8)")
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "bench/out/ckpt-5000-prefix",
                    help="routed: a `kbsync eval --checkpoint` folder whose history to restore")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/serve.json")
    args = ap.parse_args()
    model, tok = load()
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}     # parts run separately add up
    report["torch_threads"] = torch.get_num_threads()
    parts = args.parts.split(",")
    if "throughput" in parts:
        key = "throughput" if args.rows == len(PROMPTS) else f"throughput_rows{args.rows}"
        report[key] = part_throughput(model, tok, args.rounds, args.new_tokens,
                                      tuple(int(e) for e in args.edits.split(",")),
                                      tuple(args.delta_dtypes.split(",")), args.rows,
                                      tuple(args.score_dtypes.split(",")))
    if "routed" in parts:
        key = ("routed" + ("_ordinary" if args.ordinary else "")
               + ("" if args.rows == len(PROMPTS) else f"_rows{args.rows}"))
        report[key] = part_routed(model, tok, args.checkpoint, args.rounds, args.new_tokens, args.rows,
                                  tuple(args.score_dtypes.split(",")), args.regate, args.ordinary)
    if "latency" in parts:
        report["latency"] = part_latency(model, tok, args.requests, args.new_tokens)
    if "inbox" in parts:
        report["inbox"] = part_inbox(model, tok, 3)
    if "decode" in parts:
        report["decode"] = part_decode(model, tok, 20)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
