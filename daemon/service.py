"""The service layer: the one place where ``kb`` facts become ``editor`` edits. CLI and HTTP call it.

Versions follow DESIGN.md §3. A sync takes the pending changes in batches of at most B: upserts become
one COMEBA-HK step (one version) each (a correction first masks the fact's old edit); deletes become one
version that masks the deleted facts' edits. Rebuilds (``revert``, and deletes in a history from before
columns were recorded) replay facts from their stored targets, are computed in memory first and committed
as one ledger transaction, so a crash leaves either the old HEAD or the whole new chain. Compaction
(``daemon.compaction``) re-solves the live facts onto a branch and moves HEAD there.

The service owns the editor lock and the planning; the model and the version it holds are the
:class:`~daemon.live_model.LiveModel`'s, and each step passes the :class:`~daemon.verify.VerifyGate` first.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import structlog
import torch

from editor.errors import EditorError
from editor.requests import EditRequest, StepBatch
from editor.step import StepDelta, apply_delta, compute_delta, taking_out
from kb import FactStore, KBError
from kb.ledger import Ledger, PlannedVersion

from .config import AppConfig
from .errors import ServiceError
from .live_model import BASE, LiveModel, precision_here, score_precision_here
from .memory import release_freed_memory
from .verify import VerifyGate

log = structlog.get_logger("kbsync.service")


@dataclass(frozen=True)
class StepReport:
    version: int | None
    facts: int
    kind: str            # "edit", "remove" (a version that masks edits), "replay", "record" (no weights), "failed"
    seconds: float
    error: str | None = None

    def to_json(self) -> dict:
        return {"version": self.version, "facts": self.facts, "kind": self.kind,
                "seconds": round(self.seconds, 2), "error": self.error}


class Service:
    """Facts, versions and the model of one state directory. The model loads on first need."""

    def __init__(self, cfg: AppConfig, progress: bool = True, preloaded=None):
        self.cfg = cfg
        self.progress = progress
        self._preloaded = preloaded
        self.store = FactStore(cfg.kb_url)
        self.ledger = Ledger(self.store, cfg.blob_dir)
        self._live: LiveModel | None = None            # loads on first need
        self.verify = VerifyGate(cfg.verify)           # checks each step before it is committed
        self._editor: bool | None = None              # holds the editor lock (see is_editor); None: never asked

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._live is not None:
            self._live.close()
            self._live = None
        self.store.close()

    # ----- the model ---------------------------------------------------------------------------
    @property
    def live(self) -> LiveModel:
        """The live model (loaded on first use, then restored to HEAD)."""
        if self._live is None:
            self._live = LiveModel(self.cfg, self.ledger, progress=self.progress, preloaded=self._preloaded)
            head = self.ledger.head()
            try:
                self._live.restore(head.id if head else BASE)
            except (ServiceError, KBError) as exc:
                # Stay up (no crash loop under systemd): queries and syncs report this error until an
                # operator rolls back to a version that restores.
                self._live.degraded = str(exc)
                log.error("model.restore_failed", head=head.id if head else None, error=self._live.degraded)
        return self._live

    @property
    def model_loaded(self) -> bool:
        return self._live is not None

    @property
    def degraded(self) -> str | None:
        """Why HEAD could not be restored, if it could not (None before the model loads)."""
        return self._live.degraded if self._live is not None else None

    # ----- reads ---------------------------------------------------------------------------------
    def status(self) -> dict:
        doc = {**self.ledger.summary(), "model": self.cfg.model.source, "device": None,
               "model_loaded": self.model_loaded, "degraded": self.degraded,
               "role": {True: "editor", False: "follower", None: None}[self._editor],   # None: not a daemon
               "served": self.served if self.model_loaded else None}   # the version the live model is at
        if self.model_loaded:
            doc["device"] = str(self.live.em.device)
            doc["fingerprint"] = self.live.em.fingerprint()
            doc["precision"] = self.live.precision.to_json()
            doc["score_precision"] = self.live.em.score_choice.to_json()   # the gate's screen (gate_screen.py)
            doc["gate"] = self.live.em.gate                 # the routing gate HEAD's history is served with
        else:
            doc["precision"] = precision_here(self.cfg).to_json()
            doc["score_precision"] = score_precision_here(self.cfg).to_json()
        return doc

    def query(self, prompts: list[str], max_tokens: int = 16) -> tuple[list[str], int | None]:
        version = self.live.at_head()
        return self.live.query(prompts, max_tokens), version

    def model_at_head(self):
        """The live model with HEAD's hook state, and HEAD's id. Hold the model lock while using it."""
        version = self.live.at_head()
        return self.live.em, version

    def export(self, version_id: int | None, fmt: str, out, max_rank: int | None = None) -> dict:
        """Write ``version_id``'s edit as a PEFT adapter or a merged model directory (editor/export.py);
        neither keeps the gate. The live model and its hooks are untouched."""
        from editor import export

        if version_id is not None:
            self._version(version_id)
        deltas = self.live.deltas(version_id)
        meta = {"kbsync_version": version_id, "ledger_digest": self.ledger.chain_digest(version_id),
                "model_fingerprint": self.live.em.fingerprint(), "model_source": str(self.cfg.model.source)}
        if fmt == "peft":
            doc = export.write_peft(self.live.em, deltas, out, meta, max_rank or export.MAX_LORA_RANK)
        elif fmt == "merged":
            doc = export.write_merged(self.live.em, deltas, out, meta)
        else:
            raise ServiceError(f"export format {fmt!r} is not one of peft, merged")
        log.info("version.exported", version=version_id, format=fmt, out=str(out))
        return {**doc, "out": str(out)}

    # ----- the editor lock: one process edits, the others follow HEAD ----------------------------
    @property
    def is_editor(self) -> bool:
        """Whether this process edits the store: it holds the editor lock, or takes it now if it is free.

        The lock is a PostgreSQL session advisory lock (a lock file beside a SQLite store), released when the
        process ends, so a follower takes over on its next tick after the editor dies."""
        if not self._editor:
            self._editor = self.store.db.try_editor_lock()
            if self._editor:
                log.info("editor.acquired", kb=self.store.db.dialect)
        return self._editor

    @property
    def served(self) -> int | None | str:
        """The version the live model is at (None: the base model; "unloaded" before the model loads)."""
        return self._live.served if self._live is not None else "unloaded"

    def follow(self) -> int | None:
        """A follower's tick: serve HEAD as the editor (or an operator's rollback) moved it; returns HEAD."""
        return self.live.at_head()

    def require_editor(self) -> None:
        if not self.is_editor:
            raise ServiceError("another kbsync process is the editor of this fact store (it holds the editor "
                               "lock), so this one only follows HEAD: send sync and revert to that process, or "
                               "stop it and this one takes over on its next tick")

    # ----- writes --------------------------------------------------------------------------------
    def sync(self, actor: str = "cli") -> list[StepReport]:
        """Apply pending changes as consecutive steps of at most B facts (at most ``max_steps`` steps)."""
        self.require_editor()
        self.live.at_head()
        reports: list[StepReport] = []
        for _ in range(self.cfg.sync.max_steps):
            batch = self.store.next_batch(self.cfg.sync.batch_size)
            if not len(batch):
                break
            deletes = [e for e in batch if e.change.op == "delete"]
            upserts = [e for e in batch if e.change.op == "upsert"]
            try:
                if deletes:
                    reports.append(self._delete(deletes, actor))
                if upserts:
                    reports.append(self._edit(upserts, actor))
            finally:
                release_freed_memory()          # or glibc keeps each step's freed temporaries (daemon/memory.py)
        return reports

    def rollback(self, version_id: int | None, actor: str = "cli", reason: str = "") -> dict:
        """Move HEAD to ``version_id`` (``None`` = the base model); later versions stay in history."""
        if version_id is not None:
            self._version(version_id)
        before = self.ledger.head()
        self.ledger.move_head(version_id, actor=actor, reason=reason or f"rollback to {version_id or 'base'}")
        if self.model_loaded:
            self.live.restore(version_id)
        log.info("head.rollback", frm=before.id if before else None, to=version_id, actor=actor)
        return {"from": before.id if before else None, "head": version_id}

    def revert(self, version_id: int, actor: str = "cli") -> list[StepReport]:
        """Take one step out: back to its parent, then the later steps' facts applied again as new steps."""
        self.require_editor()
        v = self._version(version_id)
        head = self.ledger.head()
        chain = self.ledger.chain(head.id if head else BASE)
        ids = [c.id for c in chain]
        if v.id not in ids:
            raise ServiceError(f"version {v.id} is not on HEAD's history (HEAD is {head.id if head else 'base'}); "
                               f"`kbsync rollback {v.id}` first, or revert a version listed by `kbsync log`")
        later = chain[ids.index(v.id) + 1:]
        try:
            return self._rebuild(v.parent, later, exclude=set(), extra_ids=[], actor=actor,
                                 reason=f"revert {v.id}")
        finally:
            release_freed_memory()

    def compact_step(self, actor: str = "cli"):
        """One unit of compaction (``daemon.compaction``): a branch version, or the final move of HEAD."""
        from . import compaction
        try:
            return compaction.step(self, actor)
        finally:
            release_freed_memory()

    def compact(self, actor: str = "cli", progress=None) -> dict:
        """Compact HEAD's history to the end (in-process; the daemon runs it step by step between requests)."""
        t, steps = time.perf_counter(), []
        while True:
            p = self.compact_step(actor)
            if progress is not None:
                progress(p)
            if p.version is not None:
                steps.append(p.version)
            if p.finished:
                return {**p.to_json(), "versions": steps, "seconds": round(time.perf_counter() - t, 2)}

    # ----- steps -----------------------------------------------------------------------------------
    def _edit(self, entries, actor: str) -> StepReport:
        t = time.perf_counter()
        good, bad = self._checked(entries)
        for e, why in bad:
            self.store.mark_failed(e.change_ids, why)
            log.warning("fact.failed", change=e.change.id, subject=e.change.subject, reason=why)
        if not good:
            return StepReport(None, 0, "failed", time.perf_counter() - t, "; ".join(w for _, w in bad))
        requests = [request_for(e.change) for e in good]
        change_ids = [i for e in good for i in e.change_ids]
        # A correction: the facts' earlier edits are taken out first, so the new step is solved on a model
        # that no longer carries the old targets (and then only the new target routes).
        masks = self.live.masks_for({e.change.key for e in good}, self.live.at_head()) or ()
        canaries_before = self.verify.canary_answers(self.live.em)      # HEAD's answers, before this step
        try:
            if masks:
                apply_delta(self.live.em, self._mask_step(masks))
            delta = replace(compute_delta(self.live.em, requests, self.live.stats, self.cfg.editor),
                            **taking_out(self.live.em.gate, masks))
        except (EditorError, torch.linalg.LinAlgError) as exc:   # this batch cannot be edited: do not retry it forever
            if masks:
                self.live.back_to_head()
            self.store.mark_failed(change_ids, f"edit step failed: {exc}")
            log.warning("step.failed", facts=len(requests), reason=str(exc))
            return StepReport(None, len(requests), "failed", time.perf_counter() - t, str(exc))
        except BaseException:
            self.live.back_to_head()
            raise
        try:
            apply_delta(self.live.em, delta)      # the gate looks at the edited model; not yet committed
            refused = self.verify.refuses(self.live.em, requests, canaries_before)
            if not refused:
                version = self._commit_one(delta, change_ids, actor, f"sync: {len(requests)} facts")
        except BaseException:
            self.live.back_to_head()
            raise
        if refused:
            self.live.back_to_head()
            self.store.mark_failed(change_ids, refused)
            log.warning("step.rejected", facts=len(requests), reason=refused)
            return StepReport(None, len(requests), "failed", time.perf_counter() - t, refused)
        self.live.served = version.id
        log.info("step.committed", version=version.id, facts=len(requests),
                 seconds=round(time.perf_counter() - t, 2), canaries_drifted=self.verify.drifted)
        return StepReport(version.id, len(requests), "edit", time.perf_counter() - t)

    def _delete(self, entries, actor: str) -> StepReport:
        """Take facts out. Fast path: one version that takes their edits out at once (``taking_out``: with the
        per-token gates they stop routing and their Δ stays, so every other edit answers exactly as before;
        compaction re-solves them away). A chain from before columns were recorded is rebuilt instead: back
        to the parent of the first version carrying a fact, the rest replayed."""
        t = time.perf_counter()
        keys = {e.change.key for e in entries}
        del_ids = [i for e in entries for i in e.change_ids]
        masks = self.live.masks_for(keys, self.live.at_head())
        if masks is not None:
            delta = self._mask_step(masks)
            try:
                apply_delta(self.live.em, delta)
                version = self._commit_one(delta, del_ids, actor, f"remove {len(keys)} facts "
                                                                 f"({len(masks)} edits taken out)")
            except BaseException:
                self.live.back_to_head()
                raise
            self.live.served = version.id
            log.info("facts.removed", version=version.id, facts=len(keys), masked=len(masks),
                     seconds=round(time.perf_counter() - t, 3))
            return StepReport(version.id, len(keys), "remove", time.perf_counter() - t)
        return self._delete_by_rebuild(entries, actor)

    def _mask_step(self, masks) -> StepDelta:
        """A version with no factors of its own that takes the edits ``masks`` out."""
        em = self.live.em
        return StepDelta((), (), em.fingerprint(), self.cfg.editor.replace(opt_dtype=self.live.precision.dtype).digest(),
                         gate=em.gate, **taking_out(em.gate, masks))

    def _delete_by_rebuild(self, entries, actor: str) -> StepReport:
        head = self.ledger.head()
        chain = self.ledger.chain(head.id if head else BASE)
        keys = {e.change.key for e in entries}
        del_ids = [i for e in entries for i in e.change_ids]
        first = next((i for i, v in enumerate(chain)
                      if any(c.op == "upsert" and c.key in keys for c in self.live.carried(v.id))), None)
        if first is None:      # nothing of these facts is in the model: record the deletes only
            reports = self._rebuild(head.id if head else BASE, [], exclude=keys, extra_ids=del_ids,
                                    actor=actor, reason="delete (facts not in the model)")
        else:
            reports = self._rebuild(chain[first].parent, chain[first:], exclude=keys, extra_ids=del_ids,
                                    actor=actor, reason=f"delete {len(keys)} facts: rebuild from {chain[first].id}")
        return StepReport(reports[-1].version if reports else None, sum(r.facts for r in reports),
                          "replay", sum(r.seconds for r in reports))

    def _rebuild(self, parent: int | None, versions, exclude: set, extra_ids: list[int], actor: str,
                 reason: str) -> list[StepReport]:
        """From ``parent``, replay the facts carried by ``versions`` (minus ``exclude`` keys) as new steps.

        Computed on the live model restored to ``parent``; committed in one ledger transaction.
        """
        t = time.perf_counter()
        latest = {}
        for v in versions:
            for c in self.live.carried(v.id):
                if c.key not in exclude and (c.key not in latest or c.id > latest[c.key].id):
                    latest[c.key] = c
        replay = sorted((c for c in latest.values() if c.op == "upsert"), key=lambda c: c.id)
        dropped = sorted(c.id for c in latest.values() if c.op == "delete")
        B = self.cfg.sync.batch_size
        chunks = [replay[i:i + B] for i in range(0, len(replay), B)]
        planned: list[PlannedVersion] = []
        try:
            known = self.live.stored_targets(versions[-1].id) if versions else {}
            self.live.restore(parent)
            for k, chunk in enumerate(chunks):
                delta = compute_delta(self.live.em, [request_for(c) for c in chunk], self.live.stats,
                                      self.cfg.editor, known=[known.get(c.id) for c in chunk])
                apply_delta(self.live.em, delta)
                ids = [c.id for c in chunk] + (extra_ids + dropped if k == len(chunks) - 1 else [])
                planned.append(self._plan(delta, ids, f"{reason} (step {k + 1}/{len(chunks)})"))
            if not chunks and (extra_ids or dropped):
                planned.append(self._plan(None, extra_ids + dropped, reason))
            if planned:
                committed = self.ledger.commit_chain(planned, parent=parent, actor=actor, reason=reason)
            else:
                self.ledger.move_head(parent, actor=actor, reason=reason)
                committed = []
        except BaseException:
            self.live.back_to_head()
            raise
        self.live.served = committed[-1].id if committed else parent
        seconds = time.perf_counter() - t
        log.info("head.rebuilt", reason=reason, parent=parent, versions=[v.id for v in committed],
                 facts=len(replay), seconds=round(seconds, 2))
        return [StepReport(v.id, v.n_facts, "replay" if chunks else "record", seconds / len(committed))
                for v in committed]

    def _plan(self, delta: StepDelta | None, change_ids: list[int], note: str) -> PlannedVersion:
        em = self.live.em
        arrays, meta = delta.to_arrays() if delta is not None else ({}, {"layers": ""})
        metrics = {k: v for k, v in (delta.metrics if delta else {}).items()}
        return PlannedVersion(arrays=arrays, meta=meta, change_ids=list(change_ids),
                              config_digest=delta.config_digest if delta is not None else
                              self.cfg.editor.replace(opt_dtype=self.live.precision.dtype).digest(),
                              model_fingerprint=em.fingerprint(),
                              metrics=metrics, note=note)

    def _commit_one(self, delta: StepDelta, change_ids: list[int], actor: str, note: str):
        p = self._plan(delta, change_ids, note)
        return self.ledger.commit(p.arrays, p.meta, p.change_ids, config_digest=p.config_digest,
                                  model_fingerprint=p.model_fingerprint, metrics=p.metrics, actor=actor,
                                  reason=note)

    def _checked(self, entries):
        """Split batch entries into those the editor can take and (entry, reason) for the rest."""
        good, bad = [], []
        for e in entries:
            try:
                StepBatch(self.live.em.tokenizer, [request_for(e.change)], self.cfg.editor.contexts,
                          self.cfg.editor.kl_template)
                good.append(e)
            except EditorError as exc:
                bad.append((e, str(exc)))
        return good, bad

    def _version(self, version_id: int):
        try:
            return self.ledger.get(version_id)
        except KBError as exc:
            raise ServiceError(str(exc)) from None


def request_for(change) -> EditRequest:
    """The edit request that writes a fact change (an upsert)."""
    return EditRequest(change.subject, change.template, change.target)
