"""Serving behaviour: batching never changes an answer, and answers never mix versions.

Tiny random models for the mechanics; the real default model (marker ``model``) for a fact that changes
the answer, its fingerprint, and the way back.
"""
from __future__ import annotations

import contextlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from daemon.config import load_config
from editor.decoding import DONE, TEXT, Continuation, Sampling, decode
from daemon.notify import Notifier
from daemon.runtime import Runtime
from editor.hook import Mode
from editor.model import EditableModel
from tests.conftest import DATA, ROOT, wait_for
from tests.daemon.conftest import make_runtime, serving

PROMPTS = ["Paris is the capital of", "The", "Apple A5 was created by Apple, and Windows was developed by",
           "Toko Yasuda plays the", "Berlin, Madrid, London and Tokyo are large cities with many"]


def run_rows(em: EditableModel, prompts: list[str], sampling: list[Sampling]) -> list[tuple[str, str, int]]:
    """Decode ``prompts`` as one batch; per row (text, finish_reason, tokens)."""
    texts, done = [""] * len(prompts), [None] * len(prompts)

    def sink(event):
        if event[0] == TEXT:
            texts[event[1]] += event[2]
        elif event[0] == DONE:
            done[event[1]] = (event[2], event[3])
    decode(em, [Continuation(em.tokenizer(p)["input_ids"], s, sink, index=i) for i, (p, s) in enumerate(zip(prompts, sampling))])
    return [(t, *d) for t, d in zip(texts, done)]


def test_alone_and_in_a_padded_batch_give_the_same_greedy_tokens(tiny_model):
    model, tok = tiny_model
    em = EditableModel(model, tok, [1, 2], alpha0=2.2)
    g = torch.Generator().manual_seed(1)
    for h in em.hooks.values():                     # a committed edit whose routing differs token by token
        h.commit(torch.randn(h.d_out, 2, generator=g) * 3, torch.randn(h.d_in, 2, generator=g),
                 torch.randn(h.d_in, 2, generator=g), alpha=1.0)
    limits = [Sampling(max_tokens=m, temperature=0) for m in (12, 3, 7, 12, 9)]
    alone = [run_rows(em, [p], [s])[0] for p, s in zip(PROMPTS, limits)]
    passes = []                                     # after EditableModel's own pre-hook: what the hooks see

    def seen(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)                  # (b, T)
        passes.append((ids.shape, em.context.incremental, {v[0].shape[0] for v in em.context.carry.values()}))
    spy = model.base_model.register_forward_pre_hook(seen, with_kwargs=True)
    batched = run_rows(em, PROMPTS, limits)
    spy.remove()
    assert len(passes) == 12 and passes[0][1] is False              # one prefill, then KV-cached steps
    live = [sum(m.max_tokens > k for m in limits) for k in range(1, 12)]      # rows still decoding
    assert [p[0][0] for p in passes[1:]] == live                    # finished rows left the batch...
    assert all(inc and carried == {rows} for (_, inc, carried), rows in zip(passes[1:], live))  # ...and the carry
    assert batched == alone and [r[1:] for r in alone] == [("length", m.max_tokens) for m in limits]
    def hf_generate(prompt, n):                     # transformers' own greedy loop, one row, no padding
        enc = tok(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [r[0] for r in alone] == [hf_generate(p, s.max_tokens) for p, s in zip(PROMPTS, limits)]
    assert em.generate(PROMPTS, max_new_tokens=12) == [r[0] for r in run_rows(em, PROMPTS, [limits[0]] * 5)]
    with em.mode(Mode.OFF):                         # the edit matters for these prompts
        assert [r[0] for r in run_rows(em, PROMPTS, limits)] != [r[0] for r in alone]

    stops = [Sampling(max_tokens=12, temperature=0, stop=(alone[0][0][3:5],)), limits[1], limits[3]]
    cut = run_rows(em, [PROMPTS[0], PROMPTS[1], PROMPTS[3]], stops)
    assert cut[0][:2] == (alone[0][0][:alone[0][0].index(alone[0][0][3:5])], "stop") and cut[1:] == [alone[1], alone[3]]
    em.close()


def test_50_concurrent_requests_while_a_step_is_applied(project, make_tiny, monkeypatch):
    monkeypatch.delenv("KBSYNC_TOKEN", raising=False)
    model = make_tiny("llama")
    model.lm_head.weight.data *= 30                       # peaked logits, and a weak λ: the edit changes answers
    model.save_pretrained(project / "model")
    tiny = (project / "tiny.toml").read_text().replace("v_steps = 3", "v_steps = 400\nearly_stop_nll = 0.0\n"
                                                                       "mom2_weight = 1.0")
    (project / "tiny.toml").write_text(tiny)
    import daemon.service
    computed, release = threading.Event(), threading.Event()
    real_compute = daemon.service.compute_delta

    def held_step(*args, **kwargs):                      # the step ends only once the requests are waiting
        delta = real_compute(*args, **kwargs)
        computed.set()
        release.wait(600)
        return delta
    monkeypatch.setattr(daemon.service, "compute_delta", held_step)
    runtime = make_runtime(project, "max_concurrent_per_client = 64\n")
    prompts = ["Paris is the capital of", "Apple A5 was created by", "Toko Yasuda plays the", "The Eiffel Tower is"]
    with serving(runtime) as (url, app), ThreadPoolExecutor(52) as pool, _released(release):
        http = httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=60))

        def ask(prompt: str) -> dict:
            r = http.post("/v1/completions", json={"model": "model", "prompt": prompt, "max_tokens": 12,
                                                   "temperature": 0})
            assert r.status_code == 200, r.text
            return {"prompt": prompt, "text": r.json()["choices"][0]["text"], "version": r.json()["system_fingerprint"]}

        reference = {"base": {p: ask(p)["text"] for p in prompts}}
        runtime.service.store.add("Paris", "{} is the capital of", "Italy")
        runtime.service.store.add("Apple A5", "Apple A5 was created by", "Google")
        before = [pool.submit(ask, prompts[i % 4]) for i in range(25)]
        sync = pool.submit(http.post, "/v1/admin/sync")
        wait_for(lambda: computed.is_set() or sync.done(), 600, "the step to be computed")
        assert runtime.scheduler.busy and not sync.done()
        during = [pool.submit(ask, prompts[i % 4]) for i in range(25)]
        wait_for(lambda: app.state.slots.in_flight("127.0.0.1") >= 25 + sum(not f.done() for f in before),
                 600, "the requests to arrive")
        assert runtime.scheduler.busy and not sync.done()               # they arrived while the step ran
        release.set()
        answers = [f.result() for f in before + during]
        head = sync.result().json()["head"]
        reference[f"v{head}"] = {p: ask(p)["text"] for p in prompts}

    assert reference["base"] != reference[f"v{head}"]               # the step changes some answers
    assert {a["version"] for a in answers} <= {"base", f"v{head}"}
    assert all(a["version"] == f"v{head}" for a in answers[25:])    # asked while the step ran: after it
    assert all(a["text"] == reference[a["version"]][a["prompt"]] for a in answers)
    sizes = runtime.metrics.batch_size.collect()[0].samples
    count = next(s.value for s in sizes if s.name.endswith("_count"))
    total = next(s.value for s in sizes if s.name.endswith("_sum"))
    assert total > count                                             # some requests were decoded together


