"""Editing hyper-parameters: one frozen record per model, read from ``configs/models/*.toml``."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EditorError
from .precision import SCORE_DTYPES

SERVING_ONLY = ("delta_dtype", "score_dtype")   # settings of how deltas are served, not of what they are

DEFAULT_CONTEXTS = (
    "{}",
    "The following is a fact. {}",
    "Here is what I know. {}",
    "In short, {}",
    "According to the records, {}",
)


@dataclass(frozen=True)
class StatsConfig:
    """Where E[k kᵀ] comes from and how much of it to measure."""

    corpus: str = "model"          # "model" (text sampled from the model), a file/dir path, or "hf:NAME[:CONFIG]"
    n_tokens: int = 100_000        # tokens measured
    seq_len: int = 256             # tokens per sequence
    batch_size: int = 8
    dtype: str = "float32"         # accumulation dtype of each chunk (totals are float64)
    seed: int = 0                  # for the model-sampled corpus


@dataclass(frozen=True)
class EditConfig:
    """COMEBA-HK hyper-parameters. Paper notation in comments."""

    layers: tuple[int, ...] = (1, 2, 3, 4, 5)
    mom2_weight: float = 15000.0           # λ
    gate: str = "prefix"                   # routing: "prefix", "cascade" or "token" (per token, stateless), "zscore" (the
                                           # paper's, per sequence); editor/hook.py
    alpha0: float = 2.2                    # α0 of the zscore gate (a z-score)
    alpha_min: float = 0.0                 # floor of α's adaptation (0 = the paper's rule: α only decreases)
    token_alpha0: float = 0.6              # α0 of the token gate (a share of an edit's own key, 1 = the key)
    token_alpha_min: float = 0.4           # floor of the token gate's α
    confirm_alpha: float = 0.4             # cascade gate: the share of its edit's key a routed token must still carry
                                           # at every edited layer after the first (fixed, not adapted)
    confirm_margin: float = 0.8            # cascade gate: an edit's bar is at most this x its own prompt's score there
    route_margin: float = 0.0              # cascade gate: an edit's bar at the first layer is at least this x its own
                                           # prompt's score there (0: α alone decides there)
    massive_ratio: float = 0.0             # ρ: tokens with ‖x‖ > ρ x their sequence's median are never routed (0 = off)
    v_lr: float = 0.5                      # Adam learning rate of the target residuals δ_j (z_j = h_L + δ_j)
    v_steps: int = 25                      # at most this many optimisation steps per batch (early_stop_nll may end sooner)
    v_weight_decay: float = 0.5            # weight of ‖δ_j‖² / ‖h_L‖² in the loss: keeps each target near its output
    kl_factor: float = 0.0625              # weight of the KL term that keeps "{subject} is a" predictions as they were
    clamp_norm_factor: float = 4.0         # ‖δ_j‖ is clamped to this many times ‖h_L‖ after each step
    early_stop_nll: float = 0.05           # a fact stops once its target NLL (mean over its contexts) is below this
    early_stop: str = "nll"                # "nll": only that rule; "top1": a fact also stops once its target is the
                                           # most probable continuation in every context (ENCORE's MPES)
    opt_dtype: str = "auto"                # autocast dtype of the target optimisation; "auto": bf16 only where the
                                           # hardware has it natively, else float32 (editor/precision.py)
    prefix_cache: bool = True              # target optimisation: keys/values before each lookup computed once
    delta_dtype: str = "float32"           # of the dense Δ read per token once the rank passes the factors' size
    score_dtype: str = "auto"              # serving: the first edited layer's gate scores screened in bfloat16 ("auto":
                                           # where native), every route still decided in float32 (editor/gate_screen.py)
    contexts: tuple[str, ...] = DEFAULT_CONTEXTS
    kl_template: str = "{} is a"
    stats: StatsConfig = field(default_factory=StatsConfig)

    def __post_init__(self):
        if not self.layers:
            raise EditorError("editor config: `layers` is empty; list the block indices to edit, e.g. [3, 4, 5]")
        if list(self.layers) != sorted(set(self.layers)):
            raise EditorError(f"editor config: `layers` must be strictly increasing, got {list(self.layers)}")
        if "{}" not in self.kl_template or not all("{}" in c for c in self.contexts):
            raise EditorError("editor config: `contexts` and `kl_template` must each contain '{}'")
        if self.opt_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise EditorError(f"editor config: `opt_dtype` must be auto, float32, bfloat16 or float16, got {self.opt_dtype!r}")
        if self.delta_dtype not in ("float32", "bfloat16", "float16"):
            raise EditorError(f"editor config: `delta_dtype` must be float32, bfloat16 or float16, got {self.delta_dtype!r}")
        if self.score_dtype not in SCORE_DTYPES:
            raise EditorError(f"editor config: `score_dtype` must be auto, float32 or bfloat16, got {self.score_dtype!r}")
        if not (self.massive_ratio == 0.0 or self.massive_ratio > 1.0):
            raise EditorError(f"editor config: `massive_ratio` must be 0 (off) or above 1 (6 separates SmolLM2's attention sinks), got {self.massive_ratio}")
        if not 0.0 <= self.alpha_min <= self.alpha0:
            raise EditorError(f"editor config: `alpha_min` must be between 0 and alpha0 ({self.alpha0}), got {self.alpha_min}")
        if self.gate not in ("zscore", "token", "cascade", "prefix"):
            raise EditorError(f"editor config: `gate` must be \"prefix\", \"cascade\" or \"token\" (per token) or "
                              f"\"zscore\" (the paper's, per sequence), got {self.gate!r}")
        if not 0.0 < self.confirm_margin <= 1.0:
            raise EditorError(f"editor config: `confirm_margin` must be in (0, 1], got {self.confirm_margin}")
        if not 0.0 <= self.route_margin <= 1.0:
            raise EditorError(f"editor config: `route_margin` must be in [0, 1] (0 = off), got {self.route_margin}")
        if not 0.0 < self.confirm_alpha <= 1.0:
            raise EditorError(f"editor config: `confirm_alpha` must be in (0, 1] (a share of an edit's own key), got {self.confirm_alpha}")
        if not 0.0 < self.token_alpha_min <= self.token_alpha0:
            raise EditorError(f"editor config: need 0 < token_alpha_min <= token_alpha0, got {self.token_alpha_min}, {self.token_alpha0}")
        if self.early_stop not in ("nll", "top1"):
            raise EditorError(f"editor config: `early_stop` must be \"nll\" or \"top1\", got {self.early_stop!r}")
        if self.contexts[0] != "{}":
            raise EditorError("editor config: the first of `contexts` must be '{}' (the bare prompt)")

    def alpha0_for(self, gate: str | None = None) -> float:
        """α0 of ``gate`` (default: the configured one)."""
        return self.token_alpha0 if (gate or self.gate) in ("token", "cascade", "prefix") else self.alpha0

    def alpha_min_for(self, gate: str | None = None) -> float:
        """The floor of α for ``gate`` (default: the configured one)."""
        return self.token_alpha_min if (gate or self.gate) in ("token", "cascade", "prefix") else self.alpha_min

    @property
    def last_layer(self) -> int:
        """L: the layer after which the target residual is read and optimised."""
        return self.layers[-1]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short, stable hash of every field that shapes a delta; stored with each version.
        ``delta_dtype`` and ``score_dtype`` are left out: they change how a delta is served, not what it is."""
        fields = {k: v for k, v in self.to_dict().items() if k not in SERVING_ONLY}
        blob = json.dumps(fields, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict) -> "EditConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise EditorError(f"editor config: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        stats = data.pop("stats", {})
        sknown = {f.name for f in dataclasses.fields(StatsConfig)}
        if set(stats) - sknown:
            raise EditorError(f"editor config [stats]: unknown keys {sorted(set(stats) - sknown)}; known: {sorted(sknown)}")
        for key in ("layers", "contexts"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data, stats=StatsConfig(**stats))

    @classmethod
    def from_toml(cls, path: str | Path) -> "EditConfig":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise EditorError(f"model config {path} not found; see configs/models/ for examples") from None
        except tomllib.TOMLDecodeError as exc:
            raise EditorError(f"model config {path} is not valid TOML: {exc}") from None
        return cls.from_dict(data.get("editor", data))

    def replace(self, **changes) -> "EditConfig":
        return dataclasses.replace(self, **changes)
