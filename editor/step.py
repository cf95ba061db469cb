"""One COMEBA-HK step: ``compute_delta`` (pure: the model is left as it was) and ``apply_delta`` (commit).

For the i-th of m editable layers l (paper notation):
    K = keys at l, averaged over contexts          (d_in, n)
    R = (Z - h_L(current)) / (m - i)               (d_out, n)
    A = solve(C + K Kᵀ, K),  C = λ E[k kᵀ] + Σ_t K_t K_tᵀ   (d_in, n), float64
    Δ = R Aᵀ  ->  U = R, V = A
then α ← min(α, min over the batch's prompts of max_i z_i) per layer.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import EditConfig
from .errors import DeltaMismatch, EditorError
from .hook import CASCADE_GATES, CONFIRM_FLOOR, Mode
from .model import EditableModel
from .precision import choose_opt_dtype
from .requests import EditRequest, StepBatch
from .stats import KeyStats
from .targets import compute_targets


@dataclass(frozen=True)
class LayerDelta:
    layer: int
    U: torch.Tensor      # (d_out, n) float32
    V: torch.Tensor      # (d_in, n) float32
    K: torch.Tensor      # (d_in, n) float32, this step's keys
    alpha: float         # α of the layer after the step
    bars: torch.Tensor | None = None   # (n,) cascade gate: each edit's confirmation bar here (None: α)


@dataclass(frozen=True)
class StepDelta:
    """Everything one step changes, plus what it was computed for."""

    layers: tuple[LayerDelta, ...]
    requests: tuple[EditRequest, ...]
    model_fingerprint: str
    config_digest: str
    metrics: dict = field(default_factory=dict)
    gate: str = "zscore"     # the routing gate the step was made with (and is served with)
    # Edits of earlier steps this step takes out, as (step, column): ``step`` counts the steps that carry
    # factors, from the root of the chain; ``column`` is the edit's column in that step's factors.
    # ``masked``: the edit routes no token and its part of Δ goes (the per-sequence gate routes on ‖Δx‖, so
    # only this takes an edit out there; every removal before unrouted existed). ``unrouted``: the edit
    # routes no token and its part of Δ stays, so the edits solved after it keep exactly the Δ they were
    # solved on (facts with a small margin flip when it goes); compaction re-solves it away.
    masked: tuple[tuple[int, int], ...] = ()
    unrouted: tuple[tuple[int, int], ...] = ()
    # Per column, the (subject, prompt template) of the fact it writes: how a removal finds its columns.
    columns: tuple[tuple[str, str], ...] = ()
    # Per column, the target residual z after block L it was solved for, (n, d): a fact can be solved again
    # (compaction, replay) without optimising its target again. None in versions from before it was kept.
    targets: torch.Tensor | None = None

    @property
    def taken_out(self) -> tuple[tuple[int, int], ...]:
        """Every edit this step takes out, masked or unrouted."""
        return self.masked + self.unrouted

    def __post_init__(self):
        if self.requests and not self.columns:
            object.__setattr__(self, "columns", tuple((r.subject, r.prompt) for r in self.requests))

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """numpy tensors and string metadata, for storage with ``safetensors.numpy`` (no torch needed)."""
        # C order: U and K are transposed views, and safetensors.numpy writes an array's memory as it lies
        # (a Fortran-ordered array would come back transposed and scrambled)
        arrays: dict[str, np.ndarray] = {}
        for ld in self.layers:
            for name, t in (("U", ld.U), ("V", ld.V), ("K", ld.K)):
                arrays[f"{ld.layer}.{name}"] = np.ascontiguousarray(t.detach().cpu().numpy())
            arrays[f"{ld.layer}.alpha"] = np.array([ld.alpha], dtype=np.float64)
            if ld.bars is not None:
                arrays[f"{ld.layer}.bars"] = np.ascontiguousarray(ld.bars.detach().cpu().float().numpy())
        for name in ("masked", "unrouted"):
            if getattr(self, name):
                arrays[name] = np.array(getattr(self, name), dtype=np.int64).reshape(-1, 2)
        if self.targets is not None:
            arrays["targets"] = np.ascontiguousarray(self.targets.detach().cpu().float().numpy())
        meta = {"layers": ",".join(str(ld.layer) for ld in self.layers), "gate": self.gate,
                "model_fingerprint": self.model_fingerprint, "config_digest": self.config_digest}
        if self.columns:
            meta["columns"] = json.dumps([list(c) for c in self.columns])
        return arrays, meta

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, str],
                    requests: tuple[EditRequest, ...] = ()) -> "StepDelta":
        try:
            layers = tuple(
                LayerDelta(l, torch.from_numpy(arrays[f"{l}.U"]), torch.from_numpy(arrays[f"{l}.V"]),
                           torch.from_numpy(arrays[f"{l}.K"]), float(arrays[f"{l}.alpha"][0]),
                           torch.from_numpy(arrays[f"{l}.bars"]) if f"{l}.bars" in arrays else None)
                for l in (int(x) for x in meta["layers"].split(",") if x))
        except (KeyError, ValueError, IndexError) as exc:
            raise DeltaMismatch(f"stored delta is incomplete ({exc!r} missing or malformed)") from None
        gate = meta.get("gate", "zscore")                 # versions from before the gate was recorded: the paper's
        masked, unrouted = (tuple((int(a), int(b)) for a, b in arrays[name]) if name in arrays else ()
                            for name in ("masked", "unrouted"))
        columns = tuple(tuple(c) for c in json.loads(meta["columns"])) if "columns" in meta else ()
        targets = torch.from_numpy(arrays["targets"]) if "targets" in arrays else None
        return cls(layers, tuple(requests), meta["model_fingerprint"], meta["config_digest"], gate=gate,
                   masked=masked, unrouted=unrouted, columns=columns, targets=targets)


def compute_delta(em: EditableModel, requests: list[EditRequest], stats: KeyStats, cfg: EditConfig,
                  known: list[torch.Tensor | None] | None = None, *, route: Mode = Mode.VALIDATED,
                  accumulate: bool = True, key_steps: int = 0) -> StepDelta:
    """Compute one step for ``requests`` on top of ``em``'s committed state. ``em`` is left unchanged.

    ``known``: per request, a target residual z it was solved for before (``StepDelta.targets``), or None.
    Those facts skip the target optimisation (most of a step's time); only the keys and the solve are
    recomputed on the current model. z does not depend on the history below block L: the blocks above it
    are never edited, so the same z gives the same prediction on any edited model.

    Three switches exist for the benchmark's ablations (evaluation/methods.py), never for the daemon:
    ``route``, how the edited model runs while targets are found and α is set (``Mode.VALIDATED``: the hook
    layers route Δ; ``Mode.TEMPORARY``: Δ on every token, α left as it is); ``accumulate``, whether the
    solve counts the keys of earlier steps (Σ K Kᵀ; without them it is plain sequential MEMIT), and
    ``key_steps``, how many of the latest steps it counts when it does (0: every one, the paper's solve).
    """
    if key_steps < 0:
        raise EditorError(f"key_steps must be 0 (every earlier step) or a number of steps, got {key_steps}")
    if tuple(cfg.layers) != em.layers:
        raise DeltaMismatch(f"config layers {list(cfg.layers)} differ from the model's hooked layers {list(em.layers)}")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    batch = StepBatch(em.tokenizer, list(requests), cfg.contexts, cfg.kl_template)
    known = list(known) if known is not None else [None] * len(requests)
    if len(known) != len(requests):
        raise DeltaMismatch(f"{len(known)} known targets for {len(requests)} requests")
    todo = [j for j, z in enumerate(known) if z is None]
    fresh = None
    if todo:
        sub = batch if len(todo) == len(requests) else \
            StepBatch(em.tokenizer, [requests[j] for j in todo], cfg.contexts, cfg.kl_template)
        with em.mode(route):
            fresh = compute_targets(em, sub, cfg)
        for i, j in enumerate(todo):
            known[j] = fresh.Z[i]
    times["targets_s"] = time.perf_counter() - t0
    Z = torch.stack([z.to(em.device, torch.float32) for z in known])          # (n, d)
    m, out, times["keys_s"], times["solve_s"] = len(cfg.layers), [], 0.0, 0.0
    with contextlib.ExitStack() as stack:
        stack.enter_context(em.mode(Mode.TEMPORARY))
        for i, l in enumerate(cfg.layers):
            t = time.perf_counter()
            K, hL = _keys_and_residual(em, batch, l, cfg)                    # (d_in, n), (n, d)
            times["keys_s"] += time.perf_counter() - t
            t = time.perf_counter()
            R = (Z - hL).T.to(torch.float64) / (m - i)                       # (d_out, n)
            C = cfg.mom2_weight * stats.for_layer(l).to(em.device)                # (d_in, d_in)
            if accumulate:                                                   # Σ_t K_t K_tᵀ of earlier steps
                C = C + (em.hooks[l].recent_KK(key_steps) if key_steps else em.hooks[l].KK)
            K64 = K.to(torch.float64)                                        # (d_in, n)
            A = _solve(C + K64 @ K64.T, K64)                                 # (d_in, n)
            times["solve_s"] += time.perf_counter() - t
            U, V = R.to(torch.float32), A.to(torch.float32)                  # (d_out, n), (d_in, n)
            stack.enter_context(em.hooks[l].trial(U, V, K))
            stack.enter_context(em.mode(route, layers=[l]))
            out.append((l, U, V, K.to(torch.float32)))
        t = time.perf_counter()
        alphas = _adapted_alphas(em, batch, cfg.alpha_min_for(em.gate)) if route is Mode.VALIDATED else {l: h.alpha for l, h in em.hooks.items()}
        bars = _confirm_bars(em, batch, alphas, cfg.confirm_margin, cfg.route_margin) \
            if route is Mode.VALIDATED and em.gate in CASCADE_GATES else {}
        times["routing_s"] = time.perf_counter() - t
    layers = tuple(LayerDelta(l, U, V, K, alphas[l], bars.get(l)) for l, U, V, K in out)
    times["total_s"] = time.perf_counter() - t0
    opt_dtype = fresh.opt_dtype if fresh is not None else choose_opt_dtype(cfg.opt_dtype, em.device).dtype
    metrics = {**times, "opt_dtype": opt_dtype, "targets_reused": len(requests) - len(todo)}
    if fresh is not None:
        metrics |= {"opt_steps": fresh.steps, "target_nll": [float(x) for x in fresh.nll],
                    "target_top1": float(fresh.top1.float().mean())}
    ran = cfg.replace(opt_dtype=opt_dtype)                                  # the digest records what ran, not "auto"
    return StepDelta(layers, tuple(requests), em.fingerprint(), ran.digest(), metrics, gate=em.gate,
                     targets=Z.detach().float().cpu())


def apply_delta(em: EditableModel, delta: StepDelta) -> None:
    """Commit a step: every layer or none (everything is checked before anything changes)."""
    check_delta(em, delta)
    _check_masks(em, delta)
    if delta.layers:                                     # an empty step (a removal) routes nothing
        em.adopt_gate(delta.gate)
    _mask(em, delta)
    for ld in delta.layers:
        em.hooks[ld.layer].commit(ld.U, ld.V, ld.K, ld.alpha, ld.bars)


def restore_state(em: EditableModel, deltas: list[StepDelta]) -> None:
    """Rebuild the hook state exactly as it was after committing ``deltas`` in order (from the base model).

    Every delta is checked first, so a bad one leaves the current state untouched. Replaying the same
    commits in the same order gives bit-identical Δ, Σ K Kᵀ and α.
    """
    for d in deltas:
        check_delta(em, d)
    gates = {d.gate for d in deltas if d.layers}
    if len(gates) > 1:
        raise DeltaMismatch(f"the versions mix routing gates {sorted(gates)}; one history routes one way")
    steps = 0
    for d in deltas:
        bad = [m for m in d.taken_out if not 0 <= m[0] < steps]
        if bad:
            raise DeltaMismatch(f"a step masks edits {bad} of steps that are not before it ({steps} are)")
        steps += bool(d.layers)
    em.reset()
    for d in deltas:
        if d.layers:
            em.adopt_gate(d.gate)
        _mask(em, d)
        for ld in d.layers:
            em.hooks[ld.layer].commit(ld.U, ld.V, ld.K, ld.alpha, ld.bars)


def _mask(em: EditableModel, delta: StepDelta) -> None:
    for cols, keep_delta in ((delta.masked, False), (delta.unrouted, True)):
        for step, column in cols:
            for h in em.hooks.values():
                if h.U:
                    h.mask(step, column, keep_delta=keep_delta)


def _check_masks(em: EditableModel, delta: StepDelta) -> None:
    held = max((len(h.U) for h in em.hooks.values()), default=0)
    for step, column in delta.taken_out:
        if not 0 <= step < held or any(h.U and column >= h.U[step].shape[1] for h in em.hooks.values()):
            raise DeltaMismatch(f"the step masks edit {column} of step {step}, which the model does not hold "
                                f"({held} steps committed)")


def masked_indices(deltas: list[StepDelta], which: str = "masked") -> list[int]:
    """The edits a chain takes out, ``which`` of them ("masked", "unrouted" or both: "taken_out"), as indices
    into its factors concatenated step by step (the order the hooks, the exports and the vLLM plugin stack
    them in)."""
    starts, total = [], 0
    for d in deltas:
        if d.layers:
            starts.append(total)
            total += d.layers[0].U.shape[1]
    return sorted({starts[s] + c for d in deltas for s, c in getattr(d, which)})


def taking_out(gate: str, columns) -> dict[str, tuple[tuple[int, int], ...]]:
    """The ``StepDelta`` field that takes the (step, column) edits ``columns`` out under ``gate``: the per-token
    gates stop routing them and keep their Δ (``unrouted``); the per-sequence gate routes on ‖Δx‖, so there
    their Δ goes (``masked``)."""
    return {"masked" if gate == "zscore" else "unrouted": tuple(columns)}


def check_delta(em: EditableModel, delta: StepDelta) -> None:
    """Raise DeltaMismatch unless ``delta`` fits ``em`` (fingerprint, layers, shapes)."""
    if delta.model_fingerprint != em.fingerprint():
        raise DeltaMismatch(f"delta was computed for model {delta.model_fingerprint}, this model is {em.fingerprint()}")
    for ld in delta.layers:
        hook = em.hooks.get(ld.layer)
        if hook is None:
            raise DeltaMismatch(f"delta edits layer {ld.layer}, which is not hooked (hooked: {list(em.layers)})")
        n = ld.U.shape[1]
        if ld.U.shape != (hook.d_out, n) or ld.V.shape != (hook.d_in, n) or ld.K.shape != (hook.d_in, n):
            raise DeltaMismatch(f"layer {ld.layer}: factor shapes U{tuple(ld.U.shape)} V{tuple(ld.V.shape)} "
                                f"K{tuple(ld.K.shape)} do not fit d_in={hook.d_in}, d_out={hook.d_out}")


def _solve(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """A = lhs⁻¹ rhs for symmetric positive definite lhs (Cholesky, falling back to LU)."""
    L, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, L)
    return torch.linalg.solve(lhs, rhs)


@torch.no_grad()
def _keys_and_residual(em: EditableModel, batch: StepBatch, layer: int, cfg: EditConfig):
    """K at ``layer`` (mean over contexts) and h_L at the bare prompt, in the hooks' current modes."""
    rows = batch.keys
    ids, mask = batch.tensors(rows, em.device)                               # (R, T)
    idx = torch.arange(len(rows), device=em.device)
    lookup = torch.tensor([r.lookup for r in rows], device=em.device)        # (R,)
    got: dict[str, torch.Tensor] = {}

    def grab_key(module, inputs, output):
        got["k"] = inputs[0][idx, lookup].float()                            # (R, d_in)

    def grab_h(module, inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        got["h"] = h[idx, lookup].float()                                    # (R, d)

    handles = [em.spec.projection_module(em.model, layer).register_forward_hook(grab_key),
               em.spec.blocks(em.model)[cfg.last_layer].register_forward_hook(grab_h)]
    try:
        em.forward_until(cfg.last_layer, ids, mask)
    finally:
        for h in handles:
            h.remove()
    n, per = len(batch), len(rows) // len(batch)
    K = got["k"].view(n, per, -1).mean(1).T                                  # (d_in, n)
    hL = got["h"].view(n, per, -1)[:, 0]                                      # (n, d)
    return K, hL


@torch.no_grad()
def _confirm_bars(em: EditableModel, batch: StepBatch, alphas: dict[int, float], margin: float,
                  route_margin: float = 0.0) -> dict[int, torch.Tensor]:
    """The cascade gate's bar for each new edit at each later edited layer, {layer: (n,)}: its own bare
    prompt's best score against it there (routed through every layer, the step's trial deltas on) times
    ``margin``, between ``CONFIRM_FLOOR`` and the layer's α. An edit whose own prompt sits far from its key in
    the deeper layers (a prompt that starts with its subject, whose key is a mean over contexts where the
    subject is mid-sentence) confirms its own prompt; every other edit keeps α. With ``route_margin`` > 0,
    also a bar at the first layer: ``route_margin`` x its own prompt's score there, which the gate raises to
    α where it is lower. A token that carries α of the edit's key but much less than its own prompt does (a
    shared last sub-word, another subject's prompt start) is then not routed at all: routed and dropped at a
    later layer, it would still have changed what attends to it in between."""
    ids, mask = batch.tensors(batch.plain, em.device)               # (n, T): one bare prompt per edit
    later = em.layers[1:]
    scored = list(em.layers) if route_margin > 0 else later
    got: dict[int, torch.Tensor] = {}
    handles = [em.spec.projection_module(em.model, l).register_forward_hook(
        lambda m, i, o, l=l: got.__setitem__(l, i[0].detach())) for l in scored]
    gate, first = em.context.gate, em.hooks[em.layers[0]]
    alpha = first.alpha
    try:
        em.context.gate, first.alpha = "token", alphas[em.layers[0]]   # route as the step will: layer 1 decides
        with em.mode(Mode.VALIDATED):
            em.forward_until(max(em.layers), ids, mask)
    finally:
        em.context.gate, first.alpha = gate, alpha
        for h in handles:
            h.remove()
    n, out = len(batch), {}
    real = mask.bool()                                              # (n, T)
    for l in scored:
        hook = em.hooks[l]
        own = hook.rank + torch.arange(n, device=em.device)         # each prompt's own edit: the trial's columns
        x = got[l]                                                  # (n, T, d_in)
        s = hook.edit_scores(x.reshape(-1, x.shape[-1]), own.repeat_interleave(x.shape[1])[:, None]).view(n, -1)
        best = s.masked_fill(~real, -torch.inf).amax(dim=1)         # (n,)
        if l == em.layers[0]:
            out[l] = (best * route_margin).float().cpu()
        else:
            out[l] = (best * margin).clamp(min=CONFIRM_FLOOR, max=alphas[l]).float().cpu()
    return out


@torch.no_grad()
def _adapted_alphas(em: EditableModel, batch: StepBatch, alpha_min: float = 0.0) -> dict[int, float]:
    """α ← max(α_min, min(α, min over the batch's prompts of their max gate score)), per deciding layer
    (validated mode, trial deltas on): every edited prompt routes. The score is z (zscore gate) or a (token gate). α_min = 0
    is the paper's rule; a floor keeps one weakly-routed prompt from opening the hook to every sequence."""
    ids, mask = batch.tensors(batch.plain, em.device)
    with em.mode(Mode.VALIDATED), em.recording() as rec:
        em.forward_until(max(em.layers), ids, mask)
    alphas = {}
    for l, hook in em.hooks.items():
        if em.gate in CASCADE_GATES and l != em.layers[0]:
            alphas[l] = hook.alpha                           # the cascade's later layers: fixed α, per-edit bars
            continue
        zmax = torch.cat(rec.get(l, [torch.tensor([])])).float()
        zmax = zmax[torch.isfinite(zmax)]
        alphas[l] = max(alpha_min, min(hook.alpha, float(zmax.min()))) if zmax.numel() else hook.alpha
    return alphas
