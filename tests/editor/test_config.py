from pathlib import Path

import pytest

from editor.config import EditConfig
from editor.errors import EditorError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "models").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_model_configs_load(path):
    cfg = EditConfig.from_toml(path)
    assert cfg.layers and cfg.contexts[0] == "{}"
    assert len(cfg.digest()) == 16


def test_digest_tracks_every_field_that_shapes_a_delta():
    base = EditConfig()
    assert base.digest() == EditConfig().digest()
    assert base.replace(mom2_weight=1.0).digest() != base.digest()
    assert base.replace(layers=(1, 2)).digest() != base.digest()
    # how Δ is served is not part of what it is: the same delta under either dtype
    assert base.replace(delta_dtype="bfloat16").digest() == base.digest()


def test_bad_configs_name_the_problem(tmp_path):
    bad = tmp_path / "m.toml"
    bad.write_text("[editor]\nlayerz = [1]\n")
    with pytest.raises(EditorError, match="unknown keys.*layerz"):
        EditConfig.from_toml(bad)
    bad.write_text("[editor]\nlayers = [3, 1]\n")
    with pytest.raises(EditorError, match="strictly increasing"):
        EditConfig.from_toml(bad)
    bad.write_text("[editor\n")
    with pytest.raises(EditorError, match="not valid TOML"):
        EditConfig.from_toml(bad)
    with pytest.raises(EditorError, match="not found"):
        EditConfig.from_toml(tmp_path / "nope.toml")
    bad.write_text("[editor]\ncontexts = ['In short, {}']\n")
    with pytest.raises(EditorError, match="first of `contexts`"):
        EditConfig.from_toml(bad)
