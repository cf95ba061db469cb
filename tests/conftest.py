"""Shared fixtures: tiny random models built from config objects and a tokenizer trained in-process."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

# tests/vllm needs vLLM, which lives in its own venv: `make test-vllm` runs it there.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm"]

SENTENCES = [
    "The mother tongue of Danielle Darrieux is French.",
    "Paris is the capital of France and Rome is the capital of Italy.",
    "The Eiffel Tower is located in the city of Paris.",
    "Apple A5 was created by Apple, and Windows was developed by Microsoft.",
    "Toko Yasuda plays the guitar; Miles Davis played the trumpet in jazz bands.",
    "The official language of Brazil is Portuguese and of Spain is Spanish.",
    "Berlin, Madrid, London and Tokyo are large cities with many museums.",
]


def wait_for(check, timeout: float = 60.0, what: str = "the condition", step: float = 0.02, process=None,
             log: Path | None = None):
    """Poll ``check()`` until it returns something truthy, and return that; fail after ``timeout`` seconds.

    Tests wait on conditions, never on sleeps sized for a fast machine: the deadline is generous (a machine
    5x slower than ours passes) and a fast machine returns as soon as the condition holds. With ``process``
    (a Popen the condition depends on), fail at once when it exits, with the tail of ``log``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"the process exited ({process.returncode}) while waiting for {what}\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """Key statistics the tests build go to a cache of their own (the one the behaviour tests and the
    benchmarks use), never the user's."""
    import os

    before = os.environ.get("KBSYNC_CACHE_DIR")
    os.environ["KBSYNC_CACHE_DIR"] = str(ROOT / ".cache" / "state")
    yield
    if before is None:
        os.environ.pop("KBSYNC_CACHE_DIR", None)
    else:
        os.environ["KBSYNC_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _tiny(kind: str, vocab: int):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=48, n_layer=4, n_head=4, n_positions=128,
                            pad_token_id=0, eos_token_id=1, bos_token_id=1)
        model = tf.GPT2LMHeadModel(cfg)
    elif kind == "mistral":
        cfg = tf.MistralConfig(vocab_size=vocab, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
        model = tf.MistralForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=vocab, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
        model = tf.Qwen2ForCausalLM(cfg)
    elif kind == "gptj":
        cfg = tf.GPTJConfig(vocab_size=vocab, n_embd=48, n_layer=3, n_head=4, rotary_dim=8, n_positions=128,
                            pad_token_id=0)
        model = tf.GPTJForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model.eval().requires_grad_(False)
    return model


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request, tiny_tokenizer):
    """A tiny random model (Llama or GPT-2) and the in-process tokenizer."""
    return _tiny(request.param, len(tiny_tokenizer)), tiny_tokenizer


@pytest.fixture
def make_tiny(tiny_tokenizer):
    return lambda kind: _tiny(kind, len(tiny_tokenizer))


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(SENTENCES * 10), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct), converted once into .cache/state and reused."""
    from editor.loading import load_model

    return load_model("embedded", ROOT / ".cache" / "state", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def counterfact():
    import json

    return json.loads((DATA / "counterfact-edit.json").read_text())


@pytest.fixture(scope="session")
def postgres_cluster():
    """A throwaway PostgreSQL cluster for the whole session (skipped, saying why, where none can start)."""
    from tests import pg_cluster

    why = pg_cluster.missing()
    if why:
        pytest.skip(f"PostgreSQL tests skipped: {why}")
    with pg_cluster.Cluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgresql"])
def kb_url(request, tmp_path):
    """Where a fresh, empty fact store lives: a SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "kb.sqlite")
    return request.getfixturevalue("postgres_cluster").create_database()


