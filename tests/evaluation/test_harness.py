"""The benchmark's pieces (evaluation/ and editor/metrics.py) on tiny random models: dataset loading, metric definitions, methods, reports."""
import json

import pytest
import torch

from editor.config import EditConfig, StatsConfig
from editor.errors import EditorError
from editor.hook import Mode
from editor.metrics import Case, case_probes, perplexity, probe_metrics, score_probes
from editor.model import EditableModel
from editor.stats import key_stats
from editor.step import apply_delta, compute_delta
from evaluation.cases import first_contesting, load_cases
from evaluation.harness import _uncontested, evaluate
from evaluation.methods import METHODS, method
from tests.conftest import DATA

CASES = [
    Case(0, "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "English", "French",
         "Danielle Darrieux's mother tongue is", "The official language of Brazil is", "Portuguese"),
    Case(1, "Paris", "Paris is the capital of", "Italy", "France",
         "The city of Paris is the capital of", "Rome is the capital of", "Italy"),
    Case(2, "Apple A5", "Apple A5 was created by", "Microsoft", "Apple",
         "Apple A5 was developed by", "Windows was developed by", "Microsoft"),
    Case(3, "Toko Yasuda", "Toko Yasuda plays the", "piano", "guitar",
         "Toko Yasuda played the", "Miles Davis played the", "trumpet"),
]


@pytest.fixture
def setup(make_tiny, tiny_tokenizer, corpus_file, tmp_path):
    cfg = EditConfig(layers=(1, 2), v_steps=4, contexts=("{}", "In short, {}"),
                     stats=StatsConfig(corpus=str(corpus_file), n_tokens=500, seq_len=32))
    em = EditableModel(make_tiny("llama"), tiny_tokenizer, cfg.layers)
    stats = key_stats(em, cfg.stats, tmp_path / "stats", progress=False)
    return em, cfg, stats


def test_loads_both_shared_formats_and_names_bad_input(tmp_path):
    cf = load_cases("counterfact", DATA / "counterfact-edit.json", (5000, 5003))
    raw = json.loads((DATA / "counterfact-edit.json").read_text())[5000]
    assert len(cf) == 3 and cf[0].prompt == raw["prompt"] and cf[0].target_true == raw["ground_truth"]
    assert cf[0].loc_answer == raw["locality_ground_truth"] and cf[0].request.target == raw["target_new"]
    zs = load_cases("zsre", DATA / "zsre-train-1k.json", (0, 2))
    assert zs[0].target_new == "unmanned aircraft" and not zs[0].loc_prompt.startswith("nq question:")
    with pytest.raises(EditorError, match="outside the 1000 records"):
        load_cases("zsre", DATA / "zsre-train-1k.json", (990, 1010))
    with pytest.raises(EditorError, match="case 0 of .* field 'prompt' is missing.*is it a counterfact file"):
        load_cases("counterfact", DATA / "zsre-train-1k.json", (0, 1))
    with pytest.raises(EditorError, match="case 534 of .* field 'alt' is empty; choose a range without it"):     # kb's own validation
        load_cases("zsre", DATA / "zsre-train-1k.json", (530, 540))
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(EditorError, match="is not JSON"):
        load_cases("counterfact", tmp_path / "x.json", (0, 1))


def test_metrics_follow_their_definitions(setup):
    em, _, _ = setup
    tok = em.tokenizer
    # a case whose "new" target is the model's own greedy continuation: reliability 1 by definition
    prompt = "The mother tongue of Danielle Darrieux is"
    greedy = tok.decode(em.model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=1, do_sample=False,
                                          pad_token_id=0)[0, -1:])
    case = Case(0, "Danielle Darrieux", prompt, greedy, "French", prompt, "Rome is the capital of", "Italy")
    with em.mode(Mode.OFF):
        scores = score_probes(em, case_probes([case]))
    base_loc = [scores[4][1]]
    m = probe_metrics(scores, base_loc)
    assert m["locality"] == 1.0                      # the unedited model against itself
    ids = tok(" " + greedy.strip(), add_special_tokens=False)["input_ids"]
    if len(ids) == 1 and tok.decode(ids) == greedy:
        assert m["reliability"] == 1.0 and m["generality"] == 1.0
    nll_new, nll_true = scores[0][0], scores[1][0]
    assert m["efficacy"] == float(nll_new < nll_true)
    # a changed locality prediction counts as not local
    flipped = [(scores[4][1] + 1) % len(tok)]
    assert probe_metrics(scores, flipped)["locality"] == 0.0


