"""A benchmark run that survives its process: every step's delta and the evaluations so far, on disk.

A 5,000-edit run is hours of CPU. With ``kbsync eval --checkpoint DIR`` each committed step is written to
``DIR/<method>/step-NNNNN.safetensors`` (the same arrays a version blob holds) and the run's own record
(evaluations, editing seconds) to ``DIR/<method>/run.json``; the unedited model's scores go to ``DIR/base.pt``.
Started again with the same options, the run restores its steps (bit-identical hooks, editor/step.py
``restore_state``) and goes on from the next one. ``DIR/manifest.json`` records what the run is: started with
other cases, batch, configuration or model, it refuses rather than mix two runs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.numpy import load_file, save_file

from editor.errors import EditorError
from editor.step import StepDelta


class RunCheckpoint:
    """One run's folder: the manifest, the unedited model's scores, and per method its steps and record."""

    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "manifest.json"
        if path.exists():
            had = json.loads(path.read_text())
            differ = sorted(k for k in set(had) | set(manifest) if had.get(k) != manifest.get(k))
            if differ:
                raise EditorError(f"checkpoint {self.root} belongs to another run (it differs in {', '.join(differ)}: "
                                  f"{ {k: had.get(k) for k in differ} }); start it with those options again, or "
                                  "give a new --checkpoint folder")
        else:
            _write_json(path, manifest)

    # ----- the unedited model's scores --------------------------------------------------------------
    def base(self):
        path = self.root / "base.pt"
        return torch.load(path, weights_only=False) if path.exists() else None

    def save_base(self, base) -> None:
        tmp = self.root / "base.pt.tmp"
        torch.save(base, tmp)
        os.replace(tmp, self.root / "base.pt")

    # ----- per method ----------------------------------------------------------------------------------
    def _dir(self, method: str) -> Path:
        d = self.root / method.replace("@", "_at_")
        d.mkdir(exist_ok=True)
        return d

    def steps(self, method: str) -> tuple[list[StepDelta], dict | None]:
        """The method's saved steps in order, and its record (None: nothing saved yet). Steps written after the
        record (a process stopped between the two writes) are left out, so steps and record always agree."""
        d = self._dir(method)
        path = d / "run.json"
        if not path.exists():
            return [], None
        record = json.loads(path.read_text())
        deltas = []
        for s in range(1, record["steps_done"] + 1):
            f = d / f"step-{s:05d}.safetensors"
            if not f.exists():
                raise EditorError(f"checkpoint {d}: {f.name} is missing (run.json says {record['steps_done']} steps); "
                                  "give a new --checkpoint folder")
            deltas.append(StepDelta.from_arrays(load_file(f), _metadata(f)))
        return deltas, record

    def save_step(self, method: str, step: int, delta: StepDelta, record: dict) -> None:
        """Step ``step`` (counted from 1) and the record as it stands after it."""
        d = self._dir(method)
        arrays, meta = delta.to_arrays()
        tmp = d / f"step-{step:05d}.safetensors.tmp"
        save_file(arrays, str(tmp), metadata=meta)
        os.replace(tmp, d / f"step-{step:05d}.safetensors")
        self.save_record(method, step, record)

    def save_record(self, method: str, steps_done: int, record: dict) -> None:
        """The method's record (its evaluations so far) once ``steps_done`` steps are saved."""
        _write_json(self._dir(method) / "run.json", {**record, "steps_done": steps_done})


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open
    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
