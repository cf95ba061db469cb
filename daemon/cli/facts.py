"""``kbsync facts``: add, import, list and remove facts in the knowledge base (a thin layer over ``kb``).

The database is ``[kb] url`` (default ``<state-dir>/kb.sqlite``); the drop folder is ``<state-dir>/inbox``
(see docs/facts.md).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import click

from kb import DIALECTS, KBError
from kb.formats import FORMATS

from ..config import ConfigError


@contextmanager
def _store(obj):
    """Open the store; every ``kb`` error becomes a clear message on stderr and exit status 1."""
    from kb.facts import FactStore            # here: the store's imports are not needed for --help
    try:
        store = FactStore(obj.config().kb_url)
    except (KBError, ConfigError) as e:
        raise click.ClickException(str(e)) from e
    try:
        yield store
    except KBError as e:
        raise click.ClickException(str(e)) from e
    finally:
        store.close()


def _emit(as_json: bool, doc, human: str) -> None:
    click.echo(json.dumps(doc, indent=2, ensure_ascii=False) if as_json else human)


@click.group()
def facts():
    """The knowledge base: add, import, list and remove facts.

    A fact is a subject, a prompt that contains it (or a template with {} in its place) and a target.
    Files dropped into <state-dir>/inbox are imported by the running daemon.

    \b
    Example:
      kbsync facts import examples/facts.jsonl
      kbsync facts list --pending
    """


@facts.command("add")
@click.option("--subject", required=True, help="Who or what the fact is about.")
@click.option("--prompt", required=True, help="A prompt containing the subject verbatim, or with {} in its place.")
@click.option("--target", required=True, help="The new completion of the prompt.")
@click.option("--paraphrase", "paraphrases", multiple=True, help="Another wording of the prompt (repeatable).")
@click.option("--locality", "locality", multiple=True, metavar="PROMPT[=>TARGET]",
              help="A prompt the edit must not change, optionally with its answer (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_obj
def add(obj, subject, prompt, target, paraphrases, locality, as_json):
    """Add a fact, or update the target of the fact with the same subject and prompt.

    \b
    Example:
      kbsync facts add --subject "Danielle Darrieux" \\
        --prompt "The mother tongue of Danielle Darrieux is" --target English \\
        --paraphrase "Danielle Darrieux grew up speaking" --locality "Michel Rocard is a native speaker of=>French"
    """
    probes = [dict(zip(("prompt", "target"), (p.strip() for p in item.split("=>", 1)))) for item in locality]
    with _store(obj) as store:
        change = store.add(subject, prompt, target, paraphrases=paraphrases, locality=probes, source="cli:add")
        fact = store.get(subject.strip(), prompt.strip())
    doc = {"changed": change is not None, "change": change.to_json() if change else None,
           "fact": fact.to_json() if fact else None}
    _emit(as_json, doc, (f"fact {fact.id}: {fact.prompt} -> {fact.target}" if fact else "") +
          ("" if change else " (unchanged)"))


@facts.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="File format (default: from the extension).")
@click.option("--dialect", type=click.Choice(["auto", *DIALECTS]), default="auto", show_default=True,
              help="Record format: kbsync's own, COUNTERFACT or zsRE (auto: detected).")
@click.option("--force", is_flag=True, help="Apply the file even if these exact bytes were imported before.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_obj
def import_(obj, file, fmt, dialect, force, as_json):
    """Import every fact of FILE (JSON, JSONL, CSV or YAML) in one transaction, or none of them.

    A bad file is reported record by record (line, field, reason) and changes nothing.

    \b
    Example:
      kbsync facts import examples/facts.jsonl
      kbsync facts import counterfact.json --dialect counterfact --json
    """
    with _store(obj) as store:
        result = store.import_file(file, fmt=fmt, dialect=dialect, force=force)
    human = (f"{file}: already imported (same sha256); nothing applied. Use --force to apply it again."
             if result.duplicate else
             f"{file}: {result.records} records, {result.facts} facts, {result.changes} changes pending")
    _emit(as_json, result.to_json(), human)


@facts.command("list")
@click.option("--pending", is_flag=True, help="List the pending changes (not yet carried by HEAD) instead.")
@click.option("--failed", is_flag=True, help="List the changes that failed to apply, with the reason.")
@click.option("--subject", default=None, help="Only this subject's facts.")
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many rows.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (a list of objects).")
@click.pass_obj
def list_(obj, pending, failed, subject, limit, as_json):
    """List the facts in the store (or, with a flag, pending or failed changes).

    \b
    Example:
      kbsync facts list --subject "Danielle Darrieux"
      kbsync facts list --pending --json
    """
    if pending and failed:
        raise click.UsageError("use --pending or --failed, not both")
    with _store(obj) as store:
        if pending or failed:
            rows = store.changes.list("pending" if pending else "failed", limit=None if subject else limit)
            rows = [c for c in rows if subject is None or c.subject == subject][:limit]
            lines = [f"#{c.id} {c.op:6} {c.prompt} -> {c.target if c.target is not None else '(deleted)'}"
                     + (f"  [{c.error}]" if c.error else "") for c in rows]
        else:
            rows = store.facts(subject=subject, limit=limit)
            lines = [f"{f.id:>6}  {f.prompt} -> {f.target}" for f in rows]
    _emit(as_json, [r.to_json() for r in rows], "\n".join(lines) if lines else "(none)")


@facts.command("rm")
@click.argument("ids", nargs=-1, type=int)
@click.option("--subject", default=None, help="The subject of the fact to remove (with --prompt).")
@click.option("--prompt", default=None, help="Its prompt, or template with {}.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_obj
def rm(obj, ids, subject, prompt, as_json):
    """Remove facts by id (see `kbsync facts list`) or by subject and prompt. A removal is a change too.

    \b
    Example:
      kbsync facts rm 12 13
      kbsync facts rm --subject "Danielle Darrieux" --prompt "The mother tongue of {} is"
    """
    if (subject is None) != (prompt is None):
        raise click.UsageError("--subject and --prompt go together")
    if not ids and subject is None:
        raise click.UsageError("name the facts to remove: IDS, or --subject and --prompt")
    with _store(obj) as store:
        with store.transaction():
            changes = [store.remove_id(i, source="cli:rm") for i in ids]
            if subject is not None:
                changes.append(store.remove(subject, prompt, source="cli:rm"))
    _emit(as_json, [c.to_json() for c in changes],
          "\n".join(f"removed: {c.prompt} (change #{c.id})" for c in changes))


@facts.command("retry")
@click.argument("ids", nargs=-1, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_obj
def retry(obj, ids, as_json):
    """Make failed changes pending again (all of them, or these ids from `kbsync facts list --failed`).

    The next sync tries them again; fix what made them fail first (the reason is in the list).

    \b
    Example:
      kbsync facts retry          # every failed change
      kbsync facts retry 41 42
    """
    with _store(obj) as store:
        if ids:
            failed = {c.id for c in store.changes.list("failed")}
            unknown = sorted(set(ids) - failed)
            if unknown:
                raise click.ClickException(f"changes {unknown} are not failed (or do not exist); see "
                                           "`kbsync facts list --failed`. Nothing was retried")
        n = store.changes.retry_failed(list(ids) or None)
    _emit(as_json, {"retried": n}, f"{n} failed change(s) pending again")
