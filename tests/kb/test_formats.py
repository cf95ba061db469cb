"""Every fact-file format and the schema's edge cases, through the real store."""
from __future__ import annotations

import codecs
import json

import pytest

from kb import MAX_FIELD_CHARS, InvalidFactsError, LocalityProbe, parse_fact_file

from .conftest import DATA, fact, jsonl

pytestmark = pytest.mark.filterwarnings("error")


def problems(data: bytes, name: str, **kw) -> list:
    with pytest.raises(InvalidFactsError) as e:
        parse_fact_file(data, name, **kw)
    return [p.to_json() for p in e.value.problems]


# -- formats ---------------------------------------------------------------------------------------------------

def test_json_list_and_facts_object_give_the_same_facts(store, write):
    records = [fact(1, paraphrases=["S1, in short, is"], locality=["Paris is in", {"prompt": "Rome is in",
                                                                              "target": "Italy"}]), fact(2)]
    a = store.import_file(write("a.json", records))
    b = parse_fact_file(json.dumps({"facts": records}).encode(), "b.json")
    assert (a.records, a.facts, a.changes) == (2, 2, 2)
    got = store.get("S1", "The thing about S1 is")
    assert got.template == "The thing about {} is" and got.target == "x"
    assert got.paraphrases == ("S1, in short, is",)
    assert got.locality == (LocalityProbe("Paris is in"), LocalityProbe("Rome is in", "Italy"))
    assert [f.key for f in b.facts] == [("S1", "The thing about {} is"), ("S2", "The thing about {} is")]
    assert b.facts[0].locality == got.locality


def test_jsonl_skips_blank_lines_and_numbers_lines(store, write):
    text = "\n" + json.dumps(fact(1)) + "\n\n  \n" + json.dumps(fact(2)) + "\n"
    assert store.import_file(write("f.jsonl", text)).facts == 2
    bad = problems(("\n" + json.dumps(fact(1)) + "\n{oops\n" + json.dumps({"subject": "S"}) + "\n").encode(),
                   "g.jsonl")
    assert bad[0]["line"] == 3 and bad[0]["record"] == 2 and "invalid JSON" in bad[0]["reason"]
    assert {(p["line"], p["field"]) for p in bad[1:]} == {(4, "prompt"), (4, "target")}


def test_csv_with_list_cells(store, write):
    text = ('subject,prompt,target,paraphrases,locality\n'
            'S1,The thing about S1 is,x,"[""S1 is, briefly,"", ""About S1:""]",Paris is in\n'
            'S2,"The thing, about S2, is",y,,\n')
    assert store.import_file(write("f.csv", text)).facts == 2
    s1 = store.get("S1", "The thing about S1 is")
    assert s1.paraphrases == ("S1 is, briefly,", "About S1:") and s1.locality == (LocalityProbe("Paris is in"),)
    assert store.get("S2", "The thing, about {}, is").paraphrases == ()


def test_csv_problems_name_lines(write):
    text = "subject,prompt,target\nS1,S1 is,x\nS2,S2 is,y,extra\nS3,no subject here,z\n"
    bad = problems(text.encode(), "f.csv")
    assert [(p["record"], p["line"], p["field"]) for p in bad] == [(2, 3, None), (3, 4, "prompt")]
    assert "3 columns" in bad[0]["reason"] and "does not contain the subject" in bad[1]["reason"]
    assert problems(b"subject,,target\nS,S is,x\n", "h.csv")[0]["line"] == 1


def test_yaml_list_and_object_with_line_numbers(store, write):
    text = ("facts:\n"
            "  - subject: S1\n    prompt: The thing about S1 is\n    target: x\n    paraphrases: [About S1]\n"
            "  - subject: S2\n    prompt: The thing about {} is\n    target: 1945\n")
    assert store.import_file(write("f.yaml", text)).facts == 2
    assert store.get("S2", "The thing about {} is").target == "1945"
    bad = problems(b"- subject: S1\n  prompt: S1 is\n  target: yes\n- {subject: S2, prompt: S2 is}\n", "g.yml")
    assert [(p["record"], p["line"], p["field"]) for p in bad] == [(1, 1, "target"), (2, 4, "target")]
    assert "quote it" in bad[0]["reason"]
    syntax = problems(b"- subject: S1\n  prompt: [unclosed\n", "h.yaml")
    assert syntax[0]["line"] is not None and "invalid YAML" in syntax[0]["reason"]


def test_yaml_is_loaded_safely(write):
    bad = problems(b"- !!python/object/apply:os.system ['echo pwned']\n", "evil.yaml")
    assert "invalid YAML" in bad[0]["reason"]


