"""The live model: the loaded model with its hooks and key statistics, and the version its hooks hold.

:class:`LoadedModel` loads the configured model once and builds (or reads) its key statistics on first need;
``kbsync stats build`` and ``kbsync eval`` use it alone. :class:`LiveModel` adds the version state a service
serves: which version the hooks hold (``served``), why HEAD could not be restored (``degraded``), each
version's columns and the changes it carries, each read once (versions never change), and restoring any
version exactly. One per process; no thread of
its own: the caller holds the model lock.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import structlog
import torch

from editor.errors import EditorError
from editor.kernel_caches import bound_kernel_caches
from editor.loading import load_model
from editor.model import EditableModel
from editor.precision import PrecisionChoice, choose_opt_dtype, choose_score_dtype
from editor.stats import KeyStats, key_stats
from editor.step import StepDelta, restore_state
from kb.ledger import Ledger
from kb.records import Change

from .config import AppConfig
from .errors import ServiceError

log = structlog.get_logger("kbsync.live_model")

BASE = None  # the version id of the unedited model
UNKNOWN = "unknown"   # ``served`` while the hooks hold work that no version describes (a step being made)


def _device_here(cfg: AppConfig):
    from editor.loading import resolve_placement
    return resolve_placement(cfg.model.device, cfg.model.dtype).device


def precision_here(cfg: AppConfig) -> PrecisionChoice:
    """The precision a step would run in on this machine, without loading the model."""
    return choose_opt_dtype(cfg.editor.opt_dtype, _device_here(cfg))


def score_precision_here(cfg: AppConfig) -> PrecisionChoice:
    """The dtype the gate's scores would be screened in on this machine, without loading the model."""
    return choose_score_dtype(cfg.editor.score_dtype, _device_here(cfg))


class LoadedModel:
    """Loads the configured model once; ``stats`` are built (or read from cache) on first need."""

    def __init__(self, cfg: AppConfig, progress: bool = True, preloaded=None):
        """``preloaded``: an already loaded (model, tokenizer) to serve instead of loading ``cfg.model``."""
        self.cfg = cfg
        self.progress = progress
        t = time.perf_counter()
        model, tok = preloaded or load_model(cfg.model.source, cfg.state_dir, cfg.model.device, cfg.model.dtype)
        self.em = EditableModel.for_config(model, tok, cfg.editor)
        self._stats: KeyStats | None = None
        self.precision: PrecisionChoice = choose_opt_dtype(cfg.editor.opt_dtype, self.em.device)
        log.info("model.loaded", source=cfg.model.source, device=str(self.em.device),
                 model_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                 fingerprint=self.em.fingerprint(), seconds=round(time.perf_counter() - t, 2))
        log.info("precision.chosen", opt_dtype=self.precision.dtype, setting=self.precision.setting,
                 hardware=self.precision.hardware, reason=self.precision.reason,
                 score_dtype=self.em.score_choice.dtype, score_reason=self.em.score_choice.reason,
                 kernel_caches=bound_kernel_caches())

    @property
    def stats(self) -> KeyStats:
        if self._stats is None:
            t = time.perf_counter()
            self._stats = key_stats(self.em, self.cfg.editor.stats, self.cfg.stats_dir, progress=self.progress,
                                    also_read=(self.cfg.state_dir / "stats",)).to(self.em.device)
            log.info("stats.ready", key=self._stats.key, tokens=self._stats.n_tokens,
                     seconds=round(time.perf_counter() - t, 2))
        return self._stats

    def close(self) -> None:
        """Detach the hooks: the model object is the base model again."""
        self.em.close()

    def query(self, prompts: list[str], max_tokens: int = 16) -> list[str]:
        return self.em.generate(prompts, max_new_tokens=max_tokens)


@dataclass(frozen=True)
class StepColumns:
    """What one version does to the hooks' columns: whether it adds factors, the fact (subject, template)
    of each column it adds, the (step, column) edits of earlier steps it takes out, and each column's
    target residual z where the version kept it."""

    has_factors: bool
    columns: tuple
    taken_out: tuple        # masked or unrouted (StepDelta.taken_out)
    targets: torch.Tensor | None = None     # (n, d)


