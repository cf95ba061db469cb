"""The ``kbsync`` command line (contract: DESIGN.md section 5). A thin layer over the service objects."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from editor.errors import EditorError

from .config import ConfigError, load_config
from .facts_cli import facts
from .logs import configure_logging


class Ctx:
    def __init__(self, state_dir: Path, config: str | None):
        self.state_dir, self.config_path = state_dir, config

    def config(self):
        return load_config(self.config_path, self.state_dir)

    def worker(self, progress: bool = True):
        from .worker import ModelWorker
        return ModelWorker(self.config(), progress=progress)


def _emit(as_json: bool, doc, human: str) -> None:
    click.echo(json.dumps(doc, indent=2, default=str) if as_json else human)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), envvar="KBSYNC_STATE_DIR",
              default=Path("state"), show_default=True, help="Where models, statistics and versions live.")
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              help="Config file (default configs/default.toml), merged under <state-dir>/config.toml.")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]))
@click.pass_context
def cli(ctx, state_dir, config, log_level):
    """kbsync keeps a served language model in sync with a knowledge base.

    \b
    Example:
      kbsync --state-dir ./state stats build
    """
    configure_logging(log_level)
    ctx.obj = Ctx(state_dir, config)


@cli.group()
def stats():
    """Key statistics E[k kᵀ] of the editable layers."""


@stats.command("build")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_obj
def stats_build(obj: Ctx, as_json):
    """Precompute (or find in the cache) the key statistics for the configured model.

    \b
    Example:
      kbsync stats build --json
    """
    worker = obj.worker(progress=not as_json)
    s = worker.stats
    doc = {"key": s.key, "tokens": s.n_tokens, "layers": list(s.mom2), "model": worker.em.fingerprint(),
           "corpus": worker.cfg.editor.stats.corpus}
    _emit(as_json, doc, f"key statistics {s.key}: {s.n_tokens} tokens, layers {list(s.mom2)}")


@cli.command()
@click.argument("prompt")
@click.option("--max-tokens", default=16, show_default=True, type=click.IntRange(1, 512))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_obj
def query(obj: Ctx, prompt, max_tokens, as_json):
    """Greedy completion of PROMPT by the model (the base model until versions land).

    \b
    Example:
      kbsync query "The Eiffel Tower is in the city of" --max-tokens 8
    """
    worker = obj.worker(progress=not as_json)
    text = worker.query([prompt], max_tokens)[0]
    _emit(as_json, {"text": text, "version": None}, prompt + text)


@cli.command()
@click.argument("facts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--max-tokens", default=8, show_default=True, type=click.IntRange(1, 128))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_obj
def demo(obj: Ctx, facts_file, max_tokens, as_json):
    """Edit the model in-process with the facts of a JSONL file (one step) and show answers before and after.

    Each line is {"subject": ..., "prompt": ..., "target": ...}; the prompt contains the subject or '{}'.
    Nothing is stored: this shows the editor at work until the daemon runs the full pipeline.

    \b
    Example:
      kbsync demo examples/facts.jsonl
    """
    from editor.requests import EditRequest

    requests = []
    for n, line in enumerate(facts_file.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            requests.append(EditRequest(rec["subject"], rec["prompt"], rec["target"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise click.ClickException(f"{facts_file}:{n}: not a fact ({exc}); "
                                       'expected {"subject": ..., "prompt": ..., "target": ...}')
    if not requests:
        raise click.ClickException(f"{facts_file} holds no facts")
    worker = obj.worker(progress=not as_json)
    prompts = [r.text for r in requests]
    before = worker.query(prompts, max_tokens)
    delta = worker.edit(requests)
    after = worker.query(prompts, max_tokens)
    doc = {"facts": [{"prompt": p, "target": r.target, "before": b, "after": a}
                     for p, r, b, a in zip(prompts, requests, before, after)],
           "seconds": round(delta.metrics["total_s"], 2)}
    human = "\n".join(f"{p}\n  before:{b!r}\n  after: {a!r}" for p, b, a in zip(prompts, before, after))
    _emit(as_json, doc, human + f"\n(one step, {len(requests)} facts, {doc['seconds']} s)")


cli.add_command(facts)


def main() -> None:
    try:
        rv = cli(standalone_mode=False)
        sys.exit(rv if isinstance(rv, int) else 0)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.UsageError as exc:
        exc.show()
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(1)
    except (EditorError, ConfigError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