def test_format_by_flag_and_by_sniffing(store, write):
    body = jsonl([fact(1), fact(2)])
    assert store.import_file(write("facts.txt", body)).facts == 2              # sniffed: JSONL
    assert store.import_file(write("facts.dat", json.dumps([fact(3)]))).facts == 1   # sniffed: JSON
    assert store.import_file(write("weird.name", "subject,prompt,target\nS4,S4 is,x\n"), fmt="csv").facts == 1
    assert "cannot tell the format" in problems(b"subject,prompt\n", "facts.txt")[0]["reason"]
    assert ".jsonl" in problems(body.encode(), "wrong.json")[0]["reason"]


# -- dialects ---------------------------------------------------------------------------------------------------

def test_counterfact_records_detected_and_by_flag():
    cases = json.loads((DATA / "counterfact-edit.json").read_text())[:50]
    data = json.dumps(cases).encode()
    parsed = parse_fact_file(data, "cf.json")
    assert parsed.dialect == "counterfact" and len(parsed.facts) == 50
    f = parsed.facts[0]
    assert (f.subject, f.prompt, f.target) == (cases[0]["subject"], cases[0]["prompt"], cases[0]["target_new"])
    assert f.paraphrases == (cases[0]["rephrase_prompt"],)
    assert f.locality == (LocalityProbe(cases[0]["locality_prompt"], cases[0]["locality_ground_truth"]),)
    flagged = parse_fact_file(data, "cf.json", dialect="counterfact").facts
    assert [(f.key, f.target, f.locality) for f in flagged] == [(f.key, f.target, f.locality) for f in parsed.facts]
    assert "unknown field" in problems(data, "cf.json", dialect="native")[0]["reason"]


def test_full_counterfact_file_reports_its_conflicting_cases():
    bad = problems((DATA / "counterfact-edit.json").read_bytes(), "counterfact-edit.json")
    assert len(bad) > 10 and all(p["field"] == "target" and "conflicts with record" in p["reason"] for p in bad)
    cases = json.loads((DATA / "counterfact-edit.json").read_text())
    first = bad[0]
    other = int(first["reason"].split("record ")[1].split(":")[0])
    a, b = cases[first["record"] - 1], cases[other - 1]
    assert a["subject"] == b["subject"] and a["target_new"] != b["target_new"]


def test_zsre_records_detected_with_loc_prefix_dropped():
    cases = json.loads((DATA / "zsre-train-1k.json").read_text())[:40]
    parsed = parse_fact_file(json.dumps(cases).encode(), "zsre.json")
    assert parsed.dialect == "zsre" and len(parsed.facts) == 40
    f, c = parsed.facts[0], cases[0]
    assert (f.subject, f.prompt, f.target) == (c["subject"], c["src"], c["alt"])
    assert f.paraphrases == (c["rephrase"],)
    assert f.locality == (LocalityProbe(c["loc"].removeprefix("nq question: "), c["loc_ans"]),)
    assert not f.locality[0].prompt.startswith("nq question")


def test_full_zsre_file_names_its_two_empty_targets():
    bad = problems((DATA / "zsre-train-1k.json").read_bytes(), "zsre-train-1k.json")
    assert [(p["record"], p["field"], p["reason"]) for p in bad] == [(535, "alt", "is empty"), (724, "alt", "is empty")]


# -- edge cases -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bom,codec", [(codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
                                       (codecs.BOM_UTF16_BE, "utf-16-be")])
@pytest.mark.parametrize("name,text", [
    ("f.jsonl", jsonl([fact("é"), fact("日本")])),
    ("f.json", json.dumps([fact("é"), fact("日本")], ensure_ascii=False)),
    ("f.csv", "subject,prompt,target\nSé,The thing about Sé is,x\nS日本,The thing about S日本 is,x\n"),
    ("f.yaml", "- {subject: Sé, prompt: The thing about Sé is, target: x}\n"
               "- {subject: S日本, prompt: The thing about S日本 is, target: x}\n")])
def test_byte_order_marks(store, write, bom, codec, name, text):
    result = store.import_file(write(name, bom + text.encode(codec)))
    assert result.facts == 2
    assert {f.subject for f in store.facts()} == {"Sé", "S日本"}


@pytest.mark.parametrize("name,text", [
    ("f.jsonl", jsonl([fact(1), fact(2)])),
    ("f.csv", "subject,prompt,target\nS1,The thing about S1 is,x\nS2,\"The thing\nabout S2 is\",x\n"),
    ("f.yaml", "- {subject: S1, prompt: The thing about S1 is, target: x}\n"
               "- {subject: S2, prompt: The thing about S2 is, target: x}\n"),
    ("f.json", json.dumps([fact(1), fact(2)], indent=2))])
def test_crlf_line_endings(store, write, name, text):
    result = store.import_file(write(name, text.replace("\n", "\r\n")))
    assert result.facts == 2
    assert all("\r" not in f.target and "\r" not in f.subject for f in store.facts())
    if name == "f.csv":
        assert store.get("S2", "The thing\r\nabout {} is") is not None     # inside quotes: kept verbatim


