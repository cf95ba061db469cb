"""The ``kbsync`` command line (contract: DESIGN.md section 5). A thin layer over the service objects."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from editor.errors import EditorError

from kb import KBError

from ..config import ConfigError, load_config
from evaluation.cli import eval_cmd
from .facts import facts
from ..logs import configure_logging, configure_logging_on_first_use
from ..errors import ServiceError


KB_ONLY = {"log", "show", "facts"}      # commands that read or write the store only: kb does all their logging


class Ctx:
    def __init__(self, state_dir: Path, config: str | None):
        self.state_dir, self.config_path = state_dir, config

    def config(self):
        return load_config(self.config_path, self.state_dir)

    def model(self, progress: bool = True):
        from ..live_model import LoadedModel
        return LoadedModel(self.config(), progress=progress)

    def ledger(self):
        """The store and ledger alone (no model, no torch): what `log` and `show` read."""
        from kb import FactStore
        from kb.ledger import Ledger
        cfg = self.config()
        store = FactStore(cfg.kb_url)
        return store, Ledger(store, cfg.blob_dir)

    def service(self, progress: bool = True):
        from ..service import Service
        return Service(self.config(), progress=progress)

    def daemon(self):
        """A client of the daemon running on this state directory, or None (then work in-process)."""
        import os

        from .client import find_daemon
        return find_daemon(self.state_dir, os.environ.get("KBSYNC_TOKEN") or self.config().daemon.admin_token)


def _version_arg(value: str) -> int | None:
    if value in ("base", "0"):
        return None
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a version id; use a number from `kbsync log`, or 'base'") from None


def _dispatch(obj: "Ctx", remote, local, progress: bool = True):
    """``remote(client)`` through the running daemon when one is up, else ``local(service)`` in-process."""
    client = obj.daemon()
    if client is not None:
        return remote(client)
    with obj.service(progress=progress) as svc:
        return local(svc)


def _steps_doc(svc, reports) -> dict:
    head = svc.ledger.head()
    return {"steps": [r.to_json() for r in reports], "head": head.id if head else None}


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
    if ctx.invoked_subcommand in KB_ONLY:
        configure_logging_on_first_use(log_level)
    else:
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
    worker = obj.model(progress=not as_json)
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
    """Greedy completion of PROMPT by the model at HEAD (through the running daemon when one is up).

    \b
    Example:
      kbsync query "The mother tongue of Danielle Darrieux is" --max-tokens 8
    """
    def local(svc):
        texts, version = svc.query([prompt], max_tokens)
        return {"text": texts[0], "version": version}

    doc = _dispatch(obj, lambda c: c.query(prompt, max_tokens), local, progress=not as_json)
    _emit(as_json, doc, f"{prompt}{doc['text']}\n(version {doc['version'] or 'base'})")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--precision", is_flag=True, help="Without a daemon, also probe the editing precision this machine "
                                               "would choose (loads torch).")
@click.pass_obj
def status(obj: Ctx, as_json, precision):
    """HEAD version, pending and failed counts, model; with a daemon running, what it serves and the
    precision it chose.

    Without a daemon it reads the fact store only and answers at once; ``--precision`` adds the editing
    precision this machine would choose (it loads torch to probe the CPU or GPU, about a second).

    \b
    Example:
      kbsync status --json
    """
    client = obj.daemon()
    if client is not None:
        doc = client.status()
    else:
        cfg = obj.config()
        store, ledger = obj.ledger()
        try:
            doc = {**ledger.summary(), "model": cfg.model.source, "device": None, "model_loaded": False,
                   "degraded": None, "role": None, "served": None, "last_tick": None, "next_tick": None,
                   "daemon": None, "precision": None, "score_precision": None}
        finally:
            store.close()
        if precision:
            from ..live_model import precision_here, score_precision_here
            doc["precision"] = precision_here(cfg).to_json()
            doc["score_precision"] = score_precision_here(cfg).to_json()
    doc.setdefault("fingerprint", None)
    daemon = f"  daemon: pid {doc['daemon']['pid']}" if doc.get("daemon") else "  daemon: not running"
    chosen = (f"{doc['precision']['dtype']} ({doc['precision']['reason']})" if doc.get("precision") else
              "chosen when the model loads (`kbsync status --precision` probes this machine)")
    _emit(as_json, doc, f"head: {doc['head'] or 'base'}  pending: {doc['pending']}  failed: {doc['failed']}  "
                        f"facts: {doc['facts']}  versions: {doc['versions']}  model: {doc['model']}{daemon}"
                        f"\n  editing precision: {chosen}"
                        + (f"\n  gate scores: {doc['score_precision']['dtype']} ({doc['score_precision']['reason']})"
                           if doc.get("score_precision") else ""))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_obj
def sync(obj: Ctx, as_json):
    """Apply pending facts now, as consecutive steps of at most B facts (one version each).

    \b
    Example:
      kbsync facts import examples/facts.jsonl && kbsync sync
    """
    doc = _dispatch(obj, lambda c: c.sync(), lambda svc: _steps_doc(svc, svc.sync(actor="cli")),
                    progress=not as_json)
    human = "\n".join(f"version {r['version']}: {r['kind']}, {r['facts']} facts, {r['seconds']:.1f} s"
                      + (f" ({r['error']})" if r["error"] else "") for r in doc["steps"]) or "nothing pending"
    _emit(as_json, doc, human + f"\nhead: {doc['head'] or 'base'}")


@cli.command("log")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_obj
def log_cmd(obj: Ctx, as_json):
    """Version history, HEAD marked with '*' (versions off HEAD's history with '-', '[pruned]' when their
    weights were deleted by `kbsync prune`).

    \b
    Example:
      kbsync log --json
    """
    store, ledger = obj.ledger()
    try:
        rows = ledger.history()
    finally:
        store.close()
    lines = [f"{'*' if r['head'] else (' ' if r['on_head_chain'] else '-')} {r['id']:>4}  parent {r['parent'] or 'base':>4}  "
             f"{r['facts']:>3} facts  {r['created_at']}  {r['note'] or ''}" + ("  [pruned]" if r["pruned_at"] else "")
             for r in rows]
    _emit(as_json, rows, "\n".join(lines) or "no versions yet (the base model)")


@cli.command()
@click.argument("version", type=int)
@click.pass_obj
def show(obj: Ctx, version):
    """One version: its parent, metrics, blob and the facts it carries (JSON).

    \b
    Example:
      kbsync show 3
    """
    store, ledger = obj.ledger()
    try:
        v = ledger.get(version)
        doc = {**v.to_json(), "changes": [c.to_json() for c in ledger.carried(v.id)]}
    finally:
        store.close()
    _emit(True, doc, "")


@cli.command()
@click.argument("version")
@click.option("--reason", default="", help="Why (kept in the audit log).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_obj
def rollback(obj: Ctx, version, reason, as_json):
    """Move HEAD to VERSION (back or forward; 'base' = the unedited model). Later versions stay in history.

    \b
    Example:
      kbsync rollback 2 --reason "bad batch from import 2026-11-25"
    """
    target = _version_arg(version)
    doc = _dispatch(obj, lambda c: c.rollback(target, reason=reason),
                    lambda svc: svc.rollback(target, actor="cli", reason=reason))
    _emit(as_json, doc, f"head: {doc['head'] or 'base'} (was {doc['from'] or 'base'})")


@cli.command()
@click.argument("version", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_obj
def revert(obj: Ctx, version, as_json):
    """Take one step out of HEAD's history: back to its parent, later steps' facts re-applied as new steps.

    \b
    Example:
      kbsync revert 2
    """
    doc = _dispatch(obj, lambda c: c.revert(version), lambda svc: _steps_doc(svc, svc.revert(version, actor="cli")),
                    progress=not as_json)
    _emit(as_json, doc, f"reverted {version}; head: {doc['head'] or 'base'} ({len(doc['steps'])} new versions)")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--no-wait", is_flag=True, help="With a running daemon: start it and return.")
@click.pass_obj
def compact(obj: Ctx, as_json, no_wait):
    """Solve the facts HEAD answers with again, into fewer versions, and move HEAD there.

    Removed and corrected facts leave the new history; versions before it stay, so any rollback is exact.
    A running daemon compacts in the background, between requests; an interrupted compaction resumes
    where it stopped.

    \b
    Example:
      kbsync facts rm "Danielle Darrieux" "The mother tongue of {} is" && kbsync sync && kbsync compact
    """
    def say(p):
        if not as_json:
            click.echo(f"{p.done} of {p.live} facts on the branch" + (f" (version {p.version})" if p.version else ""),
                       err=True)

    client = obj.daemon()
    if client is not None:
        state = client.compact()
        while state.get("running") and not no_wait:
            time.sleep(0.5)
            state = client.status()["compaction"]
        doc = state
        if state.get("error"):
            raise click.ClickException(f"compaction stopped: {state['error']} (its versions so far are kept; "
                                       "`kbsync compact` again resumes it)")
    else:
        with obj.service(progress=not as_json) as svc:
            doc = svc.compact(actor="cli", progress=say)
    p = doc.get("progress", doc) or {}
    human = ("compaction running in the daemon; `kbsync status` shows it" if doc.get("running") else
             f"compacted: {p.get('live', 0)} facts, head {p.get('head') if p.get('head') is not None else 'base'}")
    _emit(as_json, doc, human)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Say what would go; delete nothing.")
@click.option("--reason", default="kbsync prune", show_default=True, help="Why (kept with each pruned version).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_obj
def prune(obj: Ctx, dry_run, reason, as_json):
    """Delete the weights of the versions off HEAD's history (what compaction, revert and rollback left).

    Their rows, the facts they carried and the HEAD log stay, marked pruned in `kbsync log`; HEAD can no
    longer move onto them. HEAD's history and an unfinished compaction's branch are kept. Safe beside a
    running daemon. After `kbsync compact`, this is what stops the ledger growing with retracted facts.

    \b
    Example:
      kbsync compact && kbsync prune --dry-run && kbsync prune
    """
    from daemon.compaction import branch_tip
    store, ledger = obj.ledger()
    try:
        head = ledger.head()
        tip = branch_tip(ledger, head.id if head else None)
        report = ledger.prune(keep=[tip] if tip is not None else [], actor="cli", reason=reason, dry_run=dry_run)
        doc = {**report.to_json(), "kept_bytes": ledger.blob_bytes_total()}
    finally:
        store.close()
    n = len(report.versions)
    human = (f"{'would prune' if dry_run else 'pruned'} {n} version{'s' * (n != 1)}"
             + (f" ({_ranges(report.versions)})" if n else "")
             + f": {report.blobs} blobs, {report.bytes / 1e6:.1f} MB; {report.kept_versions} versions kept "
               f"({doc['kept_bytes'] / 1e6:.1f} MB)")
    _emit(as_json, doc, human)


def _ranges(ids) -> str:
    """1, 2, 3, 7 -> '1-3, 7'."""
    out, run = [], []
    for i in ids:
        if run and i != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(i)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


@cli.command("export")
@click.argument("version")
@click.option("--format", "fmt", type=click.Choice(["peft", "merged"]), required=True,
              help="peft: a LoRA adapter (vLLM --enable-lora, peft); merged: a Hugging Face model directory.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory to write (default: <state-dir>/exports/v<VERSION>-<FORMAT>).")
@click.option("--max-rank", type=click.IntRange(min=1), default=None,
              help="peft only: the largest LoRA rank (default 512, vLLM's largest); above it a truncated SVD, "
                   "its error written down.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_obj
def export_cmd(obj: Ctx, version, fmt, out, max_rank, as_json):
    """Export VERSION ('head', a number, or 'base') for another server. Both formats serve the edit WITHOUT
    the gate (what `kbsync eval` calls no-hook): see docs/serving.md for the cost and for the vLLM plugin,
    which keeps it.

    \b
    Examples:
      kbsync export head --format peft
      kbsync export 12 --format merged --out ./smollm2-v12
    """
    with obj.service(progress=not as_json) as svc:
        if version == "head":
            head = svc.ledger.head()
            target = head.id if head else None
        else:
            target = _version_arg(version)
        out = out or obj.config().state_dir / "exports" / f"v{target or 'base'}-{fmt}"
        doc = svc.export(target, fmt, out, max_rank=max_rank)
    _emit(as_json, doc, f"version {target or 'base'} exported as {fmt} to {doc['out']} (no gate: the delta "
                        "applies to every token)")


@cli.command()
@click.option("--interval", "interval_s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Sync every S seconds (default: [daemon] interval_s, 60).")
@click.option("--cron", default=None, help="Sync on a crontab schedule instead, e.g. '*/5 * * * *'.")
@click.option("--host", default=None, help="Admin API address (default: [daemon] host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Admin API port (default: [daemon] port, 8765).")
@click.pass_obj
def run(obj: Ctx, interval_s, cron, host, port):
    """The daemon in the foreground: watch <state-dir>/inbox, sync on a schedule, serve the admin API.

    SIGTERM stops it within 10 s (a step in flight is abandoned, uncommitted); SIGHUP reloads the
    config; a second Ctrl-C exits at once. Under systemd it speaks the notify protocol (Type=notify).

    \b
    Example:
      kbsync --state-dir ./state run --interval 30 --port 8765
    """
    from ..runtime import Runtime
    from ..http.server import serve

    cfg = obj.config()
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    runtime = Runtime(cfg, interval_s=interval_s, cron=cron, host=host, port=port, progress=True,
                      config_loader=obj.config)
    return serve(runtime)


cli.add_command(facts)
cli.add_command(eval_cmd)


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
    except (EditorError, ConfigError, ServiceError, KBError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