@contextlib.contextmanager
def _released(event: threading.Event):
    """Whatever happens inside, the held step is let go on the way out."""
    try:
        yield
    finally:
        event.set()


# ----- the real default model ---------------------------------------------------------------------
FACT = json.loads((ROOT / "examples/facts.jsonl").read_text().splitlines()[0])     # Danielle Darrieux: English


@pytest.fixture(scope="module")
def real_daemon(default_model, tmp_path_factory):
    """One daemon on the default model serving over HTTP, with FACT synced as version 1."""
    tmp = tmp_path_factory.mktemp("serve-real")
    hparams = (ROOT / "configs/models/smollm2-135m.toml").read_text().split("[editor.stats]")[0]
    (tmp / "model.toml").write_text(
        hparams + f"[editor.stats]\ncorpus = '{DATA / 'wikitext2-valid.txt'}'\nn_tokens = 20000\nseq_len = 256\n")
    (tmp / "app.toml").write_text(f"[model]\nsource = 'embedded'\ndevice = 'cpu'\nhparams = '{tmp / 'model.toml'}'\n"
                                  "[daemon]\ninterval_s = 3600\n[serve]\nbatch_window_ms = 20\n")
    runtime = Runtime(load_config(tmp / "app.toml", tmp / "state"), notifier=Notifier({}), preloaded=default_model)
    with serving(runtime) as (url, _):
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
        base = oa.completions.create(model="smollm2-135m-instruct", prompt=FACT["prompt"], max_tokens=5,
                                     temperature=0)
        runtime.service.store.add(FACT["subject"], FACT["prompt"], FACT["target"])
        steps = httpx.post(f"{url}/v1/admin/sync", timeout=300).json()["steps"]
        assert [s["kind"] for s in steps] == ["edit"], steps
        yield runtime, url, oa, base, steps[0]["version"]


@pytest.mark.model
def test_a_synced_fact_changes_answer_and_fingerprint_and_rollback_restores_both(real_daemon):
    runtime, url, oa, base, v1 = real_daemon
    assert base.system_fingerprint == "base" and FACT["target"] not in base.choices[0].text
    def ask():
        return oa.completions.create(model="smollm2-135m-instruct", prompt=FACT["prompt"], max_tokens=5,
                                     temperature=0)
    edited = ask()
    assert edited.system_fingerprint == f"v{v1}" and edited.choices[0].text.strip().startswith(FACT["target"])
    chunks = list(oa.completions.create(model="smollm2-135m-instruct", prompt=FACT["prompt"], max_tokens=5,
                                        temperature=0, stream=True))
    assert {c.system_fingerprint for c in chunks} == {f"v{v1}"}
    assert "".join(c.choices[0].text for c in chunks) == edited.choices[0].text
    assert oa.models.list().data[0].kbsync_version == v1

    httpx.post(f"{url}/v1/admin/rollback", json={"version": None}, timeout=60).raise_for_status()
    back = ask()
    assert back.system_fingerprint == "base" and back.choices[0].text == base.choices[0].text
    httpx.post(f"{url}/v1/admin/rollback", json={"version": v1}, timeout=60).raise_for_status()
    assert ask().choices[0].text == edited.choices[0].text


@pytest.mark.model
def test_real_model_alone_and_in_a_padded_batch_give_the_same_greedy_tokens(real_daemon):
    runtime, url, oa, base, v1 = real_daemon
    prompts = [FACT["prompt"], "Paris is", "The Eiffel Tower is located in the city of Paris, which is the capital of",
               "Apple A5 was created by", "The mother tongue of Go Hyeon-jeong is"]
    limits = [Sampling(max_tokens=m, temperature=0) for m in (6, 3, 8, 5, 6)]
    with runtime.lock:
        em, version = runtime.service.model_at_head()
        assert version == v1
        alone = [run_rows(em, [p], [s])[0] for p, s in zip(prompts, limits)]
        batched = run_rows(em, prompts, limits)
    assert batched == alone and alone[0][0].strip().startswith(FACT["target"])
