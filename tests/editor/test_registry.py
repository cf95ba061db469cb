import pytest
import torch

from editor.errors import UnsupportedArchitecture
from editor.registry import REGISTRY, spec_for


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gpt2", "gptj"])
def test_registry_finds_projection_with_declared_orientation(make_tiny, kind):
    model = make_tiny(kind)
    spec = spec_for(model.config)
    module = spec.projection_module(model, 1)
    d_in, d_out = spec.dims(module)
    hidden = model.config.hidden_size
    assert d_out == hidden and d_in != hidden           # the MLP output projection: wide -> hidden
    x = torch.randn(3, d_in)
    # the math-orientation weight reproduces the module (bias aside)
    bias = getattr(module, "bias", None)
    expected = module(x) - (bias if bias is not None else 0)
    assert torch.allclose(x @ spec.weight(module).T, expected, atol=1e-5)
    # the stream-in module exists
    model.get_submodule(spec.stream_in)


def test_unknown_architecture_lists_supported():
    class Cfg:
        model_type = "mamba"

    with pytest.raises(UnsupportedArchitecture) as err:
        spec_for(Cfg())
    for name in REGISTRY:
        assert name in str(err.value)
    assert "mamba" in str(err.value)
