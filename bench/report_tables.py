"""Markdown tables for docs/benchmarks.md from the JSON reports of ``kbsync eval`` (bench/eval_runs.sh).

    .venv/bin/python bench/report_tables.py bench/out/eval-200.json [bench/out/eval-1000.json ...]
    .venv/bin/python bench/report_tables.py --merge OUT.json A.json B.json ... [--plot OUT.png]   # methods run separately
    .venv/bin/python bench/report_tables.py --merge OUT.json A.json B.json:no-hook --allow-config gate   # B's no-hook only

A merge takes reports of the same cases, steps and batch on the same model (checked: the unedited
metrics both reports have must agree exactly) and puts their methods side by side; its seconds are the sum.
The configurations must agree too, except the keys ``--allow-config`` names (kept under ``config_differs``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

COLS = ("efficacy", "paraphrase_efficacy", "specificity", "reliability", "generality", "locality")


def tables(report: dict) -> str:
    out = [f"### {report['dataset']} cases {report['cases']}: {report['edits']} edits "
           f"({report['steps']} steps x {report['batch']}), {report['seconds']} s in all", ""]
    out.append("| method | " + " | ".join(COLS) + " | perplexity | edits/s | final α (layers) |")
    out.append("|" + "---|" * (len(COLS) + 4))
    base = report["base"]
    out.append("| unedited | " + " | ".join(f"{base['final'][c]:.3f}" for c in COLS) + f" | {base['perplexity']:.2f} | | |")
    for name, run in report["methods"].items():
        alpha = ", ".join(f"{a:.2f}" for a in run.get("alpha", {}).values())
        out.append(f"| {name} | " + " | ".join(f"{run['final'][c]:.3f}" for c in COLS)
                   + f" | {run['perplexity']:.2f} | {run['speed']['edits_per_s']} | {alpha} |")
    out += ["", "Along the way (every edit so far, at each evaluation):", "",
            "| method | edits | " + " | ".join(COLS) + " |", "|" + "---|" * (len(COLS) + 2)]
    for name, run in report["methods"].items():
        for h in run["history"]:
            out.append(f"| {name} | {h['edits']} | " + " | ".join(f"{h[c]:.3f}" for c in COLS) + " |")
    out += ["", "| method | s/step | targets | keys | solve | routing | generation tokens/s hooked / base (ratio) |",
            "|---|---|---|---|---|---|---|"]
    for name, run in report["methods"].items():
        sp = run["speed"]
        inf = "; ".join(f"{k} edits: {v['tokens_per_s']} / {v['base_tokens_per_s']} ({v['ratio']})"
                        for k, v in sp.get("inference", {}).items())
        split = sp["split_s"]
        steps = report["steps"]
        out.append(f"| {name} | {sp['seconds_per_step']} | " + " | ".join(f"{split[k] / steps:.2f}" for k in
                                                                            ("targets_s", "keys_s", "solve_s", "routing_s"))
                   + f" | {inf} |")
    return "\n".join(out) + "\n"


def merge(reports: list[dict], allow_config: tuple[str, ...] = ()) -> dict:
    """The methods of ``reports`` side by side in one report. ``allow_config``: configuration keys that may
    differ (a setting the merged methods do not read, e.g. the shipped gate's for ``no-hook``); the values
    each report had are kept under ``config_differs``."""
    first = reports[0]
    same = ("dataset", "cases", "steps", "batch", "edits", "model")
    for r in reports[1:]:
        differ = [k for k in same if r.get(k) != first.get(k)]
        differ += [f"base.{k}" for k in _base_differences(first["base"], r["base"])]
        shared = set(r["config"]) & set(first["config"]) - set(allow_config)   # a key added later is no difference
        differ += [f"config.{k}" for k in sorted(shared) if r["config"][k] != first["config"][k]]
        if differ:
            raise SystemExit(f"cannot merge: the reports differ in {differ}")
    out = dict(first, methods={}, seconds=round(sum(r["seconds"] for r in reports), 2))
    out["base"] = max((r["base"] for r in reports), key=lambda b: len(b["final"]))   # the one with every metric
    for r in reports:
        twice = set(out["methods"]) & set(r["methods"])
        if twice:
            raise SystemExit(f"cannot merge: method {sorted(twice)} is in two reports; pick one report's with "
                             "FILE:METHOD[,METHOD...]")
        out["methods"].update(r["methods"])
    differs = {k: [r["config"].get(k) for r in reports] for k in allow_config
               if len({json.dumps(r["config"].get(k)) for r in reports}) > 1}
    if differs:
        out["config_differs"] = differs
    return out


def _load(spec: str) -> dict:
    """A report from ``FILE`` or, with only some of its methods, ``FILE:METHOD[,METHOD...]``."""
    path, _, names = spec.partition(":")
    report = json.loads(open(path).read())
    if names:
        wanted = names.split(",")
        missing = [m for m in wanted if m not in report["methods"]]
        if missing:
            raise SystemExit(f"{path} has no method {missing} (it has {sorted(report['methods'])})")
        report["methods"] = {m: report["methods"][m] for m in wanted}
    return report


def _base_differences(a: dict, b: dict) -> list[str]:
    """The unedited scores two reports disagree on. A metric only one report has (added to ``kbsync eval``
    after the other ran) is no difference; every metric both have must agree exactly."""
    differ = [k for k in set(a["final"]) & set(b["final"]) if a["final"][k] != b["final"][k]]
    return sorted(differ) + (["perplexity"] if a["perplexity"] != b["perplexity"] else [])


def main() -> None:
    ap = argparse.ArgumentParser(description="Markdown tables of kbsync eval reports; --merge puts separate runs side by side.")
    ap.add_argument("reports", nargs="+", help="report JSON files; with --merge, FILE:METHOD[,METHOD...] takes some methods")
    ap.add_argument("--merge", metavar="OUT.json", help="write the merged report here")
    ap.add_argument("--plot", metavar="OUT.png", help="with --merge: plot the merged report")
    ap.add_argument("--allow-config", default="", metavar="KEY,...",
                    help="with --merge: configuration keys that may differ (settings the merged methods do not read)")
    args = ap.parse_args()
    if not args.merge:
        for path in args.reports:
            print(tables(json.loads(open(path).read())))
        return
    merged = merge([_load(p) for p in args.reports], tuple(filter(None, args.allow_config.split(","))))
    open(args.merge, "w").write(json.dumps(merged, indent=2))
    if args.plot:
        from evaluation.cli import plot
        plot(merged, Path(args.plot))
    print(tables(merged))


if __name__ == "__main__":
    main()
