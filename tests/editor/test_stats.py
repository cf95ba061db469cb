"""Key statistics: correct values, cache keyed by every input, crash-safe cache writes."""
import pytest
import torch

from editor import stats as stats_mod
from editor.config import StatsConfig
from editor.errors import StatsError
from editor.model import EditableModel
from editor.stats import cache_key, compute_key_stats, key_stats


@pytest.fixture
def em(tiny_model):
    model, tok = tiny_model
    return EditableModel(model, tok, layers=(1, 2))


def test_second_moment_matches_direct_computation(em, corpus_file):
    cfg = StatsConfig(corpus=str(corpus_file), n_tokens=300, seq_len=40, batch_size=3)
    got = compute_key_stats(em, cfg, progress=False)
    xs = {1: [], 2: []}
    handles = [em.spec.projection_module(em.model, l).register_forward_hook(
        lambda m, i, o, l=l: xs[l].append(i[0])) for l in (1, 2)]
    n = 0
    with torch.no_grad():
        for ids, mask in stats_mod._batches(em, cfg):
            em.model(input_ids=ids, attention_mask=mask)
            for l in (1, 2):
                xs[l][-1] = xs[l][-1][mask.bool()]
            n += int(mask.sum())
    for h in handles:
        h.remove()
    assert got.n_tokens == n == 300
    for l in (1, 2):
        X = torch.cat(xs[l]).double()                                    # (N, d_in)
        assert torch.allclose(got.mom2[l], X.T @ X / n, rtol=1e-5, atol=1e-7)
        assert torch.allclose(got.mom2[l], got.mom2[l].T)


def test_cache_is_reused_and_keyed_by_inputs(em, corpus_file, tmp_path, monkeypatch):
    cfg = StatsConfig(corpus=str(corpus_file), n_tokens=200, seq_len=32)
    first = key_stats(em, cfg, tmp_path, progress=False)
    monkeypatch.setattr(stats_mod, "compute_key_stats", lambda *a, **k: pytest.fail("recomputed a cached value"))
    again = key_stats(em, cfg, tmp_path, progress=False)
    assert all(torch.equal(first.mom2[l], again.mom2[l]) for l in (1, 2))
    k0 = cache_key(em, cfg)
    assert cache_key(em, StatsConfig(corpus=str(corpus_file), n_tokens=201, seq_len=32)) != k0
    assert cache_key(em, StatsConfig(corpus=str(corpus_file), n_tokens=200, seq_len=32, dtype="float64")) != k0
    corpus_file.write_text(corpus_file.read_text() + "\nOne more line.")
    assert cache_key(em, cfg) != k0                                      # content, not just the path
    other = EditableModel(em.model, em.tokenizer, layers=(2,))
    assert cache_key(other, cfg) != k0
    # text sampled from the model depends on the rows drawn together; a file corpus does not
    sampled = StatsConfig(corpus="model", n_tokens=200, seq_len=32, batch_size=16)
    assert cache_key(em, sampled) != cache_key(em, StatsConfig(corpus="model", n_tokens=200, seq_len=32, batch_size=64))
    assert cache_key(em, cfg) == cache_key(em, StatsConfig(corpus=str(corpus_file), n_tokens=200, seq_len=32, batch_size=3))


def test_corrupt_cache_is_moved_aside_and_recomputed(em, corpus_file, tmp_path):
    cfg = StatsConfig(corpus=str(corpus_file), n_tokens=200, seq_len=32)
    good = key_stats(em, cfg, tmp_path, progress=False)
    path = tmp_path / f"keystats-{good.key}.safetensors"
    path.write_bytes(path.read_bytes()[:100])                            # truncated
    again = key_stats(em, cfg, tmp_path, progress=False)
    assert torch.equal(good.mom2[1], again.mom2[1])
    assert path.with_suffix(".corrupt").exists()


