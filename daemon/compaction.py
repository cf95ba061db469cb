"""Compaction: the facts HEAD answers with, solved again from the base model into fewer versions.

A long history keeps every step it took: removed and corrected facts stay in it as masked columns, and
every sync added a version. Compaction re-solves the live facts from the base model, ``[sync]
compact_batch_size`` at a time, onto a branch of versions off HEAD. Each fact reuses the target residual z
its version stored (``StepDelta.targets``), so a branch step costs the keys and the solve, not the target
optimisation; facts from versions that predate stored targets are optimised again.

Every branch step is committed as it is made (``Ledger.commit(move_head=False)``), so the state of a
compaction is the ledger itself: an interrupted one resumes from its branch's tip, and syncs, removals and
rollbacks may land between its steps. Each step compares the branch with HEAD's live facts (by the change
that set each fact): facts it lacks are added, facts HEAD no longer answers with (or with another target)
are masked. When the two agree, one last version carries HEAD's remaining changes (removals, superseded
targets) and HEAD moves onto it. The versions before stay: rollback to any of them is exact.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import structlog
import torch

from editor.step import apply_delta, compute_delta, taking_out
from kb.records import Change, version_label

from .errors import ServiceError
from .service import request_for

log = structlog.get_logger("kbsync.compaction")

MARK = "compaction"     # the key in a branch version's metrics: {"compaction": {"of": HEAD it was made for}}


@dataclass(frozen=True)
class LiveFact:
    """A fact the model at some version answers with: the change that set it and its stored target z."""

    change: Change
    target: torch.Tensor | None


@dataclass(frozen=True)
class Progress:
    """Where a compaction stands after one call of :func:`step`."""

    head: int | None          # HEAD it compared against (after a finish: the new HEAD)
    branch: int | None        # the branch tip (None: none yet)
    live: int                 # facts HEAD answers with
    done: int                 # of them, already on the branch
    finished: bool
    version: int | None = None        # the version this call committed
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"head": self.head, "branch": self.branch, "live": self.live, "done": self.done,
                "finished": self.finished, "version": self.version, "seconds": round(self.seconds, 2)}


def live_facts(svc, version_id: int | None) -> dict[tuple[str, str], LiveFact]:
    """key -> the fact the model at ``version_id`` answers with (edits not masked), with its stored target."""
    if version_id is None:
        return {}
    columns = svc.live.live_columns(version_id)          # also reads every column of the chain
    if columns is None:
        raise ServiceError(f"version {version_id}'s history predates recorded columns, so it cannot be compacted; "
                           "`kbsync revert` its first version to rebuild it with them, then compact")
    stored = svc.live.stored_targets(version_id)
    latest: dict[tuple[str, str], Change] = {}
    for v in svc.ledger.chain(version_id):
        for c in svc.live.carried(v.id):
            if c.key not in latest or c.id > latest[c.key].id:
                latest[c.key] = c
    out = {}
    for key, where in columns.items():
        change = latest.get(key)
        if where and change is not None and change.op == "upsert":
            out[key] = LiveFact(change, stored.get(change.id))
    return out


def is_compact(svc, version_id: int | None) -> bool:
    """Whether ``version_id`` is the end of a finished compaction with nothing committed after it."""
    chain = svc.ledger.chain(version_id)
    return bool(chain) and chain[-1].metrics.get(MARK, {}).get("finished", False)


def branch_tip(ledger, head_id: int | None) -> int | None:
    """The newest compaction version off HEAD's chain whose weights are kept: the branch an unfinished
    compaction left (or None)."""
    skip = {v.id for v in ledger.chain(head_id)} | set(ledger.pruned())
    tips = [v.id for v in ledger.versions() if MARK in v.metrics and v.id not in skip]
    return max(tips) if tips else None


def step(svc, actor: str) -> Progress:
    """One unit of compaction work on the live model (the caller holds the model lock): one branch version,
    or the final move of HEAD. The live model is back at HEAD when it returns."""
    t = time.perf_counter()
    svc.require_editor()
    head = svc.ledger.head()
    head_id = head.id if head else None
    live = live_facts(svc, head_id)
    tip = branch_tip(svc.ledger, head_id)
    have = live_facts(svc, tip)
    same = {k for k, f in have.items() if k in live and live[k].change.id == f.change.id}
    stale = sorted(k for k in have if k not in same)                          # masked on the branch
    todo = sorted((f for k, f in live.items() if k not in same), key=lambda f: f.change.id)
    if tip is None and is_compact(svc, head_id):                              # nothing since the last one
        return Progress(head_id, None, len(live), len(live), True, seconds=time.perf_counter() - t)
    if not todo and not stale:
        if tip is None:               # nothing to compact onto: HEAD is the base model or answers nothing
            return Progress(head_id, None, len(live), len(same), True, seconds=time.perf_counter() - t)
        return _finish(svc, head_id, tip, len(live), actor, t)
    chunk = todo[:svc.cfg.sync.compact_batch_size]
    em = svc.live.em
    try:
        if svc.live.served != tip:
            svc.live.restore(tip)
        masks = svc.live.masks_for(stale, tip) or ()
        if chunk:
            if masks:
                apply_delta(em, svc._mask_step(masks))
            requests = [request_for(f.change) for f in chunk]
            delta = replace(compute_delta(em, requests, svc.live.stats, svc.cfg.editor,
                                          known=[f.target for f in chunk]), **taking_out(em.gate, masks))
        else:
            delta = svc._mask_step(masks)
        plan = svc._plan(delta, [f.change.id for f in chunk],
                         f"compaction of {version_label(head_id)}: {len(same) + len(chunk)} of {len(live)} facts")
        version = svc.ledger.commit(plan.arrays, plan.meta, plan.change_ids, parent=tip,
                                    config_digest=plan.config_digest, model_fingerprint=plan.model_fingerprint,
                                    metrics={**plan.metrics, MARK: {"of": head_id}}, actor=actor, reason=plan.note,
                                    move_head=False)
    finally:
        svc.live.back_to_head()
    log.info("compaction.step", head=head_id, version=version.id, added=len(chunk), masked=len(masks),
             done=len(same) + len(chunk), live=len(live), seconds=round(time.perf_counter() - t, 2))
    return Progress(head_id, version.id, len(live), len(same) + len(chunk), False, version.id,
                    time.perf_counter() - t)


def _finish(svc, head_id, tip: int, n_live: int, actor: str, t: float) -> Progress:
    """The branch answers exactly like HEAD: one version on it carries HEAD's other changes, HEAD moves there."""
    head_chain, branch = svc.ledger.chain(head_id), svc.ledger.chain(tip)
    carried = {c.id for v in branch for c in svc.live.carried(v.id)}
    rest = sorted({c.id for v in head_chain for c in svc.live.carried(v.id)} - carried)
    before, after = len(head_chain), len(branch) + 1
    note = f"compaction of {version_label(head_id)}: {n_live} facts in {after} versions (were {before})"
    plan = svc._plan(None, rest, note)
    version = svc.ledger.commit(plan.arrays, plan.meta, plan.change_ids, parent=tip,
                                config_digest=plan.config_digest, model_fingerprint=plan.model_fingerprint,
                                metrics={MARK: {"of": head_id, "finished": True}}, actor=actor, reason=note)
    svc.live.at_head()
    log.info("compaction.finished", was=head_id, head=version.id, facts=n_live, versions=after, were=before)
    return Progress(version.id, version.id, n_live, n_live, True, version.id, time.perf_counter() - t)