def test_memit_forgets_earlier_keys_comeba_hk_keeps_them(setup):
    em, cfg, stats = setup
    assert set(METHODS) == {"comeba-hk", "no-hook", "memit", "comeba-hk-fresh", "comeba-hk-window"}
    assert method("comeba-hk").mode is Mode.VALIDATED and method("memit").mode is Mode.TEMPORARY
    assert method("comeba-hk-fresh").mode is Mode.VALIDATED
    with pytest.raises(EditorError, match="unknown editing method 'rome'; choose one of comeba-hk, no-hook, memit, "
                                          "comeba-hk-fresh, comeba-hk-window"):
        method("rome")
    apply_delta(em, compute_delta(em, [CASES[0].request], stats, cfg))
    second = [CASES[1].request]
    hk = compute_delta(em, second, stats, cfg, **method("comeba-hk").step_options())
    memit = compute_delta(em, second, stats, cfg, **method("memit").step_options())
    fresh = compute_delta(em, second, stats, cfg, **method("comeba-hk-fresh").step_options())
    # MEMIT and the fresh solve use C = λ E[k kᵀ] only: V satisfies (C + K Kᵀ) V = K without the earlier keys
    for ld in memit.layers + fresh.layers:
        C = cfg.mom2_weight * stats.for_layer(ld.layer).double()
        K, V = ld.K.double(), ld.V.double()
        assert torch.allclose((C + K @ K.T) @ V, K, atol=1e-6)
    kk = {l: h.KK for l, h in em.hooks.items()}
    for ld in hk.layers:
        C = cfg.mom2_weight * stats.for_layer(ld.layer).double() + kk[ld.layer]
        K, V = ld.K.double(), ld.V.double()
        assert torch.allclose((C + K @ K.T) @ V, K, atol=1e-6)
    # a window of one step counts the latest step's keys and not the one before it
    apply_delta(em, hk)
    third = [CASES[2].request]
    window = compute_delta(em, third, stats, cfg, key_steps=1)
    for ld in window.layers:
        last = em.hooks[ld.layer].K[-1].double()
        C = cfg.mom2_weight * stats.for_layer(ld.layer).double() + last @ last.T
        K, V = ld.K.double(), ld.V.double()
        assert torch.allclose((C + K @ K.T) @ V, K, atol=1e-6)
        every = cfg.mom2_weight * stats.for_layer(ld.layer).double() + em.hooks[ld.layer].KK + K @ K.T
        V_every = torch.linalg.solve(every, K)                  # what the paper's solve over both steps gives
        assert (V - V_every).norm() > 1e-5 * V.norm()            # far above float32 rounding (~1e-7)
    assert method("comeba-hk-window").step_options()["key_steps"] == 50
    with pytest.raises(EditorError, match="key_steps must be 0"):
        compute_delta(em, third, stats, cfg, key_steps=-1)


def test_report_has_the_contract_keys_and_resets_the_model(setup, corpus_file):
    em, cfg, stats = setup
    texts = [corpus_file.read_text()[:400]]
    ppl0 = perplexity(em, texts)
    seen = []
    report = evaluate(em, CASES, stats, cfg, methods=("comeba-hk", "no-hook", "memit"), steps=2, batch=2,
                      eval_every=1, heldout=texts, speed_at=(0,), progress=lambda *a: seen.append(a[:3]))
    assert report["edits"] == 4 and report["seconds"] > 0 and report["method"] == "comeba-hk"
    assert set(report["final"]) == {"efficacy", "paraphrase_efficacy", "specificity", "reliability",
                                    "generality", "locality", "locality_uncontested", "gen_success",
                                    "gen_paraphrase", "gen_locality"}
    # no edit of CASES contests another case's locality probe: both readings agree
    assert report["final"]["locality_uncontested"] == report["final"]["locality"]
    assert all(0.0 <= v <= 1.0 for v in report["final"].values())
    assert report["base"]["final"]["gen_locality"] == 1.0          # the unedited model agrees with itself
    assert report["methods"]["comeba-hk"]["gate"] == cfg.gate
    assert report["base"]["perplexity"] == pytest.approx(ppl0)
    for name, run in report["methods"].items():
        assert [h["edits"] for h in run["history"]] == [2, 4]
        assert run["speed"]["edits_per_s"] > 0 and run["speed"]["split_s"]["targets_s"] > 0
        assert run["speed"]["inference"]["0"]["ratio"] > 0
    assert seen == [(m, s, 2) for m in ("comeba-hk", "no-hook", "memit") for s in (1, 2)]
    # every method starts from the base model and the model is left unedited
    assert all(h.rank == 0 for h in em.hooks.values())
    assert perplexity(em, texts) == pytest.approx(ppl0)
    with pytest.raises(EditorError, match="need 10 cases"):
        evaluate(em, CASES, stats, cfg, steps=5, batch=2)


