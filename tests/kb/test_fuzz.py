"""Hypothesis fuzzing of fact-file contents: nothing crashes, bad files are quarantined with a report, no
partial import ever happens, and the good files around a bad one are unaffected."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kb import DropFolder, FactStore, InvalidFactsError, parse_fact_file

from .conftest import fact, jsonl

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

texts = st.text(st.characters(codec="utf-8"), max_size=40)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                      max_leaves=8)
field_names = st.sampled_from(["subject", "prompt", "target", "paraphrases", "locality", "target_new", "src", "alt",
                               "rephrase_prompt", "loc", "loc_ans", "junk"])


@st.composite
def records(draw):
    """Mostly plausible facts, with wrong types, missing fields, odd unicode and stray keys mixed in."""
    subject = draw(texts.filter(lambda s: s.strip()) | st.just("Paris"))
    rec = {"subject": subject, "prompt": draw(st.sampled_from([f"{subject} is in", "{} is in", "no subject"])),
           "target": draw(texts | st.just("France"))}
    for key, value in draw(st.dictionaries(field_names, values, max_size=2)).items():
        rec[key] = value
    for key in draw(st.lists(st.sampled_from(["subject", "prompt", "target"]), max_size=1)):
        rec.pop(key, None)
    return rec


@st.composite
def fact_files(draw):
    """(name, bytes): structured files in every format, mutated ones, and raw noise."""
    kind = draw(st.sampled_from(["jsonl", "json", "csv", "yaml", "mutated", "noise"]))
    recs = draw(st.lists(records(), max_size=5))
    if kind == "jsonl":
        return "f.jsonl", jsonl(recs).encode()
    if kind == "json":
        return "f.json", json.dumps(recs, ensure_ascii=False).encode()
    if kind == "csv":
        rows = ["subject,prompt,target"] + [",".join(json.dumps(str(r.get(k, ""))) for k in
                                                     ("subject", "prompt", "target")) for r in recs]
        return "f.csv", "\r\n".join(rows).encode()
    if kind == "yaml":
        return "f.yaml", "".join(f"- {json.dumps(r, ensure_ascii=False)}\n" for r in recs).encode()
    if kind == "mutated":
        data = bytearray(jsonl([fact(i) for i in range(4)]).encode())
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(data) - 1))
            op = draw(st.sampled_from(["flip", "cut", "insert"]))
            if op == "flip":
                data[pos] ^= draw(st.integers(1, 255))
            elif op == "cut":
                del data[pos:]
                if not data:
                    break
            else:
                data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        return draw(st.sampled_from(["f.jsonl", "f.json", "f.txt"])), bytes(data)
    return draw(st.sampled_from(["f.jsonl", "f.json", "f.csv", "f.yaml", "f"])), draw(st.binary(max_size=200))


@FUZZ
@given(fact_files(), st.sampled_from([None, "native", "counterfact", "zsre"]))
def test_parsing_never_crashes(file, dialect):
    name, data = file
    try:
        parsed = parse_fact_file(data, name, dialect=dialect)
    except InvalidFactsError as e:
        assert e.problems and all(p.reason for p in e.problems)
    else:
        assert all(f.subject and f.target and f.template.count("{}") == 1 for f in parsed.facts)


@FUZZ
@given(fact_files())
def test_drop_folder_quarantines_bad_files_and_keeps_good_ones(file):
    name, data = file
    with tempfile.TemporaryDirectory() as tmp:
        inbox = Path(tmp) / "inbox"
        inbox.mkdir()
        before, after = jsonl([fact("before-1"), fact("before-2")]), jsonl([fact("after-1")])
        (inbox / "a-before.jsonl").write_text(before)
        (inbox / f"m-{name}").write_bytes(data)
        (inbox / "z-after.jsonl").write_text(after)
        with FactStore(Path(tmp) / "kb.sqlite") as store:
            outcomes = {o.name: o for o in DropFolder(store, inbox, settle_s=0).scan_once()}
            good = {"Sbefore-1", "Sbefore-2", "Safter-1"}
            assert outcomes["a-before.jsonl"].status == outcomes["z-after.jsonl"].status == "processed"
            fuzzed = outcomes[f"m-{name}"]
            event(f"fuzzed file {fuzzed.status}")
            subjects = {f.subject for f in store.facts()}
            pending = store.counts().pending
            if fuzzed.status == "rejected":
                report = json.loads((inbox / "rejected" / f"m-{name}.error.json").read_text())
                assert report["errors"] and report["problems"] == len(fuzzed.problems)
                assert (inbox / "rejected" / f"m-{name}").read_bytes() == data
                assert subjects == good and pending == 3            # nothing of it imported
            else:
                expected = parse_fact_file(data, f"m-{name}")
                assert fuzzed.status in ("processed", "duplicate")
                assert subjects >= good and pending <= 3 + len(expected.facts)
                for f in expected.facts:                            # all of it imported
                    got = store.get(f.subject, f.template)
                    assert got is not None and got.target == f.target
            assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == []
