"""`kbsync facts ...` through click's runner, on a group that mirrors the real parent (its ``Ctx``)."""
from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
import structlog
from click.testing import CliRunner

from daemon.cli import Ctx
from daemon.cli.facts import facts
from daemon.logs import configure_logging
from kb import FactStore

from .conftest import fact, jsonl


@click.group()
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.pass_context
def root(ctx, state_dir):
    configure_logging("info")            # as the real entry point does: logs to stderr, stdout stays clean
    ctx.obj = Ctx(state_dir, None)


root.add_command(facts)


@pytest.fixture
def kbsync(tmp_path):
    yield from _runner(tmp_path)
    structlog.reset_defaults()


def _runner(tmp_path):
    runner = CliRunner()

    def run(*args, code=0):
        result = runner.invoke(root, ["--state-dir", str(tmp_path / "state"), *args], catch_exceptions=False)
        assert result.exit_code == code, (result.stdout, result.stderr)
        return result
    yield run


def test_every_command_has_help_with_an_example(kbsync):
    for args in (["facts"], ["facts", "add"], ["facts", "import"], ["facts", "list"], ["facts", "rm"],
                 ["facts", "retry"]):
        out = kbsync(*args, "--help").stdout
        assert "Example:" in out and "kbsync facts" in out


def test_add_list_update_rm(kbsync, tmp_path):
    args = ["facts", "add", "--subject", "Danielle Darrieux", "--prompt", "The mother tongue of Danielle Darrieux is",
            "--target", "English", "--paraphrase", "Danielle Darrieux grew up speaking", "--locality",
            "Michel Rocard is a native speaker of => French"]
    added = json.loads(kbsync(*args, "--json").stdout)
    assert added["changed"] and added["fact"]["template"] == "The mother tongue of {} is"
    assert added["fact"]["locality"] == [{"prompt": "Michel Rocard is a native speaker of", "target": "French"}]
    assert "(unchanged)" in kbsync(*args).stdout
    listed = json.loads(kbsync("facts", "list", "--json").stdout)
    assert [(f["subject"], f["target"], f["provenance"]["source"]) for f in listed] == \
        [("Danielle Darrieux", "English", "cli:add")]
    assert "The mother tongue of Danielle Darrieux is -> English" in kbsync("facts", "list").stdout
    removed = json.loads(kbsync("facts", "rm", str(listed[0]["id"]), "--json").stdout)
    assert [c["op"] for c in removed] == ["delete"]
    assert kbsync("facts", "list").stdout.strip() == "(none)"
    pending = json.loads(kbsync("facts", "list", "--pending", "--json").stdout)
    assert [(c["op"], c["target"]) for c in pending] == [("upsert", "English"), ("delete", None)]
    assert pending[1]["provenance"]["source"] == "cli:rm"
    assert (tmp_path / "state" / "kb.sqlite").exists()


def test_import_reports_and_refuses_duplicates(kbsync, tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(jsonl([fact(1), fact(2), fact(3)]))
    doc = json.loads(kbsync("facts", "import", str(path), "--json").stdout)
    assert (doc["records"], doc["facts"], doc["changes"], doc["duplicate"]) == (3, 3, 3, False)
    assert "already imported" in kbsync("facts", "import", str(path)).stdout
    assert "3 records, 3 facts, 0 changes" in kbsync("facts", "import", str(path), "--force").stdout
    assert len(json.loads(kbsync("facts", "list", "--subject", "S2", "--json").stdout)) == 1


def test_import_of_a_bad_file_names_every_record_and_exits_1(kbsync, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(jsonl([fact(1), {"subject": "S2", "prompt": "no subject here", "target": "x"}]) + "{oops\n")
    result = kbsync("facts", "import", str(path), code=1)
    assert "record 2, line 2, field 'prompt': does not contain the subject" in result.stderr
    assert "record 3, line 3: invalid JSON" in result.stderr and "nothing was imported" in result.stderr
    assert result.stdout == ""
    assert "kb.migrated" in result.stderr          # logs go to stderr
    assert json.loads(kbsync("facts", "list", "--json").stdout) == []


def test_import_dialect_and_format_flags(kbsync, tmp_path):
    path = tmp_path / "cf.data"
    path.write_text(json.dumps([{"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is",
                                 "subject": "Danielle Darrieux", "target_new": "English"}]))
    assert kbsync("facts", "import", str(path), "--format", "json", "--dialect", "counterfact").exit_code == 0
    assert json.loads(kbsync("facts", "list", "--json").stdout)[0]["target"] == "English"
    kbsync("facts", "import", str(path), "--dialect", "sideways", code=2)


def test_list_failed_changes_with_reason(kbsync, tmp_path):
    kbsync("facts", "add", "--subject", "S", "--prompt", "S is", "--target", "x")
    with FactStore(tmp_path / "state" / "kb.sqlite") as store:
        store.mark_failed(store.next_batch(5).change_ids, "did not converge")
    failed = kbsync("facts", "list", "--failed")
    assert "S is -> x" in failed.stdout and "[did not converge]" in failed.stdout
    assert json.loads(kbsync("facts", "list", "--pending", "--json").stdout) == []
    (change,) = json.loads(kbsync("facts", "list", "--failed", "--json").stdout)
    assert "not failed" in kbsync("facts", "retry", "999", code=1).stderr
    assert json.loads(kbsync("facts", "retry", str(change["id"]), "--json").stdout) == {"retried": 1}
    assert [c["id"] for c in json.loads(kbsync("facts", "list", "--pending", "--json").stdout)] == [change["id"]]
    assert json.loads(kbsync("facts", "list", "--failed", "--json").stdout) == []


def test_usage_and_input_errors(kbsync, tmp_path):
    kbsync("facts", "list", "--pending", "--failed", code=2)
    kbsync("facts", "rm", code=2)
    kbsync("facts", "rm", "--subject", "S", code=2)
    kbsync("facts", "add", "--subject", "S", code=2)
    kbsync("facts", "import", str(tmp_path / "missing.jsonl"), code=2)
    bad = kbsync("facts", "add", "--subject", "S", "--prompt", "no subject", "--target", "x", code=1)
    assert "field 'prompt': does not contain the subject 'S'" in bad.stderr
    assert "no fact with id 41" in kbsync("facts", "rm", "41", code=1).stderr
    gone = kbsync("facts", "rm", "--subject", "S", "--prompt", "S is", code=1)
    assert "no fact with subject 'S'" in gone.stderr


def test_rm_of_several_is_one_transaction(kbsync):
    kbsync("facts", "add", "--subject", "A", "--prompt", "A is", "--target", "x")
    (a,) = json.loads(kbsync("facts", "list", "--json").stdout)
    kbsync("facts", "rm", str(a["id"]), "999", code=1)          # 999 does not exist: A stays
    assert len(json.loads(kbsync("facts", "list", "--json").stdout)) == 1