def test_interrupted_write_leaves_no_cache_entry(em, corpus_file, tmp_path, monkeypatch):
    cfg = StatsConfig(corpus=str(corpus_file), n_tokens=200, seq_len=32)
    real_fsync = stats_mod.os.fsync

    def interrupt(fd):                                   # the bytes are written, not yet durable or renamed
        raise KeyboardInterrupt

    monkeypatch.setattr(stats_mod.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        key_stats(em, cfg, tmp_path, progress=False)
    assert not list(tmp_path.glob("keystats-*.safetensors"))
    monkeypatch.setattr(stats_mod.os, "fsync", real_fsync)
    assert key_stats(em, cfg, tmp_path, progress=False).n_tokens == 200


def test_model_sampled_corpus_is_seeded_and_leaves_global_rng(em):
    cfg = StatsConfig(corpus="model", n_tokens=40, seq_len=12, batch_size=2, seed=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = compute_key_stats(em, cfg, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    b = compute_key_stats(em, cfg, progress=False)
    assert a.n_tokens >= 40 and torch.equal(a.mom2[1], b.mom2[1])


def test_sampled_text_is_measured_as_a_full_forward_of_that_text_would(em, monkeypatch):
    """Keys taken from the KV-cached sampling steps equal those of one plain forward over the sampled rows."""
    cfg = StatsConfig(corpus="model", n_tokens=30, seq_len=10, batch_size=3, seed=1)
    draws = []
    real_draw = stats_mod._draw
    monkeypatch.setattr(stats_mod, "_draw", lambda logits, gen: draws.append(real_draw(logits, gen)) or draws[-1])
    eos = em.tokenizer.eos_token_id
    forced = lambda logits, gen: (lambda t: torch.where(torch.arange(len(t)) == 1, torch.full_like(t, eos), t))(
        real_draw(logits, gen))                                         # row 1 ends at once: its tail is not counted
    monkeypatch.setattr(stats_mod, "_draw", lambda logits, gen: draws.append(forced(logits, gen)) or draws[-1])
    got = compute_key_stats(em, cfg, progress=False)

    tok, want, count, step = em.tokenizer, {l: 0 for l in em.layers}, 0, 0
    grabbed = {}
    hooks = [em.spec.projection_module(em.model, l).register_forward_hook(
        lambda m, i, o, l=l: grabbed.__setitem__(l, i[0])) for l in em.layers]
    try:
        for round_ in range(2):
            starters = [tok(stats_mod.STARTERS[(round_ * 3 + j) % len(stats_mod.STARTERS)])["input_ids"] for j in range(3)]
            width = max(len(r) for r in starters)
            tail = torch.stack(draws[step:step + cfg.seq_len], 1) if step < len(draws) else torch.empty(3, 0, dtype=torch.long)
            n_new = tail.shape[1]
            step += n_new
            ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in starters])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in starters])
            ids = torch.cat([ids, tail], 1)
            counted = torch.cat([mask, (torch.cumsum(tail == eos, 1) - (tail == eos).long()) == 0], 1).bool()
            full_mask = torch.cat([mask, torch.ones_like(tail)], 1)
            with torch.no_grad():
                em.model(input_ids=ids, attention_mask=full_mask, position_ids=(full_mask.cumsum(1) - 1).clamp(min=0))
            for l in em.layers:
                k = grabbed[l][counted].double()
                want[l] = want[l] + k.T @ k
            count += int(counted.sum())
            if count >= cfg.n_tokens:
                break
    finally:
        for h in hooks:
            h.remove()
    assert got.n_tokens == count
    for l in em.layers:
        torch.testing.assert_close(got.mom2[l], want[l] / count, rtol=1e-4, atol=1e-6)


def test_bad_corpus_is_a_clear_error(em, tmp_path):
    with pytest.raises(StatsError, match="not a text file"):
        compute_key_stats(em, StatsConfig(corpus=str(tmp_path / "missing.txt")), progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(StatsError, match="gave no tokens"):
        compute_key_stats(em, StatsConfig(corpus=str(empty)), progress=False)
