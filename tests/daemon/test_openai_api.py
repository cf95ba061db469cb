"""The OpenAI-compatible serving API over a real HTTP server (uvicorn on loopback) on a tiny model.

The official ``openai`` client for the mechanics (completions, chat, streaming, models, fingerprints),
raw HTTP for the bad requests, the limits and /metrics.
"""
from __future__ import annotations

import json
import threading
import tomllib

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from daemon.http.api import create_app
from daemon.config import ConfigError, ServeConfig, load_config
from tests.conftest import ROOT, wait_for

from .conftest import make_runtime, serving

TOKEN = "s3cret-token"


@pytest.fixture
def server(project, monkeypatch):
    monkeypatch.delenv("KBSYNC_TOKEN", raising=False)
    runtime = make_runtime(project)
    with serving(runtime) as (url, _):
        yield runtime, url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)


def test_openai_client_completions_chat_streaming_models(server):
    runtime, url = server
    oa = client(url)
    models = oa.models.list().data
    assert [m.id for m in models] == ["model"] and models[0].kbsync_version is None   # the tiny model's folder
    assert oa.models.retrieve("model").id == "model"

    prompt = "Paris is the capital of"
    done = oa.completions.create(model="model", prompt=prompt, max_tokens=8, temperature=0)
    text = done.choices[0].text
    assert done.object == "text_completion" and done.system_fingerprint == "base"
    assert done.usage.prompt_tokens == len(runtime.service.live.em.tokenizer(prompt)["input_ids"])
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert text == runtime.query([prompt], 8)[0][0]          # the same greedy tokens as the admin query

    chunks = list(oa.completions.create(model="model", prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                        stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" and c.system_fingerprint == "base" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == done.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens

    assert len(text) > 3 and done.choices[0].finish_reason == "length"
    stop = text[2:4]                                            # a stop text is cut, finish_reason "stop"
    cut = oa.completions.create(model="model", prompt=prompt, max_tokens=8, temperature=0, stop=[stop, "zz"])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = list(oa.completions.create(model="model", prompt=prompt, max_tokens=8, temperature=0, stop=stop,
                                          stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text

    seeded = [oa.completions.create(model="model", prompt=[prompt, "The"], max_tokens=6, temperature=1.0,
                                    top_p=0.9, seed=7, n=2) for _ in range(2)]
    assert [c.text for c in seeded[0].choices] == [c.text for c in seeded[1].choices]     # reproducible
    assert [c.index for c in seeded[0].choices] == [0, 1, 2, 3]

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Paris?"}]
    chat = oa.chat.completions.create(model="model", messages=messages, max_tokens=6, temperature=0)
    assert chat.object == "chat.completion" and chat.system_fingerprint == "base"
    assert chat.choices[0].message.role == "assistant"
    fallback = "system: Be brief.\nuser: Where is Paris?\nassistant:"                  # no chat template
    assert chat.choices[0].message.content == runtime.query([fallback], 6)[0][0]
    stream = list(oa.chat.completions.create(model="model", messages=messages, max_tokens=6, temperature=0,
                                             stream=True))
    assert stream[0].choices[0].delta.role == "assistant" and stream[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert {c.system_fingerprint for c in stream} == {"base"} and stream[-1].choices[0].finish_reason

    raw = httpx.post(f"{url}/v1/completions", json={"model": "model", "prompt": prompt, "max_tokens": 3,
                                                    "stream": True}, timeout=30)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = raw.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])

    runtime.service.store.add("Paris", "{} is the capital of", "Italy")
    head = httpx.post(f"{url}/v1/admin/sync", timeout=60).json()["head"]
    after = oa.completions.create(model="model", prompt=prompt, max_tokens=8, temperature=0)
    assert after.system_fingerprint == f"v{head}" and oa.models.retrieve("model").kbsync_version == head
    assert after.choices[0].text == runtime.query([prompt], 8)[0][0]
    httpx.post(f"{url}/v1/admin/rollback", json={"version": None}, timeout=60)
    back = oa.completions.create(model="model", prompt=prompt, max_tokens=8, temperature=0)
    assert back.system_fingerprint == "base" and back.choices[0].text == text


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    runtime, url = server
    http = httpx.Client(base_url=url, timeout=30)
    good = {"model": "model", "prompt": "Paris is", "max_tokens": 2}

    def error(r: httpx.Response, status: int, param=..., code=...) -> str:
        """The OpenAI-shaped error's message; ``param`` and ``code`` are checked unless left out."""
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["type"] == "invalid_request_error"
        assert param is ... or err["param"] == param, err
        assert code is ... or err["code"] == code, err
        return err["message"]

    headers = {"Content-Type": "application/json"}
    assert "JSON" in error(http.post("/v1/completions", content=b'{"model": "model", "prompt": ', headers=headers), 400)
    assert "UTF-8" in error(http.post("/v1/completions", headers=headers,
                                      content=b'{"model": "model", "prompt": "caf\xe9 \xff"}'), 400)
    assert "UTF-8" in error(http.post("/v1/completions", headers=headers,                   # a lone surrogate
                                      content=b'{"model": "model", "prompt": "\\ud800"}'), 400, "prompt")
    for field, value in [("max_tokens", "ten"), ("prompt", 5), ("temperature", "hot"), ("stream", "yes"),
                         ("n", 1.5), ("max_tokens", -1), ("max_tokens", True), ("stop", 3)]:
        error(http.post("/v1/completions", json={**good, field: value}), 400, field)
    error(http.post("/v1/chat/completions", json={"model": "model", "messages": [{"role": "robot", "content": "x"}]}),
          400, "messages.0.role")
    error(http.post("/v1/chat/completions", json={"model": "model", "messages": "hello"}), 400, "messages")
    error(http.post("/v1/completions", json=[1, 2]), 400)
    msg = error(http.post("/v1/completions", json={**good, "max_tokens": 65}), 400, "max_tokens")
    assert "64" in msg and "[serve] max_output_tokens" in msg
    msg = error(http.post("/v1/completions", json={**good, "prompt": "Paris " * 300}), 400, "prompt",
                "context_length_exceeded")
    assert "[serve] max_prompt_tokens" in msg
    error(http.post("/v1/completions", json={**good, "model": "gpt-4"}), 404, "model", "model_not_found")
    error(http.get("/v1/models/gpt-4"), 404, "model", "model_not_found")

    huge = json.dumps({**good, "prompt": "x" * 30_000}).encode()
    assert "max_body_bytes" in error(http.post("/v1/completions", content=huge, headers=headers), 413)
    assert "max_body_bytes" in error(http.post("/v1/completions", content=huge * 200, headers=headers), 413)
    chunked = http.post("/v1/completions", content=iter([huge[:15_000], huge[15_000:]]), headers=headers)
    assert "max_body_bytes" in error(chunked, 413)                      # no Content-Length: bytes counted
    r = http.post("/v1/admin/rollback", content=huge, headers=headers)   # admin routes keep their own shape
    assert r.status_code == 413 and r.json()["error"]["code"] == 413

    ok = http.post("/v1/completions", json=good)                        # still serving
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None
    assert http.get("/readyz").status_code == 200


def test_per_client_concurrency_limit_and_not_ready(project, monkeypatch):
    monkeypatch.delenv("KBSYNC_TOKEN", raising=False)
    runtime = make_runtime(project, "max_concurrent_per_client = 2\n")
    early = TestClient(create_app(runtime)).post("/v1/completions", json={"model": "model", "prompt": "x"})
    assert early.status_code == 503 and early.json()["error"]["code"] == "not_ready"     # model not loaded yet
    assert early.json()["error"]["type"] == "server_error"
    with serving(runtime) as (url, app):
        body = {"model": "model", "prompt": "Paris is", "max_tokens": 2}
        results = []
        with runtime.lock:                             # the model is busy: requests stay in flight
            threads = [threading.Thread(target=lambda: results.append(httpx.post(f"{url}/v1/completions", json=body,
                                                                                  timeout=60)))
                       for _ in range(2)]
            for t in threads:
                t.start()
            wait_for(lambda: app.state.slots.in_flight("127.0.0.1") >= 2, 120, "the two requests to arrive")
            third = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        for t in threads:
            t.join(120)
        assert third.status_code == 429 and third.json()["error"]["code"] == "concurrency_limit_exceeded"
        assert third.json()["error"]["type"] == "rate_limit_error"
        assert "[serve] max_concurrent_per_client" in third.json()["error"]["message"]
        assert [r.status_code for r in results] == [200, 200]
        for _ in range(3):                                               # streams give their slot back too
            chunks = list(client(url).completions.create(model="model", prompt="Paris", max_tokens=2, stream=True))
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")     # (sampled: EOS may come first)
        wait_for(lambda: not app.state.slots.in_flight("127.0.0.1"), 120, "every slot to be released")
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200


def test_serve_config_is_documented_loaded_and_checked(project):
    defaults = tomllib.loads((ROOT / "configs/default.toml").read_text())["serve"]
    assert set(defaults) == set(ServeConfig.__dataclass_fields__)
    readme = (ROOT / "README.md").read_text()
    assert all(f"serve.{key}" in readme for key in defaults)
    assert load_config(None, project / "state").serve == ServeConfig(**defaults)
    (project / "state").mkdir(exist_ok=True)
    (project / "state" / "config.toml").write_text("[serve]\nmax_batch = 0\n")
    with pytest.raises(ConfigError, match="max_batch"):
        load_config(None, project / "state")


def test_metrics(server, project):
    runtime, url = server
    oa = client(url)
    oa.completions.create(model="model", prompt="Paris is", max_tokens=3, temperature=0)
    list(oa.completions.create(model="model", prompt="Paris is", max_tokens=3, temperature=0, stream=True))
    runtime.service.store.add("Paris", "{} is the capital of", "Italy")
    httpx.post(f"{url}/v1/admin/sync", timeout=60)
    httpx.post(f"{url}/v1/admin/rollback", json={"version": None}, timeout=60)
    runtime.service.store.add("Apple A5", "Apple A5 was created by", "Google")
    text = httpx.get(f"{url}/metrics", timeout=10).text                  # loopback: no token needed
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['kbsync_http_requests_total{endpoint="/v1/completions",method="POST",status="200"}'] == 2
    assert samples['kbsync_http_request_duration_seconds_count{endpoint="/v1/completions",status="200"}'] == 2
    assert samples['kbsync_http_requests_total{endpoint="/v1/admin/sync",method="POST",status="200"}'] == 1
    assert samples["kbsync_completion_tokens_total"] >= 2 and samples["kbsync_prompt_tokens_total"] > 0
    assert samples["kbsync_batch_size_count"] == 2
    assert samples['kbsync_steps_total{result="applied"}'] == 1
    assert samples['kbsync_step_duration_seconds_count{result="applied"}'] == 1
    assert samples["kbsync_rollbacks_total"] == 1 and samples["kbsync_head_version"] == 0
    assert samples["kbsync_facts_pending"] == 1 and samples["kbsync_facts_failed"] == 0


def test_metrics_need_the_token_off_loopback(project, monkeypatch):
    monkeypatch.setenv("KBSYNC_TOKEN", TOKEN)
    runtime = make_runtime(project, host="0.0.0.0")
    try:
        http = TestClient(create_app(runtime))
        assert http.get("/metrics").status_code == 401
        r = http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and "kbsync_head_version" in r.text
    finally:
        runtime.stop()
