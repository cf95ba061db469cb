"""Which precision the target optimisation (and the gate's screen) runs in, chosen at run time from what the hardware computes natively.

``opt_dtype = "auto"`` (the shipped value) means bfloat16 only where the hardware has native bf16 arithmetic
(a CUDA device that supports it; a CPU with AVX512_BF16 or AMX tiles) and float32 everywhere else. On a CPU
without native bf16 (AVX2-only, or AVX-512 without the BF16 extension) bf16 autocast is emulated and
measured 3-8x slower than float32 (docs/benchmarks.md), so "auto" never picks it there.

The environment variable ``KBSYNC_OPT_DTYPE`` (float32, bfloat16, float16 or auto) overrides the configured
value, e.g. to force float32 for a test run; the choice records that it was forced.

``score_dtype = "auto"`` (shipped) is chosen the same way for serving: the first edited layer's gate scores are
screened in bfloat16 where the hardware has it natively, float32 elsewhere (``choose_score_dtype``).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from .errors import EditorError

DTYPES = ("float32", "bfloat16", "float16")
SCORE_DTYPES = ("auto", "float32", "bfloat16")
ENV_OVERRIDE = "KBSYNC_OPT_DTYPE"


@dataclass(frozen=True)
class CpuFeatures:
    """What the CPU offers, as torch reports it."""

    capability: str          # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", "DEFAULT", ...
    avx512_bf16: bool
    amx: bool

    @property
    def native_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx

    def describe(self) -> str:
        extras = [name for name, has in (("AVX512_BF16", self.avx512_bf16), ("AMX", self.amx)) if has]
        return "+".join([self.capability, *extras])


@dataclass(frozen=True)
class PrecisionChoice:
    """The dtype picked for a setting on a device, and why (logged at start-up, shown by status and eval)."""

    setting: str             # what was asked for: "auto", "float32", ...
    dtype: str               # what runs: "float32", "bfloat16" or "float16"
    device: str              # "cpu", "cuda:0", ...
    hardware: str            # "AVX2", "AVX512+AVX512_BF16", "cuda bf16", ...
    reason: str

    def to_json(self) -> dict:
        return asdict(self)


def cpu_features() -> CpuFeatures:
    """Read the CPU's features from torch (no benchmark, no side effects)."""
    import torch

    cpu = torch.cpu
    probe = lambda name: bool(getattr(cpu, name, lambda: False)())   # private helpers; absent = no
    return CpuFeatures(torch.backends.cpu.get_cpu_capability(), probe("_is_avx512_bf16_supported"),
                       probe("_is_amx_tile_supported"))


def _bf16_hardware(dev: str, cpu: CpuFeatures | None, cuda_bf16: bool | None) -> tuple[str, bool]:
    """(a description of ``dev``'s hardware, whether it computes bfloat16 natively)."""
    if dev.startswith("cuda"):
        if cuda_bf16 is None:
            import torch
            cuda_bf16 = bool(torch.cuda.is_bf16_supported())
        return ("cuda bf16" if cuda_bf16 else "cuda without bf16"), cuda_bf16
    cpu = cpu or cpu_features()
    return cpu.describe(), cpu.native_bf16


def _resolve(setting: str, dev: str, origin: str, cpu: CpuFeatures | None, cuda_bf16: bool | None,
             native_note: str, emulated_note: str) -> PrecisionChoice:
    """``setting`` (auto or a dtype) for ``dev``: an explicit dtype as it is, "auto" bfloat16 only where the
    hardware computes it natively. ``origin`` names what asked; the notes end the reason either way."""
    hardware, native = _bf16_hardware(dev, cpu, cuda_bf16)
    if setting != "auto":
        return PrecisionChoice(setting, setting, dev, hardware, f"{origin} (set explicitly, not chosen)")
    if native:
        return PrecisionChoice(setting, "bfloat16", dev, hardware, f"{origin}: {hardware} computes bfloat16 natively"
                                                                   + native_note)
    return PrecisionChoice(setting, "float32", dev, hardware, f"{origin}: {hardware} has no native bfloat16, where "
                                                              + emulated_note)


def choose_score_dtype(setting: str, device, cpu: CpuFeatures | None = None,
                       cuda_bf16: bool | None = None) -> PrecisionChoice:
    """Resolve ``score_dtype`` (auto, float32 or bfloat16): the dtype the first edited layer's gate scores are
    screened in while serving (``editor/gate_screen.py``; the routes are float32's either way). "auto" picks
    bfloat16 only where the hardware computes it natively: emulated bf16 makes the screen slower than float32."""
    if setting not in SCORE_DTYPES:
        raise EditorError(f"score_dtype {setting!r} is not one of {', '.join(SCORE_DTYPES)}")
    return _resolve(setting, str(device), f"score_dtype={setting!r}", cpu, cuda_bf16,
                    "; scores screened in bf16, decided in float32", "a bf16 screen is slower")


def choose_opt_dtype(setting: str, device, cpu: CpuFeatures | None = None, cuda_bf16: bool | None = None,
                     env: dict | None = None) -> PrecisionChoice:
    """Resolve ``setting`` (``auto`` or a dtype name) for ``device``.

    ``cpu`` and ``cuda_bf16`` default to probing this machine; pass them to decide for another one.
    ``env`` defaults to ``os.environ`` (``KBSYNC_OPT_DTYPE`` wins over ``setting``).
    """
    env = os.environ if env is None else env
    forced = env.get(ENV_OVERRIDE, "").strip()
    if forced:
        if forced not in (*DTYPES, "auto"):
            raise EditorError(f"{ENV_OVERRIDE}={forced!r} is not one of auto, {', '.join(DTYPES)}; unset it or fix it")
        setting = forced
    if setting not in (*DTYPES, "auto"):
        raise EditorError(f"opt_dtype {setting!r} is not one of auto, {', '.join(DTYPES)}")
    origin = f"{ENV_OVERRIDE}={forced}" if forced else f"opt_dtype={setting!r}"
    return _resolve(setting, str(device), origin, cpu, cuda_bf16, "", "bf16 autocast is several times slower")