def test_unicode_round_trips(store, write):
    subjects = ["Ærøskøbing", "Zoë Saldaña", "北京大学", "Сергей", "مصر", "🦄 Unicorn", "e\u0301cole",
                "\u2028sep"]
    recs = [{"subject": s.strip(), "prompt": f"Where is {s.strip()}? It is in", "target": f"→ {s.strip()} ✓"}
            for s in subjects]
    assert store.import_file(write("u.jsonl", jsonl(recs))).facts == len(subjects)
    for r in recs:
        got = store.get(r["subject"], r["prompt"])
        assert got is not None and got.prompt == r["prompt"] and got.target == r["target"]


def test_very_long_fields(store, write):
    long = "a" * (MAX_FIELD_CHARS - 20)
    ok = {"subject": "S", "prompt": f"S {long}", "target": long, "paraphrases": [long]}
    assert store.import_file(write("long.jsonl", jsonl([ok]))).facts == 1
    assert store.get("S", f"S {long}").target == long
    too_long = {"subject": "T", "prompt": "T is", "target": "b" * (MAX_FIELD_CHARS + 1)}
    bad = problems(jsonl([too_long]).encode(), "t.jsonl")
    assert bad == [{"record": 1, "line": 1, "field": "target",
                    "reason": f"is {MAX_FIELD_CHARS + 1} characters long; the limit is {MAX_FIELD_CHARS}"}]


@pytest.mark.parametrize("name,data", [("e.json", b""), ("e.jsonl", b"\n\n  \r\n"), ("e.csv", b""),
                                       ("e.yaml", b"   "), ("e.json", codecs.BOM_UTF8)])
def test_empty_files_are_rejected(name, data):
    assert problems(data, name) == [{"record": None, "line": None, "field": None,
                                     "reason": "the file is empty: it holds no facts"}]


@pytest.mark.parametrize("name,data", [("z.json", b"[]"), ("z.json", b'{"facts": []}'),
                                       ("z.csv", b"subject,prompt,target\r\n"), ("z.yaml", b"facts: []\n")])
def test_explicitly_empty_lists_import_nothing(store, write, name, data):
    result = store.import_file(write(name, data))
    assert (result.records, result.facts, result.changes) == (0, 0, 0)


def test_templates_and_subject_placement():
    ok = parse_fact_file(jsonl([
        {"subject": "Paris", "prompt": "{} is the capital of", "target": "France"},
        {"subject": "Rome", "prompt": "Rome, Rome is the capital of", "target": "Italy"},
        {"subject": "A {x}", "prompt": "Say A {x} now", "target": "ok"}]).encode(), "t.jsonl").facts
    assert [f.template for f in ok] == ["{} is the capital of", "{}, Rome is the capital of", "Say {} now"]
    assert ok[1].prompt == "Rome, Rome is the capital of"
    bad = problems(jsonl([{"subject": "Paris", "prompt": "{} and {}", "target": "x"},
                          {"subject": "Paris", "prompt": "paris is", "target": "x"}]).encode(), "t.jsonl")
    assert [(p["record"], p["field"]) for p in bad] == [(1, "prompt"), (2, "prompt")]


def test_every_bad_record_is_named():
    records = [fact(1), {"subject": 3, "prompt": "3 is", "target": True}, "just text", fact(4, target=""),
               {**fact(5), "colour": "red"}, fact(6, paraphrases=[1.5, {"a": 1}]),
               fact(7, locality=[{"prompt": "p", "x": 1}]),
               {"subject": "S8\x00", "prompt": "S8\x00 is", "target": "x"}, fact(9, target=["a"])]
    bad = problems(json.dumps(records).encode(), "bad.json")
    named = {(p["record"], p["field"]) for p in bad}
    assert named == {(2, "target"), (3, None), (4, "target"), (5, "colour"), (6, "paraphrases[0]"),
                     (6, "paraphrases[1]"), (7, "locality[0]"), (8, "subject"), (8, "prompt"), (9, "target")}
    assert all(p["reason"] for p in bad)


def test_conflicts_inside_one_file_but_repeats_are_fine():
    same = parse_fact_file(jsonl([fact(1, paraphrases=["a"]), fact(2), fact(1, paraphrases=["b"])]).encode(),
                           "r.jsonl")
    assert len(same.facts) == 2 and same.facts[0].paraphrases == ("b",)
    bad = problems(jsonl([fact(1, "x"), fact(2), fact(1, "y")]).encode(), "c.jsonl")
    assert bad == [{"record": 3, "line": 3, "field": "target", "reason":
                    "conflicts with record 1: target 'y' here but 'x' there, for the same subject and prompt"}]


def test_undecodable_and_non_list_files():
    assert "not valid UTF-8" in problems(b'[{"subject": "\xff"}]', "x.json")[0]["reason"]
    assert "top level must be a list" in problems(b'{"subject": "S"}', "x.json")[0]["reason"]
    assert "top level must be a list" in problems(b"just a string\n", "x.yaml")[0]["reason"]
    assert "nested too deeply" in problems(b"[" * 100_000, "x.json")[0]["reason"]
