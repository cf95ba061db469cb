"""The model worker: owns the loaded model, its hooks and its key statistics (edits: ``daemon.service``)."""
from __future__ import annotations

import time

import structlog

from editor.loading import load_model
from editor.model import EditableModel
from editor.precision import PrecisionChoice, choose_opt_dtype
from editor.stats import KeyStats, key_stats

from .config import AppConfig

log = structlog.get_logger("kbsync.worker")


class ModelWorker:
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
                 hardware=self.precision.hardware, reason=self.precision.reason)

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
