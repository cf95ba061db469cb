"""Typed, frozen records that cross the ``kb`` API: facts, their provenance, changes, batches, versions, reports."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

#: Placeholder for the subject inside a prompt template.
SLOT = "{}"

Op = Literal["upsert", "delete"]
#: pending: carried by no version yet (and not failed); applied: carried by a version on HEAD's chain;
#: held: carried only by versions off HEAD's chain (rolled back, not re-queued); failed: a step refused it.
Status = Literal["pending", "applied", "failed", "held"]


@dataclass(frozen=True)
class LocalityProbe:
    """A prompt the edit must not change. ``target`` is the expected answer, or None for "as the base model"."""

    prompt: str
    target: str | None = None

    def to_json(self) -> dict:
        return {"prompt": self.prompt} if self.target is None else {"prompt": self.prompt, "target": self.target}


@dataclass(frozen=True)
class Provenance:
    """Where a fact came from: a file (path and sha256 of its bytes) or a command, record number, time."""

    source: str
    sha256: str | None = None
    record: int | None = None
    at: str | None = None

    def to_json(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "record": self.record, "at": self.at}


@dataclass(frozen=True)
class Fact:
    """One fact. ``template`` is the prompt with ``{}`` where the subject goes; (subject, template) is the key."""

    subject: str
    template: str
    target: str
    paraphrases: tuple[str, ...] = ()
    locality: tuple[LocalityProbe, ...] = ()
    provenance: Provenance | None = None
    id: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.subject, self.template)

    @property
    def prompt(self) -> str:
        """The prompt with the subject filled in."""
        return render(self.template, self.subject)

    def to_json(self) -> dict:
        return {"id": self.id, "subject": self.subject, "prompt": self.prompt, "template": self.template,
                "target": self.target, "paraphrases": list(self.paraphrases),
                "locality": [p.to_json() for p in self.locality],
                "provenance": self.provenance.to_json() if self.provenance else None}


@dataclass(frozen=True)
class Change:
    """One row of the append-only change log. A delete has ``target`` None."""

    id: int
    op: Op
    subject: str
    template: str
    target: str | None
    paraphrases: tuple[str, ...]
    locality: tuple[LocalityProbe, ...]
    provenance: Provenance
    at: str
    status: Status
    version_id: int | None = None
    error: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.subject, self.template)

    @property
    def prompt(self) -> str:
        return render(self.template, self.subject)

    def to_json(self) -> dict:
        return {"id": self.id, "op": self.op, "subject": self.subject, "prompt": self.prompt,
                "template": self.template, "target": self.target, "paraphrases": list(self.paraphrases),
                "locality": [p.to_json() for p in self.locality], "provenance": self.provenance.to_json(),
                "at": self.at, "status": self.status, "version_id": self.version_id, "error": self.error}


@dataclass(frozen=True)
class BatchEntry:
    """The net effect on one key: its last pending change, and every pending change id it stands for."""

    change: Change
    change_ids: tuple[int, ...]


@dataclass(frozen=True)
class Batch:
    """The next pending changes, coalesced per key, in the order their keys first became pending."""

    entries: tuple[BatchEntry, ...]

    @property
    def change_ids(self) -> tuple[int, ...]:
        """Every change id the batch carries: hand these to ``mark_applied`` or ``mark_failed``."""
        return tuple(i for e in self.entries for i in e.change_ids)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)


@dataclass(frozen=True)
class Counts:
    """Sizes for ``kbsync status``: facts in the store, pending changes (and distinct keys), failed, applied
    and held changes (held: carried only by versions off HEAD's chain, after a rollback)."""

    facts: int
    pending: int
    pending_keys: int
    failed: int
    applied: int
    held: int = 0


@dataclass(frozen=True)
class Version:
    """One immutable step in the ledger: its parent, fingerprints, content-addressed blob and what it carries.

    ``n_facts`` is the number of distinct fact keys among the changes it carries; ``note`` is the commit's reason.
    """

    id: int
    parent: int | None
    created_at: str
    config_digest: str
    model_fingerprint: str
    blob_sha256: str
    blob_bytes: int
    n_facts: int
    metrics: dict
    note: str | None = None

    def to_json(self) -> dict:
        return {"id": self.id, "parent": self.parent, "created_at": self.created_at,
                "config_digest": self.config_digest, "model_fingerprint": self.model_fingerprint,
                "blob_sha256": self.blob_sha256, "blob_bytes": self.blob_bytes, "n_facts": self.n_facts,
                "metrics": dict(self.metrics), "note": self.note}


@dataclass(frozen=True)
class PruneReport:
    """What ``Ledger.prune`` deleted (or, with ``dry_run``, would delete)."""

    versions: tuple[int, ...]     # the versions whose weights went
    blobs: int                    # blob files removed (versions may share one)
    bytes: int                    # their bytes
    kept_versions: int            # versions whose weights stay
    dry_run: bool = False

    def to_json(self) -> dict:
        return {"versions": list(self.versions), "blobs": self.blobs, "bytes": self.bytes,
                "kept_versions": self.kept_versions, "dry_run": self.dry_run}


@dataclass(frozen=True)
class HeadMove:
    """One row of HEAD's append-only audit log: who moved it, when, from where to where (None: base), why."""

    id: int
    at: str
    actor: str
    from_version: int | None
    to_version: int | None
    reason: str

    def to_json(self) -> dict:
        return {"id": self.id, "at": self.at, "actor": self.actor, "from_version": self.from_version,
                "to_version": self.to_version, "reason": self.reason}


@dataclass(frozen=True)
class BadRecord:
    """One problem in a fact file: record number (1-based), line (when known), field (when one), reason."""

    record: int | None
    line: int | None
    field: str | None
    reason: str

    def describe(self) -> str:
        where = [f"record {self.record}" if self.record is not None else None,
                 f"line {self.line}" if self.line is not None else None,
                 f"field '{self.field}'" if self.field else None]
        return ", ".join(w for w in where if w) + (": " if any(where) else "") + self.reason

    def to_json(self) -> dict:
        return {"record": self.record, "line": self.line, "field": self.field, "reason": self.reason}


@dataclass(frozen=True)
class ImportResult:
    """What an import did. ``duplicate``: these exact bytes were imported before, so nothing was applied."""

    source: str
    sha256: str
    records: int
    facts: int
    changes: int
    duplicate: bool = False

    def to_json(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "records": self.records, "facts": self.facts,
                "changes": self.changes, "duplicate": self.duplicate}


def render(template: str, subject: str) -> str:
    """Fill the subject into a template (only the first ``{}``; other braces are literal)."""
    return template.replace(SLOT, subject, 1)


def probes_from_json(text: str | None) -> tuple[LocalityProbe, ...]:
    items = json.loads(text) if text else []
    return tuple(LocalityProbe(i["prompt"], i.get("target")) if isinstance(i, dict) else LocalityProbe(str(i))
                 for i in items)


def probes_to_json(probes: tuple[LocalityProbe, ...]) -> str:
    return json.dumps([p.to_json() for p in probes], ensure_ascii=False)


def version_label(version_id: int | None) -> str:
    """How a served answer names the version that produced it (``system_fingerprint``): "v3", or "base"."""
    return "base" if version_id is None else f"v{version_id}"
