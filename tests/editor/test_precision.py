"""The run-time choice of the optimisation's precision, decided for CPUs other than this one."""
import pytest

from editor.config import EditConfig
from editor.errors import EditorError
from editor.precision import ENV_OVERRIDE, CpuFeatures, choose_opt_dtype, choose_score_dtype, cpu_features
from editor.requests import EditRequest
from editor.step import compute_delta
from editor.stats import compute_key_stats
from editor.config import StatsConfig
from editor.model import EditableModel

AVX2 = CpuFeatures("AVX2", avx512_bf16=False, amx=False)
AVX512 = CpuFeatures("AVX512", avx512_bf16=False, amx=False)
AVX512_BF16 = CpuFeatures("AVX512", avx512_bf16=True, amx=False)
AMX = CpuFeatures("AVX512", avx512_bf16=False, amx=True)


@pytest.mark.parametrize("cpu", [AVX2, AVX512], ids=["avx2", "avx512-no-bf16"])
def test_auto_is_float32_on_cpus_without_native_bf16(cpu):
    choice = choose_opt_dtype("auto", "cpu", cpu=cpu, env={})
    assert choice.dtype == "float32"
    assert cpu.capability in choice.hardware and "no native bfloat16" in choice.reason


@pytest.mark.parametrize("cpu", [AVX512_BF16, AMX], ids=["avx512-bf16", "amx"])
def test_auto_is_bfloat16_where_the_cpu_computes_it(cpu):
    choice = choose_opt_dtype("auto", "cpu", cpu=cpu, env={})
    assert choice.dtype == "bfloat16"
    assert ("AVX512_BF16" in choice.hardware) or ("AMX" in choice.hardware)


def test_auto_on_cuda_follows_the_device_bf16_support():
    assert choose_opt_dtype("auto", "cuda:0", cuda_bf16=True, env={}).dtype == "bfloat16"
    assert choose_opt_dtype("auto", "cuda:0", cuda_bf16=False, env={}).dtype == "float32"


def test_an_explicit_setting_is_kept_and_the_env_overrides_both():
    assert choose_opt_dtype("bfloat16", "cpu", cpu=AVX2, env={}).dtype == "bfloat16"
    forced = choose_opt_dtype("auto", "cpu", cpu=AVX512_BF16, env={ENV_OVERRIDE: "float32"})
    assert forced.dtype == "float32" and ENV_OVERRIDE in forced.reason
    assert choose_opt_dtype("float32", "cpu", cpu=AVX2, env={ENV_OVERRIDE: "auto"}).dtype == "float32"
    with pytest.raises(EditorError, match=f"{ENV_OVERRIDE}='fp8'.*unset it"):
        choose_opt_dtype("auto", "cpu", cpu=AVX2, env={ENV_OVERRIDE: "fp8"})


def test_this_machine_is_described_as_torch_sees_it():
    import torch

    cpu = cpu_features()
    assert cpu.capability == torch.backends.cpu.get_cpu_capability()
    assert choose_opt_dtype("auto", "cpu", env={}).dtype == ("bfloat16" if cpu.native_bf16 else "float32")


@pytest.mark.parametrize("cpu,want", [(AVX2, "float32"), (AVX512, "float32"), (AVX512_BF16, "bfloat16"),
                                      (AMX, "bfloat16")], ids=["avx2", "avx512-no-bf16", "avx512-bf16", "amx"])
def test_the_gate_screen_runs_in_bf16_only_where_the_cpu_computes_it(cpu, want):
    choice = choose_score_dtype("auto", "cpu", cpu=cpu)
    assert choice.dtype == want and cpu.capability in choice.hardware
    assert ("natively" in choice.reason) == (want == "bfloat16")
    assert choose_score_dtype("bfloat16", "cpu", cpu=AVX2).dtype == "bfloat16"       # asked for: kept
    with pytest.raises(EditorError, match="score_dtype 'float16' is not one of auto, float32, bfloat16"):
        choose_score_dtype("float16", "cpu", cpu=cpu)


def test_an_editable_model_resolves_score_dtype_for_its_device(make_tiny, tiny_tokenizer):
    import torch

    em = EditableModel.for_config(make_tiny("llama"), tiny_tokenizer, EditConfig(layers=(1, 2), gate="prefix"))
    want = "bfloat16" if cpu_features().native_bf16 else "float32"
    assert em.score_choice.dtype == want and em.score_choice.setting == "auto"
    assert {h.score_dtype for h in em.hooks.values()} == {getattr(torch, want)}
    em.close()
    with pytest.raises(EditorError, match="`score_dtype` must be auto, float32 or bfloat16"):
        EditConfig(score_dtype="float16")
    assert EditConfig().replace(score_dtype="float32").digest() == EditConfig().digest()   # how it is served only


def test_auto_is_the_shipped_default_and_accepted_by_the_config():
    assert EditConfig().opt_dtype == "auto"
    with pytest.raises(EditorError, match="opt_dtype"):
        EditConfig(opt_dtype="half")


def test_a_step_records_the_precision_it_ran_in(make_tiny, tiny_tokenizer, corpus_file, monkeypatch):
    """With the CPU faked to either side, the step runs in, and its digest records, the chosen dtype."""
    import editor.precision as precision

    em = EditableModel(make_tiny("llama"), tiny_tokenizer, (1, 2))
    cfg = EditConfig(layers=(1, 2), v_steps=2, mom2_weight=10.0,
                     stats=StatsConfig(corpus=str(corpus_file), n_tokens=200, seq_len=16))
    stats = compute_key_stats(em, cfg.stats, progress=False)
    request = [EditRequest("Paris", "Paris is the capital of", "Italy")]
    monkeypatch.delenv(ENV_OVERRIDE, raising=False)
    ran = {}
    for name, cpu in (("plain", AVX2), ("bf16", AVX512_BF16)):
        monkeypatch.setattr(precision, "cpu_features", lambda cpu=cpu: cpu)
        ran[name] = compute_delta(em, request, stats, cfg)
    assert ran["plain"].metrics["opt_dtype"] == "float32" and ran["bf16"].metrics["opt_dtype"] == "bfloat16"
    assert ran["plain"].config_digest == cfg.replace(opt_dtype="float32").digest()
    assert ran["bf16"].config_digest == cfg.replace(opt_dtype="bfloat16").digest()
    em.close()
