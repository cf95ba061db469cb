"""The CLI end to end on a tiny model saved to disk (real files, real subprocess, no mocks)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import ROOT

from .conftest import kbsync


def test_stats_build_then_cached_for_every_state_directory(project):
    first = json.loads(kbsync(project, "stats", "build", "--json").stdout)
    assert first["tokens"] == 300 and first["layers"] == [1, 2]
    files = list((project / "cache" / "stats").glob("keystats-*.safetensors"))
    assert len(files) == 1 and not (project / "state" / "stats").exists()
    mtime = files[0].stat().st_mtime_ns
    assert json.loads(kbsync(project, "stats", "build", "--json").stdout) == first
    other = {**os.environ, "KBSYNC_STATE_DIR": str(project / "other-state")}     # a second state directory
    proc = subprocess.run([sys.executable, "-m", "daemon", "--config", str(project / "app.toml"), "stats", "build",
                           "--json"], cwd=ROOT, env=other, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and json.loads(proc.stdout) == first
    assert files[0].stat().st_mtime_ns == mtime                 # read from the shared cache, not rewritten


def test_statistics_in_a_state_directory_from_before_the_shared_cache_are_reused(project):
    kbsync(project, "stats", "build", "--json")
    (built,) = (project / "cache" / "stats").glob("keystats-*.safetensors")
    (project / "state" / "stats").mkdir(parents=True)
    legacy = project / "state" / "stats" / built.name
    built.rename(legacy)                                       # where the statistics lived until now
    tensors = load_file(legacy)
    tensors["n_tokens"] = torch.tensor(12345)                  # marked, so a re-measurement would show
    save_file(tensors, legacy, metadata={"format": "kbsync-keystats-1"})
    assert json.loads(kbsync(project, "stats", "build", "--json").stdout)["tokens"] == 12345
    assert built.read_bytes() == legacy.read_bytes()          # copied into the shared cache


def test_facts_sync_log_rollback_query(project):
    facts = project / "facts.jsonl"
    facts.write_text('{"subject": "Paris", "prompt": "{} is the capital of", "target": "Italy"}\n'
                     '{"subject": "Apple A5", "prompt": "Apple A5 was created by", "target": "Microsoft"}\n')
    kbsync(project, "facts", "import", str(facts))
    status = json.loads(kbsync(project, "status", "--json").stdout)
    assert status["head"] is None and status["pending"] == 2 and status["model"]
    assert status["precision"] is None and status["daemon"] is None          # the store alone: no torch
    assert "chosen when the model loads (`kbsync status --precision`" in kbsync(project, "status").stdout
    probed = json.loads(kbsync(project, "status", "--json", "--precision").stdout)
    import torch.backends.cpu
    assert probed["precision"]["hardware"].startswith(torch.backends.cpu.get_cpu_capability())   # the choice, and why
    from editor.precision import cpu_features
    assert probed["score_precision"]["dtype"] == ("bfloat16" if cpu_features().native_bf16 else "float32")
    probes = ("precision", "score_precision")
    assert {k: v for k, v in probed.items() if k not in probes} == {k: v for k, v in status.items() if k not in probes}
    forced = subprocess.run([sys.executable, "-m", "daemon", "--config", str(project / "app.toml"), "status", "--precision"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KBSYNC_STATE_DIR": str(project / "state"), "KBSYNC_OPT_DTYPE": "float32"})
    assert "editing precision: float32 (KBSYNC_OPT_DTYPE=float32" in forced.stdout
    first = json.loads(kbsync(project, "sync", "--json").stdout)
    assert [s["kind"] for s in first["steps"]] == ["edit"] and first["head"] == first["steps"][0]["version"]
    (project / "more.jsonl").write_text('{"subject": "Toko Yasuda", "prompt": "Toko Yasuda plays the", "target": "piano"}\n')
    kbsync(project, "facts", "import", str(project / "more.jsonl"))
    second = json.loads(kbsync(project, "sync", "--json").stdout)
    v1, v2 = first["head"], second["head"]
    log = json.loads(kbsync(project, "log", "--json").stdout)
    assert [(r["id"], r["parent"], r["facts"], r["head"]) for r in log] == [(v1, None, 2, False), (v2, v1, 1, True)]
    assert {"created_at"} <= set(log[0])
    shown = json.loads(kbsync(project, "show", str(v1)).stdout)
    assert sorted(c["subject"] for c in shown["changes"]) == ["Apple A5", "Paris"]
    at_v2 = json.loads(kbsync(project, "query", "Toko Yasuda plays the", "--json").stdout)
    assert at_v2["version"] == v2
    out = json.loads(kbsync(project, "rollback", str(v1), "--json").stdout)
    assert out == {"from": v2, "head": v1}
    assert json.loads(kbsync(project, "query", "Toko Yasuda plays the", "--json").stdout)["version"] == v1
    status = json.loads(kbsync(project, "status", "--json").stdout)
    assert status["head"] == v1 and status["pending"] == 0          # rolled-back facts are not re-queued
    assert json.loads(kbsync(project, "sync", "--json").stdout)["steps"] == []
    kbsync(project, "rollback", str(v2))                               # and forward again
    assert json.loads(kbsync(project, "status", "--json").stdout)["head"] == v2
    kbsync(project, "facts", "rm", "--subject", "Paris", "--prompt", "{} is the capital of")
    kbsync(project, "sync")
    compacted = json.loads(kbsync(project, "compact", "--json").stdout)
    assert compacted["finished"] and compacted["live"] == 2 and len(compacted["versions"]) == 2
    log = json.loads(kbsync(project, "log", "--json").stdout)
    assert [r["id"] for r in log if r["head"]] == [compacted["head"]]
    kbsync(project, "rollback", "base")
    assert json.loads(kbsync(project, "status", "--json").stdout)["head"] is None


def test_failing_verify_gate_commits_nothing_and_marks_facts_failed(project):
    text = (project / "app.toml").read_text().replace("[verify]\nenabled = false", "[verify]\nmin_success = 1.0")
    (project / "app.toml").write_text(text)
    facts = project / "facts.jsonl"
    facts.write_text('{"subject": "Paris", "prompt": "{} is the capital of", "target": "Italy"}\n'
                     '{"subject": "Apple A5", "prompt": "Apple A5 was created by", "target": "Microsoft"}\n')
    kbsync(project, "facts", "import", str(facts))
    out = json.loads(kbsync(project, "sync", "--json").stdout)
    assert out["head"] is None and out["steps"][0]["kind"] == "failed"
    assert "verify gate" in out["steps"][0]["error"]
    status = json.loads(kbsync(project, "status", "--json").stdout)
    assert status["head"] is None and status["failed"] == 2 and status["pending"] == 0
    failed = json.loads(kbsync(project, "facts", "list", "--failed", "--json").stdout)
    assert len(failed) == 2 and all("verify gate" in json.dumps(f) for f in failed)
    assert json.loads(kbsync(project, "log", "--json").stdout) == []


def test_errors_are_clear_with_exit_codes(project, tmp_path):
    proc = kbsync(project, "rollback", "42", check=False)
    assert proc.returncode == 1 and "42" in proc.stderr and "kbsync log" in proc.stderr
    proc = kbsync(project, "rollback", "yesterday", check=False)
    assert proc.returncode == 2 and "not a version id" in proc.stderr
    proc = kbsync(project, "query", check=False)                   # missing argument: usage error
    assert proc.returncode == 2 and "PROMPT" in proc.stderr
    (tmp_path / "broken.toml").write_text("[model\n")
    proc = subprocess.run([sys.executable, "-m", "daemon", "--config", str(tmp_path / "broken.toml"), "stats", "build"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "not valid TOML" in proc.stderr


@pytest.mark.parametrize("args", [[], ["stats"], ["stats", "build"], ["query"], ["status"], ["sync"], ["log"],
                                  ["show"], ["rollback"], ["revert"], ["facts"], ["facts", "add"],
                                  ["facts", "import"], ["facts", "list"], ["facts", "rm"], ["compact"]])
def test_every_command_has_help_with_an_example(args):
    proc = subprocess.run([sys.executable, "-m", "daemon", *args, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "Usage:" in proc.stdout
    if args and args not in (["stats"],):
        assert "Example" in proc.stdout


def test_a_corrupted_head_blob_is_a_clear_error_not_a_crash_loop(project):
    from daemon.config import load_config
    from daemon.service import Service
    from kb import BlobError

    facts = project / "facts.jsonl"
    facts.write_text('{"subject": "Paris", "prompt": "{} is the capital of", "target": "Italy"}\n')
    kbsync(project, "facts", "import", str(facts))
    head = json.loads(kbsync(project, "sync", "--json").stdout)["head"]
    cfg = load_config(project / "app.toml", project / "state")
    svc = Service(cfg, progress=False)
    blob = svc.ledger.blob_path(head)
    blob.write_bytes(blob.read_bytes()[:-7])                      # truncated on disk
    svc.close()

    svc = Service(cfg, progress=False)
    try:
        svc.live                                                   # loading does not raise: no crash loop
        assert f"version {head}" in svc.status()["degraded"]
        with pytest.raises(BlobError, match=f"version {head}.*kbsync rollback"):
            svc.query(["Paris is"], 2)
        svc.rollback(None)                                         # the operator's way out
        assert svc.status()["degraded"] is None
        assert svc.query(["Paris is"], 2)[1] is None
    finally:
        svc.close()
    kbsync(project, "rollback", str(head))                         # HEAD moves; the blob is still bad
    proc = kbsync(project, "query", "Paris is", "--json", check=False)
    assert proc.returncode == 1 and f"version {head}" in proc.stderr


def test_eval_writes_report_and_plot(project, corpus_file):
    records = [{"case_id": i, "subject": s, "prompt": p, "target_new": n, "ground_truth": t, "rephrase_prompt": r,
                "locality_prompt": lp, "locality_ground_truth": la}
               for i, (s, p, n, t, r, lp, la) in enumerate([
                   ("Paris", "Paris is the capital of", "Italy", "France", "The city of Paris is the capital of",
                    "Rome is the capital of", "Italy"),
                   ("Apple A5", "Apple A5 was created by", "Microsoft", "Apple", "Apple A5 was developed by",
                    "Windows was developed by", "Microsoft"),
                   ("Toko Yasuda", "Toko Yasuda plays the", "piano", "guitar", "Toko Yasuda played the",
                    "Miles Davis played the", "trumpet")])]
    data = project / "cf.json"
    data.write_text(json.dumps(records))
    out = kbsync(project, "eval", "--data", str(data), "--cases", "0:3", "--steps", "3", "--batch", "1",
                 "--eval-every", "1", "--method", "comeba-hk,memit", "--heldout", str(corpus_file),
                 "--json", str(project / "r.json"), "--plot", str(project / "r.png"), "--no-progress")
    report = json.loads((project / "r.json").read_text())
    assert report["edits"] == 3 and report["seconds"] > 0 and list(report["methods"]) == ["comeba-hk", "memit"]
    assert {"efficacy", "paraphrase_efficacy", "specificity", "reliability", "generality", "locality",
            "locality_uncontested", "gen_success", "gen_paraphrase", "gen_locality"} == set(report["final"])
    assert report["precision"]["dtype"] in ("float32", "bfloat16") and report["precision"]["reason"]
    from editor.precision import cpu_features
    assert report["score_precision"]["dtype"] == ("bfloat16" if cpu_features().native_bf16 else "float32")
    assert [h["edits"] for h in report["methods"]["memit"]["history"]] == [1, 2, 3]
    assert (project / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| comeba-hk |" in out.stdout and "| unedited |" in out.stdout
    bad = kbsync(project, "eval", "--data", str(data), "--method", "rome", check=False)
    assert bad.returncode == 2 and "unknown editing method 'rome'" in bad.stderr
    missing = kbsync(project, "eval", "--data", str(data), "--cases", "0:3", "--steps", "1", "--batch", "1",
                     "--model", str(project / "no-such-model"), "--no-progress", check=False)
    assert missing.returncode == 1 and "no-such-model" in missing.stderr and "does not exist" in missing.stderr
    short = kbsync(project, "eval", "--data", str(data), "--cases", "0:3", "--steps", "2", "--batch", "2",
                   "--no-progress", check=False)
    assert short.returncode == 1 and "need 4 cases" in short.stderr
