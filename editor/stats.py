"""Key statistics E[k kᵀ] per editable layer: the second moment of the projection's inputs over a corpus.

Cached on disk as safetensors under a key holding every input that changes the value (model fingerprint,
layers, projection, corpus identity, token count, sequence length, dtype, seed). Writes go to a temporary
file, are fsynced and renamed, so an interrupted run never leaves a corrupt cache entry.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from .config import StatsConfig
from .errors import StatsError
from .hook import Mode
from .model import EditableModel

FORMAT = "kbsync-keystats-1"
SAMPLER = "kv-measured-icdf-1"     # how the model-sampled corpus is drawn (part of the cache key)
FLUSH_ROWS = 2048                  # keys gathered per layer before they are summed into x xᵀ


@dataclass(frozen=True)
class KeyStats:
    """E[k kᵀ] per layer, float64 (d_in, d_in), measured over ``n_tokens`` tokens."""

    mom2: dict[int, torch.Tensor]
    n_tokens: int
    key: str

    def to(self, device) -> "KeyStats":
        """The same statistics on ``device`` (move once, not every step)."""
        return KeyStats({l: m.to(device) for l, m in self.mom2.items()}, self.n_tokens, self.key)

    def for_layer(self, layer: int) -> torch.Tensor:
        try:
            return self.mom2[layer]
        except KeyError:
            raise StatsError(f"key statistics {self.key} have no layer {layer}; rebuild them with `kbsync stats build`") from None


def key_stats(em: EditableModel, cfg: StatsConfig, cache_dir: str | Path, progress: bool = True,
              also_read: tuple[str | Path, ...] = ()) -> KeyStats:
    """Load the cached statistics for ``em``'s editable layers, computing and caching them if missing.

    ``also_read``: older cache folders (e.g. a state directory's own ``stats/`` from before the shared
    cache); an entry found there is copied into ``cache_dir`` instead of being measured again."""
    key = cache_key(em, cfg)
    path = Path(cache_dir) / f"keystats-{key}.safetensors"
    if not path.is_file():
        older = next((p for d in also_read if (p := Path(d) / path.name).is_file()), None)
        if older is not None:
            _write_atomic(path, older.read_bytes())
    if path.is_file():
        try:
            tensors = load_file(path)
            return KeyStats({l: tensors[f"layer.{l}"] for l in em.layers}, int(tensors["n_tokens"]), key)
        except Exception as exc:  # a foreign or damaged file: recompute rather than crash-loop
            path.rename(path.with_suffix(".corrupt"))
            if progress:
                tqdm.write(f"key statistics cache {path} unreadable ({exc}); moved aside and recomputing")
    stats = compute_key_stats(em, cfg, progress=progress, key=key)
    tensors = {f"layer.{l}": m.contiguous() for l, m in stats.mom2.items()}
    tensors["n_tokens"] = torch.tensor(stats.n_tokens)
    _write_atomic(path, save(tensors, metadata={"format": FORMAT, "key": key}))
    return stats


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: readers (other processes too) see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cache_key(em: EditableModel, cfg: StatsConfig) -> str:
    parts = {
        "format": FORMAT,
        "model": em.fingerprint(),
        "layers": list(em.layers),
        "projection": em.spec.projection,
        "corpus": corpus_identity(cfg.corpus),
        "n_tokens": cfg.n_tokens,
        "seq_len": cfg.seq_len,
        "dtype": cfg.dtype,
        "seed": cfg.seed if cfg.corpus == "model" else None,
    }
    if cfg.corpus == "model":                  # the sampled text depends on how many rows are drawn together
        parts["batch_size"] = cfg.batch_size
        parts["sampler"] = SAMPLER
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def corpus_identity(corpus: str) -> str:
    """A string that changes whenever the corpus content does."""
    if corpus == "model" or corpus.startswith("hf:"):
        return corpus
    files = _corpus_files(corpus)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return f"files:{h.hexdigest()[:16]}"


@torch.no_grad()
def compute_key_stats(em: EditableModel, cfg: StatsConfig, progress: bool = True, key: str = "") -> KeyStats:
    """Accumulate x xᵀ of every editable projection's input over the corpus, through the base model.

    A text corpus runs forward only up to the last editable layer. The model-sampled corpus is measured
    while it is sampled: every decoding step's forward already computes the keys of the token it feeds.
    """
    acc_dtype = {"float32": torch.float32, "float64": torch.float64}.get(cfg.dtype)
    if acc_dtype is None:
        raise StatsError(f"stats dtype {cfg.dtype!r} must be float32 or float64")
    # float64 totals on the model's device. Keys are buffered and summed as x xᵀ (in acc_dtype) once
    # FLUSH_ROWS have gathered: a decoding step gives only batch_size rows, and a product per step would
    # write a d_in x d_in matrix per layer for every 64 tokens
    sums = {l: torch.zeros(em.hooks[l].d_in, em.hooks[l].d_in, dtype=torch.float64, device=em.device) for l in em.layers}
    held: dict[int, list[torch.Tensor]] = {l: [] for l in em.layers}
    rows = dict.fromkeys(em.layers, 0)       # rows held per layer
    counted: dict[str, object] = {}          # "mask": which positions of the running forward count; "stop"
    last = em.layers[-1]

    def flush(layer):
        if held[layer]:
            k = torch.cat(held[layer])                                 # (N, d_in)
            sums[layer] += (k.T @ k).to(torch.float64)                 # (d_in, d_in)
            held[layer].clear()
            rows[layer] = 0

    def capture(layer):
        def fn(module, inputs, output):
            if "mask" not in counted:
                return None
            held[layer].append(inputs[0][counted["mask"]].to(acc_dtype))   # (N, d_in) the counted positions
            rows[layer] += len(held[layer][-1])
            if rows[layer] >= FLUSH_ROWS:
                flush(layer)
            if layer == last and counted["stop"]:
                raise _Stop
        return fn

    @contextlib.contextmanager
    def measuring(mask: torch.Tensor, stop: bool):
        counted.update(mask=mask.bool(), stop=stop)
        try:
            yield
        except _Stop:
            pass
        finally:
            counted.clear()

    handles = [em.spec.projection_module(em.model, l).register_forward_hook(capture(l)) for l in em.layers]
    bar = tqdm(total=cfg.n_tokens, desc="key statistics", unit="tok", disable=not progress)
    count = 0
    try:
        with em.mode(Mode.OFF):
            chunks = _sample_measured(em, cfg, measuring) if cfg.corpus == "model" else _measure_text(em, cfg, measuring)
            for n in chunks:
                count += n
                bar.update(n)
        for l in em.layers:
            flush(l)
    finally:
        bar.close()
        for h in handles:
            h.remove()
    if count == 0:
        raise StatsError(f"corpus {cfg.corpus!r} gave no tokens; point [stats] corpus at a text file or 'model'")
    return KeyStats({l: (s / count).cpu() for l, s in sums.items()}, count, key)


class _Stop(Exception):
    """Raised after the last editable layer: a text corpus needs no forward beyond it."""


def _measure_text(em: EditableModel, cfg: StatsConfig, measuring) -> Iterator[int]:
    """Forward each batch of the text corpus (up to the last editable layer); yields tokens counted."""
    for ids, mask in _batches(em, cfg):
        with measuring(mask, stop=True):
            em.model(input_ids=ids, attention_mask=mask)
        yield int(mask.sum())


def _batches(em: EditableModel, cfg: StatsConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches of the text corpus totalling about cfg.n_tokens tokens."""
    ids = _corpus_token_ids(em, cfg)
    seqs = [ids[i:i + cfg.seq_len] for i in range(0, min(len(ids), cfg.n_tokens), cfg.seq_len)]
    seqs = [s for s in seqs if len(s) > 1]
    for i in range(0, len(seqs), cfg.batch_size):
        chunk = seqs[i:i + cfg.batch_size]
        width = max(len(s) for s in chunk)
        batch = torch.full((len(chunk), width), em.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, s in enumerate(chunk):
            batch[j, :len(s)] = torch.tensor(s)
            mask[j, :len(s)] = 1
        yield batch.to(em.device), mask.to(em.device)


def _corpus_token_ids(em: EditableModel, cfg: StatsConfig) -> list[int]:
    if cfg.corpus.startswith("hf:"):
        texts = _hf_texts(cfg.corpus[3:])
    else:
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in _corpus_files(cfg.corpus)]
    ids: list[int] = []
    for text in texts:
        for para in text.split("\n"):
            if para.strip() and not para.strip().startswith("="):
                ids.extend(em.tokenizer(para.strip(), add_special_tokens=False)["input_ids"])
                if len(ids) >= cfg.n_tokens:
                    return ids[:cfg.n_tokens]
    return ids


