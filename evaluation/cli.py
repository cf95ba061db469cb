"""``kbsync eval``: the consecutive-editing benchmark (evaluation/harness.py) from the command line."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

DATA_FILES = {"counterfact": "counterfact-edit.json", "zsre": "zsre-train-1k.json"}
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"     # ../shared/data beside the project


def _span(value: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in value.split(":"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a range A:B, e.g. 5000:5200") from None
    if not 0 <= a < b:
        raise click.BadParameter(f"{value!r}: need 0 <= A < B")
    return a, b


def _counts(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of edit counts, e.g. 0,100,1000") from None


@click.command("eval")
@click.option("--dataset", type=click.Choice(sorted(DATA_FILES)), default="counterfact", show_default=True)
@click.option("--data", "data_path", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Dataset file (default: ../shared/data/ beside the project).")
@click.option("--cases", "span", default="5000:5200", show_default=True, help="Case range A:B (tune below 2000, report from 5000).")
@click.option("--steps", type=click.IntRange(1), default=20, show_default=True, help="Number of consecutive steps T.")
@click.option("--batch", type=click.IntRange(1), default=10, show_default=True, help="Edits per step B.")
@click.option("--eval-every", type=click.IntRange(0), default=0, help="Evaluate every k steps as well (0: at the end only).")
@click.option("--method", "methods", default="comeba-hk", show_default=True,
              help="comeba-hk, no-hook, memit, comeba-hk@GATE (another routing gate: cascade, token, zscore), "
                   "or several comma-separated (run side by side).")
@click.option("--heldout", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Plain text for perplexity (default: ../shared/data/wikitext2-valid.txt if present).")
@click.option("--gen-every", type=click.IntRange(1), default=1, show_default=True,
              help="Generation metrics (greedy answers) on every k-th edit only: at 1,000 edits they cost ~20 min per "
                   "evaluation on 2 CPU cores.")
@click.option("--score-every", type=click.IntRange(1), default=1, show_default=True,
              help="Teacher-forced metrics on every k-th edit only (a 5,000-edit evaluation of every edit is ~30 min "
                   "on 2 CPU cores).")
@click.option("--speed-at", default="", help="Edit counts at which to measure hooked vs base generation speed, e.g. 0,100,1000.")
@click.option("--model", "model_source", default=None,
              help="Model to edit instead of [model] source (embedded, a Hugging Face folder, .safetensors or .gguf); "
                   "its editing hyper-parameters still come from [model] hparams.")
@click.option("--device", default=None, help="Device instead of [model] device (auto, cpu, cuda, cuda:N).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the JSON report here (each evaluation also goes to PATH.partial.jsonl as soon as it exists, until the report is written).")
@click.option("--checkpoint", "checkpoint", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Save every step and evaluation in this folder; started again with the same options, the run "
                   "goes on from its last saved step (a 5,000-edit run is hours of CPU).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write a PNG plot here.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.pass_obj
def eval_cmd(obj, dataset, data_path, span, steps, batch, eval_every, methods, heldout, gen_every, score_every, speed_at, model_source,
             device, json_path, checkpoint, plot_path, progress):
    """Run a consecutive-editing benchmark on the configured model (not the daemon's state: a fresh,
    unedited copy) and report efficacy, paraphrase efficacy, specificity, reliability, generality,
    locality, perplexity and speed.

    \b
    Example (200 edits, three methods side by side):
      kbsync eval --dataset counterfact --cases 5000:5200 --steps 20 --batch 10 \\
        --method comeba-hk,no-hook,memit --json bench/out/eval.json --plot docs/img/eval.png
    """
    from .cases import load_cases
    from .harness import evaluate, heldout_texts
    from editor.errors import EditorError

    from .methods import method

    names = tuple(m.strip() for m in methods.split(",") if m.strip())
    if not names:
        raise click.BadParameter("no method given; e.g. comeba-hk", param_hint="--method")
    for m in names:
        try:
            method(m)
        except EditorError as e:
            raise click.BadParameter(str(e), param_hint="--method") from None
    path = data_path or SHARED / DATA_FILES[dataset]
    if not path.exists():
        raise click.UsageError(f"no dataset file at {path}; pass --data PATH")
    cases = load_cases(dataset, path, _span(span))
    heldout = heldout or (SHARED / "wikitext2-valid.txt")
    texts = heldout_texts(heldout) if heldout.exists() else []

    from dataclasses import replace

    from daemon.live_model import LoadedModel

    cfg = obj.config()
    cfg = replace(cfg, model=replace(cfg.model, source=model_source or cfg.model.source,
                                     device=device or cfg.model.device))
    worker = LoadedModel(cfg, progress=progress)
    t = time.perf_counter()
    stats = worker.stats
    stats_s = round(time.perf_counter() - t, 2)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps * len(names), desc="eval", unit="step")

    partial = json_path.with_name(json_path.name + ".partial.jsonl") if json_path else None
    seen: set = set()

    def tick(method, s, total, last):
        if partial is not None and last is not None and (method, last["step"]) not in seen:
            seen.add((method, last["step"]))                     # each evaluation, as soon as it exists
            partial.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "a") as f:
                f.write(json.dumps({"method": method, **last}) + "\n")
        if bar is not None:
            bar.set_postfix_str(f"{method} {s}/{total}" + (f" eff={last['efficacy']:.2f} loc={last['locality']:.2f}"
                                                            if last else ""))
            bar.update(1)

    try:
        report = evaluate(worker.em, cases, stats, worker.cfg.editor, methods=names, steps=steps, batch=batch,
                          eval_every=eval_every, heldout=texts, speed_at=_counts(speed_at), stats_seconds=stats_s,
                          progress=tick, gen_every=gen_every, score_every=score_every, checkpoint=checkpoint)
    finally:
        if bar:
            bar.close()
        worker.close()
    report.update({"dataset": dataset, "data": str(path), "cases": span, "gen_every": gen_every, "score_every": score_every, "model": worker.cfg.model.source,
                   "device": str(worker.em.device), "precision": worker.precision.to_json(),
                   "score_precision": worker.em.score_choice.to_json()})
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
        partial.unlink(missing_ok=True)                          # the report holds the whole history
    if plot_path:
        plot(report, plot_path)
    click.echo(table(report))


def table(report: dict) -> str:
    """The final metrics of every method (and the unedited model) as a markdown table."""
    cols = ("efficacy", "paraphrase_efficacy", "specificity", "reliability", "generality", "locality",
            "locality_uncontested", "gen_success", "gen_paraphrase", "gen_locality")
    cell = lambda final, c: f"{final[c]:.3f}" if c in final else "-"               # noqa: E731
    head = "| method | " + " | ".join(cols) + " | perplexity | edits/s |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    base = report["base"]
    lines.append("| unedited | " + " | ".join(cell(base["final"], c) for c in cols) + f" | {base['perplexity']:.2f} | |")
    for name, run in report["methods"].items():
        lines.append(f"| {name} | " + " | ".join(cell(run["final"], c) for c in cols)
                     + f" | {run['perplexity']:.2f} | {run['speed']['edits_per_s']} |")
    return "\n".join(lines) + f"\n\n{report['edits']} edits ({report['steps']} x {report['batch']}), {report['seconds']} s"


def plot(report: dict, path: Path) -> None:
    """One panel per metric: value against the number of edits, a line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ("efficacy", "paraphrase_efficacy", "specificity", "reliability", "generality", "locality")
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), sharex=True)
    for ax, col in zip(axes.flat, cols):
        for name, run in report["methods"].items():
            xs = [h["edits"] for h in run["history"]]
            ax.plot(xs, [h[col] for h in run["history"]], marker="o", ms=3, label=name)
        ax.axhline(report["base"]["final"][col], color="grey", ls=":", lw=1, label="unedited")
        ax.set_title(col.replace("_", " "))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=.3)
    for ax in axes[-1]:
        ax.set_xlabel("edits")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{report['dataset']} cases {report['cases']}, {report['steps']} steps x {report['batch']}, {report['model']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
