"""The ledger: immutable versions of the served model's hook deltas, the HEAD pointer and its audit log.

A version is a content-addressed safetensors blob (``blob_dir/<sha[:2]>/<sha>.safetensors``, written with
``safetensors.numpy``; ``kb`` never imports torch) plus a ``versions`` row naming its parent. The blob is written
first (temporary name, fsync, rename, fsync of the directory); then one database transaction inserts the row and
what it carries, marks those changes applied and moves HEAD. A crash leaves at most an orphan blob
(``gc_blobs`` removes it), never a row pointing at a missing or partial blob.

Change statuses follow HEAD: a change carried by a version on HEAD's chain is ``applied`` (``version_id``: the
latest such version); one carried only by versions off the chain is ``held`` (``version_id``: the latest version
carrying it), so a rollback does not put it back in the pending queue; pending and failed changes are untouched.

Example::

    ledger = Ledger(store, state_dir / "blobs")
    version = ledger.commit(arrays, {"layers": "..."}, batch.change_ids, config_digest=digest,
                            model_fingerprint=fingerprint, metrics={"seconds": 3.2}, actor="daemon", reason="tick")
    arrays, meta = ledger.load(version.id, expect_fingerprint=fingerprint)
    ledger.move_head(version.parent, actor="alice", reason="the last step broke a locality probe")
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .logger import get_logger
from .blobs import BlobStore, deserialize, serialize
from .changes import change_from_cursor
from .errors import BlobError, ChangeStateError, ModelMismatchError, VersionNotFoundError, VersionPrunedError
from .records import Change, HeadMove, PruneReport, Version
from .validation import now_iso

if TYPE_CHECKING:
    import numpy as np
    from .facts import FactStore

log = get_logger("kbsync.kb")

#: The ``format`` metadata of every blob this ledger writes.
BLOB_FORMAT = "kbsync-delta/1"
RESERVED_META = ("format", "config_digest", "model_fingerprint")

_VERSION_COLS = ("id, parent, created_at, config_digest, model_fingerprint, blob_sha256, blob_bytes, n_facts, "
                 "metrics, note")
_CHAIN = ("WITH RECURSIVE up(id, parent) AS (SELECT id, parent FROM versions WHERE id = ? UNION ALL "
          "SELECT v.id, v.parent FROM versions v JOIN up ON v.id = up.parent) ")
_BELOW = ("WITH RECURSIVE down(id) AS (SELECT id FROM versions WHERE id = ? UNION ALL "
          "SELECT v.id FROM versions v JOIN down ON v.parent = down.id) ")
_CHUNK = 500
_KEPT = "WHERE id NOT IN (SELECT version_id FROM pruned_versions)"     # versions whose weights are kept


class _Head:
    def __repr__(self) -> str:
        return "<HEAD>"


_HEAD = _Head()


@dataclass(frozen=True)
class PlannedVersion:
    """One version to be committed by ``Ledger.commit_chain``."""

    arrays: Mapping[str, np.ndarray]
    meta: Mapping[str, str]
    change_ids: Sequence[int]
    config_digest: str
    model_fingerprint: str
    metrics: Mapping = field(default_factory=dict)
    note: str = ""


class Ledger:
    """Versions, HEAD and blobs of one ``FactStore``; thread-safe through the store's lock, like the rest of kb."""

    def __init__(self, store: FactStore, blob_dir: str | Path):
        self.store = store
        self.blob_dir = Path(blob_dir)
        self.blobs = BlobStore(self.blob_dir)

    # -- writing ------------------------------------------------------------------------------------------------

    def commit(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, str], change_ids: Iterable[int], *,
               parent: int | None | _Head = _HEAD, config_digest: str, model_fingerprint: str,
               metrics: Mapping, actor: str, reason: str, move_head: bool = True) -> Version:
        """Store a step as a new version carrying ``change_ids`` and move HEAD to it; returns the version.

        ``move_head=False`` stores it off HEAD (a branch being built, e.g. a compaction): HEAD stays, and the
        changes it carries stay as HEAD's chain has them (applied there, else held).

        ``parent`` defaults to the current HEAD (None: the base model). ``arrays`` may be empty (a step that
        carries changes but leaves nothing to edit). Raises ``VersionNotFoundError`` for an unknown parent and
        ``ChangeStateError`` for unknown or failed change ids; then no row is written (at most an orphan blob).
        """
        _require(actor=actor, reason=reason, config_digest=config_digest, model_fingerprint=model_fingerprint)
        metadata = _blob_metadata(meta, config_digest, model_fingerprint)
        data = serialize(arrays, metadata)
        metrics_json = _metrics_json(metrics)
        ids = sorted({int(i) for i in change_ids})
        sha, _ = self.blobs.put(data)
        with self.store.transaction() as conn:
            if not self.blobs.has(sha, len(data)):        # a gc in another process took it before our row
                self.blobs.put(data)
            head = conn.execute("SELECT version_id FROM head WHERE id = 1").fetchone()[0]
            parent_id = head if isinstance(parent, _Head) else parent
            if parent_id is not None:
                self._get(conn, parent_id)
                self._refuse_pruned(conn, parent_id)
            n_facts = self._check_changes(conn, ids)
            version_id = conn.execute(
                "INSERT INTO versions (parent, created_at, config_digest, model_fingerprint, blob_sha256, blob_bytes, "
                "n_facts, metrics, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (parent_id, now_iso(), config_digest, model_fingerprint, sha, len(data), n_facts, metrics_json,
                 reason)).fetchone()[0]
            conn.executemany("INSERT INTO version_changes (version_id, change_id) VALUES (?, ?)",
                             [(version_id, i) for i in ids])
            self.store.changes.carry(conn, ids, version_id)
            if move_head:
                self._move(conn, version_id, actor, reason)
            else:
                self._restatus(conn, head)
            version = self._get(conn, version_id)
        log.info("kb.version_committed", version=version.id, parent=version.parent, changes=len(ids),
                 n_facts=n_facts, blob_sha256=sha, blob_bytes=len(data), actor=actor)
        return version

    def commit_chain(self, planned: Sequence[PlannedVersion], *, parent: int | None, actor: str,
                     reason: str) -> list[Version]:
        """Commit several versions in one transaction, the first on ``parent``, each the parent of the next.

        All or none: a rebuild (revert, delete) that replays many steps never leaves HEAD half-way with the
        rest of its facts held. HEAD ends on the last version; each move is in the audit log.
        """
        out: list[Version] = []
        with self.store.transaction():
            for p in planned:
                out.append(self.commit(p.arrays, p.meta, p.change_ids, parent=out[-1].id if out else parent,
                                       config_digest=p.config_digest, model_fingerprint=p.model_fingerprint,
                                       metrics=p.metrics, actor=actor, reason=p.note or reason))
        return out

    def move_head(self, version_id: int | None, *, actor: str, reason: str) -> HeadMove:
        """Point HEAD at ``version_id`` (None: the base model), log who and why, and re-derive change statuses.

        Later versions stay in history: moving HEAD onto them again (roll forward) makes their changes applied.
        """
        _require(actor=actor, reason=reason)
        with self.store.transaction() as conn:
            if version_id is not None:
                self._get(conn, version_id)
                self._refuse_pruned(conn, version_id)
            move = self._move(conn, version_id, actor, reason)
        log.info("kb.head_moved", from_version=move.from_version, to_version=move.to_version, actor=actor,
                 reason=reason)
        return move

    def gc_blobs(self, *, min_age_s: float = 0.0) -> list[Path]:
        """Remove blobs no version references, and temporary files older than ``min_age_s``; returns them.

        Runs inside a write transaction, so a commit in another process cannot insert a row for a blob while
        it is removed (commit re-checks its blob under the same lock). Pass ``min_age_s`` when another process
        may be writing a blob right now: its temporary file is left alone until it is that old.
        """
        with self.store.transaction() as conn:
            referenced = {sha for (sha,) in conn.execute(f"SELECT DISTINCT blob_sha256 FROM versions {_KEPT}")}
            removed = self.blobs.collect(referenced, min_age_s=min_age_s)
        log.info("kb.blobs_collected", removed=len(removed))
        return removed

    def prune(self, *, keep: Iterable[int | None] = (), actor: str, reason: str, dry_run: bool = False
              ) -> PruneReport:
        """Delete the weights of every version off HEAD's chain and off the chains of ``keep`` (version ids, e.g.
        an unfinished compaction's branch tip, whose later versions are kept too, so a branch step committed
        meanwhile stays): what a compaction, a revert or a rollback left behind.

        Their rows, the changes they carried and the HEAD log stay (``kbsync log`` marks them pruned); HEAD can
        no longer move onto them, and nothing can be built on them. One transaction records them; then their
        blobs (those no kept version shares) are removed, so a crash in between leaves orphan blobs that the
        next prune or ``gc_blobs`` removes. ``dry_run``: report what would go, change nothing.
        """
        _require(actor=actor, reason=reason)
        with self.store.transaction() as conn:
            head = conn.execute("SELECT version_id FROM head WHERE id = 1").fetchone()[0]
            kept: set[int] = set()
            for tip in {head, *keep} - {None}:
                kept |= {i for (i,) in conn.execute(_CHAIN + "SELECT id FROM up", (tip,))}
            for tip in set(keep) - {None}:                # a branch kept goes on growing from its tip
                kept |= {i for (i,) in conn.execute(_BELOW + "SELECT id FROM down", (tip,))}
            done = {i for (i,) in conn.execute("SELECT version_id FROM pruned_versions")}
            rows = conn.execute("SELECT id, blob_sha256, blob_bytes FROM versions ORDER BY id").fetchall()
            go = [i for i, _, _ in rows if i not in kept and i not in done]
            going = set(go)
            still = {sha for i, sha, _ in rows if i not in done and i not in going}
            freed = {sha: n for i, sha, n in rows if i in going and sha not in still}
            report = PruneReport(versions=tuple(go), blobs=len(freed), bytes=sum(freed.values()),
                                 kept_versions=len(rows) - len(done) - len(go), dry_run=dry_run)
            if not dry_run and go:
                at = now_iso()
                conn.executemany("INSERT INTO pruned_versions (version_id, at, actor, reason) VALUES (?, ?, ?, ?)",
                                 [(i, at, actor, reason) for i in go])
        if not dry_run:
            self.gc_blobs(min_age_s=3600.0)       # a temporary file younger than that may be a commit in flight
            log.info("kb.versions_pruned", versions=len(go), blobs=report.blobs, bytes=report.bytes, actor=actor,
                     reason=reason)
        return report

    # -- reading ------------------------------------------------------------------------------------------------

    def head(self) -> Version | None:
        """The version HEAD points at, or None for the base model."""
        with self.store.snapshot() as conn:
            head = conn.execute("SELECT version_id FROM head WHERE id = 1").fetchone()[0]
            return None if head is None else self._get(conn, head)

    def get(self, version_id: int) -> Version:
        """The version with this id; ``VersionNotFoundError`` if there is none."""
        with self.store.snapshot() as conn:
            return self._get(conn, version_id)

    def summary(self) -> dict:
        """The knowledge base at a glance (what ``kbsync status`` shows before any model is loaded): HEAD, the
        changes pending, held and failed, the facts and versions, and which store this is."""
        from .db import redact
        head = self.head()
        counts = self.store.counts()
        with self.store.snapshot() as conn:
            versions = conn.execute("SELECT COUNT(*) FROM versions").fetchone()[0]
            pruned = conn.execute("SELECT COUNT(*) FROM pruned_versions").fetchone()[0]
        return {"head": head.id if head else None, "pending": counts.pending, "pending_keys": counts.pending_keys,
                "held": counts.held, "failed": counts.failed, "facts": counts.facts, "versions": versions,
                "pruned_versions": pruned,
                "kb": {"backend": self.store.db.dialect, "url": redact(self.store.url)}}

    def versions(self) -> list[Version]:
        """Every version, by id (the order they were committed in)."""
        with self.store.snapshot() as conn:
            return [_version(r) for r in conn.execute(f"SELECT {_VERSION_COLS} FROM versions ORDER BY id")]

    def chain(self, version_id: int | None) -> list[Version]:
        """The versions from the root to ``version_id`` following parents ([] for None, the base model)."""
        if version_id is None:
            return []
        with self.store.snapshot() as conn:
            self._get(conn, version_id)
            rows = conn.execute(_CHAIN + f"SELECT {_VERSION_COLS} FROM versions WHERE id IN (SELECT id FROM up) "
                                "ORDER BY id", (version_id,)).fetchall()
        return [_version(r) for r in rows]

    def chain_digest(self, version_id: int | None) -> str:
        """sha256 over the chain's (id, blob sha256) pairs: names exactly the deltas a version is made of."""
        h = hashlib.sha256(b"kbsync-chain-v1")
        for v in self.chain(version_id):
            h.update(f"\n{v.id}:{v.blob_sha256}".encode())
        return h.hexdigest()

    def history(self) -> list[dict]:
        """Every version as ``kbsync log`` shows it: whether it is HEAD or on HEAD's chain, its metrics, and
        when its weights were pruned (None: kept)."""
        head = self.head()
        on_chain = {v.id for v in self.chain(head.id if head else None)}
        pruned = self.pruned()
        return [{"id": v.id, "parent": v.parent, "facts": v.n_facts, "created_at": v.created_at,
                 "head": head is not None and v.id == head.id, "on_head_chain": v.id in on_chain,
                 "note": v.note, "bytes": v.blob_bytes, "metrics": v.metrics, "pruned_at": pruned.get(v.id)}
                for v in self.versions()]

    def pruned(self) -> dict[int, str]:
        """version id -> when its weights were pruned (``prune``), for every pruned version."""
        with self.store.snapshot() as conn:
            return {int(i): at for i, at in conn.execute("SELECT version_id, at FROM pruned_versions")}

    def children(self, version_id: int | None) -> list[Version]:
        """The versions whose parent is ``version_id`` (None: the roots, built on the base model), by id."""
        with self.store.snapshot() as conn:
            if version_id is not None:
                self._get(conn, version_id)
            where, args = ("parent IS NULL", ()) if version_id is None else ("parent = ?", (version_id,))
            return [_version(r) for r in conn.execute(f"SELECT {_VERSION_COLS} FROM versions WHERE {where} ORDER BY id",
                                                      args)]

    def carried(self, version_id: int) -> list[Change]:
        """The change rows this version carries, in id order (with their current status)."""
        with self.store.snapshot() as conn:
            self._get(conn, version_id)
            return change_from_cursor(conn.execute("SELECT c.* FROM changes c JOIN version_changes vc ON "
                                                   "vc.change_id = c.id WHERE vc.version_id = ? ORDER BY c.id",
                                                   (version_id,)))

    def head_log(self) -> list[HeadMove]:
        """Every move of HEAD, oldest first (commits included)."""
        with self.store.snapshot() as conn:
            return [HeadMove(*r) for r in conn.execute(
                "SELECT id, at, actor, from_version, to_version, reason FROM head_log ORDER BY id")]

    def blob_path(self, version_id: int) -> Path:
        """Where the blob of this version lives."""
        return self.blobs.path(self.get(version_id).blob_sha256)

    def blob_bytes_total(self) -> int:
        """Bytes of all distinct blobs the versions not pruned reference (what the ledger keeps on disk)."""
        with self.store.snapshot() as conn:
            return int(conn.execute("SELECT coalesce(sum(blob_bytes), 0) FROM "
                                    f"(SELECT DISTINCT blob_sha256, blob_bytes FROM versions {_KEPT}) AS distinct_blobs"
                                    ).fetchone()[0])

    def load(self, version_id: int, *, expect_fingerprint: str | None = None
             ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """The arrays and metadata of a version's blob, verified against its row.

        Raises ``BlobError`` (naming the version and the way out) when the blob is missing, unreadable,
        truncated or corrupted, and ``ModelMismatchError`` (a ``BlobError``) when it was made for another model
        than its row says, or than ``expect_fingerprint``.
        """
        with self.store.snapshot() as conn:
            version = self._get(conn, version_id)
            self._refuse_pruned(conn, version_id)
        path = self.blobs.path(version.blob_sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobError(version.id, "its delta blob is missing", path) from None
        except OSError as e:
            raise BlobError(version.id, f"its delta blob cannot be read ({e.strerror or e})", path) from e
        if len(data) != version.blob_bytes:
            raise BlobError(version.id, f"its delta blob is truncated or altered: {len(data)} bytes, "
                                        f"the ledger recorded {version.blob_bytes}", path)
        sha = hashlib.sha256(data).hexdigest()
        if sha != version.blob_sha256:
            raise BlobError(version.id, f"its delta blob is corrupted: sha256 {sha[:16]}..., the ledger recorded "
                                        f"{version.blob_sha256[:16]}...", path)
        try:
            arrays, meta = deserialize(data)
        except (_safetensors_error(), ValueError, TypeError) as e:
            raise BlobError(version.id, f"its delta blob is not a readable safetensors file ({e})", path) from e
        if meta.get("format") != BLOB_FORMAT:
            raise BlobError(version.id, f"its delta blob has format {meta.get('format')!r}, this kbsync reads "
                                        f"{BLOB_FORMAT!r}", path)
        if meta.get("model_fingerprint") != version.model_fingerprint:
            raise ModelMismatchError(version.id, str(meta.get("model_fingerprint")), version.model_fingerprint, path)
        if expect_fingerprint is not None and version.model_fingerprint != expect_fingerprint:
            raise ModelMismatchError(version.id, version.model_fingerprint, expect_fingerprint, path)
        return arrays, meta

    # -- helpers ------------------------------------------------------------------------------------------------

    def _get(self, conn, version_id: int) -> Version:
        row = conn.execute(f"SELECT {_VERSION_COLS} FROM versions WHERE id = ?", (version_id,)).fetchone()
        if row is None:
            raise VersionNotFoundError(version_id)
        return _version(row)

    def _refuse_pruned(self, conn, version_id: int) -> None:
        row = conn.execute("SELECT at FROM pruned_versions WHERE version_id = ?", (version_id,)).fetchone()
        if row is not None:
            raise VersionPrunedError(version_id, row[0])

    def _check_changes(self, conn, ids: list[int]) -> int:
        """Refuse unknown and failed change ids; return how many distinct fact keys the changes touch."""
        found: dict[int, str] = {}
        keys: set[tuple[str, str]] = set()
        for chunk in _chunks(ids):
            for i, status, subject, template in conn.execute(
                    f"SELECT id, status, subject, template FROM changes WHERE id IN ({','.join('?' * len(chunk))})",
                    chunk):
                found[i] = status
                keys.add((subject, template))
        bad = [i for i in ids if found.get(i, "failed") == "failed"]
        if bad:
            raise ChangeStateError(f"a version cannot carry {len(bad)} change(s) {bad[:10]}: they are unknown or "
                                   "failed; nothing was committed. Retry failed changes first, or take a fresh batch.")
        return len(keys)

    def _move(self, conn, to: int | None, actor: str, reason: str) -> HeadMove:
        """Inside a transaction: set HEAD, append to its log, re-derive the carried changes' statuses."""
        frm = conn.execute("SELECT version_id FROM head WHERE id = 1").fetchone()[0]
        conn.execute("UPDATE head SET version_id = ? WHERE id = 1", (to,))
        at = now_iso()
        move_id = conn.execute("INSERT INTO head_log (at, actor, from_version, to_version, reason) "
                               "VALUES (?, ?, ?, ?, ?) RETURNING id", (at, actor, frm, to, reason)).fetchone()[0]
        self._restatus(conn, to)
        return HeadMove(move_id, at, actor, frm, to, reason)

    def _restatus(self, conn, head: int | None) -> None:
        """The change log re-derives its statuses from HEAD's chain (the versions from the root to HEAD)."""
        chain = set() if head is None else {i for (i,) in conn.execute(_CHAIN + "SELECT id FROM up", (head,))}
        self.store.changes.follow_chain(conn, chain)


def _blob_metadata(meta: Mapping[str, str], config_digest: str, model_fingerprint: str) -> dict[str, str]:
    fixed = {"format": BLOB_FORMAT, "config_digest": config_digest, "model_fingerprint": model_fingerprint}
    clash = [k for k in RESERVED_META if k in meta and meta[k] != fixed[k]]
    if clash:
        raise ValueError(f"blob metadata keys {clash} are set by the ledger; pass them as arguments instead")
    bad = [k for k, v in meta.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"blob metadata maps strings to strings (safetensors); not so for {bad[:5]}")
    return {**meta, **fixed}


def _metrics_json(metrics: Mapping) -> str:
    def plain(x):
        if type(x).__module__ == "numpy" and hasattr(x, "item"):     # a numpy scalar
            return x.item()
        raise TypeError(f"metric value {x!r} ({type(x).__name__}) is not JSON")
    try:
        return json.dumps(dict(metrics), sort_keys=True, default=plain, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"step metrics must be JSON numbers, strings, lists or dicts: {e}") from e


def _version(row: tuple) -> Version:
    return Version(*row[:8], json.loads(row[8]), row[9])


def _require(**values: str) -> None:
    empty = [k for k, v in values.items() if not (isinstance(v, str) and v.strip())]
    if empty:
        raise ValueError(f"say {', '.join(empty)} (a non-empty string each)")


def _chunks(ids: list[int]) -> Iterable[list[int]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i:i + _CHUNK]


def _safetensors_error() -> type:
    import safetensors
    return safetensors.SafetensorError