def _corpus_files(corpus: str) -> list[Path]:
    path = Path(corpus).expanduser()
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise StatsError(f"stats corpus {corpus!r} is not a text file or a folder of .txt files; "
                         "use a path, 'model' (sampled from the model, offline) or 'hf:DATASET'")
    return files


def _hf_texts(name: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise StatsError("stats corpus 'hf:...' needs the `datasets` package (pip install datasets); "
                         "offline, use a text file or 'model'") from None
    ds_name, _, ds_config = name.partition(":")
    try:
        ds = datasets.load_dataset(ds_name, ds_config or None, split="train")
    except Exception as exc:
        raise StatsError(f"could not load dataset {name!r} ({exc}); offline, use a text file or 'model'") from None
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return [str(t) for t in ds[column]]


STARTERS = ("The", "In", "A", "It", "When", "One", "This", "There", "After", "Many", "Some", "Our")


def _sample_measured(em: EditableModel, cfg: StatsConfig, measuring) -> Iterator[int]:
    """Text sampled from the model itself (the offline default), measured as it is sampled.

    ``cfg.batch_size`` rows at a time, each started from one of :data:`STARTERS`, ``cfg.seq_len`` tokens of
    plain sampling (temperature 1, no top-k/top-p) with a KV cache; a row's tokens count up to and
    including its first end-of-sequence token. Seeded by ``cfg.seed`` with a generator of its own (the
    global RNG is untouched). Each step's forward measures the keys of the token it feeds, so the text is
    never run a second time. Yields the tokens counted per forward.
    """
    from transformers import DynamicCache

    tok, dev, model = em.tokenizer, em.device, em.model
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    produced, round_ = 0, 0
    while produced < cfg.n_tokens:
        rows = [tok(STARTERS[(round_ * cfg.batch_size + j) % len(STARTERS)])["input_ids"] for j in range(cfg.batch_size)]
        B, P = len(rows), max(len(r) for r in rows)
        ids = torch.full((B, P), tok.pad_token_id, dtype=torch.long)                   # (B, P) left-padded
        mask = torch.zeros(B, P, dtype=torch.long)                                     # (B, P)
        for j, r in enumerate(rows):
            ids[j, P - len(r):], mask[j, P - len(r):] = torch.tensor(r), 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(1) - 1).clamp(min=0)                                        # (B, P)
        cache = DynamicCache(config=model.config)
        with measuring(mask, stop=False):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                           logits_to_keep=1, **{cache_kw: cache}).logits[:, -1]        # (B, V)
        produced += int(mask.sum())
        yield int(mask.sum())
        alive = torch.ones(B, dtype=torch.bool, device=dev)                            # (B,) before its first eos
        pos = pos[:, -1:]                                                              # (B, 1)
        for _ in range(cfg.seq_len):
            nxt = _draw(logits, gen)                                                   # (B,)
            mask, pos = torch.cat([mask, torch.ones_like(pos)], 1), pos + 1           # (B, T+1), (B, 1)
            with measuring(alive[:, None], stop=False):                                # this token's keys
                logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                               logits_to_keep=1, **{cache_kw: cache}).logits[:, -1]
            n = int(alive.sum())
            produced += n
            yield n
            alive &= nxt != tok.eos_token_id
            if not alive.any():
                break
        round_ += 1


def _draw(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits) by inverse transform sampling, (B,).

    The same distribution as ``torch.multinomial``, which on CPU draws an exponential per vocabulary entry
    (measured: 28 % of sampling time at 64 rows x 49k entries); this draws one uniform per row."""
    cdf = logits.float().softmax(-1).cumsum(-1)                                        # (B, V)
    u = torch.rand(cdf.shape[0], 1, generator=gen, device=cdf.device) * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, u).squeeze(1).clamp(max=cdf.shape[1] - 1)         # (B,)
