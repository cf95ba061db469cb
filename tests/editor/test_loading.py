import pytest
import torch

from editor.errors import ModelLoadError
from editor.loading import load_model, resolve_placement


def test_loads_a_saved_model_directory_and_safetensors_file(make_tiny, tiny_tokenizer, tmp_path):
    model = make_tiny("llama")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    ids = torch.tensor([[3, 4, 5]])
    for source in (tmp_path / "m", tmp_path / "m" / "model.safetensors"):
        loaded, tok = load_model(str(source), tmp_path / "state", device="cpu", dtype="float32")
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
        assert tok.pad_token is not None
        assert not any(p.requires_grad for p in loaded.parameters())


def test_missing_sources_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_placement():
    p = resolve_placement("cpu", "auto")
    assert p.device.type == "cpu" and p.dtype == torch.float32
    assert resolve_placement("cpu", "bf16").dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="dtype"):
        resolve_placement("cpu", "int3")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA device"):
            resolve_placement("cuda", "auto")
