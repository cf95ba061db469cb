"""vLLM with the kbsync plugin answers as kbsync itself does, under continuous batching, chunked prefill and
prefix caching, and both replicas follow HEAD when it moves."""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import wait_for
from tests.vllm.conftest import LONG_PREFIX, cases

MAX_TOKENS = 8


def answers(server, prompts: list[str], model: str, parallel: int = 8) -> list[tuple[str, str]]:
    """(text, system_fingerprint) per prompt, greedy, all sent at once (continuous batching does the rest)."""
    client = server.client()

    def one(prompt):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        return r.choices[0].text, r.system_fingerprint

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(one, prompts))


def kbsync_answers(daemon, prompts: list[str]) -> list[tuple[str, str]]:
    return answers(daemon, prompts, model=daemon.client().models.list().data[0].id, parallel=1)


def edited_and_locality_prompts() -> list[str]:
    cs = cases()
    return [c["prompt"] for c in cs] + [c["locality_prompt"] for c in cs]


def head(daemon) -> int:
    return httpx.get(f"{daemon.url}/v1/admin/status", timeout=30).json()["head"]


def test_the_plugin_answers_as_kbsync_on_edited_facts_and_locality_prompts(daemon, replicas):
    prompts = edited_and_locality_prompts()
    expected = kbsync_answers(daemon, prompts)
    v = head(daemon)
    assert {fp for _, fp in expected} == {f"v{v}"}
    for replica in replicas:
        got = answers(replica, prompts, model="smollm2")
        assert {fp for _, fp in got} == {f"kbsync-v{v}"}
        mismatches = [(p, e, g) for p, (e, _), (g, _) in zip(prompts, expected, got) if e != g]
        assert mismatches == [], f"{replica.name}: {len(mismatches)} of {len(prompts)} answers differ"
    # the edits are live: most edited prompts now continue with their new target
    n = len(cases())
    hits = sum(g.strip().startswith(c["target_new"].split()[0]) for (g, _), c in zip(expected[:n], cases()))
    assert hits >= 0.7 * n


def _prefix_hits(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return sum(float(m) for m in re.findall(r'^vllm:prefix_cache_hits(?:_total)?(?:\{[^}]*\})? ([0-9.e+]+)$', text, re.M))


def test_chunked_prefill_and_prefix_caching_keep_the_answers(daemon, replicas):
    """Prompts of ~60 tokens are prefilled in 32-token chunks; the second round reuses the cached prefix."""
    prompts = [LONG_PREFIX + p for p in edited_and_locality_prompts()[::4]]
    expected = kbsync_answers(daemon, prompts)
    replica = replicas[0]
    before = _prefix_hits(replica)
    first = answers(replica, prompts, model="smollm2")
    second = answers(replica, prompts, model="smollm2")
    assert _prefix_hits(replica) > before                         # the cache was used
    assert [t for t, _ in first] == [t for t, _ in expected]
    assert [t for t, _ in second] == [t for t, _ in expected]


def _label(replica) -> str:
    """The version a replica answers at now (one token, so the poll is quick)."""
    r = replica.client().completions.create(model="smollm2", prompt="Hello", max_tokens=1, temperature=0)
    return r.system_fingerprint


def _rollback(daemon, version) -> None:
    r = httpx.post(f"{daemon.url}/v1/admin/rollback", json={"version": version, "reason": "vLLM replica test"},
                   timeout=300)
    assert r.status_code == 200, r.text


def test_a_head_move_reaches_both_replicas(daemon, replicas, record_property):
    edited = cases()[:4]
    prompts = [c["prompt"] for c in edited]
    at_head = head(daemon)
    edited_answers = [t for t, _ in kbsync_answers(daemon, prompts)]

    for target, label in ((None, "kbsync-base"), (at_head, f"kbsync-v{at_head}")):
        t0 = time.monotonic()
        _rollback(daemon, target)
        for replica in replicas:
            wait_for(lambda: _label(replica) == label, timeout=120, what=f"{replica.name} at {label}", step=0.05)
        seconds = time.monotonic() - t0
        record_property(f"head_move_to_{label}_seconds", seconds)
        print(f"\nHEAD move to {label}: both replicas answer at it {seconds:.2f} s after the rollback request")
        expected = [t for t, _ in kbsync_answers(daemon, prompts)]
        assert (expected == edited_answers) == (target is not None)
        for replica in replicas:
            assert answers(replica, prompts, model="smollm2") == [(t, label) for t in expected]
