"""Application configuration: ``configs/default.toml`` merged under ``<state-dir>/config.toml``."""
from __future__ import annotations

import os
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
    cache_dir: str = ""           # key statistics shared by every state directory; "" = the user's cache


@dataclass(frozen=True)
class KBConfig:
    """Where the fact store and the version blobs live."""

    url: str = ""        # "" = <state-dir>/kb.sqlite; sqlite:///path or postgresql://... (env KBSYNC_KB_URL wins)
    blob_dir: str = ""   # "" = <state-dir>/versions; with several kbsync processes on one PostgreSQL, a shared folder

    def __post_init__(self):
        url = self.url.strip()
        if url and "://" not in url:
            raise ConfigError(f"[kb] url {url!r} is not a database URL: write sqlite:///path/to/kb.sqlite or "
                              "postgresql://user@host/dbname (or leave it empty for <state-dir>/kb.sqlite)")
        if url and url.split("://", 1)[0].lower() not in ("sqlite", "postgresql", "postgres"):
            raise ConfigError(f"[kb] url {url!r}: kbsync stores facts in SQLite (sqlite:///...) or PostgreSQL "
                              "(postgresql://...)")


@dataclass(frozen=True)
class SyncConfig:
    batch_size: int = 10          # B: facts per step (one version per step)
    max_steps: int = 100          # steps one sync may apply before yielding
    compact_batch_size: int = 100  # facts per version when a compaction solves the live facts again

    def __post_init__(self):
        if self.batch_size < 1 or self.max_steps < 1 or self.compact_batch_size < 1:
            raise ConfigError("[sync] batch_size, max_steps and compact_batch_size must be at least 1")


@dataclass(frozen=True)
class DaemonConfig:
    interval_s: float = 60.0      # the sync schedule (ignored when cron is set)
    cron: str = ""                # a 5-field crontab line, e.g. "*/5 * * * *"; empty = use interval_s
    host: str = "127.0.0.1"       # the admin API; a non-loopback host needs a token
    port: int = 8765
    admin_token: str = ""         # bearer token of the admin routes only (env KBSYNC_TOKEN wins); old name: token
    inbox_settle_s: float = 2.0   # a dropped file is taken once unchanged this long
    inbox_rescan_s: float = 30.0  # full rescan of the inbox (catches missed file events); old name: rescan_s

    def __post_init__(self):
        if self.interval_s <= 0 and not self.cron:
            raise ConfigError("[daemon] interval_s must be positive (or set cron)")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"[daemon] port must be in 0..65535, got {self.port}")
        if self.inbox_settle_s < 0 or self.inbox_rescan_s <= 0:
            raise ConfigError("[daemon] inbox_settle_s must be >= 0 and inbox_rescan_s > 0")


@dataclass(frozen=True)
class ServeConfig:
    """The OpenAI-compatible serving API: model name, batching and request limits."""

    model_name: str = ""               # the id in /v1/models; "" = derived from [model] source
    batch_window_ms: float = 5.0       # requests arriving within this window are decoded as one batch
    max_batch: int = 8                 # sequences (choices) decoded together at most
    max_prompt_tokens: int = 2048      # longer prompts are refused (400)
    max_output_tokens: int = 512       # the largest max_tokens a request may ask for (400 above)
    max_body_bytes: int = 1_000_000    # larger request bodies are refused (413)
    max_concurrent_per_client: int = 8  # requests one client address may have in flight (429 above)

    def __post_init__(self):
        if self.batch_window_ms < 0:
            raise ConfigError("[serve] batch_window_ms must be >= 0")
        for name in ("max_batch", "max_prompt_tokens", "max_output_tokens", "max_body_bytes",
                     "max_concurrent_per_client"):
            if getattr(self, name) < 1:
                raise ConfigError(f"[serve] {name} must be at least 1, got {getattr(self, name)}")


DEFAULT_CANARIES = (
    "The capital of France is",
    "The Eiffel Tower is located in the city of",
    "Water is made of hydrogen and",
    "The largest planet in the solar system is",
    "William Shakespeare was born in",
    "The chemical symbol for gold is",
    "Mount Everest is located in",
    "The first president of the United States was",
    "Python is a programming",
    "The sun rises in the",
    "Albert Einstein developed the theory of",
    "The Great Wall is in",
    "Tokyo is the capital of",
    "A week has seven",
    "The Amazon river flows through",
    "Leonardo da Vinci painted the",
    "The currency of Japan is the",
    "Penguins live mostly in",
    "The opposite of hot is",
    "Beethoven was a famous",
)


