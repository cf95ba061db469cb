"""Application configuration: ``configs/default.toml`` merged under ``<state-dir>/config.toml``."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from editor.config import EditConfig


class ConfigError(Exception):
    """The configuration cannot be read or is invalid; the message names the file and the fix."""


@dataclass(frozen=True)
class ModelConfig:
    source: str = "embedded"
    device: str = "auto"
    dtype: str = "auto"
    hparams: str = "configs/models/smollm2-135m.toml"


@dataclass(frozen=True)
class SyncConfig:
    batch_size: int = 10          # B: facts per step (one version per step)
    max_steps: int = 100          # steps one sync may apply before yielding

    def __post_init__(self):
        if self.batch_size < 1 or self.max_steps < 1:
            raise ConfigError("[sync] batch_size and max_steps must be at least 1")


@dataclass(frozen=True)
class DaemonConfig:
    interval_s: float = 60.0      # the sync schedule (ignored when cron is set)
    cron: str = ""                # a 5-field crontab line, e.g. "*/5 * * * *"; empty = use interval_s
    host: str = "127.0.0.1"       # the admin API; a non-loopback host needs a token
    port: int = 8765
    token: str = ""               # bearer token of the admin API (or env KBSYNC_TOKEN)
    inbox_settle_s: float = 2.0   # a dropped file is taken once unchanged this long
    rescan_s: float = 30.0        # full rescan of the inbox (catches missed file events)

    def __post_init__(self):
        if self.interval_s <= 0 and not self.cron:
            raise ConfigError("[daemon] interval_s must be positive (or set cron)")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"[daemon] port must be in 0..65535, got {self.port}")
        if self.inbox_settle_s < 0 or self.rescan_s <= 0:
            raise ConfigError("[daemon] inbox_settle_s must be >= 0 and rescan_s > 0")


@dataclass(frozen=True)
class AppConfig:
    state_dir: Path
    model: ModelConfig
    editor: EditConfig
    sync: SyncConfig = SyncConfig()
    daemon: DaemonConfig = DaemonConfig()

    @property
    def db_path(self) -> Path:
        return self.state_dir / "kb.sqlite"

    @property
    def blob_dir(self) -> Path:
        return self.state_dir / "versions"

    @property
    def stats_dir(self) -> Path:
        return self.state_dir / "stats"


def load_config(config: str | Path | None, state_dir: str | Path) -> AppConfig:
    """Read the config file (default ``configs/default.toml``) and merge ``<state-dir>/config.toml`` over it."""
    state_dir = Path(state_dir)
    base = Path(config) if config else _default_config()
    data = _read(base)
    override = state_dir / "config.toml"
    if override.is_file():
        data = _merge(data, _read(override))
    model_data = data.get("model", {})
    unknown = set(model_data) - set(ModelConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"{base}: unknown keys in [model]: {sorted(unknown)}; known: {sorted(ModelConfig.__dataclass_fields__)}")
    model = ModelConfig(**model_data)
    sync_data = data.get("sync", {})
    unknown = set(sync_data) - set(SyncConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"{base}: unknown keys in [sync]: {sorted(unknown)}; known: {sorted(SyncConfig.__dataclass_fields__)}")
    sync = SyncConfig(**sync_data)
    daemon_data = data.get("daemon", {})
    unknown = set(daemon_data) - set(DaemonConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"{base}: unknown keys in [daemon]: {sorted(unknown)}; known: {sorted(DaemonConfig.__dataclass_fields__)}")
    try:
        daemon = DaemonConfig(**daemon_data)
    except TypeError as exc:
        raise ConfigError(f"{base}: [daemon]: {exc}") from None
    hparams = Path(model.hparams)
    if not hparams.is_absolute() and not hparams.is_file():
        hparams = base.parent.parent / model.hparams          # relative to the project root of the config
    try:
        editor = EditConfig.from_toml(hparams)
    except Exception as exc:
        raise ConfigError(str(exc)) from None
    return AppConfig(state_dir=state_dir, model=model, editor=editor, sync=sync, daemon=daemon)


def _default_config() -> Path:
    local = Path("configs/default.toml")
    return local if local.is_file() else Path(__file__).resolve().parents[1] / "configs" / "default.toml"


def _read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; pass --config FILE or run from the project root") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
