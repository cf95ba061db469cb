"""Where the plugin reads versions: the kbsync fact store and blob folder the editing daemon writes."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from editor.step import StepDelta
from kb import FactStore
from kb.ledger import Ledger

from ..config import load_config

STATE_ENV, CONFIG_ENV = "KBSYNC_STATE_DIR", "KBSYNC_CONFIG"


@dataclass(frozen=True)
class Chain:
    version: int | None
    digest: str
    deltas: list[StepDelta]
    gate: str


class VersionSource:
    """HEAD, and the deltas of a version's chain (each step loaded once per process: versions never change)."""

    def __init__(self, kb_url: str, blob_dir: str | Path):
        self.store = FactStore(kb_url)
        self.ledger = Ledger(self.store, blob_dir)
        self._steps: dict[int, StepDelta] = {}

    @classmethod
    def from_env(cls) -> "VersionSource | None":
        """The state directory (env KBSYNC_STATE_DIR, config KBSYNC_CONFIG) the editing daemon uses; KBSYNC_KB_URL
        overrides its store as it does for the daemon. None when neither is set: the plugin stays out."""
        state = os.environ.get(STATE_ENV)
        if not state and not os.environ.get("KBSYNC_KB_URL"):
            return None
        cfg = load_config(os.environ.get(CONFIG_ENV) or None, state or ".")
        return cls(cfg.kb_url, cfg.blob_dir)

    def head(self) -> int | None:
        head = self.ledger.head()
        return head.id if head else None

    def chain(self, version: int | None) -> Chain:
        deltas = []
        for v in self.ledger.chain(version):
            if v.id not in self._steps:
                arrays, meta = self.ledger.load(v.id)
                self._steps[v.id] = StepDelta.from_arrays(arrays, meta)
            deltas.append(self._steps[v.id])
        gates = {d.gate for d in deltas if d.layers}
        return Chain(version, self.ledger.chain_digest(version), deltas, gates.pop() if gates else "token")

    def close(self) -> None:
        self.store.close()
