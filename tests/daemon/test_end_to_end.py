"""End to end on the real default model: a running `kbsync run`, a dropped fact file, rollback — all by CLI."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.conftest import DATA, ROOT, wait_for
from tests.daemon.conftest import free_port

pytestmark = pytest.mark.model


def cli(env, config, *args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "daemon", "--config", str(config), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout) if "--json" in args else proc.stdout


def test_drop_sync_query_rollback_through_the_daemon(default_model, tmp_path):
    converted = next((ROOT / ".cache/state/models").glob("*/config.json")).parent   # made by default_model
    hparams = (ROOT / "configs/models/smollm2-135m.toml").read_text().split("[editor.stats]")[0]
    (tmp_path / "model.toml").write_text(
        hparams + f"[editor.stats]\ncorpus = '{DATA / 'wikitext2-valid.txt'}'\nn_tokens = 20000\nseq_len = 256\n")
    port = free_port()
    config = tmp_path / "app.toml"
    config.write_text(f"[model]\nsource = '{converted}'\ndevice = 'cpu'\nhparams = '{tmp_path / 'model.toml'}'\n"
                      f"[daemon]\ninterval_s = 5\nport = {port}\ninbox_settle_s = 0.2\nrescan_s = 1.0\n"
                      "[verify]\nmin_success = 0.6\n")
    state = tmp_path / "state"
    env = {**os.environ, "KBSYNC_STATE_DIR": str(state)}
    env.pop("NOTIFY_SOCKET", None)
    facts = [json.loads(line) for line in (ROOT / "examples/facts.jsonl").read_text().splitlines()]
    with open(tmp_path / "daemon.log", "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(config), "run"], cwd=ROOT,
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        dlog = tmp_path / "daemon.log"
        wait_for(lambda: (state / "daemon.json").exists() or None, 900, "the daemon to be ready", process=daemon, log=dlog)
        ask = lambda f: cli(env, config, "query", f["prompt"], "--max-tokens", "4", "--json")  # noqa: E731
        before = [ask(f) for f in facts]
        assert all(a["version"] is None for a in before)

        shutil.copy(ROOT / "examples/facts.jsonl", state / "inbox" / ".facts.jsonl.part")
        os.replace(state / "inbox" / ".facts.jsonl.part", state / "inbox" / "facts.jsonl")
        status = wait_for(lambda: (lambda s: s if s["head"] is not None and s["pending"] == 0 else None)(
            cli(env, config, "status", "--json")), 1200, "the dropped facts to be applied", process=daemon, log=dlog)
        assert status["failed"] == 0 and status["daemon"]
        after = [ask(f) for f in facts]
        assert all(a["version"] == status["head"] for a in after)
        hits = [a["text"].strip().startswith(f["target"]) for a, f in zip(after, facts)]
        assert sum(hits) >= 2, (after, (tmp_path / "daemon.log").read_text()[-2000:])

        assert cli(env, config, "rollback", "base", "--json") == {"from": status["head"], "head": None}
        assert [ask(f) for f in facts] == before                     # the old answers, exactly
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
    assert not (state / "daemon.json").exists()
