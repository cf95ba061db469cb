"""What the benchmark scripts share: the default model on CPU (float32) with its shipped hyper-parameters."""
from __future__ import annotations

import contextlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
STATE = ROOT / ".cache" / "state"          # the converted model and key statistics, shared with the tests
HPARAMS = ROOT / "configs" / "models" / "smollm2-135m.toml"


def hparams():
    """The shipped ``EditConfig`` of the default model."""
    from editor.config import EditConfig
    return EditConfig.from_toml(HPARAMS)


def load():
    """(model, tokenizer) of the embedded default model, float32 on CPU."""
    from editor.loading import load_model
    return load_model("embedded", STATE, device="cpu", dtype="float32")


def default_editable(with_stats: bool = False):
    """(EditConfig, EditableModel[, KeyStats]) for the embedded default model, state under .cache/state."""
    from editor.model import EditableModel
    from editor.stats import key_stats

    cfg = hparams()
    model, tok = load()
    em = EditableModel.for_config(model, tok, cfg)
    if not with_stats:
        return cfg, em
    return cfg, em, key_stats(em, cfg.stats, STATE / "stats", progress=False)


def checkpoint_steps(folder: Path, depth: int | None = None) -> tuple[dict, list]:
    """(manifest, saved steps) of the first method of a ``kbsync eval --checkpoint`` folder, the first
    ``depth`` steps of it (all when None), ready for ``editor.step.restore_state``."""
    import json

    from evaluation.checkpoint import RunCheckpoint

    manifest = json.loads((folder / "manifest.json").read_text())
    saved, _ = RunCheckpoint(folder, manifest).steps(manifest["methods"][0])
    if depth is not None and len(saved) < depth:
        raise SystemExit(f"{folder} holds {len(saved)} steps, fewer than --depth {depth}")
    return manifest, saved[:depth]


def history_arguments(ap) -> None:
    """The options of a bench that reads a restored ``kbsync eval --checkpoint`` history (``restored_history``)."""
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "bench/out/ckpt-5000-prefix")
    ap.add_argument("--depth", type=int, default=None, help="steps of the history to restore (all)")
    ap.add_argument("--every", type=int, default=5, help="every k-th edited case")
    ap.add_argument("--first-case", type=int, default=5000, help="the run's first COUNTERFACT record (--cases A:B's A)")


def restored_history(folder: Path, depth: int | None, first_case: int):
    """A ``kbsync eval --checkpoint`` history (prefix or cascade gate) restored on the default model:
    (cfg, em, saved steps, (r,) each edit column's step, the run's cases in edit order)."""
    import torch

    from editor.step import restore_state
    from evaluation.cases import load_cases

    cfg, em = default_editable()
    manifest, saved = checkpoint_steps(folder, depth)
    em.configure_gate(saved[-1].gate, cfg.alpha0_for(saved[-1].gate), cfg.confirm_alpha)
    restore_state(em, saved)
    sizes = [d.layers[0].U.shape[1] for d in saved]
    step_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))   # (r,)
    cases = load_cases("counterfact", DATA / "counterfact-edit.json", (first_case, first_case + len(step_of)))
    if cases[0].case_id != manifest["cases"][0]:
        raise SystemExit(f"{folder} does not start at COUNTERFACT record {first_case}; pass the run's --first-case")
    return cfg, em, saved, step_of, cases


def regated(delta, gate: str, cfg):
    """``delta`` as if made with ``gate``: the first layer's α at the gate's α0, the later ones' at
    ``confirm_alpha``, no stored bars (the factors and keys as they are)."""
    from dataclasses import replace
    first = min((ld.layer for ld in delta.layers), default=None)
    layers = tuple(replace(ld, bars=None, alpha=cfg.alpha0_for(gate) if ld.layer == first else cfg.confirm_alpha)
                   for ld in delta.layers)
    return replace(delta, layers=layers, gate=gate)


@contextlib.contextmanager
def no_eos(model, eos: int):
    """EOS logits pushed down so every row decodes exactly max_tokens (the same work on both sides)."""
    head = model.get_output_embeddings()

    def hook(module, inputs, output):
        output[..., eos] = -1e9
        return output
    handle = head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def screen_share(em) -> dict:
    """Rows the first edited layer's bf16 screen decided alone and sent to the float32 rescore, so far."""
    first = em.hooks[min(em.layers)]
    seen = first.screened_rows + first.rescored_rows
    return {"screened_rows": first.screened_rows, "rescored_rows": first.rescored_rows,
            "rescored_share": round(first.rescored_rows / seen, 4) if seen else None}


def reference_texts(n: int = 16) -> list[str]:
    """Long WikiText-2 validation paragraphs from the front (text to calibrate on); the perplexity's
    ``evaluation.harness.heldout_texts`` takes the last 24, so the two never overlap."""
    from evaluation.harness import heldout_texts
    return heldout_texts(DATA / "wikitext2-valid.txt", n=10**9)[:n]


@contextlib.contextmanager
def projection_inputs(em):
    """While inside: {layer: the input (B, T, d_in) of its edited projection in the latest forward pass}."""
    got: dict = {}
    handles = [em.spec.projection_module(em.model, l).register_forward_hook(
        lambda m, i, o, l=l: got.__setitem__(l, i[0].detach())) for l in em.layers]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def service_on_copy(state: Path, prefix: str):
    """A ``Service`` on a fresh copy of the state directory ``state`` (its lock files left behind), so a
    benchmark can change the copy, or read it beside a process that holds the original."""
    import os
    import shutil
    import tempfile
    os.environ.setdefault("KBSYNC_CACHE_DIR", str(STATE))
    from daemon.config import load_config
    from daemon.service import Service
    copy = Path(tempfile.mkdtemp(prefix=prefix)) / "state"
    shutil.copytree(state, copy, ignore=shutil.ignore_patterns("*.lock"))
    return Service(load_config(None, copy), progress=False)


def edited_cases(svc, head, em, cases) -> list[tuple[int, int, int, object]]:
    """The ``cases`` whose facts the model at ``head`` holds, as (column in the hooks' concatenated factors,
    step, column in that step, case), each at its latest live edit, in the order of ``cases``."""
    starts, at = [], 0
    for u in em.hooks[em.layers[0]].U:
        starts.append(at)
        at += u.shape[1]
    live = svc.live.live_columns(head)
    out = []
    for c in cases:
        cols = live.get((c.subject, c.prompt.replace(c.subject, "{}", 1)))
        if cols:
            s, j = cols[-1]
            out.append((starts[s] + j, s, j, c))
    return out
