"""The admin HTTP API in-process (FastAPI TestClient) over a Runtime serving a tiny model saved to disk."""
from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from daemon.http.api import create_app, is_loopback
from daemon.config import ConfigError, load_config
from daemon.notify import Notifier
from daemon.runtime import Runtime

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def runtime(project, monkeypatch):
    monkeypatch.delenv("KBSYNC_TOKEN", raising=False)
    with open(project / "app.toml", "a") as f:
        f.write(f"[daemon]\ninterval_s = 3600\ntoken = '{TOKEN}'\ninbox_settle_s = 0.1\n")
    rt = Runtime(load_config(project / "app.toml", project / "state"), notifier=Notifier({}))
    yield rt
    rt.stop()


def test_health_readiness_auth_and_admin_routes(runtime, project):
    http = TestClient(create_app(runtime))
    assert http.get("/healthz").status_code == 200
    r = http.get("/readyz")
    assert r.status_code == 503 and r.json()["ready"] is False            # model not loaded yet
    runtime.start()
    assert http.get("/readyz").json() == {"ready": True, "model_loaded": True, "degraded": None,
                                        "scheduler_running": True}

    for headers in ({}, {"Authorization": "Bearer wrong"}):               # a token is configured: required
        r = http.get("/v1/admin/status", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
        assert http.post("/v1/admin/sync", headers=headers).status_code == 401
    status = http.get("/v1/admin/status", headers=AUTH).json()
    assert status["head"] is None and status["model_loaded"] and status["next_tick"] and status["last_tick"] is None

    runtime.service.store.add("Paris", "{} is the capital of", "Italy")
    first = http.post("/v1/admin/sync", headers=AUTH).json()
    assert [s["kind"] for s in first["steps"]] == ["edit"] and first["head"] == first["steps"][0]["version"]
    status = http.get("/v1/admin/status", headers=AUTH).json()
    assert status["head"] == first["head"] and status["pending"] == 0 and status["last_tick"]["reason"] == "manual"

    r = http.post("/v1/admin/rollback", headers=AUTH, json={"version": 42, "reason": "test"})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == 404 and err["type"] == "not_found" and "42" in err["message"]
    r = http.post("/v1/admin/rollback", headers=AUTH, json={"version": "yesterday"})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request"
    assert http.post("/v1/admin/rollback", headers=AUTH, json={"version": None}).json() == \
        {"from": first["head"], "head": None}
    r = http.post("/v1/admin/revert", headers=AUTH, json={"version": first["head"]})   # not on HEAD's chain
    assert r.status_code == 409 and "rollback" in r.json()["error"]["message"]
    http.post("/v1/admin/rollback", headers=AUTH, json={"version": first["head"]})
    reverted = http.post("/v1/admin/revert", headers=AUTH, json={"version": first["head"]}).json()
    assert reverted == {"steps": [], "head": None}

    runtime.stop()
    assert http.get("/readyz").status_code == 503


def test_refuses_a_public_bind_without_a_token(project, monkeypatch):
    monkeypatch.delenv("KBSYNC_TOKEN", raising=False)
    cfg = load_config(project / "app.toml", project / "state")
    rt = Runtime(cfg, host="0.0.0.0", notifier=Notifier({}))
    try:
        with pytest.raises(ConfigError, match="KBSYNC_TOKEN"):
            create_app(rt)
        monkeypatch.setenv("KBSYNC_TOKEN", TOKEN)
        http = TestClient(create_app(rt))
        assert http.get("/v1/admin/status").status_code == 401
        assert http.get("/healthz").status_code == 200                    # health needs no token
    finally:
        rt.stop()
    loopback = Runtime(cfg, notifier=Notifier({}))
    monkeypatch.delenv("KBSYNC_TOKEN")
    try:                                                                   # loopback, no token: open
        assert TestClient(create_app(loopback)).get("/v1/admin/status").status_code == 200
    finally:
        loopback.stop()
    assert is_loopback("localhost") and is_loopback("::1") and not is_loopback("10.0.0.1")


def test_reload_config_reschedules_and_survives_a_bad_file(project, monkeypatch):
    monkeypatch.delenv("KBSYNC_TOKEN", raising=False)
    state = project / "state"
    load = lambda: load_config(project / "app.toml", state)  # noqa: E731
    rt = Runtime(load(), notifier=Notifier({}), config_loader=load)
    try:
        rt.scheduler.start()
        assert rt.scheduler.next_run_time.timestamp() - time.time() > 50          # default: 60 s
        (state / "config.toml").write_text("[daemon]\ninterval_s = 5\n")
        rt.reload_config()
        assert rt.cfg.daemon.interval_s == 5 and rt.scheduler.next_run_time.timestamp() - time.time() < 6
        (state / "config.toml").write_text("[daemon]\nbogus = 1\n")
        rt.reload_config()                                                         # logged, old one kept
        assert rt.cfg.daemon.interval_s == 5
    finally:
        rt.stop()


def test_compaction_runs_in_the_background_and_moves_head_when_done(runtime, project):
    from dataclasses import replace

    from tests.conftest import wait_for
    runtime.service.cfg = replace(runtime.service.cfg, sync=replace(runtime.service.cfg.sync, compact_batch_size=1))
    http = TestClient(create_app(runtime))
    runtime.start()
    for subject, target in (("Paris", "Italy"), ("Rome", "France"), ("Berlin", "Spain")):
        runtime.service.store.add(subject, "{} is the capital of", target)
        http.post("/v1/admin/sync", headers=AUTH)
    runtime.service.store.remove("Rome", "{} is the capital of")
    http.post("/v1/admin/sync", headers=AUTH)
    before = http.get("/v1/admin/status", headers=AUTH).json()["head"]

    started = http.post("/v1/admin/compact", headers=AUTH).json()
    assert started["running"] is True
    answer = http.post("/v1/admin/query", headers=AUTH, json={"prompt": "Paris is the capital of", "max_tokens": 2})
    assert answer.status_code == 200                                   # served while it compacts
    done = wait_for(lambda: (s := http.get("/v1/admin/status", headers=AUTH).json())["compaction"]["running"]
                    is False and s, what="the compaction to end")
    c = done["compaction"]
    assert c["error"] is None and c["steps"] == 3 and c["progress"]["finished"]   # Paris, Berlin, then HEAD
    assert c["progress"]["live"] == 2 and done["head"] == c["progress"]["head"] != before
    chain = runtime.service.ledger.chain(done["head"])
    assert len(chain) == 3 and chain[0].parent is None                  # base -> Paris -> Berlin -> HEAD
    http.post("/v1/admin/compact", headers=AUTH)                        # nothing new since: no version
    again = wait_for(lambda: (s := http.get("/v1/admin/status", headers=AUTH).json())["compaction"]["running"]
                     is False and s)
    assert again["compaction"]["steps"] == 0 and again["compaction"]["progress"]["finished"]
    assert again["head"] == done["head"]