class LiveModel(LoadedModel):
    """The loaded model at a version of ``ledger``: restores any version exactly and knows which it holds."""

    def __init__(self, cfg: AppConfig, ledger: Ledger, progress: bool = True, preloaded=None):
        super().__init__(cfg, progress=progress, preloaded=preloaded)
        self.ledger = ledger
        self.served: int | None | str = UNKNOWN         # the version the hooks are at (None: the base model)
        self.degraded: str | None = None                # why HEAD could not be restored, if it could not
        self.columns: dict[int, StepColumns] = {}       # per version, read from its blob once
        self._carried: dict[int, tuple[Change, ...]] = {}   # per version, read from the ledger once

    def carried(self, version_id: int) -> tuple[Change, ...]:
        """The changes ``version_id`` carries, in id order, read once: what a version carries never changes
        (their ``status`` is as first read; ask the ledger for the current one)."""
        got = self._carried.get(version_id)
        if got is None:
            got = self._carried[version_id] = tuple(self.ledger.carried(version_id))
        return got

    def stored_targets(self, version_id: int | None) -> dict[int, torch.Tensor]:
        """change id -> the target residual z that a version of ``version_id``'s chain solved the change's fact
        for, where the version kept targets (``StepDelta.targets``): re-solving the fact from it skips the
        target optimisation."""
        chain = self._chain_with_columns(version_id)
        out: dict[int, torch.Tensor] = {}
        for v in chain:
            sc = self.columns[v.id]
            if sc.targets is None:
                continue
            by_key = {c.key: c.id for c in self.carried(v.id) if c.op == "upsert"}
            for i, key in enumerate(sc.columns):
                change_id = by_key.get(tuple(key))
                if change_id is not None:
                    out[change_id] = sc.targets[i]
        return out

    def deltas(self, version_id: int | None) -> list[StepDelta]:
        """The steps of ``version_id``'s chain, from the root, read from their blobs (and checked)."""
        fp = self.em.fingerprint()
        return [self._delta(v, fp) for v in self.ledger.chain(version_id)]

    def _delta(self, v, fingerprint: str) -> StepDelta:
        """One version's step, read from its blob (and checked); its ``columns`` are kept."""
        arrays, meta = self.ledger.load(v.id, expect_fingerprint=fingerprint)
        try:
            d = StepDelta.from_arrays(arrays, meta)
        except EditorError as exc:
            raise ServiceError(f"version {v.id}: {exc}; roll back to an earlier version with "
                               f"`kbsync rollback {v.parent if v.parent is not None else 'base'}`") from None
        self.columns[v.id] = StepColumns(bool(d.layers), d.columns, d.taken_out, d.targets)
        return d

    def _chain_with_columns(self, version_id: int | None) -> list:
        """``version_id``'s chain, with every version's ``columns`` read (from the blobs, each once)."""
        chain = self.ledger.chain(version_id)
        fp = None
        for v in chain:
            if v.id not in self.columns:
                fp = fp or self.em.fingerprint()
                self._delta(v, fp)
        return chain

    def live_columns(self, version_id: int | None) -> dict[tuple[str, str], list[tuple[int, int]]] | None:
        """Where each fact the model at ``version_id`` answers with sits in the hooks: key -> [(step, column)]
        of its edits not taken out yet. None when a step of the chain predates recorded columns (then only a
        rebuild can take a fact out)."""
        chain = self._chain_with_columns(version_id)
        where: dict[tuple[str, str], list[tuple[int, int]]] = {}
        out: set[tuple[int, int]] = set()       # taken out by a version of the chain
        step = 0
        for v in chain:
            sc = self.columns[v.id]
            out.update(sc.taken_out)
            if sc.has_factors:
                if not sc.columns:
                    return None
                for c, key in enumerate(sc.columns):
                    where.setdefault(tuple(key), []).append((step, c))
                step += 1
        return {k: [m for m in ms if m not in out] for k, ms in where.items()}

    def masks_for(self, keys, version_id: int | None) -> tuple[tuple[int, int], ...] | None:
        """The (step, column) edits that write ``keys`` in ``version_id``'s model (None: see live_columns)."""
        live = self.live_columns(version_id)
        if live is None:
            return None
        return tuple(sorted(m for k in keys for m in live.get(tuple(k), [])))

    def restore(self, version_id: int | None) -> None:
        """The hooks exactly as committing ``version_id``'s chain from the base model left them."""
        t = time.perf_counter()
        deltas = self.deltas(version_id)
        try:
            restore_state(self.em, deltas)
        except EditorError as exc:
            raise ServiceError(f"cannot restore version {version_id}: {exc}. The configured model or its "
                               "editable layers differ from the ones the versions were made with; restore the "
                               "config, or `kbsync rollback base` to start again from the base model") from None
        self.served = version_id
        self.degraded = None
        log.info("model.restored", version=version_id, steps=len(deltas),
                 seconds=round(time.perf_counter() - t, 3))

    def at_head(self) -> int | None:
        """Restore HEAD unless the hooks hold it already; HEAD's id."""
        head = self.ledger.head()
        head_id = head.id if head else BASE
        if self.served != head_id:
            self.restore(head_id)
        return head_id

    def back_to_head(self) -> None:
        """The hooks may hold uncommitted work (a step, a mask, a half-built chain): restore HEAD exactly."""
        self.served = UNKNOWN
        self.at_head()