def test_a_locality_probe_that_asks_an_edited_fact_is_contested_from_that_edit_on():
    def case(subject, prompt, new, true, loc_prompt, loc_answer):
        return Case(0, subject, prompt, new, true, prompt, loc_prompt, loc_answer)

    edits = [case("Keith Olbermann", "Keith Olbermann, who works for", "BBC", "ESPN", "Paris is in", "France"),
             case("Guyana", "The official language of Guyana is", "French", "English", "Rome is in", "Italy"),
             case("UK", "The official language of the UK is", "German", "English", "Oslo is in", "Norway")]
    scored = [case("A", "a", "x", "y", "Keith Olbermann, who is employed by", " ESPN"),   # edit 0's very fact
              case("B", "b", "x", "y", "Keith Olbermann was born in", "New York"),       # its subject, another fact
              case("C", "c", "x", "y", "In Guyana, they understand", "English"),          # edit 1's fact
              case("D", "d", "x", "y", "In the UK they speak", "English")]                # a subject too short to match
    assert first_contesting(scored, edits) == [0, None, 1, None]
    # locality without the contested probes, counted once their edit is made
    assert _uncontested([1.0, 0.5, 0.0], [None, 5, 1], done=3) == 0.75
    assert _uncontested([1.0, 0.5, 0.0], [None, 5, 1], done=1) == 0.5
    assert _uncontested([0.0], [0], done=1) == 1.0


def test_the_gate_comes_from_the_config_of_the_run(setup):
    em, cfg, stats = setup
    report = evaluate(em, CASES, stats, cfg.replace(gate="token"), steps=1, batch=2)
    run = report["methods"]["comeba-hk"]
    assert run["gate"] == "token" and all(0.4 <= a <= 0.6 for a in run["alpha"].values())   # token α, in [min, α0]
    assert report["config"]["gate"] == "token"


def test_a_method_can_name_another_gate_and_runs_beside_the_configured_one(setup):
    em, cfg, stats = setup
    assert cfg.gate == "prefix"
    report = evaluate(em, CASES, stats, cfg, methods=("comeba-hk", "comeba-hk@cascade", "comeba-hk@zscore"),
                      steps=1, batch=2)
    gates = {m: run["gate"] for m, run in report["methods"].items()}
    assert gates == {"comeba-hk": "prefix", "comeba-hk@cascade": "cascade", "comeba-hk@zscore": "zscore"}
    assert report["methods"]["comeba-hk@zscore"]["alpha"]["1"] > 1.0          # a z-score α (α0 2.2)
    assert report["methods"]["comeba-hk"]["alpha"]["2"] == cfg.confirm_alpha   # the cascade confirms at its α
    with pytest.raises(EditorError, match="comeba-hk@GATE with GATE one of zscore, token, cascade, prefix"):
        method("memit@token")
    with pytest.raises(EditorError, match="unknown editing method 'comeba-hk@nope'"):
        method("comeba-hk@nope")


def test_a_checkpointed_run_stopped_midway_goes_on_to_the_same_report(setup, tmp_path):
    em, cfg, stats = setup
    kw = dict(steps=2, batch=2, eval_every=1, heldout=["Some held-out text about a city and its river. " * 4],
              gen_every=2)
    whole = evaluate(em, CASES, stats, cfg, **kw)

    class Stop(Exception):
        pass

    def stop_after_first_step(method, s, total, last):
        if s == 1:
            raise Stop

    with pytest.raises(Stop):
        evaluate(em, CASES, stats, cfg, checkpoint=tmp_path / "ck", progress=stop_after_first_step, **kw)
    assert (tmp_path / "ck" / "comeba-hk" / "step-00001.safetensors").exists()
    assert not (tmp_path / "ck" / "comeba-hk" / "step-00002.safetensors").exists()
    steps_seen = []
    resumed = evaluate(em, CASES, stats, cfg, checkpoint=tmp_path / "ck",
                       progress=lambda m, s, total, last: steps_seen.append(s), **kw)
    assert steps_seen == [2]                                    # only the second step was edited again
    a, b = whole["methods"]["comeba-hk"], resumed["methods"]["comeba-hk"]
    untimed = lambda history: [{k: v for k, v in r.items() if k != "edit_seconds"} for r in history]   # noqa: E731
    assert untimed(a["history"]) == untimed(b["history"])
    assert a["perplexity"] == b["perplexity"] and a["alpha"] == b["alpha"]
    assert [r["step"] for r in b["history"]] == [1, 2] and "gen_success" in b["history"][0]
    assert whole["base"] == resumed["base"]
    with pytest.raises(EditorError, match="belongs to another run .*batch.*new --checkpoint folder"):
        evaluate(em, CASES, stats, cfg, checkpoint=tmp_path / "ck", **{**kw, "steps": 1, "batch": 4})


def test_score_every_scores_every_kth_edit_only(setup):
    em, cfg, stats = setup
    sampled = evaluate(em, CASES, stats, cfg, steps=1, batch=4, score_every=2)
    alone = evaluate(em, CASES[::2], stats, cfg, steps=1, batch=2)
    keys = ("efficacy", "paraphrase_efficacy", "specificity", "reliability", "generality")
    assert {k: sampled["base"]["final"][k] for k in keys} == {k: alone["base"]["final"][k] for k in keys}
    assert sampled["methods"]["comeba-hk"]["history"][-1]["edits"] == 4
