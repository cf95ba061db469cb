"""`kbsync export`: a PEFT adapter and a merged directory that serve a version's edit without the gate.

A tiny random Llama, real COMEBA-HK steps, the real peft and transformers loaders; both exports must give
kbsync's own no-hook logits (the delta on every token) to float32 rounding.
"""
from __future__ import annotations

import json

import pytest
import torch

from daemon.config import load_config
from daemon.service import Service
from editor.export import low_rank
from editor.hook import Mode
from tests.daemon.conftest import kbsync

PROMPTS = ["Paris is the capital of", "The Eiffel Tower is in", "Rome is the capital of", "apples and pears"]


@pytest.fixture
def edited(project):
    """A project with two committed versions (three facts); yields (service, head id)."""
    svc = Service(load_config(project / "app.toml", project / "state"), progress=False)
    svc.store.add("Paris", "{} is the capital of", "Italy")
    svc.store.add("Rome", "{} is the capital of", "France")
    svc.sync()
    svc.store.add("Eiffel Tower", "The {} is in", "Berlin")
    svc.sync()
    head = svc.ledger.head().id
    try:
        yield svc, head
    finally:
        svc.close()


def _no_hook_logits(svc: Service) -> torch.Tensor:
    em, _ = svc.model_at_head()
    with torch.no_grad(), em.mode(Mode.TEMPORARY):
        return em.next_token_logits(PROMPTS)


def _logits(model, tok) -> torch.Tensor:
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**enc).logits                                  # (B, T, V)
    last = enc["attention_mask"].sum(1) - 1 if tok.padding_side == "right" else torch.full((len(PROMPTS),), -1)
    return out[torch.arange(len(PROMPTS)), last]


def test_peft_and_merged_exports_give_the_no_hook_logits(edited, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    svc, head = edited
    expected = _no_hook_logits(svc)
    em, _ = svc.model_at_head()
    with torch.no_grad(), em.mode(Mode.OFF):
        base = em.next_token_logits(PROMPTS)
    assert (expected - base).abs().max() > 1e-3                    # the edit changes these logits at all

    peft_doc = svc.export(head, "peft", tmp_path / "peft")
    merged_doc = svc.export(head, "merged", tmp_path / "merged")
    digest = svc.ledger.chain_digest(head)
    for doc in (peft_doc, merged_doc):
        assert doc["kbsync_version"] == head and doc["ledger_digest"] == digest and "no-hook" in doc["gate"]
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["kbsync"]["ledger_digest"] == digest
    assert peft_doc["relative_error"] == {"1": 0.0, "2": 0.0}

    source = svc.cfg.model.source
    tok = AutoTokenizer.from_pretrained(source)
    tok.pad_token = tok.pad_token or tok.eos_token
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32),
                                     tmp_path / "peft").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    for model in (lora, merged):
        assert (_logits(model, tok) - expected).abs().max() <= 1e-3

    # the live model still serves HEAD with its gate: an export never touches the hooks
    assert svc.served == head and em.hooks[1].rank == 3


def test_export_cli_names_its_output_and_refuses_a_bad_version(project):
    facts = project / "facts.jsonl"
    facts.write_text('{"subject": "Paris", "prompt": "{} is the capital of", "target": "Italy"}\n')
    kbsync(project, "facts", "import", str(facts))
    kbsync(project, "sync")
    doc = json.loads(kbsync(project, "export", "head", "--format", "peft", "--json").stdout)
    out = project / "state" / "exports" / f"v{doc['kbsync_version']}-peft"
    assert doc["out"] == str(out) and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 1
    bad = kbsync(project, "export", "99", "--format", "merged", check=False)
    assert bad.returncode != 0 and "99" in bad.stderr and "kbsync log" in bad.stderr


def test_above_the_largest_lora_rank_the_svd_error_is_written_down():
    torch.manual_seed(0)
    U, V = torch.randn(48, 40), torch.randn(96, 40)              # rank 40: exact at 40, lossy at 30
    B, A, err = low_rank(U, V, 40)
    assert err == 0.0 and torch.equal(B, U)
    B, A, err = low_rank(U, V, 30)
    D = U @ V.T
    actual = float(torch.linalg.norm(D - B @ A) / torch.linalg.norm(D))
    assert B.shape == (48, 30) and A.shape == (30, 96)
    assert 0 < err and abs(err - actual) < 1e-4
    # a rank above min(d_in, d_out) compresses exactly to it
    U, V = torch.randn(8, 20), torch.randn(12, 20)
    B, A, err = low_rank(U, V, 10)
    assert err < 1e-6 and torch.allclose(B @ A, U @ V.T, atol=1e-4)