@dataclass(frozen=True)
class VerifyConfig:
    """The gate after each step: its own prompts give their targets, and unrelated canaries do not drift."""

    enabled: bool = True
    min_success: float = 0.7      # share of the step's prompts whose greedy next token starts their target
    min_canary: float = 0.9       # share of canary prompts whose greedy next token the step leaves as it was
    canaries: tuple[str, ...] = DEFAULT_CANARIES

    def __post_init__(self):
        for name in ("min_success", "min_canary"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"[verify] {name} must be between 0 and 1, got {getattr(self, name)}")
        object.__setattr__(self, "canaries", tuple(self.canaries))


@dataclass(frozen=True)
class AppConfig:
    state_dir: Path
    model: ModelConfig
    editor: EditConfig
    kb: KBConfig = KBConfig()
    sync: SyncConfig = SyncConfig()
    daemon: DaemonConfig = DaemonConfig()
    verify: VerifyConfig = VerifyConfig()
    serve: ServeConfig = ServeConfig()

    @property
    def kb_url(self) -> str:
        """The fact store: env ``KBSYNC_KB_URL``, else ``[kb] url``, else ``<state-dir>/kb.sqlite``."""
        return os.environ.get("KBSYNC_KB_URL") or self.kb.url or str(self.state_dir / "kb.sqlite")

    @property
    def blob_dir(self) -> Path:
        return Path(self.kb.blob_dir).expanduser() if self.kb.blob_dir else self.state_dir / "versions"

    @property
    def stats_dir(self) -> Path:
        """Key statistics: one cache for every state directory (keyed by everything that changes them)."""
        return user_cache_dir(self.model.cache_dir) / "stats"


def load_config(config: str | Path | None, state_dir: str | Path) -> AppConfig:
    """Read the config file (default ``configs/default.toml``) and merge ``<state-dir>/config.toml`` over it."""
    state_dir = Path(state_dir)
    base = Path(config) if config else _default_config()
    data = _renamed(_read(base), base)
    override = state_dir / "config.toml"
    if override.is_file():
        data = _merge(data, _renamed(_read(override), override))
    model = _section(data, "model", ModelConfig, base)
    kb = _section(data, "kb", KBConfig, base)
    sync = _section(data, "sync", SyncConfig, base)
    daemon = _section(data, "daemon", DaemonConfig, base)
    verify = _section(data, "verify", VerifyConfig, base)
    serve = _section(data, "serve", ServeConfig, base)
    hparams = Path(model.hparams)
    if not hparams.is_absolute() and not hparams.is_file():
        hparams = base.parent.parent / model.hparams          # relative to the project root of the config
    try:
        editor = EditConfig.from_toml(hparams)
    except Exception as exc:
        raise ConfigError(str(exc)) from None
    return AppConfig(state_dir=state_dir, model=model, editor=editor, kb=kb, sync=sync, daemon=daemon, verify=verify,
                     serve=serve)


def user_cache_dir(configured: str = "") -> Path:
    """``[model] cache_dir``, else env ``KBSYNC_CACHE_DIR``, else ``$XDG_CACHE_HOME/kbsync`` (~/.cache/kbsync)."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("KBSYNC_CACHE_DIR"):
        return Path(os.environ["KBSYNC_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kbsync"


#: Keys renamed in a section: the old name is still read (one of the two, not both).
RENAMED = {"daemon": {"token": "admin_token", "rescan_s": "inbox_rescan_s"}}


def _renamed(data: dict, path: Path) -> dict:
    """One file's tables with old key names read as their new names (each file on its own, before merging)."""
    out = dict(data)
    for name, renames in RENAMED.items():
        if not isinstance(out.get(name), dict):
            continue
        values = out[name] = dict(out[name])
        for old, new in renames.items():
            if old in values:
                if new in values:
                    raise ConfigError(f"{path}: [{name}] sets both {old} and {new}; {old} is the old name of {new}: "
                                      f"keep {new} only")
                values[new] = values.pop(old)
    return out


def _section(data: dict, name: str, cls, base: Path):
    """The ``[name]`` table as a ``cls``; unknown keys and bad values are errors naming the file."""
    values = data.get(name, {})
    known = set(cls.__dataclass_fields__)
    if set(values) - known:
        raise ConfigError(f"{base}: unknown keys in [{name}]: {sorted(set(values) - known)}; known: {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{base}: [{name}]: {exc}") from None


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