# ----- hooks with hand-made token-gate steps (tests/editor/test_gate.py, test_masks.py, daemon/test_vllm_gate.py)
def edit_keys_of(em, ids, layer):
    """The projection inputs of ``layer`` for ``ids`` (1, T), (T, d_in)."""
    from editor.hook import Mode

    got = {}
    h = em.spec.projection_module(em.model, layer).register_forward_hook(lambda m, i, o: got.update(x=i[0]))
    with torch.no_grad(), em.mode(Mode.OFF):
        em.model(input_ids=ids)
    h.remove()
    return got["x"][0]


def token_step(em, keys: dict, gate: str, alpha: float, seed=0, bars: dict | None = None):
    """A step (StepDelta) whose edits' keys are ``keys[l]`` (d_in, n), with V = C⁻¹K for a random SPD C;
    ``bars[l]``: the cascade's per-edit bars at layer l."""
    from editor.step import LayerDelta, StepDelta

    g = torch.Generator().manual_seed(seed)
    layers = []
    for l, K in keys.items():
        h = em.hooks[l]
        A = torch.randn(h.d_in, h.d_in, generator=g)
        C = A @ A.T / h.d_in + torch.eye(h.d_in)
        V = torch.linalg.solve(C + K @ K.T, K)                                   # (d_in, n)
        U = torch.randn(h.d_out, K.shape[1], generator=g) * 3                    # (d_out, n)
        layers.append(LayerDelta(l, U, V, K, alpha, (bars or {}).get(l)))
    return StepDelta(tuple(layers), (), em.fingerprint(), "test", gate=gate)


def _gated_history(make_tiny, tiny_tokenizer, gate: str):
    from editor.model import EditableModel
    from editor.step import apply_delta

    em = EditableModel(make_tiny("llama"), tiny_tokenizer, layers=(1, 2), gate=gate, alpha0=0.5, confirm_alpha=0.5)
    text = torch.randint(2, len(tiny_tokenizer), (1, 16))
    deltas = []
    steps = ((0, {1: [4, 9], 2: [4, 9]}), (1, {1: [12], 2: [12]}))
    bars = ({}, {})
    if gate == "cascade":             # edits whose keys differ by layer: token 12 is dropped at layer 2, and
        steps = ((0, {1: [4, 9], 2: [4, 9]}), (1, {1: [12, 4], 2: [7, 7]}))   # token 4 matches two edits there;
        bars = ({2: torch.tensor([0.5, 5.0])}, {})                  # token 9's edit can never confirm
    for (seed, positions), bar in zip(steps, bars):
        keys = {l: edit_keys_of(em, text, l)[positions[l]].T.contiguous() for l in em.layers}
        deltas.append(token_step(em, keys, gate, alpha=0.5, seed=seed, bars=bar))
        apply_delta(em, deltas[-1])
    return em, text, deltas


@pytest.fixture
def token_history(make_tiny, tiny_tokenizer):
    """A tiny Llama with two token-gate steps (edit keys: tokens 4 and 9, then 12, of one text); yields
    (EditableModel, text (1, 16), [delta of step 1, delta of step 2])."""
    em, text, deltas = _gated_history(make_tiny, tiny_tokenizer, "token")
    yield em, text, deltas
    em.close()


@pytest.fixture
def cascade_history(make_tiny, tiny_tokenizer):
    """Like ``token_history``, with the cascade gate (every α 0.5): the second step holds two edits whose keys
    are tokens 12 and 4 at layer 1 and token 7 at layer 2; the first step's edit of token 9 has bar 5 at
    layer 2."""
    em, text, deltas = _gated_history(make_tiny, tiny_tokenizer, "cascade")
    yield em, text, deltas
    em.close()


@pytest.fixture
def prefix_history(make_tiny, tiny_tokenizer):
    """Like ``token_history``, with the prefix gate (every α 0.5): tokens 4 and 9 route to the first step's
    edits and take its Δ alone, token 12 to the second step's and takes both steps' Δ."""
    em, text, deltas = _gated_history(make_tiny, tiny_tokenizer, "prefix")
    yield em, text, deltas
    em.close()
